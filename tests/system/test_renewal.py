"""After enrollment: renewal over mutual TLS, revocation of enrolled agents (at the
coordinator and at renewal), certificates that expired while the agent was away, and
the enrollment service's own certificate made again while it runs. Real TLS on
loopback ports, a real coordinator, in this process."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from cloud.app import Coordinator
from cloud.enrollment import CaConfig, CaServer
from edge import enroll
from edge.channels import CloudChannels
from tandem import certs, enrollment, grpcserver, metrics, revocation, tls
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc


async def _enrolled(server: CaServer, ca_dir: Path, certs_dir: Path, directory: Path, name: str) -> Path:
    """Agent `name` enrolled into `directory` with a fresh token."""
    store = enrollment.TokenStore(ca_dir)
    try:
        token = store.create(name, 600)
    finally:
        store.close()
    token_file = directory.parent / f"{name}.token"
    token_file.write_text(token)
    config = enroll.EnrollConfig(f"localhost:{server.port}", token_file, certs_dir / "ca.pem")
    return await enroll.enroll(directory, name, config)


async def _renewed_nothing() -> None:
    return None


def _renewer(server: CaServer, directory: Path, name: str) -> enroll.Renewer:
    return enroll.Renewer(directory, name, f"localhost:{server.renew_port}", _renewed_nothing)


def _count(outcome: str) -> float:
    return float(metrics.ENROLLMENTS.labels(outcome=outcome)._value.get())


async def _probe_code(port: int, directory: Path, name: str) -> grpc.StatusCode:
    async with grpcserver.secure_channel(f"localhost:{port}", tls.agent_credentials(directory, name)) as channel:
        try:
            await coordinator_pb2_grpc.CoordinatorStub(channel).Probe(pb.ProbeRequest(reply_bytes=1), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_renewal_replaces_key_and_certificate_and_the_coordinator_accepts_the_new_one(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, coordinator: Coordinator, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    cert_path = await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-a")
    _, key_path = certs.agent_paths(directory, "renew-a")
    old_cert, old_key = cert_path.read_bytes(), key_path.read_bytes()
    before = _count(enrollment.RENEWED)

    not_after = await _renewer(ca_server, directory, "renew-a").renew()

    assert cert_path.read_bytes() != old_cert and key_path.read_bytes() != old_key
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert leaf.not_valid_after_utc == not_after
    assert leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC) > datetime.timedelta(hours=1.9)
    assert certs.identity_from_pem(cert_path.read_bytes()) == certs.Identity("agent", "renew-a")
    assert _count(enrollment.RENEWED) == before + 1
    assert enroll.needed(directory, "renew-a") is None
    assert await _probe_code(coordinator.port, directory, "renew-a") == grpc.StatusCode.OK


async def test_a_revoked_enrolled_agent_is_refused_by_the_coordinator_and_cannot_renew(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, coordinator: Coordinator, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-revoked")
    assert await _probe_code(coordinator.port, directory, "renew-revoked") == grpc.StatusCode.OK

    # Its certificate comes from the intermediate, which the coordinator's bundle does not
    # hold: the deny list applies all the same (found through the chain the agent presents).
    certs.revoke(certs_dir, "renew-revoked", role="agent")
    certs.revoke(ca_dir, "renew-revoked", role="agent")
    await asyncio.sleep(revocation.CHECK_INTERVAL * 2)
    assert await _probe_code(coordinator.port, directory, "renew-revoked") == grpc.StatusCode.UNAUTHENTICATED

    before = _count(enrollment.REVOKED)
    old = certs.agent_paths(directory, "renew-revoked")[0].read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _renewer(ca_server, directory, "renew-revoked").renew()
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (error.value.details() or "")
    assert _count(enrollment.REVOKED) == before + 1
    assert certs.agent_paths(directory, "renew-revoked")[0].read_bytes() == old  # nothing replaced


async def test_renewal_refuses_callers_without_an_agent_certificate_and_csrs_for_another_name(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, tmp_path: Path
) -> None:
    csr = enrollment.make_request("renew-b")[1]

    async def renew(port: int, credentials: grpc.ChannelCredentials, csr_pem: bytes) -> grpc.StatusCode:
        async with grpcserver.secure_channel(f"localhost:{port}", credentials) as channel:
            try:
                await enrollment_pb2_grpc.RenewalStub(channel).Renew(enrollment_pb2.RenewRequest(csr_pem=csr_pem),
                                                                     timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    # On the enrollment port, with no client certificate.
    anonymous = grpc.ssl_channel_credentials(root_certificates=(certs_dir / "ca.pem").read_bytes())
    assert await renew(ca_server.port, anonymous, csr) == grpc.StatusCode.UNAUTHENTICATED
    # The admin's certificate is not an agent's.
    assert await renew(ca_server.renew_port, tls.admin_credentials(certs_dir), csr) == grpc.StatusCode.PERMISSION_DENIED
    # An agent asking for another agent's name.
    directory = tmp_path / "agent"
    await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-c")
    mine = tls.agent_credentials(directory, "renew-c")
    assert await renew(ca_server.renew_port, mine, csr) == grpc.StatusCode.INVALID_ARGUMENT
    assert await renew(ca_server.renew_port, mine, b"not a csr") == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_agent_from_certs_init_renews_into_an_intermediate_certificate(
    ca_server: CaServer, certs_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    directory.mkdir()
    certs.add_agent(certs_dir, "renew-d")
    for path in (*certs.agent_paths(certs_dir, "renew-d"), certs_dir / "ca.pem"):
        target = directory / path.relative_to(certs_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    await _renewer(ca_server, directory, "renew-d").renew()
    chain = x509.load_pem_x509_certificates(certs.agent_paths(directory, "renew-d")[0].read_bytes())
    assert [c.subject for c in chain[1:]] == [ca_server.issuer.issuer.cert.subject]


def test_renewal_is_due_two_thirds_into_a_certificates_life() -> None:
    key = certs.new_key()
    issued = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(certs.name_of("a")).issuer_name(certs.name_of("a"))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(issued - certs.CLOCK_SKEW).not_valid_after(issued + datetime.timedelta(hours=24))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert enroll.renewal_due(pem) == issued + datetime.timedelta(hours=16)


async def test_needed_says_why_an_agent_must_enrol(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    assert enroll.needed(directory, "renew-e") == "no certificate yet"
    cert_path = await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-e")
    assert enroll.needed(directory, "renew-e") is None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=3)
    assert (enroll.needed(directory, "renew-e", now=later) or "").startswith("its certificate expired at ")
    # A renewal cut short between its two renames: the key is new, the certificate old.
    certs.agent_paths(directory, "renew-e")[1].write_bytes(certs.key_pem(certs.new_key()))
    assert "does not match" in (enroll.needed(directory, "renew-e") or "")
    cert_path.write_text("garbage")
    assert "is not a certificate" in (enroll.needed(directory, "renew-e") or "")


async def test_channels_made_again_leave_the_control_stream_on_the_old_ones_running(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, coordinator: Coordinator, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-f")
    channels = CloudChannels(directory, "renew-f", f"localhost:{coordinator.port}")
    await channels.open()
    outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
    outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello()))

    async def messages() -> AsyncIterator[pb.AgentMessage]:
        while True:
            yield await outgoing.get()

    try:
        old = channels.coordinator
        assert old is not None
        stream = coordinator_pb2_grpc.CoordinatorStub(old).Connect(messages())
        assert (await stream.read()).WhichOneof("kind") == "welcome"

        await _renewer(ca_server, directory, "renew-f").renew()
        assert await channels.refresh()
        assert channels.coordinator is not old
        reply = await coordinator_pb2_grpc.CoordinatorStub(channels.coordinator).Probe(
            pb.ProbeRequest(reply_bytes=1), timeout=5)  # new calls: the new certificate, a new connection
        assert len(reply.payload) == 1
        await asyncio.sleep(0.3)
        assert not stream.done()  # the control stream on the old connection goes on

        channels.drop_retired(grace=0.5)  # as the agent does once that stream has ended
        await asyncio.sleep(1.5)
        assert stream.done()
        assert old.get_state() == grpc.ChannelConnectivity.SHUTDOWN
    finally:
        await channels.close()


def _served_certificate(port: int, root_pem: bytes, client: tuple[Path, Path] | None = None) -> x509.Certificate:
    context = ssl.create_default_context(cadata=root_pem.decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as wrapped:
        der = wrapped.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_the_services_own_certificate_is_made_again_halfway_through_its_life(
    ca_dir: Path, certs_dir: Path
) -> None:
    server = CaServer(CaConfig(ca_dir=ca_dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0",
                               server_cert_lifetime=datetime.timedelta(seconds=2)))
    await server.start()
    try:
        root = (certs_dir / "ca.pem").read_bytes()
        first = await asyncio.to_thread(_served_certificate, server.port, root)
        assert await asyncio.to_thread(_served_certificate, server.port, root) == first  # not before halfway
        await asyncio.sleep(1.2)
        second = await asyncio.to_thread(_served_certificate, server.port, root)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        # The renewal port (mutual TLS: an agent's certificate) serves the new one too.
        client = certs.agent_paths(certs_dir, "agent-0")
        renewal = await asyncio.to_thread(_served_certificate, server.renew_port, root, client)
        assert renewal.serial_number == second.serial_number
    finally:
        await server.stop()


async def test_a_failed_enrolment_leaves_the_agents_old_key_and_certificate_as_they_were(
    ca_server: CaServer, ca_dir: Path, certs_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "agent"
    cert_path = await _enrolled(ca_server, ca_dir, certs_dir, directory, "renew-g")
    key_path = certs.agent_paths(directory, "renew-g")[1]
    old = cert_path.read_bytes(), key_path.read_bytes()
    spent = directory.parent / "renew-g.token"  # the token it enrolled with: used
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await enroll.enroll(directory, "renew-g",
                            enroll.EnrollConfig(f"localhost:{ca_server.port}", spent, certs_dir / "ca.pem"))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (cert_path.read_bytes(), key_path.read_bytes()) == old
    assert sorted(p.name for p in key_path.parent.iterdir()) == ["renew-g.key", "renew-g.pem"]
