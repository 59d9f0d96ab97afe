"""The enrollment service (`tandem ca`): its own process, so the intermediate CA's key
is never on the coordinator's serving path.

Two ports, one server: enrollment over server-authenticated TLS (an enrolling agent
has no certificate yet), and renewal over mutual TLS (the agent's current certificate,
from the deployment's root, is the proof; revoked agents are refused, with the deny
list of the CA's directory). The service's own certificate is made from the
intermediate, kept in memory, and made again halfway through its life, for new
connections. Every answer is logged in one line (never the token) and counted in
`tandem_enrollments_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tandem import certs, enrollment, grpcserver, metrics, revocation, tls
from tandem.errors import PermissionDenied, TandemError, Unauthenticated, grpc_errors
from tandem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name
RENEWAL_SERVICE_NAME = enrollment_pb2.DESCRIPTOR.services_by_name["Renewal"].full_name
GRACE_SECONDS = 2.0
# Few and short calls: a small connection cap keeps a flood from exhausting the process.
MAX_CONNECTIONS = 256


def _answer(issued: enrollment.Issued) -> enrollment_pb2.EnrollResponse:
    return enrollment_pb2.EnrollResponse(certificate_chain_pem=issued.chain_pem,
                                         not_after=int(issued.not_after.timestamp()))


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    """Thin adapter: `enrollment.AgentIssuer` holds the logic."""

    def __init__(self, issuer: enrollment.AgentIssuer) -> None:
        self.issuer = issuer
        for outcome in enrollment.OUTCOMES:  # every series exists from the start, at 0
            metrics.ENROLLMENTS.labels(outcome=outcome)

    @grpc_errors
    async def Enroll(  # noqa: N802 - gRPC's method name
        self, request: enrollment_pb2.EnrollRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        peer = context.peer()
        try:
            # SQLite and signing are quick, but stay off the event loop anyway.
            issued = await asyncio.to_thread(self.issuer.enroll, request.name, request.token, request.csr_pem)
        except TandemError as exc:
            metrics.ENROLLMENTS.labels(outcome=exc.reason).inc()
            log.warning("enrollment of %r from %s refused (%s): %s", request.name, peer, exc.code.name, exc)
            raise
        metrics.ENROLLMENTS.labels(outcome=enrollment.ISSUED).inc()
        log.info("enrolled agent %r from %s: certificate valid until %s", request.name, peer,
                 issued.not_after.isoformat(timespec="seconds"))
        return _answer(issued)


class RenewalService(enrollment_pb2_grpc.RenewalServicer):
    """Thin adapter: who the caller is comes from its verified certificate, never the request."""

    def __init__(self, issuer: enrollment.AgentIssuer) -> None:
        self.issuer = issuer

    @grpc_errors
    async def Renew(  # noqa: N802 - gRPC's method name
        self, request: enrollment_pb2.RenewRequest, context: grpc.aio.ServicerContext
    ) -> enrollment_pb2.EnrollResponse:
        caller: certs.Identity | str = "an unknown caller"
        try:
            caller = _caller(context).identity
            issued = await asyncio.to_thread(self.issuer.renew, caller.name, request.csr_pem)
        except TandemError as exc:
            metrics.ENROLLMENTS.labels(outcome=exc.reason).inc()
            log.warning("renewal of %s from %s refused (%s): %s", caller, context.peer(), exc.code.name, exc)
            raise
        metrics.ENROLLMENTS.labels(outcome=enrollment.RENEWED).inc()
        log.info("renewed %s: certificate valid until %s", caller, issued.not_after.isoformat(timespec="seconds"))
        return _answer(issued)


def _caller(context: grpc.aio.ServicerContext) -> tls.Peer:
    """The renewing agent, from its verified certificate; refused with the outcome as reason."""
    if not context.auth_context().get("x509_pem_cert"):
        raise Unauthenticated("renewal needs the agent's current certificate: call the renewal port "
                              "(`tandem ca --renew-listen`) with mutual TLS", reason=enrollment.NOT_AGENT)
    try:
        found = tls.peer(context)
    except Unauthenticated as exc:
        raise Unauthenticated(f"{exc}: enrol again with a new token if it should come back",
                              reason=enrollment.REVOKED) from None
    if found.identity.role != certs.ROLE_AGENT:
        raise PermissionDenied(f"only agents renew here; {found.identity} presented", reason=enrollment.NOT_AGENT)
    return found


class OwnCertificate:
    """The service's TLS certificate: made from the intermediate, in memory only, and made
    again once half its life has passed (for new connections; open ones keep theirs).

    gRPC asks each port's fetcher before every handshake, from its own threads."""

    def __init__(self, issuer: enrollment.AgentIssuer, hosts: list[str], lifetime: datetime.timedelta,
                 clock: Callable[[], float] = time.time) -> None:
        self._issuer, self._hosts, self._lifetime, self._clock = issuer, hosts, lifetime, clock
        self._lock = threading.Lock()
        self.generation = 1
        self.pair, self.not_after, self._renew_at = self._make()

    def _make(self) -> tuple[tuple[bytes, bytes], datetime.datetime, float]:
        """A new (key, chain), its expiry, and when to make the next: halfway."""
        key, chain, not_after = self._issuer.server_certificate(self._hosts, self._lifetime)
        now = self._clock()
        return (key, chain), not_after, now + (not_after.timestamp() - now) / 2

    def _current(self) -> int:
        with self._lock:
            if self._clock() >= self._renew_at:
                self.pair, self.not_after, self._renew_at = self._make()
                self.generation += 1
                log.info("the enrollment service's own certificate was made again (valid until %s)",
                         self.not_after.isoformat(timespec="seconds"))
            return self.generation

    def credentials(self, client_roots: bytes | None) -> grpc.ServerCredentials:
        """Credentials for one port: mutual TLS against `client_roots` when given."""
        seen = self.generation

        def config() -> grpc.ServerCertificateConfiguration:
            return grpc.ssl_server_certificate_configuration([self.pair], root_certificates=client_roots)

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal seen
            try:
                generation = self._current()
                if generation == seen:
                    return None
                seen = generation
                return config()
            except Exception as exc:  # noqa: BLE001 - on gRPC's thread nothing may escape: keep the current one
                log.error("keeping the enrollment service's current certificate: %s", exc)
                return None

        return grpc.dynamic_ssl_server_credentials(config(), fetch,
                                                   require_client_authentication=client_roots is not None)


@dataclass
class CaConfig:
    ca_dir: Path
    listen: str
    renew_listen: str | None = None  # no renewal port when None
    hosts: list[str] = field(default_factory=list)
    cert_hours: float = enrollment.DEFAULT_CERT_HOURS
    metrics: str | None = None
    state_dir: Path | None = None  # where tokens.sqlite is kept: ca_dir when None
    server_cert_lifetime: datetime.timedelta = enrollment.SERVER_CERT_LIFETIME


class CaServer:
    """Start-up and shutdown order of the enrollment service."""

    def __init__(self, config: CaConfig) -> None:
        self.config = config
        self.issuer = enrollment.AgentIssuer(config.ca_dir, config.cert_hours, state_dir=config.state_dir)
        self.own = OwnCertificate(self.issuer, config.hosts, config.server_cert_lifetime)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.renew_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        cfg = self.config
        if cfg.metrics:
            _, self.metrics_port = metrics.serve_metrics(cfg.metrics)
        self.server = grpcserver.create_server([metrics.MetricsInterceptor()], max_connections=MAX_CONNECTIONS)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(self.issuer), self.server)
        self.port = grpcserver.bind(self.server, cfg.listen, self.own.credentials(None))
        if cfg.renew_listen is not None:
            # Agents' certificates chain to the deployment's root; the CA's own deny list refuses revoked ones.
            roots = (cfg.ca_dir / "ca.pem").read_bytes()
            revocation.REGISTRY.trust(roots, revocation.REGISTRY.for_directory(cfg.ca_dir))
            enrollment_pb2_grpc.add_RenewalServicer_to_server(RenewalService(self.issuer), self.server)
            self.renew_port = grpcserver.bind(self.server, cfg.renew_listen, self.own.credentials(roots))
        await self.server.start()
        renewing = f", renewals on port {self.renew_port}" if cfg.renew_listen is not None else ""
        log.info("enrollment service on port %d%s, issuing %g-hour agent certificates from %s",
                 self.port, renewing, cfg.cert_hours, cfg.ca_dir)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(GRACE_SECONDS)
        self.issuer.tokens.close()
