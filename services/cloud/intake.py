"""Receiving model updates: validate everything, make it durable, then acknowledge."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator

import numpy as np

from cloud.jobs import JobManager
from cloud.models import ModelRepository
from cloud.spec import JobSpec
from cloud.store import Store, UpdateRow, write_tensors
from tandem import codec, metrics
from tandem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, TandemError
from tandem.v1 import coordinator_pb2 as pb


def update_digest(header: pb.UpdateHeader, tensors_sha256: str) -> str:
    """Identity of an update's content: what a byte-identical re-send reproduces."""
    text = f"{header.base_version}\0{header.num_examples}\0{header.local_loss!r}\0{header.codec}\0{tensors_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()


class UpdateIntake:
    def __init__(self, store: Store, jobs: JobManager, models: ModelRepository) -> None:
        self._store = store
        self._jobs = jobs
        self._models = models
        # One upload at a time per (job, round, agent), so a re-send racing the
        # original is answered as a duplicate instead of colliding. Each entry counts
        # its users and goes away with the last one.
        self._locks: dict[tuple[str, int, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def _lock(self, key: tuple[str, int, str]) -> AsyncIterator[None]:
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

    async def receive(self, agent: str, messages: AsyncIterator[pb.UpdateChunk]) -> pb.UpdateReceipt:
        first = await anext(messages, None)
        if first is None or not first.HasField("header"):
            metrics.UPDATES_REJECTED.labels("malformed").inc()
            raise InvalidArgument("an upload starts with an UpdateHeader", reason="malformed")
        header = first.header
        wire = first.ByteSize()
        key = (header.job_id, header.round, agent)
        try:
            async with self._lock(key):
                receipt, wire = await self._receive(agent, header, messages, wire)
        except (TandemError, codec.CodecError) as exc:
            reason = exc.reason if isinstance(exc, TandemError) else "malformed"
            metrics.UPDATES_REJECTED.labels(reason).inc()
            self._jobs.count_rejection(header.job_id, header.round, wire)
            raise
        metrics.BYTES_RECEIVED.labels("update").inc(wire)
        return receipt

    async def _receive(
        self, agent: str, header: pb.UpdateHeader, messages: AsyncIterator[pb.UpdateChunk], wire: int
    ) -> tuple[pb.UpdateReceipt, int]:
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
        spec = JobSpec.from_dict(json.loads(job["spec"]))
        limit = spec.max_update_bytes
        assembler = codec.ChunkAssembler(self._models.specs(spec.model))
        async for message in messages:
            wire += message.ByteSize()
            if not message.HasField("tensor"):
                raise InvalidArgument("an upload has exactly one header, first", reason="malformed")
            if assembler.bytes_received + len(message.tensor.data) > limit:
                raise ResourceExhausted(f"update exceeds the job's limit of {limit} bytes", reason="too_large")
            assembler.add(message.tensor)
        arrays = assembler.result()
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise InvalidArgument(f"tensor {name!r} has non-finite values", reason="not_finite")
        digest = update_digest(header, await asyncio.to_thread(codec.state_sha256, arrays))
        receipt = pb.UpdateReceipt(
            job_id=header.job_id, round=header.round, agent_id=agent, digest=digest, bytes_received=wire
        )
        if existing is not None:
            if existing.digest != digest:
                raise AlreadyExists(
                    f"agent {agent!r} already has a different update in round {header.round} of job {header.job_id}",
                    reason="conflict",
                )
            metrics.UPDATES_DUPLICATE.inc()
            receipt.duplicate = True
            return receipt, wire
        assert runner is not None
        path = self._store.update_path(header.job_id, header.round, agent)
        size = await asyncio.to_thread(write_tensors, path, arrays)
        rnd = runner.check_update(agent, header)  # the round may have closed while we wrote
        if not rnd.accepting:
            raise FailedPrecondition(f"round {header.round} closed while the update arrived", reason="stale")
        row = UpdateRow(agent, digest, header.num_examples, header.local_loss, str(path), size)
        self._store.add_update(header.job_id, header.round, row, wire)
        runner.accepted(rnd, agent)
        metrics.UPDATES_ACCEPTED.inc()
        return receipt, wire
