"""Published model versions: files on disk, records in the store. Every file is checked
against its recorded hash before it is served (`cloud.integrity`); a corrupt one is
quarantined, logged once, answered DATA_LOSS, and the rest keeps serving."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from cloud.integrity import Verifier, corrupt_message
from cloud.spool import Spool
from cloud.store import FileKind, ModelEvent, Stage, Store, VersionRow
from cloud.tensorfile import TensorFile, content_sha256, size_problem, write_tensor_pieces, write_tensors
from tandem import deltas, metrics, tasks, wire
from tandem.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import tensor_pb2

log = logging.getLogger(__name__)

def no_serving_message(model: str) -> str:
    """What a request that names no version of a model with no serving version is told."""
    return (f"model {model!r} has no serving version: a job's versions are candidates until promoted "
            f"(by the job's --promote policy at completion, or `tandem models promote {model} VERSION`); "
            f"name a version explicitly to use a candidate")


class ModelRepository:
    """Reads and writes global model versions. Versions are numbered per model name.

    Each model has at most one serving version (docs/lifecycle.md): what a request
    that names no version gets. A version becomes serving only by `promote` (a job's
    policy or an operator) or `rollback`; every other version is a candidate."""

    def __init__(self, store: Store) -> None:
        self._store = store
        for leftover in (store.directory / "models").glob("*/*.part"):
            leftover.unlink()  # a publication broken by a crash
        self._specs: dict[str, dict[str, wire.TensorSpec]] = {}
        self._reserved: dict[str, int] = {}
        self._listeners: list[Callable[[VersionRow], None]] = []
        self._serving_listeners: list[Callable[[str, VersionRow], None]] = []
        self._verifier = Verifier()
        self._scan()
        for name in store.version_models():
            metrics.SERVING_VERSION.labels(name).set(store.serving_version(name))

    def _scan(self) -> None:
        """Quarantine at once every version whose file is missing or not the size written
        (a stat each, so a truncated newest version is never tried); what a stat cannot
        see is found when the file is first served."""
        served = self._store.list_versions()
        for row in served:
            problem = size_problem(Path(row.path), row.bytes)
            if problem is not None:
                self.quarantine(row, problem)
        held_back = {(r.model, r.version) for r in self._store.list_versions(quarantined=True)}
        held_back -= {(r.model, r.version) for r in served}
        for name in {model for model, _ in held_back}:  # quarantined by an earlier run
            metrics.VERSIONS_QUARANTINED.labels(name).inc(sum(1 for model, _ in held_back if model == name))

    def quarantine(self, row: VersionRow, reason: str, kind: FileKind = FileKind.MODEL) -> None:
        """Record `row`'s file (or its delta's) as corrupt: never served again. Logged
        and counted once per file, however many requests find it."""
        was_serving = self._store.serving_version(row.model)
        if not self._store.quarantine(row.model, row.version, kind, reason):
            return
        path = row.path if kind is FileKind.MODEL else row.delta_path
        served = "the whole version is sent instead" if kind is FileKind.DELTA else "no longer served"
        log.warning("quarantined %s v%d (%s file %s): %s; %s", row.model, row.version, kind, path, reason, served)
        metrics.FILES_CORRUPT.labels(kind.value).inc()
        if kind is FileKind.MODEL:
            metrics.VERSIONS_QUARANTINED.labels(row.model).inc()
            serving = self.serving(row.model)
            metrics.SERVING_VERSION.labels(row.model).set(serving.version if serving else 0)
            if row.version == was_serving and serving is not None:  # the one served before it serves again
                log.warning("%s v%d was serving: %s v%d serves instead", row.model, row.version, row.model,
                            serving.version)
                for listener in self._serving_listeners:
                    listener(row.model, serving)

    def corrupt(self, row: VersionRow, reason: str) -> None:
        """A version's file did not load as recorded (inference found it): quarantine it."""
        self.quarantine(row, reason)

    def add_listener(self, listener: Callable[[VersionRow], None]) -> None:
        """Call `listener(row)` whenever a version is published (inference swaps it in)."""
        self._listeners.append(listener)

    def add_serving_listener(self, listener: Callable[[str, VersionRow], None]) -> None:
        """Call `listener(model, row)` whenever a model's serving version changes to `row`."""
        self._serving_listeners.append(listener)

    # ---- what is served --------------------------------------------------------

    def serving(self, model: str) -> VersionRow | None:
        """The serving version of `model` (a corrupt one falls back to the one before it)."""
        version = self._store.serving_version(model)
        return self._store.get_version(model, version) if version else None

    def stages(self, model: str) -> dict[int, Stage]:
        return self._store.stages(model)

    def events(self, model: str) -> list[ModelEvent]:
        return self._store.events(model)

    def promote(self, model: str, version: int, actor: str, reason: str = "") -> tuple[VersionRow, ModelEvent]:
        """Make `version` the serving one (NOT_FOUND if it does not exist, DATA_LOSS if it
        is corrupt, FAILED_PRECONDITION if it already serves)."""
        if version <= 0:
            raise InvalidArgument(f"promote a version >= 1, got {version}")
        row = self.version(model, version)
        current = self._store.serving_version(model)
        if current == version:
            raise FailedPrecondition(f"{model} v{version} is already the serving version")
        return row, self._changed(row, "promote", current, actor, reason)

    def rollback(self, model: str, actor: str, reason: str = "") -> tuple[VersionRow, ModelEvent]:
        """Serve again the version that served before the current one."""
        current = self._store.serving_version(model)
        if not current:
            self.version(model, 0)  # NOT_FOUND or FAILED_PRECONDITION, saying why
        stack = [v for v in self._store.serving_stack(model) if self._store.quarantined(model, v) is None]
        earlier = [v for v in stack[: len(stack) - 1 - stack[::-1].index(current)] if v != current]
        if not earlier:
            raise FailedPrecondition(f"{model} v{current} is the first version served: there is nothing to roll "
                                     f"back to; promote another (`tandem models promote {model} VERSION`)")
        row = self.version(model, earlier[-1])
        return row, self._changed(row, "rollback", current, actor, reason)

    def keep(self, model: str, version: int, actor: str, reason: str) -> ModelEvent:
        """Record a job's decision not to promote `version` (the history shows it)."""
        return self.note(model, "kept", version, actor, reason)

    def note(self, model: str, event: str, version: int, actor: str, reason: str) -> ModelEvent:
        """Record an event about `version` that does not change what is served (a job's
        decision to keep it; a staged rollout's start or end, cloud.rollouts)."""
        return self._store.add_event(model, event, version, self._store.serving_version(model), actor, reason)

    def _changed(self, row: VersionRow, event: str, previous: int, actor: str, reason: str) -> ModelEvent:
        recorded = self._store.add_event(row.model, event, row.version, previous, actor, reason)
        metrics.SERVING_VERSION.labels(row.model).set(row.version)
        metrics.MODEL_PROMOTIONS.labels(row.model, event).inc()
        log.info("%s: %s serves v%d (was %s) by %s%s", event, row.model, row.version,
                 f"v{previous}" if previous else "none", actor, f": {reason}" if reason else "")
        for listener in self._serving_listeners:
            listener(row.model, row)
        return recorded

    def specs(self, model: str) -> dict[str, wire.TensorSpec]:
        """The tensors every version (and every update) of `model` must have."""
        if model not in self._specs:
            try:
                self._specs[model] = tasks.get(model).specs
            except tasks.TaskError as exc:
                raise NotFound(str(exc)) from None
        return self._specs[model]

    def initial_arrays(self, model: str, seed: int) -> dict[str, np.ndarray]:
        """The seeded initial model's federated tensors, as float32 arrays."""
        task = tasks.get(model)
        return task.state_arrays(task.build(seed))

    async def write(self, model: str, arrays: Mapping[str, np.ndarray], job_id: str, round_: int) -> VersionRow:
        """Write the next version's file (not yet recorded: the caller commits it).

        Versions are not kept in memory: downloads and the next round read the file
        piece by piece (`TensorFile`), so a large model costs the coordinator nothing
        between rounds."""
        version = self._reserve(model)
        path = self._store.model_path(model, version)
        size, sha = await asyncio.to_thread(write_tensors, path, arrays)
        origin = ("initial" if round_ == 0 else "round") if job_id else "publish"
        return VersionRow(model, version, sha, str(path), job_id, round_, time.time(), size, origin=origin)

    async def write_changed(
        self, model: str, base: TensorFile, change_of: Callable[[str], deltas.Change], job_id: str, round_: int
    ) -> VersionRow:
        """Write the next version as base + change, slice by slice: neither the base nor
        the new version is ever whole in memory, and `change_of(name)` is called once
        per tensor, as it is written (not yet recorded: the caller commits it)."""
        version = self._reserve(model)
        path = self._store.model_path(model, version)

        def pieces(name: str) -> Iterator[np.ndarray]:
            change = change_of(name)
            for first, piece in base.slices(name):
                deltas.apply_change(piece, first, change)
                yield piece

        try:
            size, sha = await asyncio.to_thread(write_tensor_pieces, path, base.specs, pieces)
        except Exception:  # not on cancellation: the worker thread may still be writing the file
            self._release(model, version)
            raise
        return VersionRow(model, version, sha, str(path), job_id, round_, time.time(), size, origin="round")

    async def publish(self, model: str, arrays: Mapping[str, np.ndarray], job_id: str = "", round_: int = 0) -> VersionRow:
        """Write, record and announce the next version of `model` made of `arrays`."""
        row = await self.write(model, arrays, job_id, round_)
        self._store.add_version(row)
        self.published(row)
        return row

    async def receive(self, chunks: AsyncIterator[pb.ModelChunk]) -> VersionRow:
        """Publish a whole model sent by an operator. It goes to disk as it arrives and
        is checked there, one slice at a time, against the zoo model, its hash and for
        non-finite values before it becomes a version: its size costs no memory."""
        first = await anext(chunks, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("a model upload must start with a ModelHeader")
        header = first.header
        if header.steps:
            raise InvalidArgument("publish a whole model, not delta steps")
        specs = self.specs(header.model)
        folder = self._store.model_path(header.model, 1).parent
        spool = Spool(folder / f"publish-{uuid.uuid4().hex[:12]}.part", specs)
        try:
            async for message in chunks:
                if not message.HasField("tensor"):
                    raise InvalidArgument("only TensorChunks may follow the ModelHeader")
                spool.add(message.tensor)
            file = await asyncio.to_thread(spool.finish)
            await asyncio.to_thread(_check_finite, file)
            sha = spool.content_sha256()
            if sha != header.sha256:
                raise InvalidArgument(f"the tensors hash to {sha}, not to the header's sha256 {header.sha256!r}")
            # Numbered once complete, so that a round closing meanwhile does not end up newer.
            version = self._reserve(header.model)
            path = self._store.model_path(header.model, version)
            await asyncio.to_thread(spool.move, path)
        finally:
            spool.discard()
        row = VersionRow(header.model, version, sha, str(path), "", 0, time.time(), path.stat().st_size,
                         origin="publish")
        self._store.add_version(row)
        self.published(row)
        return row

    def discard(self, row: VersionRow) -> None:
        """Delete a version that was written but never recorded (its round's close failed,
        say for space) with its delta, and free its number for the retry."""
        Path(row.path).unlink(missing_ok=True)
        self._store.delta_path(row.model, row.version).unlink(missing_ok=True)
        self._release(row.model, row.version)

    def _reserve(self, model: str) -> int:
        """The next version number, reserved at once (no await between read and write),
        so concurrent writers never share one."""
        version = max(self._store.next_version(model), self._reserved.get(model, 0) + 1)
        self._reserved[model] = version
        return version

    def _release(self, model: str, version: int) -> None:
        """A reserved number that nothing was recorded under is free again (if still the last)."""
        if self._reserved.get(model) == version:
            self._reserved[model] = version - 1

    def published(self, row: VersionRow) -> None:
        """Announce a recorded version. Its file and its delta's were hashed as they were
        written (a round's close records the delta's hash with the version), so both are
        trusted as they stand; a delta recorded without a hash gets one now, so that it
        too is checked before it is served."""
        self._verifier.trust(Path(row.path))
        if row.delta_path is not None:
            if row.delta_sha256 is None:
                self._store.set_delta_sha256(row.model, row.version, content_sha256(Path(row.delta_path)))
            self._verifier.trust(Path(row.delta_path))
        metrics.MODEL_VERSION.labels(row.model).set(row.version)
        for listener in self._listeners:
            listener(row)

    def newest(self, model: str) -> VersionRow | None:
        """The newest version not quarantined (whatever its stage)."""
        return self._store.get_version(model, 0)

    def serving_notices(self) -> list[pb.ModelNotice]:
        """The serving version of every model that has one."""
        rows = [self.serving(name) for name in self._store.version_models()]
        return [pb.ModelNotice(model=r.model, version=r.version, sha256=r.sha256, job_id=r.job_id or "", serving=True)
                for r in rows if r is not None]

    def version(self, model: str, version: int) -> VersionRow:
        """Version `version` of `model`; 0: its serving version (FAILED_PRECONDITION,
        saying how to promote one, if it has none)."""
        if not model:
            raise InvalidArgument("model name is required")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0, got {version}")
        if version == 0:
            serving = self.serving(model)
            if serving is not None:
                return serving
            if self._store.get_version(model, 0) is not None:
                raise FailedPrecondition(no_serving_message(model))
        row = self._store.get_version(model, version)
        if row is None:
            what = "no version" if version == 0 else f"no version {version}"
            raise NotFound(f"model {model!r} has {what}")
        if version != 0 and (bad := self._store.quarantined(model, version)) is not None:
            raise DataLoss(corrupt_message(model, version, bad.reason))
        return row

    async def servable(self, model: str, version: int) -> VersionRow:
        """`version` (0: the serving one) with its file checked against its hash:
        DataLoss, and quarantined, if it does not match."""
        while True:
            row = self.version(model, version)
            problem = await self._verifier.problem(Path(row.path), row.sha256, row.bytes)
            if problem is None:
                return row
            self.quarantine(row, problem)
            if version != 0:
                raise DataLoss(corrupt_message(model, version, problem))

    def file(self, model: str, version: int) -> tuple[VersionRow, TensorFile]:
        row = self.version(model, version)
        return row, TensorFile(Path(row.path))

    async def response(
        self, model: str, version: int, have_version: int
    ) -> tuple[pb.ModelHeader, Callable[[], Iterator[tensor_pb2.TensorChunk]]]:
        """What to send an agent asking for `version` while holding `have_version`:
        the chain of encoded deltas between them when every step has one that checks
        out and they are smaller than the model, else the whole model. Returns the
        header and a function that yields the chunks, read from the files as they go."""
        row = await self.servable(model, version)
        file = TensorFile(Path(row.path))
        header = pb.ModelHeader(model=row.model, version=row.version, sha256=row.sha256)
        steps = await self._checked(self._chain(row, have_version))
        if steps and sum(s.delta_bytes or 0 for s in steps) < file.nbytes:
            files = []
            for step in steps:
                assert step.delta_path is not None
                files.append((f"{step.version}/", TensorFile(Path(step.delta_path))))
                header.steps.append(
                    pb.DeltaStep(from_version=step.delta_from, to_version=step.version, codec=step.delta_codec)
                )
        else:
            files = [("", file)]
            header.tensors.extend(spec.to_proto() for spec in file.specs.values())
        header.total_bytes = sum(f.nbytes for _, f in files)
        header.total_chunks = sum(f.chunk_count() for _, f in files)

        def chunks() -> Iterator[tensor_pb2.TensorChunk]:
            # Sorted by full name, as wire.iter_chunks orders a dict of all of them.
            try:
                for prefix, f in sorted(files, key=lambda pf: pf[0]):
                    yield from f.chunks(prefix)
            except OSError:  # cut short since it was checked: the next request checks it again
                raise DataLoss(corrupt_message(row.model, row.version, "its file changed while sent")) from None

        return header, chunks

    async def _checked(self, steps: list[VersionRow]) -> list[VersionRow]:
        """`steps` if every delta in them matches its recorded hash, else none (the whole
        version goes instead); a delta that does not is quarantined."""
        for step in steps:
            if step.delta_path is None or step.delta_sha256 is None:
                return []  # written before deltas had hashes: unchecked, so never served
            if self._store.quarantined(step.model, step.version, FileKind.DELTA) is not None:
                return []
            problem = await self._verifier.problem(Path(step.delta_path), step.delta_sha256, None)
            if problem is not None:
                self.quarantine(step, problem, FileKind.DELTA)
                return []
        return steps

    def _chain(self, row: VersionRow, have_version: int) -> list[VersionRow]:
        """Versions from have_version (exclusive) to row (inclusive), if deltas link them."""
        if have_version <= 0 or have_version >= row.version:
            return []
        chain = []
        while row.version != have_version:
            if row.delta_path is None or row.delta_from is None or row.delta_from < have_version:
                return []
            chain.append(row)
            previous = self._store.get_version(row.model, row.delta_from)
            if previous is None:
                return []
            row = previous
        return chain[::-1]


def _check_finite(file: TensorFile) -> None:
    for name in file.specs:
        for _, piece in file.slices(name):
            if not np.isfinite(piece).all():
                raise InvalidArgument(f"tensor {name!r} holds non-finite values")
