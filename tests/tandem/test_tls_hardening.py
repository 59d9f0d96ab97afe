"""Trust under attack and failure: revocation and rotation without a restart, refused
handshakes, a TLS scanner's view of the coordinator, and pickle refused wherever
tensors are read."""

from __future__ import annotations

import asyncio
import datetime
import os
import pickle
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from safetensors import SafetensorError

from cloud.app import CloudConfig, Coordinator
from cloud.tensorfile import TensorFile, read_tensors
from edge.agent import AgentConfig
from edge.app import EdgeApp
from tandem import certs, data, grpcserver, inference, metrics, revocation, tls
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc, inference_pb2, inference_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tests.support.clients import ControlStream, admin_channel, agent_channel, target

OK, UNAVAILABLE, UNAUTHENTICATED = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED


async def _code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


async def _eventually(call: Callable[[], Awaitable[Any]], want: grpc.StatusCode, seconds: float = 3.0) -> grpc.StatusCode:
    """The status of `call`, repeated until it is `want` or `seconds` have passed."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (code := await _code(call())) != want and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return code


def _probe(channel: grpc.aio.Channel) -> Any:
    """An agent-only call."""
    return coordinator_pb2_grpc.CoordinatorStub(channel).Probe(pb.ProbeRequest(reply_bytes=1), timeout=5)


def _list_agents(channel: grpc.aio.Channel) -> Any:
    return admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)


async def _connect_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async def drain() -> None:
        async for _ in coordinator_pb2_grpc.CoordinatorStub(channel).Connect(iter([pb.AgentMessage(hello=pb.Hello())])):
            pass

    return await _code(drain())


def _replace(path: Path, content: bytes) -> None:
    """Swap a file by rename, as a mounted Secret or `cp new tmp && mv tmp old` does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """A deployment of this test's own: its own CA, agent names that collide with the session's."""
    directory = tmp_path / "certs"
    certs.init_deployment(directory, ["agent-0", "agent-1"])
    certs.add_client(directory, "cam")
    return directory


@pytest_asyncio.fixture
async def own_coordinator(tmp_path: Path, deployment: Path) -> AsyncIterator[Coordinator]:
    # Its own state directory: a test may run it beside the `coordinator` fixture, and
    # one state directory takes one coordinator (cloud.statelock).
    server = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=deployment, state=tmp_path / "own-state", grace=0.5))
    await server.start()
    yield server
    await server.stop()


# --- revocation ---------------------------------------------------------------------


async def test_revoked_agent_is_refused_on_its_next_call_without_restart(
    own_coordinator: Coordinator, deployment: Path, coordinator: Coordinator, certs_dir: Path
) -> None:
    port = own_coordinator.port
    stream = ControlStream(port, deployment, "agent-0")  # its control stream stays open throughout
    await stream.open()
    try:
        async with (agent_channel(port, deployment, "agent-1") as other,
                    agent_channel(coordinator.port, certs_dir, "agent-0") as namesake):
            assert await _code(_probe(stream.channel)) == OK
            assert certs.revoke(deployment, "agent-0") == certs.Identity(certs.ROLE_AGENT, "agent-0")
            # The same open connection: refused within the deny list's check interval.
            assert await _eventually(lambda: _probe(stream.channel), UNAUTHENTICATED) == UNAUTHENTICATED
            assert await _connect_code(stream.channel) == UNAUTHENTICATED
            assert await _code(_probe(other)) == OK
            # Deny lists belong to a deployment (its CA): the session's agent-0 is someone else.
            assert await _code(_probe(namesake)) == OK
        # Certificates without an authority key id are matched to their CA by signature.
        for server, directory, want in ((port, deployment, UNAUTHENTICATED), (coordinator.port, certs_dir, OK)):
            async with grpcserver.secure_channel(target(server), _forged(directory)) as channel:
                assert await _code(_probe(channel)) == want
    finally:
        await stream.close()
    async with agent_channel(port, deployment, "agent-0") as fresh:
        assert await _code(_probe(fresh)) == UNAUTHENTICATED


class _AnyModel:
    """An Inference backend that describes any model it is asked about."""

    async def infer(self, request: inference_pb2.InferRequest, deadline: float | None) -> inference_pb2.InferResponse:
        raise NotImplementedError

    async def model_info(self, request: inference_pb2.ModelInfoRequest) -> inference_pb2.ModelInfo:
        return inference_pb2.ModelInfo(model=request.model)


async def test_edge_inference_server_refuses_a_revoked_application(deployment: Path) -> None:
    server = grpcserver.create_server()
    inference_pb2_grpc.add_InferenceServicer_to_server(inference.InferenceService(_AnyModel()), server)
    port = server.add_secure_port("127.0.0.1:0", tls.agent_server_credentials(deployment, "agent-0"))
    await server.start()
    try:
        async with grpcserver.secure_channel(target(port), tls.app_credentials(deployment, "cam")) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            def info() -> Any:
                return stub.GetModelInfo(inference_pb2.ModelInfoRequest(model="mlp"), timeout=5)

            assert await _code(info()) == OK
            certs.revoke(deployment, "cam")
            assert await _eventually(info, UNAUTHENTICATED) == UNAUTHENTICATED
    finally:
        await server.stop(0)


def test_revoke_checks_its_arguments_and_writes_each_identity_once(deployment: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no agent or client named"):
        certs.revoke(deployment, "nobody")
    with pytest.raises(ValueError, match="invalid name"):
        certs.revoke(deployment, "../ca")
    with pytest.raises(ValueError, match="cannot revoke role"):
        certs.revoke(deployment, "admin", role=certs.ROLE_ADMIN)
    with pytest.raises(FileNotFoundError, match="no deployment"):
        certs.revoke(tmp_path / "elsewhere", "agent-0", role=certs.ROLE_AGENT)
    certs.add_agent(deployment, "cam")  # now both an agent and a client
    with pytest.raises(ValueError, match="names agent and client certificates"):
        certs.revoke(deployment, "cam")
    with pytest.raises(ValueError, match="not ROLE/NAME"):
        revocation.add(deployment, ["agent/x y"])
    assert revocation.read(deployment) == frozenset()

    certs.revoke(deployment, "cam", role=certs.ROLE_CLIENT)
    certs.revoke(deployment, "cam", role=certs.ROLE_CLIENT)
    certs.revoke(deployment, "gone", role=certs.ROLE_AGENT)  # its certificate no longer in the directory
    assert revocation.read(deployment) == {"client/cam", "agent/gone"}
    assert revocation.path_in(deployment).read_text().count("client/cam") == 1
    assert not [p.name for p in deployment.iterdir() if p.name.endswith(".tmp")]


def test_deny_list_rereads_the_file_only_when_due_and_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    deny = revocation.DenyList(tmp_path, clock=lambda: now[0])
    path = revocation.path_in(tmp_path)
    assert deny.entries() == frozenset()
    revocation.add(tmp_path, ["agent/a"])
    assert "agent/a" not in deny  # not looked at again within the interval
    now[0] += revocation.CHECK_INTERVAL
    assert "agent/a" in deny
    # Metadata is all it looks at: an in-place edit that keeps size, mtime and inode goes unseen.
    stat = path.stat()
    with open(path, "r+") as f:
        text = f.read()
        f.seek(0)
        f.write(text.replace("agent/a", "agent/b"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    now[0] += revocation.CHECK_INTERVAL
    assert deny.entries() == {"agent/a"}

    _replace(path, b"\xff\xfe garbage")  # unreadable: the previous list stays in force
    now[0] += revocation.CHECK_INTERVAL
    assert deny.entries() == {"agent/a"}
    assert "cannot read the deny list" in caplog.text
    _replace(path, b"agent/a\nnot an entry\nclient/b  # lost laptop\n")
    now[0] += revocation.CHECK_INTERVAL
    assert deny.entries() == {"agent/a", "client/b"}
    assert "ignoring malformed entry 'not an entry'" in caplog.text
    path.unlink()  # un-revoking everyone is an operator's edit, and is followed too
    now[0] += revocation.CHECK_INTERVAL
    assert deny.entries() == frozenset()


# --- rotation -----------------------------------------------------------------------


async def test_rotated_certificates_serve_new_connections_and_keep_open_ones(
    own_coordinator: Coordinator, deployment: Path, tmp_path: Path
) -> None:
    new = tmp_path / "new"
    certs.init_deployment(new, ["agent-9"])
    old_ca, port = (deployment / "ca.pem").read_bytes(), own_coordinator.port
    admin_key, admin_pem = (deployment / "admin.key").read_bytes(), (deployment / "admin.pem").read_bytes()
    async with admin_channel(port, deployment) as before:  # trusts the old CA only
        assert await _code(_list_agents(before)) == OK
        _replace(deployment / "ca.pem", old_ca + (new / "ca.pem").read_bytes())
        _replace(deployment / "cloud.pem", (new / "cloud.pem").read_bytes())
        _replace(deployment / "cloud.key", (new / "cloud.key").read_bytes())

        # A client that trusts only the new CA gets in: the server presents the new certificate.
        trusts_new = grpc.ssl_channel_credentials((new / "ca.pem").read_bytes(), admin_key, admin_pem)
        async with grpcserver.secure_channel(target(port), trusts_new) as channel:
            assert await _code(_list_agents(channel)) == OK
        # The new CA signs clients too, and its deny list is the deployment's.
        async with agent_channel(port, new, "agent-9") as channel:
            assert await _code(_probe(channel)) == OK
            certs.revoke(deployment, "agent-9", role=certs.ROLE_AGENT)
            assert await _eventually(lambda: _probe(channel), UNAUTHENTICATED) == UNAUTHENTICATED
        # The connection opened before still works; it could not have been remade.
        assert await _code(_list_agents(before)) == OK
    trusts_old = grpc.ssl_channel_credentials(old_ca, admin_key, admin_pem)
    async with grpcserver.secure_channel(target(port), trusts_old) as channel:
        assert await _code(_list_agents(channel)) == UNAVAILABLE


def _served_serial(port: int, deployment: Path) -> int:
    """The serial of the certificate a server presents to a new connection (as the admin)."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(deployment / "ca.pem"))
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(deployment / "admin.pem", deployment / "admin.key")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_certs_rotate_gives_running_servers_new_keys_for_new_connections(
    own_coordinator: Coordinator, deployment: Path
) -> None:
    from tandem_cli.main import main

    port = own_coordinator.port
    before = await asyncio.to_thread(_served_serial, port, deployment)
    old_key = (deployment / "cloud.key").read_bytes()
    old_names = x509.load_pem_x509_certificate((deployment / "cloud.pem").read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    async with agent_channel(port, deployment, "agent-0") as open_before:
        assert await _code(_probe(open_before)) == OK
        assert main(["certs", "rotate", "--dir", str(deployment), "--days", "30"]) == 0
        assert (deployment / "cloud.key").read_bytes() != old_key
        new = x509.load_pem_x509_certificate((deployment / "cloud.pem").read_bytes())
        assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == old_names
        assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 30
        assert await asyncio.to_thread(_served_serial, port, deployment) == new.serial_number != before
        assert await _code(_probe(open_before)) == OK  # open connections keep theirs
    async with agent_channel(port, deployment, "agent-1") as channel:
        assert await _code(_probe(channel)) == OK
    replica = x509.load_pem_x509_certificate(tls.replica_paths(deployment)[0].read_bytes())
    assert (replica.not_valid_after_utc - replica.not_valid_before_utc).days == 30


def test_certs_rotate_without_a_deployment_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tandem_cli.main import main

    assert main(["certs", "rotate", "--dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


async def test_half_rotated_files_keep_the_previous_pair(
    own_coordinator: Coordinator, deployment: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = tmp_path / "new"
    certs.init_deployment(new, [])
    old_ca, port = (deployment / "ca.pem").read_bytes(), own_coordinator.port
    _replace(deployment / "cloud.pem", (new / "cloud.pem").read_bytes())  # its key not there yet
    async with admin_channel(port, deployment) as channel:
        assert await _code(_list_agents(channel)) == OK  # still the old pair, which the old CA verifies
    assert "does not match its certificate" in caplog.text
    _replace(deployment / "cloud.key", (new / "cloud.key").read_bytes())
    _replace(deployment / "ca.pem", old_ca + (new / "ca.pem").read_bytes())
    credentials = grpc.ssl_channel_credentials(
        (new / "ca.pem").read_bytes(), (deployment / "admin.key").read_bytes(), (deployment / "admin.pem").read_bytes()
    )
    async with grpcserver.secure_channel(target(port), credentials) as channel:
        assert await _code(_list_agents(channel)) == OK


def test_server_credentials_refuse_missing_or_mismatched_files(deployment: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tandem certs init"):
        tls.server_credentials(tmp_path / "nothing")
    shutil.copy(deployment / "admin.key", deployment / "cloud.key")
    with pytest.raises(ValueError, match="does not match its certificate"):
        tls.server_credentials(deployment)


# --- refused handshakes -------------------------------------------------------------


def _forged(certs_dir: Path, valid_from_days: float = -1, valid_days: float = 2, self_signed: bool = False,
            usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH) -> grpc.ChannelCredentials:
    """agent-0's identity in a certificate made here (with no authority key id, as some
    tools issue them), and the deployment's CA to trust the server by."""
    ca_cert = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((certs_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent-0")])
    start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=valid_from_days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("tandem://agent/agent-0")]),
                       critical=False)
    )
    cert = builder.sign(key if self_signed else ca_key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_channel_credentials((certs_dir / "ca.pem").read_bytes(), key_pem,
                                        cert.public_bytes(serialization.Encoding.PEM))


FORGED: dict[str, tuple[dict[str, Any], grpc.StatusCode]] = {
    "control-fresh-from-our-ca": ({}, OK),  # the forge itself makes acceptable certificates
    "expired": ({"valid_from_days": -10, "valid_days": 9}, UNAVAILABLE),
    "not-yet-valid": ({"valid_from_days": 1}, UNAVAILABLE),
    "server-auth-only": ({"usage": ExtendedKeyUsageOID.SERVER_AUTH}, UNAVAILABLE),
    "self-signed": ({"self_signed": True}, UNAVAILABLE),
}


@pytest.mark.parametrize("case", FORGED)
async def test_client_certificate_refused_in_the_handshake(coordinator: Coordinator, certs_dir: Path, case: str) -> None:
    options, want = FORGED[case]
    async with grpcserver.secure_channel(target(coordinator.port), _forged(certs_dir, **options)) as channel:
        assert await _code(_probe(channel)) == want
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        assert await _code(_probe(channel)) == OK


@pytest.mark.parametrize("who", ["another-ca-agent", "cloud-server-cert"])
async def test_real_certificates_of_the_wrong_kind_are_refused(
    coordinator: Coordinator, certs_dir: Path, foreign_certs_dir: Path, who: str
) -> None:
    cert, key = (certs.agent_paths(foreign_certs_dir, "agent-0") if who == "another-ca-agent"
                 else (certs_dir / "cloud.pem", certs_dir / "cloud.key"))
    credentials = grpc.ssl_channel_credentials((certs_dir / "ca.pem").read_bytes(), key.read_bytes(), cert.read_bytes())
    async with grpcserver.secure_channel(target(coordinator.port), credentials) as channel:
        assert await _code(_probe(channel)) == UNAVAILABLE
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        assert await _code(_probe(channel)) == OK


# --- an external scanner ------------------------------------------------------------

_WEAK = {"NULL", "RC4", "EXP", "EXPORT", "ANON", "ADH", "AECDH", "DES", "3DES", "DES40", "CBC3", "MD5"}


needs_sslscan = pytest.mark.skipif(shutil.which("sslscan") is None,
                                   reason="sslscan not installed (apt-get install sslscan; .ci/run does)")


async def _assert_only_modern_tls(port: int, client: tuple[Path, Path] | None) -> None:
    """sslscan of a loopback port finds no old protocol and no weak cipher, and TLS 1.3."""
    # With a client certificate where the server asks for one: without it sslscan lists
    # no TLS 1.2 cipher at all (the handshake ends before it can tell).
    flags = [f"--certs={client[0]}", f"--pk={client[1]}"] if client else []
    process = await asyncio.create_subprocess_exec(
        "sslscan", "--no-colour", "--xml=-", *flags, f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # asynchronous: the server answers on this event loop
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    root = ET.fromstring(out)
    enabled = {f"{p.get('type')}{p.get('version')}": p.get("enabled") for p in root.iter("protocol")}
    assert {name: enabled.get(name) for name in ("ssl2", "ssl3", "tls1.0", "tls1.1")} == dict.fromkeys(
        ("ssl2", "ssl3", "tls1.0", "tls1.1"), "0"
    )
    ciphers = [(c.get("sslversion", ""), c.get("cipher", ""), c.get("strength")) for c in root.iter("cipher")]
    for version in ("1.2", "1.3"):
        if enabled.get(f"tls{version}") == "1":
            assert any(v == f"TLSv{version}" for v, _, _ in ciphers), f"no TLS {version} cipher enumerated"
    assert enabled.get("tls1.3") == "1"
    weak = [c for c in ciphers if _WEAK & set(re.split(r"[-_]", c[1].upper())) or c[2] not in ("strong", "acceptable")]
    assert weak == []


@pytest.mark.process
@needs_sslscan
async def test_sslscan_finds_only_modern_protocols_and_ciphers(coordinator: Coordinator, certs_dir: Path) -> None:
    await _assert_only_modern_tls(coordinator.port, certs.agent_paths(certs_dir, "agent-0"))


@pytest.mark.process
@needs_sslscan
async def test_sslscan_of_the_enrollment_service_finds_only_modern_tls(certs_dir: Path, tmp_path: Path) -> None:
    from cloud.enrollment import CaConfig, CaServer
    from tandem import enrollment

    enrollment.create_intermediate(certs_dir, tmp_path / "ca")
    server = CaServer(CaConfig(ca_dir=tmp_path / "ca", listen="127.0.0.1:0", renew_listen="127.0.0.1:0"))
    await server.start()
    try:
        await _assert_only_modern_tls(server.port, None)  # enrollment: server-authenticated only
        await _assert_only_modern_tls(server.renew_port, certs.agent_paths(certs_dir, "agent-0"))
    finally:
        await server.stop()


# --- pickle is never loaded ---------------------------------------------------------


class _Payload:
    """Unpickling this creates the directory `marker`: proof that something ran pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (self.marker,)


def _write_pickle(path: Path, marker: Path, how: str) -> None:
    if how == "torch.save":
        import torch

        torch.save({"weight": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))


def _unpickle(path: Path, how: str) -> None:
    """What an unsafe loader would do: the control that shows the payload is live."""
    if how == "torch.save":
        import torch

        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_model_files_are_read_as_safetensors_only(tmp_path: Path, how: str) -> None:
    path, marker = tmp_path / "v000001", tmp_path / "pwned"  # torch.load reads a .safetensors name as one
    _write_pickle(path, marker, how)
    with pytest.raises(SafetensorError):
        read_tensors(path)
    with pytest.raises(ValueError):
        TensorFile(path)
    assert not marker.exists()
    _unpickle(path, how)
    assert marker.exists()


def test_data_directory_refuses_pickled_arrays(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    npz_dir, st_dir = tmp_path / "npz", tmp_path / "st"
    npz_dir.mkdir()
    st_dir.mkdir()
    np.savez(npz_dir / "part.npz", x=np.array([_Payload(marker)], dtype=object), y=np.zeros(1, np.int64))
    _write_pickle(st_dir / "part.safetensors", marker, "pickle")
    for directory in (npz_dir, st_dir):
        with pytest.raises(ValueError, match="cannot read"):
            data.load_data(str(directory))
    assert not marker.exists()
    with np.load(npz_dir / "part.npz", allow_pickle=True) as npz:
        npz["x"]
    assert marker.exists()


@pytest.mark.slow  # waits for the open stream's next heartbeat, then a second more: ~11 s
async def test_a_revoked_agent_says_so_and_stops_hurrying(
    own_coordinator: Coordinator, deployment: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused for its certificate, an agent logs why at ERROR and waits its longest
    backoff between tries instead of hammering the coordinator."""
    app = EdgeApp(AgentConfig(cloud=target(own_coordinator.port), certs=deployment, agent_id="agent-1",
                              data="digits:0/4", backoff_initial=0.05, backoff_max=30.0))
    await app.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    try:
        async with asyncio.timeout(30):
            await app.agent.welcomed.wait()
        certs.revoke(deployment, "agent-1")

        def refused() -> bool:
            return any(r.levelname == "ERROR" and "refuses this agent's certificate (UNAUTHENTICATED)" in r.message
                       for r in caplog.records)

        async with asyncio.timeout(20):  # the open stream ends at its next heartbeat
            while not refused():
                await asyncio.sleep(0.1)
        # Counted from the refusal on: the open stream may first break otherwise (it
        # has ended INTERNAL, then been refused at a quick retry), which is no hurry.
        refused_at = metrics.EDGE_RECONNECTS._value.get()
        await asyncio.sleep(1.0)  # a jittered 0.05 s backoff would have retried several times by now
        assert metrics.EDGE_RECONNECTS._value.get() == refused_at
    finally:
        stop.set()
        await runner


async def test_an_agent_follows_a_ca_rotation_at_its_next_reconnect(deployment: Path, tmp_path: Path) -> None:
    """The coordinator restarts with a certificate from a new CA; the agent, whose CA
    bundle on disk now holds both, reconnects without a restart of its own."""
    config = CloudConfig(listen="127.0.0.1:0", certs=deployment, state=tmp_path / "state", grace=0.5)
    first = Coordinator(config)
    await first.start()
    app = EdgeApp(AgentConfig(cloud=target(first.port), certs=deployment, agent_id="agent-1", data="digits:0/4",
                              backoff_initial=0.05, backoff_max=0.5))
    await app.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    second: Coordinator | None = None
    try:
        async with asyncio.timeout(30):
            await app.agent.welcomed.wait()
        new = tmp_path / "new"
        certs.init_deployment(new, [])
        _replace(deployment / "ca.pem", (deployment / "ca.pem").read_bytes() + (new / "ca.pem").read_bytes())
        _replace(deployment / "cloud.pem", (new / "cloud.pem").read_bytes())
        _replace(deployment / "cloud.key", (new / "cloud.key").read_bytes())
        await first.stop()
        async with asyncio.timeout(10):
            while app.agent.welcomed.is_set():  # its stream with the old coordinator is over
                await asyncio.sleep(0.05)
        second = Coordinator(replace(config, listen=f"127.0.0.1:{first.port}"))
        await second.start()  # presents the new CA's certificate: the agent's first channel cannot verify it
        async with asyncio.timeout(30):
            while not app.agent.welcomed.is_set():
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await runner
        await (second or first).stop()
