"""The enrollment service (`tandem ca`): its own process, so the intermediate CA's key
is never on the coordinator's serving path.

Server-authenticated TLS only (an enrolling agent has no certificate yet); the
service's own certificate is made from the intermediate at start and kept in memory.
Every answer is logged in one line (never the token) and counted in
`tandem_enrollments_total{outcome}`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tandem import enrollment, grpcserver, metrics
from tandem.errors import TandemError, grpc_errors
from tandem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = enrollment_pb2.DESCRIPTOR.services_by_name["Enrollment"].full_name
GRACE_SECONDS = 2.0
# Few and short calls: a small connection cap keeps a flood from exhausting the process.
MAX_CONNECTIONS = 256


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
        return enrollment_pb2.EnrollResponse(certificate_chain_pem=issued.chain_pem,
                                             not_after=int(issued.not_after.timestamp()))


@dataclass
class CaConfig:
    ca_dir: Path
    listen: str
    hosts: list[str] = field(default_factory=list)
    cert_hours: float = enrollment.DEFAULT_CERT_HOURS
    metrics: str | None = None


class CaServer:
    """Start-up and shutdown order of the enrollment service."""

    def __init__(self, config: CaConfig) -> None:
        self.config = config
        self.issuer = enrollment.AgentIssuer(config.ca_dir, config.cert_hours)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        cfg = self.config
        if cfg.metrics:
            _, self.metrics_port = metrics.serve_metrics(cfg.metrics)
        key, chain = self.issuer.server_certificate(cfg.hosts)
        credentials = grpc.ssl_server_credentials([(key, chain)], require_client_auth=False)
        self.server = grpcserver.create_server([metrics.MetricsInterceptor()], max_connections=MAX_CONNECTIONS)
        enrollment_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentService(self.issuer), self.server)
        self.port = grpcserver.bind(self.server, cfg.listen, credentials)
        await self.server.start()
        log.info("enrollment service on port %d, issuing %g-hour agent certificates from %s",
                 self.port, cfg.cert_hours, cfg.ca_dir)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(GRACE_SECONDS)
        self.issuer.tokens.close()
