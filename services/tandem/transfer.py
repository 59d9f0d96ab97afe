"""Moving tensors between an agent and the coordinator: chunked, verified, counted,
and resumable: a transfer broken by a reconnect continues where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import grpc
import numpy as np

from tandem import compression, deltas, metrics, wire
from tandem.errors import peer_error
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc

# Transfers smaller than this say more about latency than about throughput.
MEASURABLE_BYTES = 64 << 10


class ModelMismatch(Exception):
    """The downloaded model is not what was asked for (hash or tensors differ)."""


def count_call(method: str, code: grpc.StatusCode) -> None:
    metrics.RPC_CLIENT_HANDLED.labels(method, code.name).inc()


@dataclass(frozen=True)
class HeldVersion:
    """A model version held in memory: what a download patches with deltas, what an
    agent trains from and serves, what a replica mirrors."""

    version: int
    sha256: str
    arrays: Mapping[str, np.ndarray]


@dataclass
class Download:
    """One model version on its way down: a whole model, or the deltas from `held`.

    `run` may be called again after a failure; once the header has arrived, the next
    call asks the coordinator to skip the chunks already received.
    """

    model: str
    version: int
    sha256: str
    specs: Mapping[str, wire.TensorSpec]
    held: HeldVersion | None = None
    header: pb.ModelHeader | None = None
    assembler: wire.ChunkAssembler | None = None
    chunks: int = 0
    wire: int = 0
    seconds: float = 0.0

    async def run(self, stub: coordinator_pb2_grpc.CoordinatorStub, timeout: float) -> dict[str, np.ndarray]:
        request = pb.ModelRequest(model=self.model, version=self.version, skip_chunks=self.chunks,
                                  have_version=self.held.version if self.held else 0)
        start = time.perf_counter()
        try:
            async for message in stub.DownloadModel(request, timeout=timeout):
                self.wire += message.ByteSize()
                if message.HasField("header"):
                    self._begin(message.header)
                elif self.assembler is None:
                    raise ModelMismatch("download did not start with a header")
                else:
                    self.assembler.add(message.tensor)
                    self.chunks += 1
        except grpc.aio.AioRpcError as exc:
            count_call("DownloadModel", exc.code())
            raise
        finally:
            self.seconds += time.perf_counter() - start
        count_call("DownloadModel", grpc.StatusCode.OK)
        metrics.EDGE_BYTES_RECEIVED.labels("model").inc(self.wire)
        assert self.assembler is not None and self.header is not None
        arrays = self._finish(self.assembler.result())
        self.assembler = None  # the arrays own the buffers now; a finished download holds nothing
        if wire.state_sha256(arrays) != self.sha256:
            raise ModelMismatch(f"{self.model} v{self.version}: content hash does not match {self.sha256[:12]}")
        return arrays

    def _begin(self, header: pb.ModelHeader) -> None:
        if header.version != self.version or header.sha256 != self.sha256:
            raise ModelMismatch(f"asked for {self.model} v{self.version} ({self.sha256[:12]}), got v{header.version}")
        if self.header is not None:
            if header.SerializeToString(deterministic=True) != self.header.SerializeToString(deterministic=True):
                raise ModelMismatch("the resumed download is not the same response")
            return  # resuming: keep what arrived
        self.header = header
        if not header.steps:
            self.assembler = wire.ChunkAssembler(self.specs)
            return
        expected: dict[str, wire.TensorSpec] = {}
        at = self.held.version if self.held else -1
        for step in header.steps:
            if step.from_version != at:
                raise ModelMismatch(f"delta step from v{step.from_version} where v{at} is held")
            at = step.to_version
            expected.update(deltas.expected(self.specs, compression.parse_codec(step.codec), f"{step.to_version}/"))
        if at != self.version:
            raise ModelMismatch(f"delta steps end at v{at}, not v{self.version}")
        self.assembler = wire.ChunkAssembler(expected)

    def _finish(self, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.header is not None
        if not self.header.steps:
            return received
        assert self.held is not None
        arrays = {name: np.array(a, dtype=np.float32, copy=True) for name, a in self.held.arrays.items()}
        for step in self.header.steps:
            step_codec = compression.parse_codec(step.codec)
            prefix = f"{step.to_version}/"
            components = {k[len(prefix):]: v for k, v in received.items() if k.startswith(prefix)}
            for name, spec in self.specs.items():
                # The same float32 additions the coordinator made when it published the version.
                deltas.apply_change(arrays[name], 0, deltas.decode_change(name, components, spec.shape, step_codec))
        return arrays


@dataclass
class Upload:
    """One encoded update on its way up; `run` again after a break resumes it.
    Chunks are made as they are sent: the update is never copied whole."""

    header: pb.UpdateHeader
    components: Mapping[str, np.ndarray]
    wire: int = 0
    seconds: float = 0.0
    broken: bool = False

    def __post_init__(self) -> None:
        self.header.content_sha256 = wire.state_sha256(self.components)

    async def run(self, stub: coordinator_pb2_grpc.CoordinatorStub, timeout: float) -> pb.UpdateReceipt:
        skip = 0
        if self.broken:
            skip = (await stub.UploadStatus(self.header, timeout=timeout)).chunks_received
        header = pb.UpdateHeader()
        header.CopyFrom(self.header)
        header.skip_chunks = skip

        def messages() -> Iterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for chunk in wire.iter_chunks(self.components, skip=skip):
                yield pb.UpdateChunk(tensor=chunk)

        async def stream() -> AsyncIterator[pb.UpdateChunk]:
            for message in messages():
                self.wire += message.ByteSize()
                yield message

        start = time.perf_counter()
        try:
            receipt: pb.UpdateReceipt = await stub.UploadUpdate(stream(), timeout=timeout)
        except grpc.aio.AioRpcError as raw:
            exc = peer_error(raw)  # a refused upload ends at once; see tandem.errors.EndsStream
            count_call("UploadUpdate", exc.code())
            if skip and exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "resume" in (exc.details() or ""):
                self.broken = False  # the coordinator lost the partial upload: start over
                return await self.run(stub, timeout)
            self.broken = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                         grpc.StatusCode.CANCELLED)
            raise exc from None
        finally:
            self.seconds += time.perf_counter() - start
        count_call("UploadUpdate", grpc.StatusCode.OK)
        metrics.EDGE_BYTES_SENT.labels("update").inc(self.wire)
        return receipt


def throughput(nbytes: int, seconds: float) -> float | None:
    """Bytes per second of a transfer, when it was large enough to say."""
    if nbytes < MEASURABLE_BYTES or seconds <= 0:
        return None
    return nbytes / seconds
