"""Start-up and shutdown order of the coordinator, and nothing else."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2

from cloud.disk import DEFAULT_RESERVE_BYTES, HEALTH_NAME, DiskMonitor
from cloud.intake import UPLOAD_IDLE_SECONDS, UpdateIntake
from cloud.jobs import JobManager
from cloud.limits import AgentLimits, LimitsConfig
from cloud.models import ModelRepository
from cloud.observations import DirectSource, PrometheusSource, Source, heartbeats
from cloud.placement import ControllerConfig, PlacementController
from cloud.registry import Registry
from cloud.rollouts import Rollouts
from cloud.service import AdminService, CoordinatorService
from cloud.serving import ModelServer, ServingConfig
from cloud.statelock import StateLock
from cloud.store import Store, VersionRow
from tandem import grpcserver, inference, lifecycle, metrics, tls
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = [
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    inference.SERVICE_NAME,
]


@dataclass(frozen=True)
class CloudConfig:
    listen: str
    certs: Path
    state: Path
    metrics: str | None = None
    health: str | None = None  # plaintext health-only port for probes that cannot present a certificate
    heartbeat_interval: float = 5.0
    grace: float = 10.0
    serving: ServingConfig = ServingConfig()
    placement: ControllerConfig | None = None  # None: no placement controller
    prometheus_url: str | None = None  # the controller's source; None reads /metrics and heartbeats directly
    limits: LimitsConfig = LimitsConfig()  # per agent: streams open at once, requests and request bytes per second
    disk_reserve: int = DEFAULT_RESERVE_BYTES  # free bytes on the state volume below which uploads are refused
    upload_idle_seconds: float = UPLOAD_IDLE_SECONDS  # an upload silent this long is ended DEADLINE_EXCEEDED
    identity: tuple[Path, Path] | None = None  # the server's (certificate, key); None: cloud.pem in `certs`


class Coordinator:
    """The coordinator's parts, built and wired here; `start` brings them up in order."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = cfg = config
        lifecycle.tune_allocator()
        self.lock = StateLock(cfg.state)  # first: nothing may touch a state directory another process holds
        self.store = Store(cfg.state)
        self.registry = Registry(stale_after=2 * cfg.heartbeat_interval)
        self.models = ModelRepository(self.store)
        self.rollouts = Rollouts(self.store, self.registry, self.models)
        self.jobs = JobManager(self.store, self.registry, self.models, self.rollouts)
        self.serving = ModelServer(self.models, cfg.serving)
        source: Source = PrometheusSource(cfg.prometheus_url) if cfg.prometheus_url else DirectSource(heartbeats(self.registry))
        self.placement = PlacementController(source, self.registry, self.store, cfg.placement or ControllerConfig())
        self.models.add_serving_listener(self.serving.serving_changed)
        self.models.add_listener(self._announce)
        self.models.add_serving_listener(lambda _, row: self._announce(row, serving=True))
        self.limits = AgentLimits(cfg.limits)
        self.server = grpcserver.create_server([metrics.MetricsInterceptor(), self.limits])
        self.disk = DiskMonitor(cfg.state, cfg.disk_reserve)
        intake = UpdateIntake(self.store, self.jobs, self.models, self.disk, cfg.upload_idle_seconds)
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(
            CoordinatorService(self.store, self.registry, self.models, self.jobs, intake, self.rollouts,
                               cfg.heartbeat_interval, limits=self.limits),
            self.server,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(self.store, self.registry, self.models, self.jobs, self.placement, self.rollouts), self.server
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(inference.InferenceService(self.serving), self.server)
        # Bound and started by `start`:
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.health: health.aio.HealthServicer | None = None
        self.health_server: grpc.aio.Server | None = None
        self._controller: asyncio.Task[None] | None = None
        self._disk_watch: asyncio.Task[None] | None = None
        self._rollout_judge: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        self.health = await grpcserver.add_standard_services(self.server, SERVICES)
        # Every address bound before anything starts: one in use refuses the start (one
        # line), with nothing to undo but the lock.
        try:
            self.port = grpcserver.bind(self.server, cfg.listen, tls.server_credentials(cfg.certs, cfg.identity))
            if cfg.metrics:
                _, self.metrics_port = metrics.serve_metrics(cfg.metrics)
            self.health_server, self.health_port = await grpcserver.start_health_only(cfg.health, self.health)
        except ValueError:
            self.store.close()
            self.lock.release()
            raise
        await self.serving.start(self.serving.served)  # serving versions loaded before serving
        resumed = self.jobs.resume()  # before serving: uploads find their round's runner
        if resumed:
            log.info("resumed jobs %s", resumed)
        await self.server.start()
        self._controller = asyncio.create_task(self.placement.run()) if cfg.placement else None
        await grpcserver.set_serving(self.health, SERVICES, True)
        self._disk_watch = asyncio.create_task(self.disk.run(self._disk_health))
        self._rollout_judge = asyncio.create_task(self.rollouts.run(), name="rollouts")
        if cfg.identity is None:  # a region's coordinator: the region says its tier
            metrics.TIER.labels("cloud", "").set(1)
        log.info("coordinator listening on port %d", self.port)

    async def _disk_health(self, low: bool) -> None:
        """A full state volume shows in a health entry of its own, HEALTH_NAME. The server
        ("") stays SERVING: Kubernetes' probes read it, and NOT_SERVING would take the
        coordinator out of its Service (downloads, inference and control streams work on
        a full disk) or restart it (which frees nothing). Metrics and an alert say it too."""
        if self.health is not None:
            status = health_pb2.HealthCheckResponse.NOT_SERVING if low else health_pb2.HealthCheckResponse.SERVING
            await self.health.set(HEALTH_NAME, status)

    def _announce(self, row: VersionRow, serving: bool = False) -> None:
        """Tell every connected agent of a new version, and of a new serving version
        (edges serving the model switch to it)."""
        notice = coordinator_pb2.ModelNotice(model=row.model, version=row.version, sha256=row.sha256,
                                             job_id=row.job_id or "", serving=serving)
        self.registry.broadcast(coordinator_pb2.CoordinatorMessage(model=notice))

    async def stop(self) -> None:
        """Drain: NOT_SERVING first, end control streams, let uploads finish, then close."""
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        self.registry.close_all("coordinator shutting down")
        await self.server.stop(self.config.grace)
        await self.jobs.shutdown()
        if self._controller is not None:
            self._controller.cancel()
        for task in (self._disk_watch, self._rollout_judge):
            if task is not None:
                task.cancel()
        await self.serving.close()
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.store.close()
        self.lock.release()
