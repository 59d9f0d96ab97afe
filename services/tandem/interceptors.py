"""What every server interceptor here does: run each call of a method inside a guard,
whichever of gRPC's four kinds of handler the method has."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# Entered around one call with its request and context; what it yields is the request the
# method gets (the same one, or a wrapper of it). An exception it raises ends the call.
Guard = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]


def guarded(
    handler: grpc.RpcMethodHandler, guard: Guard, request_deserializer: Callable[[bytes], Any] | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `guard`; `request_deserializer` replaces the
    handler's own when given."""

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(request, context) as request:
                return await behavior(request, context)

        return call

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):  # it writes with context.write (grpc's Health.Watch)
            return unary(behavior)

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with guard(request, context) as request:
                async for response in behavior(request, context):
                    yield response

        return call

    serialize = {"request_deserializer": request_deserializer or handler.request_deserializer,
                 "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **serialize)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **serialize)


class Wrapped:
    """Each method's guarded handler, built once and reused for every call.

    gRPC asks an interceptor for a handler on every call; building a fresh one (closures,
    a new method handler) each time cost several microseconds per request per
    interceptor on the serving path. A method's handler object is the same on every
    call of it (gRPC's generic handlers keep them in a dict), so the wrapped one can be
    kept. Only registered methods reach here (an unknown one has no handler): bounded."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler, build: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        found = self._built.get(method)
        if found is not None and found[0] is handler:
            return found[1]
        wrapped = build()
        self._built[method] = (handler, wrapped)
        return wrapped
