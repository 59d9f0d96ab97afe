"""Cloud inference: every published model version, batched, on the GPU when there is one.

A request that names no version gets the model's serving version (docs/lifecycle.md):
it is loaded as soon as it is promoted (or rolled back to) and then swapped in:
requests that arrive after the swap get it, requests already queued finish on the
version they were queued for (batches are keyed by version), so a swap neither fails
nor delays anything in flight. A model with no serving version answers such a request
FAILED_PRECONDITION, saying how to promote one: never from an untrained network.
Other versions (candidates too) are loaded on request and a few are kept. A version
whose file does not load as recorded is reported to its owner (who quarantines it)
and answered DATA_LOSS; the version that served before it serves again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors import SafetensorError

from cloud.integrity import CorruptFile, corrupt_message
from cloud.models import no_serving_message
from cloud.store import VersionRow
from cloud.tensorfile import content_problem, read_tensors
from tandem import metrics, staged, tasks, wire
from tandem.batching import Batcher, keep_profiled
from tandem.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, TandemError
from tandem.inference import decode_input, model_info
from tandem.staged import StagedModel
from tandem.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingConfig:
    device: str = "auto"
    max_batch: int = 64  # rows per forward pass
    max_delay: float = 0.002  # seconds the oldest request may wait for its batch to fill
    max_queue_rows: int = 8192  # rows waiting, all models together; more is RESOURCE_EXHAUSTED
    max_request_rows: int = 1024  # rows in one request
    # A batch predicted to take less (seconds) runs inline on the event loop, on a CPU:
    # cheaper than a thread switch and a wait for the GIL; dearer ones on the worker thread.
    inline_below: float = 0.001
    kept_versions: int = 4  # other versions kept loaded per model, besides the serving one
    models: tuple[str, ...] = ()  # the models served; empty: every registered task that loads


def served_models(config: ServingConfig) -> list[str]:
    """The models a server with `config` serves, each loaded as a task. Named ones must
    load (ValueError saying why one cannot); with none named, every registered task
    that loads here (the zoo's and installed packages'), the others skipped with a warning."""
    if config.models:
        for name in config.models:
            tasks.get(name)  # TaskError (a ValueError) names the known tasks
        return sorted(config.models)
    served = []
    for name in tasks.names():
        try:
            tasks.get(name)
        except tasks.TaskError as exc:
            log.warning("not serving task %s: %s", name, exc)
            continue
        served.append(name)
    return served


class Versions(Protocol):
    """Where the served versions are recorded: the coordinator's repository, or a replica's mirror."""

    def serving(self, model: str) -> VersionRow | None:
        """The version served when a request names none (None: no serving version)."""

    def version(self, model: str, version: int) -> VersionRow:
        """Version `version` (0: the serving one; FailedPrecondition when there is none)."""

    def corrupt(self, row: VersionRow, reason: str) -> None:
        """`row`'s file does not load as recorded: never offer it again (logged once)."""


def _load(row: VersionRow, device: str) -> StagedModel:
    """The version, loaded and checked against its recorded hash (the bytes loaded are
    the bytes hashed); CorruptFile, with how it differs, if they do not match."""
    path = Path(row.path)
    arrays: dict[str, np.ndarray] | None = None
    with contextlib.suppress(OSError, SafetensorError):
        arrays = read_tensors(path)
    if arrays is None or wire.state_sha256(arrays) != row.sha256:
        raise CorruptFile(content_problem(path, row.sha256, row.bytes) or "its file does not load")
    model = StagedModel(row.model, row.version, row.sha256, arrays, device)
    model.profile(0, model.num_stages)  # warm up, and a first cost for every stage
    return model


class ModelServer:
    """The cloud's inference backend (see `tandem.inference.Backend`)."""

    def __init__(self, models: Versions, config: ServingConfig) -> None:
        self.config = config
        self.device = staged.resolve_device(config.device)
        self._models = models
        self.served = served_models(config)
        self._serving: dict[str, StagedModel] = {}
        self._older: collections.OrderedDict[tuple[str, int], StagedModel] = collections.OrderedDict()
        self._loading: dict[tuple[str, int], asyncio.Task[StagedModel]] = {}
        self._swaps: set[asyncio.Task[None]] = set()
        self._profiler: asyncio.Task[None] | None = None
        # On a GPU the forward pass waits for the device: never on the event loop.
        inline_below = config.inline_below if self.device == "cpu" else 0.0
        self.batcher = Batcher(config.max_batch, config.max_delay, config.max_queue_rows, name="cloud-infer",
                               inline_below=inline_below)
        metrics.INFER_DEVICE.labels(self.device).set(1)

    async def start(self, model_names: list[str], profile_interval: float = 5.0) -> None:
        """Load the serving version of each model, so the first requests do not wait for it,
        and keep every stage's cost measured (placement needs the ones no request runs)."""
        for name in model_names:
            await self._load_serving(name)
        self._profiler = asyncio.create_task(
            keep_profiled(self.batcher, lambda: list(self._serving.values()), profile_interval)
        )

    def serving_changed(self, model: str, row: VersionRow) -> None:
        """`row` is now the model's serving version: load it in the background, then swap it in."""
        if model not in self.served:
            return
        task = asyncio.create_task(self._swap_in(row), name=f"swap-{row.model}-{row.version}")
        self._swaps.add(task)
        task.add_done_callback(self._swaps.discard)

    async def _swap_in(self, row: VersionRow) -> None:
        try:
            model = await self._load(row)
        except DataLoss:
            return  # quarantined and logged by its owner; the one served before it serves
        except Exception:
            log.exception("could not load %s v%d; still serving the previous version", row.model, row.version)
            return
        # Still the serving one? (a rollback may have come while it loaded)
        current = self._models.serving(row.model)
        self._install(model, serving=current is not None and current.version == model.version)

    def _install(self, model: StagedModel, serving: bool) -> None:
        current = self._serving.get(model.model)
        if not serving or (current is not None and current.version == model.version):
            self._keep(model)
            return
        self._serving[model.model] = model
        self._older.pop((model.model, model.version), None)
        if current is not None:
            self._keep(current)
        log.info("serving %s v%d on %s", model.model, model.version, self.device)
        metrics.SERVING_VERSION.labels(model.model).set(model.version)
        self._count(model.model)

    def _keep(self, model: StagedModel) -> None:
        """Keep an older version loaded; forget the least recently used beyond the limit."""
        self._older[(model.model, model.version)] = model
        self._older.move_to_end((model.model, model.version))
        mine = [key for key in self._older if key[0] == model.model]
        for key in mine[: max(0, len(mine) - self.config.kept_versions)]:
            del self._older[key]
        self._count(model.model)

    def _count(self, name: str) -> None:
        held = sum(1 for key in self._older if key[0] == name) + (name in self._serving)
        metrics.INFER_LOADED_VERSIONS.labels(name).set(held)

    async def _load(self, row: VersionRow) -> StagedModel:
        """The version loaded; DataLoss, once its owner has quarantined it, if its file is corrupt."""
        key = (row.model, row.version)
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.create_task(asyncio.to_thread(_load, row, self.device))
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        try:
            return await asyncio.shield(task)
        except CorruptFile as exc:
            self._models.corrupt(row, exc.reason)
            raise DataLoss(corrupt_message(row.model, row.version, exc.reason)) from None

    async def _load_serving(self, name: str) -> StagedModel | None:
        """Load and install the serving version of `name`: a corrupt one is quarantined
        by its owner, which then offers the one that served before it."""
        tried: set[int] = set()
        while (row := self._models.serving(name)) is not None and row.version not in tried:
            tried.add(row.version)
            try:
                model = await self._load(row)
            except DataLoss:
                continue
            self._install(model, serving=True)
            return self._serving.get(name)
        return None

    async def get(self, name: str, version: int) -> StagedModel:
        """The loaded model for (name, version); version 0 is the serving one."""
        if name not in self.served:
            raise NotFound(f"this server does not serve {name!r}; it serves {self.served}")
        if version == 0:
            serving = self._serving.get(name)
            if serving is None:
                serving = await self._load_serving(name)
            if serving is None:
                self._models.version(name, 0)  # NotFound (no version at all) or FailedPrecondition (none serving)
                raise FailedPrecondition(no_serving_message(name))
            return serving
        serving = self._serving.get(name)
        if serving is not None and serving.version == version:
            return serving
        kept = self._older.get((name, version))
        if kept is not None:
            self._older.move_to_end((name, version))
            return kept
        model = await self._load(self._models.version(name, version))
        self._install(model, serving=False)
        return model

    async def infer(self, request: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        try:
            x = decode_input(request, self.config.max_request_rows)
            model = await self.get(request.model, request.version)
            model.check_input(x, request.start_layer)
        except TandemError as exc:
            # A name from the wire labels a series only if it is a model: no unbounded series.
            label = request.model if request.model in self.served else "unknown"
            metrics.INFER_REJECTED.labels(label, exc.reason).inc()
            raise
        key = (model.model, model.version, request.start_layer)
        run = functools.partial(model.run, start_layer=request.start_layer)
        cost = functools.partial(model.predicted_seconds, start_layer=request.start_layer)
        out = await self.batcher.submit(key, x, run, model.model, cost)
        return pb.InferResponse(
            request_id=request.request_id, model=model.model, version=model.version,
            output=wire.to_proto(out), placement=pb.PLACEMENT_CLOUD,
        )

    async def model_info(self, request: pb.ModelInfoRequest) -> pb.ModelInfo:
        if not request.model:
            raise InvalidArgument("model name is required")
        return model_info(await self.get(request.model, request.version))

    async def close(self) -> None:
        if self._profiler is not None:
            self._profiler.cancel()
        for task in list(self._swaps):
            task.cancel()
        await self.batcher.close()

