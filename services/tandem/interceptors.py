"""What every server interceptor here does: hand back the method handler it was given
with the behaviour wrapped, whichever of gRPC's four kinds of handler it is."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Unary = Callable[..., Awaitable[Any]]  # answers once (unary-unary, stream-unary)
Streaming = Callable[..., AsyncIterator[Any]]  # streams its answers (unary-stream, stream-stream)


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Unary], Unary],
    streaming: Callable[[Streaming], Streaming],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `unary` or by `streaming`, by how it answers;
    `request_deserializer` replaces the handler's own when given."""
    serialize = {"request_deserializer": request_deserializer or handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serialize)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serialize)
