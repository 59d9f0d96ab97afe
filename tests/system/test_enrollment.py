"""Enrollment over real TLS: a `tandem ca` service on a loopback port (in this process),
every refusal with its code, and an enrolled agent accepted by a real coordinator."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from cloud.app import Coordinator
from cloud.enrollment import CaServer
from edge import enroll
from tandem import certs, enrollment, grpcserver, metrics, tls
from tandem.v1 import admin_pb2, admin_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc
from tests.support.clients import ControlStream, admin_channel


def _token(ca_dir: Path, name: str, ttl: float = 3600) -> str:
    store = enrollment.TokenStore(ca_dir)
    try:
        return store.create(name, ttl)
    finally:
        store.close()


async def _enroll(server: CaServer, ca_dir: Path, name: str, token: str, csr_pem: bytes | None = None
                  ) -> enrollment_pb2.EnrollResponse:
    if csr_pem is None:
        csr_pem = enrollment.make_request(name)[1]
    credentials = grpc.ssl_channel_credentials(root_certificates=(ca_dir / "ca.pem").read_bytes())
    async with grpcserver.secure_channel(f"localhost:{server.port}", credentials) as channel:
        reply: enrollment_pb2.EnrollResponse = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
            enrollment_pb2.EnrollRequest(name=name, token=token, csr_pem=csr_pem), timeout=10)
        return reply


async def _refused(server: CaServer, ca_dir: Path, name: str, token: str, csr_pem: bytes | None = None
                   ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _enroll(server, ca_dir, name, token, csr_pem)
    return error.value


def _count(outcome: str) -> float:
    return float(metrics.ENROLLMENTS.labels(outcome=outcome)._value.get())


async def test_issues_a_short_lived_agent_certificate_chained_to_the_root(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path
) -> None:
    reply = await _enroll(ca_server, ca_dir, "enrolled-a", _token(ca_dir, "enrolled-a"))
    leaf, intermediate = x509.load_pem_x509_certificates(reply.certificate_chain_pem)
    assert certs.identity_from_pem(reply.certificate_chain_pem) == certs.Identity("agent", "enrolled-a")
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes()))
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= 2 * 3600 + 600  # --cert-hours 2, plus the clock-skew allowance
    assert reply.not_after == int(leaf.not_valid_after_utc.timestamp())


async def test_unknown_token_is_unauthenticated(ca_server: CaServer, ca_dir: Path) -> None:
    before = _count(enrollment.UNKNOWN_TOKEN)
    error = await _refused(ca_server, ca_dir, "enrolled-b", "not-a-token")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown" in (error.details() or "")
    assert _count(enrollment.UNKNOWN_TOKEN) == before + 1


async def test_replayed_token_is_unauthenticated(ca_server: CaServer, ca_dir: Path) -> None:
    token = _token(ca_dir, "enrolled-c")
    await _enroll(ca_server, ca_dir, "enrolled-c", token)
    before = _count(enrollment.REPLAYED)
    error = await _refused(ca_server, ca_dir, "enrolled-c", token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already been used" in (error.details() or "")
    assert _count(enrollment.REPLAYED) == before + 1


async def test_racing_requests_with_one_token_get_one_certificate(ca_server: CaServer, ca_dir: Path) -> None:
    token = _token(ca_dir, "enrolled-r")
    results = await asyncio.gather(*(_enroll(ca_server, ca_dir, "enrolled-r", token) for _ in range(4)),
                                   return_exceptions=True)
    assert sum(isinstance(r, enrollment_pb2.EnrollResponse) for r in results) == 1
    assert all(r.code() == grpc.StatusCode.UNAUTHENTICATED for r in results if isinstance(r, grpc.aio.AioRpcError))


async def test_expired_token_is_unauthenticated_and_says_so(ca_server: CaServer, ca_dir: Path) -> None:
    token = _token(ca_dir, "enrolled-d", ttl=0.05)
    await asyncio.sleep(0.1)
    before = _count(enrollment.EXPIRED)
    error = await _refused(ca_server, ca_dir, "enrolled-d", token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (error.details() or "")
    assert _count(enrollment.EXPIRED) == before + 1


async def test_token_for_another_name_is_permission_denied_and_stays_usable(ca_server: CaServer, ca_dir: Path) -> None:
    token = _token(ca_dir, "enrolled-e")
    before = _count(enrollment.WRONG_NAME)
    error = await _refused(ca_server, ca_dir, "enrolled-other", token)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _count(enrollment.WRONG_NAME) == before + 1
    await _enroll(ca_server, ca_dir, "enrolled-e", token)  # a refused attempt does not spend it


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str) -> bytes:
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("bad", ["garbage", "other-cn", "rsa-key", "bad-signature"])
async def test_bad_csr_is_invalid_argument_and_does_not_spend_the_token(
    bad: str, ca_server: CaServer, ca_dir: Path
) -> None:
    name = f"enrolled-csr-{bad}"
    token = _token(ca_dir, name)
    good = _csr(ec.generate_private_key(ec.SECP256R1()), name)
    csr = {
        "garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "other-cn": _csr(ec.generate_private_key(ec.SECP256R1()), "someone-else"),
        "rsa-key": _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048), name),
        # The CSR's DER with one byte of its signature changed.
        "bad-signature": _tamper(good),
    }[bad]
    before = _count(enrollment.BAD_REQUEST)
    error = await _refused(ca_server, ca_dir, name, token, csr)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _count(enrollment.BAD_REQUEST) == before + 1
    await _enroll(ca_server, ca_dir, name, token, good)


def _tamper(csr_pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    body = base64.encodebytes(bytes(der))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def test_tokens_are_stored_hashed(ca_dir: Path) -> None:
    token = _token(ca_dir, "enrolled-f")
    data = (ca_dir / enrollment.TOKENS_DB).read_bytes()
    assert token.encode() not in data
    rows = sqlite3.connect(ca_dir / enrollment.TOKENS_DB).execute("SELECT * FROM tokens").fetchall()
    assert rows and not any(token in str(value) for row in rows for value in row)
    assert stat.S_IMODE((ca_dir / enrollment.TOKENS_DB).stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / enrollment.INTERMEDIATE_KEY).stat().st_mode) == 0o600


def test_an_intermediate_is_never_replaced(tmp_path: Path, certs_dir: Path) -> None:
    enrollment.create_intermediate(certs_dir, tmp_path / "first")
    with pytest.raises(FileExistsError):
        enrollment.create_intermediate(certs_dir, tmp_path / "first")


async def test_enrolled_agent_is_accepted_by_the_coordinator_and_limited_to_agent_identities(
    ca_server: CaServer, ca_dir: Path, coordinator: Coordinator, certs_dir: Path, tmp_path: Path
) -> None:
    agent_dir = tmp_path / "agent-certs"
    token_file = tmp_path / "token"
    token_file.write_text(_token(ca_dir, "enrolled-g") + "\n")
    config = enroll.EnrollConfig(f"localhost:{ca_server.port}", token_file, certs_dir / "ca.pem")
    assert enroll.needed(agent_dir, "enrolled-g")
    await enroll.enroll(agent_dir, "enrolled-g", config)
    _, key_path = certs.agent_paths(agent_dir, "enrolled-g")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not enroll.needed(agent_dir, "enrolled-g")

    stream = ControlStream(coordinator.port, agent_dir, "enrolled-g")
    await stream.open()
    try:
        async with admin_channel(coordinator.port, certs_dir) as channel:
            agents = (await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)).agents
        assert {a.agent_id: a.connected for a in agents}.get("enrolled-g") is True
    finally:
        await stream.close()

    # Whoever holds the intermediate's key cannot mint an admin: the name constraint refuses it.
    forged = tmp_path / "forged"
    (forged).mkdir()
    issuer = enrollment._load_intermediate(ca_dir)
    cert, key = certs._issue(issuer, "admin", certs.Identity("admin", "admin"),
                             x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, 1)
    chain = cert.public_bytes(serialization.Encoding.PEM) + issuer.cert.public_bytes(serialization.Encoding.PEM)
    (forged / "admin.pem").write_bytes(chain)
    (forged / "admin.key").write_bytes(certs.key_pem(key))
    (forged / "ca.pem").write_bytes((certs_dir / "ca.pem").read_bytes())
    async with grpcserver.secure_channel(f"localhost:{coordinator.port}", tls.admin_credentials(forged)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # refused at the handshake


@pytest.mark.parametrize("missing", ["token", "ca"])
async def test_a_missing_token_or_ca_file_names_its_flag_and_writes_no_key(tmp_path: Path, missing: str) -> None:
    token, ca = tmp_path / "token", tmp_path / "ca.pem"
    token.write_text("t")
    ca.write_text("not read")
    (token if missing == "token" else ca).unlink()
    flag = "--enroll-token-file" if missing == "token" else "--ca-file"
    with pytest.raises(ValueError, match=f"^{flag} .*: No such file or directory$"):
        await enroll.enroll(tmp_path / "certs", "edge-1", enroll.EnrollConfig("localhost:1", token, ca))
    assert not (tmp_path / "certs").exists()
