"""Receiving model updates: validate everything, make it durable, fold it into the
round's sum, then acknowledge. Broken uploads can resume where they stopped.

An update goes to disk as it arrives (`cloud.spool`) and is validated and folded in
from its file one tensor at a time, so the memory an upload takes is a chunk plus a
few copies of the model's largest tensor, whatever the model's size and however many
agents upload at once (at most two are decoded at a time).

An upload that sends nothing for `idle_seconds` is ended DEADLINE_EXCEEDED (what it
delivered is kept for a resume); one that is refused ends at its first bad message,
without reading the rest (`tandem.errors.EndsStream`). Kept partial uploads are freed
when their round ends (closed, or its job stopped, completed or failed)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from cloud.disk import DiskMonitor
from cloud.jobs import JobManager
from cloud.models import ModelRepository
from cloud.phases import Stopwatch, agent_reported
from cloud.rounds import JobRunner
from cloud.spec import JobSpec
from cloud.spool import Spool
from cloud.store import Store, UpdateRow
from cloud.tensorfile import TensorFile
from tandem import compression, deltas, metrics, wire
from tandem.certs import ROLE_AGENT, ROLE_REGION
from tandem.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EndsStream,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TandemError,
)
from tandem.v1 import coordinator_pb2 as pb

PARTIAL_TTL_SECONDS = 600.0
PARTIAL_BUDGET_BYTES = 4 << 30  # on disk, all kept partial uploads together
# An upload stream that sends nothing for this long is ended: a stalled agent must not
# hold a stream, its memory and its round's close. Long enough for a chunk (1 MiB) on
# a slow link (~10 kB/s) and for an agent's pause between its header and its first chunk.
UPLOAD_IDLE_SECONDS = 120.0

UploadKey = tuple[str, int, str]  # job, round, agent
MAX_CONTRIBUTORS = 1_000_000  # agents behind one partial aggregate


def update_digest(header: pb.UpdateHeader, content_sha256: str) -> str:
    """Identity of an update's content: what a byte-identical re-send reproduces."""
    text = f"{header.base_version}\0{header.num_examples}\0{header.local_loss!r}\0{header.codec}\0{content_sha256}"
    if header.contributors > 1:  # a partial aggregate (one agent's update keeps the digest it always had)
        text += f"\0{header.contributors}"
    return hashlib.sha256(text.encode()).hexdigest()


def _check_contributors(header: pb.UpdateHeader, role: str, spec: JobSpec) -> int:
    """How many agents' updates an upload stands for; a partial aggregate (more than 1)
    only from a region's certificate, and only for a job whose aggregation is a plain
    weighted mean (what partial sums can give)."""
    if not 0 <= header.contributors <= MAX_CONTRIBUTORS:
        raise InvalidArgument(f"contributors must be in 0..{MAX_CONTRIBUTORS}, got {header.contributors}",
                              reason="malformed")
    if header.contributors <= 1:
        return 1
    if role != ROLE_REGION:
        raise PermissionDenied("only a region's certificate may upload a partial aggregate (contributors > 1); "
                               f"this is a {role}'s", reason="not_region")
    if spec.defence.partials_refused:
        raise FailedPrecondition(spec.defence.partials_refused, reason="partial_refused")
    return int(header.contributors)


@dataclass
class Partial:
    """What a broken upload delivered, kept so that the agent can resume it."""

    content_sha256: str
    spool: Spool
    chunks: int
    wire_bytes: int
    since: float


class UpdateIntake:
    def __init__(
        self, store: Store, jobs: JobManager, models: ModelRepository, disk: DiskMonitor | None = None,
        idle_seconds: float = UPLOAD_IDLE_SECONDS,
    ) -> None:
        self._store = store
        self._disk = disk  # below its reserve, uploads are refused (the space is for closing rounds)
        self._idle_seconds = idle_seconds
        updates = store.directory / "updates"
        for leftover in [*updates.glob("*/*/*.part"), *updates.glob("*/*.sum")]:
            leftover.unlink()  # uploads broken by a crash (their agents send them again), and scratch sums
        self._jobs = jobs
        self._models = models
        # One upload at a time per (job, round, agent), so a re-send racing the
        # original is answered as a duplicate instead of colliding. Each entry counts
        # its users and goes away with the last one.
        self._locks: dict[UploadKey, tuple[asyncio.Lock, int]] = {}
        self._partials: dict[UploadKey, Partial] = {}
        self._decoding = asyncio.Semaphore(2)
        jobs.add_round_end_listener(self.forget)

    @contextlib.asynccontextmanager
    async def _lock(self, key: UploadKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def progress(self, agent: str, header: pb.UpdateHeader) -> int:
        """Chunks of a broken upload of this content that can be skipped on resume."""
        partial = self._partials.get((header.job_id, header.round, agent))
        if partial is None or partial.content_sha256 != header.content_sha256 or not header.content_sha256:
            return 0
        return partial.chunks

    def forget(self, job_id: str, round_: int) -> None:
        """Free the partial uploads kept for a round that has ended (closed, or its job
        stopped, completed or failed): no agent can resume them any more."""
        for key in [k for k in self._partials if k[0] == job_id and k[1] == round_]:
            self._partials.pop(key).spool.discard()
        _count_partials(self._partials)

    async def receive(self, agent: str, messages: AsyncIterator[pb.UpdateChunk],
                      role: str = ROLE_AGENT) -> pb.UpdateReceipt:
        """Take in one upload stream from member `agent` (an agent, or a region: `role`).
        A refusal ends the stream at once (`EndsStream`) with the refusal's own status:
        the rest of the stream is not read."""
        try:
            first = await self._next(messages)
        except DeadlineExceeded as exc:
            metrics.UPDATES_REJECTED.labels(exc.reason).inc()
            raise EndsStream(exc) from None
        if first is None or not first.HasField("header"):
            metrics.UPDATES_REJECTED.labels("malformed").inc()
            raise EndsStream(InvalidArgument("an upload starts with an UpdateHeader", reason="malformed"))
        header = first.header
        watch = Stopwatch()  # from the header on: upload, validate (cloud.phases)
        key = (header.job_id, header.round, agent)
        wire_bytes = first.ByteSize()
        try:
            if self._disk is not None:
                self._disk.check()
            async with self._lock(key):
                receipt = await self._receive(key, header, messages, watch, role)
        except (TandemError, wire.WireError, compression.CompressionError, DecodeError) as exc:
            error = exc if isinstance(exc, TandemError) else InvalidArgument(
                str(exc) if not isinstance(exc, DecodeError) else f"malformed message: {exc}", reason="malformed")
            metrics.UPDATES_REJECTED.labels(error.reason).inc()
            self._jobs.count_rejection(header.job_id, header.round, wire_bytes)
            raise EndsStream(error) from None
        metrics.BYTES_RECEIVED.labels("update").inc(receipt.bytes_received)
        return receipt

    async def _next(self, messages: AsyncIterator[pb.UpdateChunk]) -> pb.UpdateChunk | None:
        """The stream's next message (None at its end), or DeadlineExceeded after
        `idle_seconds` without one."""
        try:
            # asyncio.timeout, not wait_for: wait_for can swallow a cancellation (CPython gh-86296).
            async with asyncio.timeout(self._idle_seconds):
                return await _anext(messages)
        except TimeoutError:
            metrics.UPLOAD_IDLE_TIMEOUTS.inc()
            raise DeadlineExceeded(
                f"the upload sent nothing for {self._idle_seconds:g} s and was ended; resume it", reason="idle"
            ) from None

    async def _receive(
        self, key: UploadKey, header: pb.UpdateHeader, messages: AsyncIterator[pb.UpdateChunk], watch: Stopwatch,
        role: str,
    ) -> pb.UpdateReceipt:
        agent = key[2]
        if not header.job_id:
            raise InvalidArgument("job_id is required", reason="malformed")
        job = self._store.get_job(header.job_id)
        if job is None:
            raise NotFound(f"no job {header.job_id!r}", reason="unknown_job")
        existing = self._store.get_update(header.job_id, header.round, agent)
        runner = None
        if existing is None:
            runner = self._jobs.runner(header.job_id)
            runner.check_update(agent, header)
            # An agent's claim is bounded by its hello; a region's by the job's max_examples
            # alone (check_update): its agents come and go after its hello.
            declared = self._store.agent_examples(agent)
            if role != ROLE_REGION and header.num_examples > declared:
                raise InvalidArgument(
                    f"num_examples {header.num_examples} is more than the {declared} the agent declared in its hello",
                    reason="malformed",
                )
        try:
            update_codec = compression.parse_codec(header.codec)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason="malformed") from None
        spec = runner.spec if runner is not None else job.spec  # parsed once, by the runner
        _check_contributors(header, role, spec)
        specs = self._models.specs(spec.model)
        return await self._assemble(key, header, messages, spec, specs, update_codec, existing, runner, watch)

    async def _assemble(
        self, key: UploadKey, header: pb.UpdateHeader, messages: AsyncIterator[pb.UpdateChunk], spec: JobSpec,
        specs: dict[str, wire.TensorSpec], update_codec: compression.Codec, existing: UpdateRow | None,
        runner: JobRunner | None, watch: Stopwatch,
    ) -> pb.UpdateReceipt:
        partial = self._resume(key, header, specs, update_codec)
        spool = partial.spool
        try:
            while (message := await self._next(messages)) is not None:
                partial.wire_bytes += message.ByteSize()
                if not message.HasField("tensor"):
                    raise InvalidArgument("an upload has exactly one header, first", reason="malformed")
                if spool.bytes_received + len(message.tensor.data) > spec.transport.max_update_bytes:
                    raise ResourceExhausted(
                        f"update exceeds the job's limit of {spec.transport.max_update_bytes} bytes", reason="too_large"
                    )
                spool.add(message.tensor)
                partial.chunks += 1
        except DeadlineExceeded:
            self._keep(key, partial)  # silent, not wrong: what arrived can be resumed
            raise
        except (TandemError, wire.WireError, compression.CompressionError, DecodeError):
            spool.discard()
            raise
        except BaseException:
            # The stream broke (cancelled, connection lost): keep what arrived for a resume.
            self._keep(key, partial)
            raise
        if spool.missing():
            # A cancelled client stream can also end as a plain end of stream.
            self._keep(key, partial)
            raise wire.WireError(f"update incomplete: missing or truncated tensors {spool.missing()}")
        try:
            return await self._accept(key, header, partial, specs, update_codec, existing, runner, watch)
        finally:
            spool.discard()  # unless accepted, when the file has moved to its final name

    async def _accept(
        self, key: UploadKey, header: pb.UpdateHeader, partial: Partial, specs: dict[str, wire.TensorSpec],
        update_codec: compression.Codec, existing: UpdateRow | None, runner: JobRunner | None, watch: Stopwatch,
    ) -> pb.UpdateReceipt:
        """Check a complete upload, then record it, or answer a re-send as a duplicate."""
        agent = key[2]
        file = await asyncio.to_thread(partial.spool.finish)
        watch.lap("upload")  # the chunks received and the file complete on disk
        content = partial.spool.content_sha256()
        if header.content_sha256 and content != header.content_sha256:
            raise InvalidArgument("the update's content does not match its content_sha256", reason="malformed")
        async with self._decoding:  # bounds the memory of dense decodes running at once
            await asyncio.to_thread(_validate, file.arrays(), specs, update_codec, header.num_examples)
        watch.lap("validate")
        digest = update_digest(header, content)
        receipt = pb.UpdateReceipt(
            job_id=header.job_id, round=header.round, agent_id=agent, digest=digest, bytes_received=partial.wire_bytes
        )
        if existing is not None:
            if existing.digest != digest:
                raise AlreadyExists(
                    f"agent {agent!r} already has a different update in round {header.round} of job {header.job_id}",
                    reason="conflict",
                )
            metrics.UPDATES_DUPLICATE.inc()
            receipt.duplicate = True
            return receipt
        assert runner is not None
        path = self._store.update_path(header.job_id, header.round, agent)
        rnd = runner.check_update(agent, header)  # the round may have closed while it arrived
        await asyncio.to_thread(partial.spool.move, path)
        try:
            row = UpdateRow(agent, digest, header.num_examples, header.local_loss, str(path), path.stat().st_size,
                            header.codec, dict(header.metrics), contributors=max(1, header.contributors))
            # Once the record is committed the update must be folded in and counted,
            # even if this call is cancelled meanwhile: shield the three together.
            phases = {**agent_reported(header.phase_seconds), **watch.phases}
            await asyncio.shield(rnd.commit(row, partial.wire_bytes, TensorFile(path).arrays(), update_codec, phases))
        except TandemError:
            path.unlink(missing_ok=True)
            raise
        metrics.UPDATES_ACCEPTED.inc()
        return receipt

    def _resume(
        self, key: UploadKey, header: pb.UpdateHeader, specs: dict[str, wire.TensorSpec], update_codec: compression.Codec
    ) -> Partial:
        self._prune()
        partial = self._partials.pop(key, None)
        wire_bytes = pb.UpdateChunk(header=header).ByteSize()
        if header.skip_chunks == 0:
            if partial is not None:
                partial.spool.discard()
            path = self._store.update_path(*key)
            spool = Spool(path.with_name(f"{path.stem}.{uuid.uuid4().hex[:8]}.part"),
                          deltas.expected(specs, update_codec))
            return Partial(header.content_sha256, spool, 0, wire_bytes, time.monotonic())
        if partial is None or partial.content_sha256 != header.content_sha256 or partial.chunks != header.skip_chunks:
            have = partial.chunks if partial is not None else 0
            if partial is not None:
                partial.spool.discard()
            raise FailedPrecondition(
                f"cannot resume at chunk {header.skip_chunks}: {have} chunks of this content are held; start over",
                reason="resume",
            )
        partial.wire_bytes += wire_bytes
        return partial

    def _keep(self, key: UploadKey, partial: Partial) -> None:
        """Hold a broken upload for a resume: only for an open round, within a byte budget."""
        rnd = self._jobs.open_round(key[0], key[1])
        if not partial.content_sha256 or partial.chunks == 0 or rnd is None or not rnd.accepting:
            partial.spool.discard()
            return
        self._prune()
        partial.since = time.monotonic()
        self._partials[key] = partial
        while sum(p.spool.bytes_received for p in self._partials.values()) > PARTIAL_BUDGET_BYTES:
            self._partials.pop(next(iter(self._partials))).spool.discard()
        _count_partials(self._partials)

    def _prune(self) -> None:
        """Forget kept partial uploads whose round is over or that waited too long."""
        now = time.monotonic()
        for key, kept in list(self._partials.items()):
            if now - kept.since > PARTIAL_TTL_SECONDS or self._jobs.open_round(key[0], key[1]) is None:
                del self._partials[key]
                kept.spool.discard()
        _count_partials(self._partials)


def _anext(messages: AsyncIterator[pb.UpdateChunk]) -> Awaitable[pb.UpdateChunk | None]:
    return anext(messages, None)


def _count_partials(partials: Mapping[UploadKey, Partial]) -> None:
    metrics.PARTIAL_UPLOADS.set(len(partials))
    metrics.PARTIAL_UPLOAD_BYTES.set(sum(p.spool.bytes_received for p in partials.values()))


# Weighted by its example count, an update folded into the float32 running sum must
# stay far from float32's 3.4e38, or one agent turns the sum into infinities. This is
# overflow protection only; bounding update norms is robust aggregation's job.
FOLD_LIMIT = 1e30


def _validate(
    components: Mapping[str, np.ndarray], specs: Mapping[str, wire.TensorSpec], update_codec: compression.Codec,
    num_examples: int,
) -> None:
    """Decode every tensor once, so that nothing malformed, non-finite or overflowing is acknowledged."""
    for name, spec in specs.items():
        largest = compression.validate(name, components, spec.shape, update_codec)
        if largest * num_examples > FOLD_LIMIT:
            raise InvalidArgument(f"tensor {name!r}: values up to {largest:.3g} x {num_examples} examples overflow "
                                  "the aggregate", reason="too_large")
