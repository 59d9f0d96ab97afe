"""The `tandem.v1.Inference` servicer, shared by the cloud and every edge agent.

It is a thin adapter: it checks the caller's certificate, works out the request's
deadline, and hands the request to a backend (the cloud's model server or the
agent's router), which holds the logic. `InferStream` runs requests concurrently,
so they batch with each other, and answers in order, an error in its response.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import numpy as np

from tandem import grpcserver, metrics, tls, wire
from tandem.errors import InvalidArgument, grpc_errors, grpc_stream_errors, status_of
from tandem.staged import StagedModel
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

# Requests of one stream in progress at once; beyond it the stream is not read
# further until answers go out (backpressure instead of unbounded memory).
STREAM_WINDOW = 64
MAX_INPUT_DIMS = 8  # batch, channels, height, width and room to spare

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class Backend(Protocol):
    async def infer(self, request: pb.InferRequest, deadline: float | None) -> pb.InferResponse:
        """Answer one request; `deadline` is a time.monotonic() instant or None. Raises TandemError."""
        ...

    async def model_info(self, request: pb.ModelInfoRequest) -> pb.ModelInfo: ...


def decode_input(request: pb.InferRequest, max_rows: int) -> np.ndarray:
    """The request's input batch, its size checked before anything else looks at it."""
    if not request.model:
        raise InvalidArgument("model name is required")
    if request.version < 0:
        raise InvalidArgument(f"version must be >= 0, got {request.version}")
    if request.start_layer < 0:
        raise InvalidArgument(f"start_layer must be >= 0, got {request.start_layer}")
    if request.deadline_ms < 0:
        raise InvalidArgument(f"deadline_ms must be >= 0, got {request.deadline_ms}")
    if not request.HasField("input"):
        raise InvalidArgument("input tensor is required")
    dims = list(request.input.shape)
    # Checked before decoding: numpy refuses more than 64 dimensions or sizes past int64,
    # and a peer's shape should not cost more than a glance.
    if len(dims) > MAX_INPUT_DIMS:
        raise InvalidArgument(f"input has {len(dims)} dimensions; at most {MAX_INPUT_DIMS} are accepted")
    if any(d < 0 for d in dims) or math.prod(d for d in dims if d) > grpcserver.MAX_MESSAGE_BYTES:
        raise InvalidArgument(f"input shape {dims} is negative or larger than any message")
    x = wire.from_proto(request.input, max_bytes=grpcserver.MAX_MESSAGE_BYTES)
    if x.ndim < 2:
        raise InvalidArgument(f"input must be a batch (at least 2 dimensions), got shape {list(x.shape)}")
    if x.shape[0] > max_rows:
        raise InvalidArgument(f"input batch of {x.shape[0]} rows is over this server's limit of {max_rows}")
    return x


def deadline_of(request: pb.InferRequest, time_remaining: float | None) -> float | None:
    """The earlier of the request's own budget and the RPC's deadline, as a monotonic instant."""
    budgets = [b for b in (request.deadline_ms / 1000 if request.deadline_ms else None, time_remaining) if b]
    return time.monotonic() + min(budgets) if budgets else None


def model_info(model: StagedModel) -> pb.ModelInfo:
    """What a model looks like and how long its stages take on this server."""
    seconds = model.seconds_per_example()
    return pb.ModelInfo(
        model=model.model, version=model.version, sha256=model.sha256, input_shape=model.input_shape,
        device=model.device, split_note=model.split_note,
        stages=[
            pb.StageInfo(index=s.index, name=s.name, output_shape=s.output_shape, output_bytes=s.output_bytes,
                         seconds_per_example=seconds[s.index - 1])
            for s in model.stages
        ],
    )


def placement_name(placement: int) -> str:
    return pb.Placement.Name(placement).removeprefix("PLACEMENT_").lower()


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Any certificate of the deployment's CA may call; the backend does the work."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def _answer(self, request: pb.InferRequest, time_remaining: float | None) -> pb.InferResponse:
        start = time.perf_counter()
        response = await self._backend.infer(request, deadline_of(request, time_remaining))
        response.server_seconds = time.perf_counter() - start
        metrics.child(
            metrics.INFER_REQUEST_SECONDS, response.model, str(request.start_layer), placement_name(response.placement)
        ).observe(response.server_seconds)
        return response

    @grpc_errors
    async def Infer(self, request: pb.InferRequest, context: grpc.aio.ServicerContext) -> pb.InferResponse:  # noqa: N802 - gRPC method name
        tls.peer_identity(context)
        return await self._answer(request, context.time_remaining())

    @grpc_stream_errors
    async def InferStream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferResponse]:
        tls.peer_identity(context)
        window: asyncio.Queue[asyncio.Task[pb.InferResponse] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.put(asyncio.create_task(self._answer_in_stream(request)))
            finally:
                await window.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await window.get()) is not None:
                yield await task
            await reader  # a message that does not parse ends the stream with INVALID_ARGUMENT
        finally:
            reader.cancel()
            while not window.empty():
                leftover = window.get_nowait()
                if leftover is not None:
                    leftover.cancel()

    async def _answer_in_stream(self, request: pb.InferRequest) -> pb.InferResponse:
        try:
            return await self._answer(request, None)
        except Exception as exc:
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("inference request %r failed", request.request_id)
            return pb.InferResponse(
                request_id=request.request_id, model=request.model, error_code=code.value[0], error_message=message
            )

    @grpc_errors
    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:  # noqa: N802 - gRPC method name
        tls.peer_identity(context)
        return await self._backend.model_info(request)
