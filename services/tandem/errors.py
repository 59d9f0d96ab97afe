"""Domain errors and their gRPC status codes, in one place.

Plain logic raises these; servicers translate them with `grpc_errors`. Anything
else becomes a sanitized INTERNAL so no stack trace or path leaks to a peer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from tandem.codec import CodecError
from tandem.compression import CompressionError

log = logging.getLogger(__name__)


class TandemError(Exception):
    """An error meant for the peer. `reason` labels the metrics of rejected requests."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class InvalidArgument(TandemError):
    code, reason = grpc.StatusCode.INVALID_ARGUMENT, "invalid"


class NotFound(TandemError):
    code, reason = grpc.StatusCode.NOT_FOUND, "not_found"


class AlreadyExists(TandemError):
    code, reason = grpc.StatusCode.ALREADY_EXISTS, "conflict"


class FailedPrecondition(TandemError):
    code, reason = grpc.StatusCode.FAILED_PRECONDITION, "stale"


class PermissionDenied(TandemError):
    code, reason = grpc.StatusCode.PERMISSION_DENIED, "permission"


class Unauthenticated(TandemError):
    code, reason = grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"


class ResourceExhausted(TandemError):
    code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"


class Unavailable(TandemError):
    code, reason = grpc.StatusCode.UNAVAILABLE, "unavailable"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(exc, TandemError):
        return exc.code, str(exc)
    if isinstance(exc, (CodecError, CompressionError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, name: str) -> None:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name, exc_info=exc)
    await context.abort(code, message)


def grpc_errors(method: F) -> F:
    """Translate domain errors into gRPC statuses for a unary-response handler."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, method.__qualname__)

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Translate domain errors into gRPC statuses for a streaming-response handler."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            await _abort(context, exc, method.__qualname__)

    return wrapper

