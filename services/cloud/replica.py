"""A cloud inference replica (`tandem serve`): Inference without the coordinator's state.

The coordinator keeps jobs, rounds and the model store on one volume; inference
scales apart from it. A replica mirrors the published versions it serves into a
local cache directory (polling `Admin.ListModelVersions` for each model's serving
version, downloading with `Coordinator.DownloadModel`, as a delta from the version
it holds where it can; a rollback to a version still held needs no download) and
serves them with the same `ModelServer` as the coordinator: batched, hot-swapped,
on the GPU when there is one. It reports NOT_SERVING until its first mirror pass has
loaded every model that has a serving version, so a Kubernetes Service sends it nothing
before then, and again from SIGTERM on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health
from safetensors import SafetensorError

from cloud.models import no_serving_message
from cloud.serving import ModelServer, ServingConfig, served_models
from cloud.store import VersionRow
from cloud.tensorfile import read_tensors, write_tensors
from tandem import grpcserver, inference, metrics, tls, training, wire
from tandem.errors import FailedPrecondition, InvalidArgument, NotFound
from tandem.transfer import Download, HeldVersion  # the client side of a model download, as agents do it
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = [inference.SERVICE_NAME]
GRACE_SECONDS = 5.0
DOWNLOAD_TIMEOUT = 300.0


class ModelMirror:
    """The serving versions of some models, copied into a local directory.

    It answers `ModelServer`'s questions (`serving`, `version`, `add_listener`) from
    what it holds: the serving version of each model and the ones that served before
    it while this replica ran, up to `keep` per model."""

    def __init__(self, cache: Path, models: list[str], keep: int = 4) -> None:
        self._cache = cache
        self._models = models
        self._keep = keep
        self._held: dict[str, dict[int, VersionRow]] = {name: {} for name in models}
        self._serving: dict[str, int] = {}  # model -> the serving version (held)
        self._listeners: list[Callable[[str, VersionRow], None]] = []
        self._specs: dict[str, dict[str, wire.TensorSpec]] = {}

    def add_listener(self, listener: Callable[[str, VersionRow], None]) -> None:
        """Call `listener(model, row)` when the serving version changes to `row`."""
        self._listeners.append(listener)

    def serving(self, model: str) -> VersionRow | None:
        version = self._serving.get(model)
        return self._held.get(model, {}).get(version) if version is not None else None

    def version(self, model: str, version: int) -> VersionRow:
        if not model:
            raise InvalidArgument("model name is required")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0, got {version}")
        if model not in self._held:
            raise NotFound(f"this replica does not serve {model!r}; it serves {self._models}")
        held = self._held[model]
        if version == 0:
            serving = self.serving(model)
            if serving is None:
                raise FailedPrecondition(no_serving_message(model))
            return serving
        row = held.get(version)
        if row is None:
            have = sorted(held) or "none yet"
            raise NotFound(f"this replica holds versions {have} of {model!r}, not {version}; the coordinator has all")
        return row

    def corrupt(self, row: VersionRow, reason: str) -> None:
        """A mirrored file does not load as recorded: forget it, so that the next pass
        fetches the version again (if it is still the newest) and the one before serves."""
        held = self._held.get(row.model, {})
        if held.get(row.version) is not row:
            return  # forgotten already: logged once
        del held[row.version]
        if self._serving.get(row.model) == row.version:
            del self._serving[row.model]
        Path(row.path).unlink(missing_ok=True)
        metrics.FILES_CORRUPT.labels("model").inc()
        log.warning("mirrored %s v%d is corrupt (%s); dropped, to be fetched again", row.model, row.version, reason)

    async def sync(self, admin: admin_pb2_grpc.AdminStub, coordinator: coordinator_pb2_grpc.CoordinatorStub) -> int:
        """Follow every served model's serving version (fetched unless held); returns how many were fetched."""
        listed = await admin.ListModelVersions(admin_pb2.ListModelVersionsRequest(), timeout=30)
        serving = {v.model: v for v in listed.versions if v.model in self._held and v.stage == "serving"}
        fetched = 0
        for name, v in serving.items():
            if self._serving.get(name) == v.version:
                continue
            row = self._held[name].get(v.version)
            if row is None or row.sha256 != v.sha256:
                row = await self._fetch(coordinator, v, self.serving(name))
                fetched += 1
            self._add(row)
            self._serving[name] = row.version
            log.info("replica serves %s v%d", name, row.version)
            for listener in self._listeners:
                listener(name, row)
        return fetched

    async def _fetch(
        self, stub: coordinator_pb2_grpc.CoordinatorStub, v: admin_pb2.ModelVersion, current: VersionRow | None
    ) -> VersionRow:
        held = await asyncio.to_thread(_held, current) if current else None
        arrays = await Download(v.model, v.version, v.sha256, self._specs_of(v.model), held).run(
            stub, timeout=DOWNLOAD_TIMEOUT
        )
        path = self._cache / v.model / f"{v.version:08d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        size, _ = await asyncio.to_thread(write_tensors, path, arrays)
        log.info("mirrored %s v%d (%d bytes)", v.model, v.version, size)
        return VersionRow(v.model, v.version, v.sha256, str(path), v.job_id or None, v.round or None,
                          time.time(), size)

    def _specs_of(self, model: str) -> dict[str, wire.TensorSpec]:
        if model not in self._specs:
            self._specs[model] = training.state_specs(model)
        return self._specs[model]

    def _add(self, row: VersionRow) -> None:
        """Hold `row` (about to serve); the least recently added beyond `keep` go."""
        held = self._held[row.model]
        held.pop(row.version, None)
        held[row.version] = row  # dicts keep insertion order: the oldest added first
        for old in list(held)[: max(0, len(held) - self._keep)]:
            Path(held.pop(old).path).unlink(missing_ok=True)


def _held(row: VersionRow) -> HeldVersion | None:
    """The mirrored version as a delta base, if its file still holds what was recorded
    (a corrupt base would make every delta from it fail: the whole version is fetched)."""
    try:
        arrays = read_tensors(Path(row.path))
    except (OSError, SafetensorError):
        return None
    return HeldVersion(row.version, row.sha256, arrays) if wire.state_sha256(arrays) == row.sha256 else None


@dataclass(frozen=True)
class ReplicaConfig:
    cloud: str
    certs: Path
    listen: str
    cache: Path
    health: str | None = None
    metrics: str | None = None
    poll_interval: float = 2.0
    serving: ServingConfig = ServingConfig()  # its `models` are the ones mirrored and served


class Replica:
    def __init__(self, config: ReplicaConfig) -> None:
        self.models = served_models(config.serving)
        self.config = cfg = config
        self.mirror = ModelMirror(cfg.cache, self.models)
        self.serving = ModelServer(self.mirror, cfg.serving)
        self.mirror.add_listener(self.serving.serving_changed)
        self.server = grpcserver.create_server([metrics.MetricsInterceptor()])
        inference_pb2_grpc.add_InferenceServicer_to_server(inference.InferenceService(self.serving), self.server)
        # Bound and opened by `start`:
        self.port = 0
        self.health_port = 0
        self.metrics_port = 0
        self.channel: grpc.aio.Channel | None = None
        self.health: health.aio.HealthServicer | None = None
        self.health_server: grpc.aio.Server | None = None

    async def start(self) -> None:
        cfg = self.config
        self.channel = grpcserver.secure_channel(cfg.cloud, tls.replica_credentials(cfg.certs))
        self.health = await grpcserver.add_standard_services(self.server, SERVICES)
        self.port = grpcserver.bind(self.server, cfg.listen, tls.replica_server_credentials(cfg.certs))
        self.health_server, self.health_port = await grpcserver.start_health_only(cfg.health, self.health)
        if cfg.metrics:
            _, self.metrics_port = metrics.serve_metrics(cfg.metrics)
        await self.server.start()
        log.info("inference replica listening on port %d, following %s", self.port, cfg.cloud)

    async def run(self, stop: asyncio.Event) -> None:
        """Mirror until `stop`; SERVING from the first complete pass on. Then drain and close."""
        assert self.channel is not None and self.health is not None, "start() first"
        admin = admin_pb2_grpc.AdminStub(self.channel)
        coordinator = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        serving = False
        while not stop.is_set():
            try:
                await self.mirror.sync(admin, coordinator)
                if not serving:
                    await self.serving.start([])  # profiling of the loaded models
                    await _until_loaded(self.serving, self.mirror, self.models)
                    await grpcserver.set_serving(self.health, SERVICES, True)
                    serving = True
                    log.info("replica serving %s", {m: r.version for m in self.models
                                                    if (r := self.mirror.serving(m)) is not None})
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot reach the coordinator (%s: %s); serving what is held",
                            exc.code().name, exc.details())
            try:
                async with asyncio.timeout(self.config.poll_interval):
                    await stop.wait()
            except TimeoutError:
                pass
        await self.health.enter_graceful_shutdown()
        await self.server.stop(GRACE_SECONDS)
        await self.serving.close()
        await self.channel.close()
        if self.health_server is not None:
            await self.health_server.stop(0)


async def _until_loaded(server: ModelServer, mirror: ModelMirror, models: list[str]) -> None:
    """Every model's serving version is loaded (the swaps the mirror triggered have finished)."""
    for name in models:
        row = mirror.serving(name)
        if row is not None:
            await server.get(name, row.version)
