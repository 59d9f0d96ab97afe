"""Moving tensors between an agent and the coordinator: chunked, verified, counted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import grpc
import numpy as np

from tandem import codec, metrics
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc


class ModelMismatch(Exception):
    """The downloaded model is not what was asked for (hash or tensors differ)."""


def count_call(method: str, code: grpc.StatusCode) -> None:
    metrics.RPC_CLIENT_HANDLED.labels(method, code.name).inc()


async def download_model(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    model: str,
    version: int,
    expected: Mapping[str, codec.TensorSpec],
    sha256: str,
    timeout: float,
) -> dict[str, np.ndarray]:
    """Download one version in chunks and verify it against the zoo's specs and `sha256`."""
    call = stub.DownloadModel(pb.ModelRequest(model=model, version=version), timeout=timeout)
    received = 0
    try:
        first = await anext(aiter(call), None)
        if first is None or not first.HasField("header"):
            raise ModelMismatch("download did not start with a header")
        received += first.ByteSize()
        header = first.header
        if header.version != version or header.sha256 != sha256:
            raise ModelMismatch(f"asked for {model} v{version} ({sha256[:12]}), got v{header.version}")
        assembler = codec.ChunkAssembler(expected)
        async for message in call:
            received += message.ByteSize()
            assembler.add(message.tensor)
        arrays = assembler.result()
    except grpc.aio.AioRpcError as exc:
        count_call("DownloadModel", exc.code())
        raise
    count_call("DownloadModel", grpc.StatusCode.OK)
    metrics.EDGE_BYTES_RECEIVED.labels("model").inc(received)
    if codec.state_sha256(arrays) != sha256:
        raise ModelMismatch(f"{model} v{version}: content hash does not match {sha256[:12]}")
    return arrays


async def upload_update(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    header: pb.UpdateHeader,
    delta: Mapping[str, np.ndarray],
    timeout: float,
) -> pb.UpdateReceipt:
    """Send a header and the delta's chunks; returns the coordinator's receipt."""
    sent = 0

    async def messages() -> AsyncIterator[pb.UpdateChunk]:
        nonlocal sent
        first = pb.UpdateChunk(header=header)
        sent += first.ByteSize()
        yield first
        for chunk in codec.iter_chunks(delta):
            message = pb.UpdateChunk(tensor=chunk)
            sent += message.ByteSize()
            yield message

    try:
        receipt: pb.UpdateReceipt = await stub.UploadUpdate(messages(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        count_call("UploadUpdate", exc.code())
        raise
    count_call("UploadUpdate", grpc.StatusCode.OK)
    metrics.EDGE_BYTES_SENT.labels("update").inc(sent)
    return receipt
