"""The deployment CA: files, modes, extensions, chains, identities, and a real mTLS handshake."""

from __future__ import annotations

import ipaddress
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem import certs
from tandem.certs import Identity


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    certs.init_deployment(d, ["edge-1", "edge-2"], hosts=["cloud.example.com", "10.0.0.7", "::1"])
    return d


def test_files_and_modes(deployment: Path) -> None:
    pairs = [("ca.pem", "ca.key"), ("cloud.pem", "cloud.key"), ("admin.pem", "admin.key")]
    pairs += [(f"agents/{n}.pem", f"agents/{n}.key") for n in ("edge-1", "edge-2")]
    for cert_name, key_name in pairs:
        assert _mode(deployment / cert_name) == 0o644, cert_name
        assert _mode(deployment / key_name) == 0o600, key_name
        key = serialization.load_pem_private_key((deployment / key_name).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key.curve, ec.SECP256R1)
        assert (deployment / key_name).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert certs.agent_paths(deployment, "edge-1") == (
        deployment / "agents" / "edge-1.pem",
        deployment / "agents" / "edge-1.key",
    )


def test_server_sans_and_usages(deployment: Path) -> None:
    cloud = _cert(deployment / "cloud.pem")
    san = cloud.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "cloud.example.com"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    }
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["tandem://server/cloud"]
    assert cloud.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "tandem-cloud"
    eku = cloud.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]

    admin = _cert(deployment / "admin.pem").extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(admin) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # Agents are clients of the cloud and serve Inference to local applications.
    agent = _cert(deployment / "agents/edge-1.pem")
    eku = agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    san = agent.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["tandem://agent/edge-1"]


def test_client_certificates_for_local_applications(deployment: Path) -> None:
    cert_path, _ = certs.add_client(deployment, "camera-app")
    cert = _cert(cert_path)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert certs.identity_from_pem(cert_path.read_bytes()) == certs.Identity("client", "camera-app")
    with pytest.raises(FileExistsError):
        certs.add_client(deployment, "camera-app")


def test_ca_and_chain(deployment: Path) -> None:
    ca = _cert(deployment / "ca.pem")
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1  # room for the agents' intermediate (enrollment)
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca.verify_directly_issued_by(ca)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    for name in ("cloud.pem", "admin.pem", "agents/edge-1.pem", "agents/edge-2.pem"):
        leaf = _cert(deployment / name)
        leaf.verify_directly_issued_by(ca)
        assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 365 * 86400 <= lifetime.total_seconds() <= 365 * 86400 + 3600


def test_identity_from_pem(deployment: Path) -> None:
    def ident(name: str) -> Identity | None:
        return certs.identity_from_pem((deployment / name).read_bytes())

    assert ident("agents/edge-1.pem") == Identity(certs.ROLE_AGENT, "edge-1")
    assert ident("admin.pem") == Identity(certs.ROLE_ADMIN, "admin")
    assert ident("cloud.pem") == Identity(certs.ROLE_SERVER, "cloud")
    assert ident("ca.pem") is None  # no SAN at all
    assert certs.identity_from_pem(b"not a certificate") is None


def test_add_agent(deployment: Path) -> None:
    cert_path, key_path = certs.add_agent(deployment, "edge-3")
    assert (cert_path, key_path) == certs.agent_paths(deployment, "edge-3")
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644
    _cert(cert_path).verify_directly_issued_by(_cert(deployment / "ca.pem"))
    assert certs.identity_from_pem(cert_path.read_bytes()) == Identity("agent", "edge-3")

    before = cert_path.read_bytes()
    with pytest.raises(FileExistsError, match="edge-3"):
        certs.add_agent(deployment, "edge-3")
    with pytest.raises(FileExistsError):
        certs.add_agent(deployment, "edge-1")
    assert cert_path.read_bytes() == before


def test_add_agent_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="certificate authority"):
        certs.add_agent(tmp_path, "edge-1")


def test_init_refuses_to_overwrite(deployment: Path) -> None:
    ca_before = (deployment / "ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        certs.init_deployment(deployment, ["edge-9"])
    assert (deployment / "ca.pem").read_bytes() == ca_before
    assert not (deployment / "agents" / "edge-9.pem").exists()


@pytest.mark.parametrize("bad", ["", "Edge", "-edge", ".edge", "edge/1", "edge 1", "a" * 64, "edge\n", "é"])
def test_bad_names_rejected(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid name"):
        certs.validate_name(bad)
    with pytest.raises(ValueError, match="invalid name"):
        certs.init_deployment(tmp_path, [bad])
    assert not (tmp_path / "ca.pem").exists()


def test_good_names_and_duplicates(tmp_path: Path) -> None:
    for good in ("a", "edge-1", "0.node_x", "a" * 63):
        assert certs.validate_name(good) == good
    with pytest.raises(ValueError, match="duplicate"):
        certs.init_deployment(tmp_path, ["edge-1", "edge-1"])
    assert not (tmp_path / "ca.pem").exists()


# --- a real mutual-TLS handshake ----------------------------------------------------


@pytest.fixture
def health_server(deployment: Path) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc.ssl_server_credentials(
        [((deployment / "cloud.key").read_bytes(), (deployment / "cloud.pem").read_bytes())],
        root_certificates=(deployment / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def _check(port: int, root: Path, cert: Path, key: Path) -> health_pb2.HealthCheckResponse:
    creds = grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response: health_pb2.HealthCheckResponse = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return response


def test_mtls_accepts_own_agent_and_refuses_foreign_ca(deployment: Path, health_server: int, tmp_path: Path) -> None:
    cert, key = certs.agent_paths(deployment, "edge-1")
    response = _check(health_server, deployment / "ca.pem", cert, key)
    assert response.status == health_pb2.HealthCheckResponse.SERVING

    # Same agent name, but issued by another deployment's CA: the server must refuse it.
    other = tmp_path / "other"
    certs.init_deployment(other, ["edge-1"])
    foreign_cert, foreign_key = certs.agent_paths(other, "edge-1")
    with pytest.raises(grpc.RpcError) as excinfo:
        _check(health_server, deployment / "ca.pem", foreign_cert, foreign_key)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_missing_certificate_names_the_command_that_makes_it(tmp_path: Path) -> None:
    from tandem import tls

    certs.init_deployment(tmp_path / "d", ["edge-1"])
    with pytest.raises(FileNotFoundError, match=r"tandem certs add-agent edge-9 --dir .*d`"):
        tls.agent_credentials(tmp_path / "d", "edge-9")
    with pytest.raises(FileNotFoundError, match=r"tandem certs init --dir"):
        tls.agent_credentials(tmp_path / "nowhere", "edge-1")
