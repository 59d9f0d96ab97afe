"""Domain errors and their gRPC status codes, in one place.

Plain logic raises these; servicers translate them with `grpc_errors`. Anything
else becomes a sanitized INTERNAL so no stack trace or path leaks to a peer. A
request that is not even valid protobuf is INVALID_ARGUMENT: in a stream, the
servicer sees the DecodeError and `status_of` says so; a unary request is parsed
before any servicer runs, so `MalformedRequests` (a server interceptor) answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from tandem.compression import CompressionError
from tandem.interceptors import Wrapped, guarded
from tandem.wire import WireError

log = logging.getLogger(__name__)


class TandemError(Exception):
    """An error meant for the peer. `reason` labels the metrics of rejected requests."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"

    # Whether the servicer reads what the client is still sending before answering (see
    # `drain`). An error that ends a stream at its first bad message says False, and its
    # status then also travels in the initial metadata (see `peer_status`).
    drain: bool = True

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


class Aborted(TandemError):
    """The call was ended by a newer one that takes its place (a replaced control stream)."""

    code, reason = grpc.StatusCode.ABORTED, "replaced"


class Unavailable(TandemError):
    code, reason = grpc.StatusCode.UNAVAILABLE, "unavailable"


# ---- a full disk (issue 14, item 3) -------------------------------------------

_SQLITE_FULL = 13  # SQLite's primary result code for "database or disk is full"
NO_SPACE_MESSAGE = ("no space left on the server's state volume, so the request was not carried out; "
                    "an operator must free space or grow the volume, then try again")


class NoSpace(ResourceExhausted):
    """Refused because the server's disk is full or below its reserve."""

    reason = "no_space"


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised from) says a disk or its quota is full:
    ENOSPC, EDQUOT, or SQLite's SQLITE_FULL. Such a failure passes once space is freed,
    so callers keep their state and retry instead of giving up."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, sqlite3.Error) and getattr(seen, "sqlite_errorcode", 0) & 0xFF == _SQLITE_FULL:
            return True
        seen = seen.__cause__
    return False


# ---- corrupt files (issue 14, item 4) ------------------------------------------

class DataLoss(TandemError):
    """A stored file no longer matches its recorded hash: the data asked for is gone (not
    the peer's fault, and no retry brings it back), the rest is served as before."""

    code, reason = grpc.StatusCode.DATA_LOSS, "data_loss"


# ---- streams ended at once, and silent ones (issue 14, items 5 and 7) ------------

class DeadlineExceeded(TandemError):
    """The peer let a deadline of ours pass (an upload stream that went silent)."""

    code, reason = grpc.StatusCode.DEADLINE_EXCEEDED, "idle"


class EndsStream(TandemError):
    """`error`, ended at once: the rest of the client's stream is not read. Its status is
    also sent as initial metadata, ahead of the trailers, because the aio client can
    report INTERNAL instead of a status that arrives while it is still writing
    (grpc/grpc#36066); `peer_status` reads it back."""

    drain = False

    def __init__(self, error: TandemError) -> None:
        super().__init__(str(error), error.reason)
        self.code = error.code


# Initial-metadata keys of a stream ended at once (`EndsStream`).
STATUS_KEY = "tandem-status"
DETAILS_KEY = "tandem-details"


# Messages often quote what the peer sent. A status message travels in a trailer, which
# gRPC percent-encodes (up to 3 bytes for each byte of UTF-8); a client refuses trailers
# over 8 KiB some of the time and over 16 KiB always, and then sees RESOURCE_EXHAUSTED
# instead of the real status.
MAX_STATUS_BYTES = 2000


def clip(message: str) -> str:
    """`message`, cut to MAX_STATUS_BYTES of UTF-8 so that its status reaches the peer."""
    data = message.encode()
    if len(data) <= MAX_STATUS_BYTES:
        return message
    kept = data[:MAX_STATUS_BYTES].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception."""
    if isinstance(exc, TandemError):
        return exc.code, clip(str(exc))
    if isinstance(exc, (WireError, CompressionError)):
        return grpc.StatusCode.INVALID_ARGUMENT, clip(str(exc))
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {exc}"
    if out_of_space(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, NO_SPACE_MESSAGE
    return grpc.StatusCode.INTERNAL, "internal error"


F = TypeVar("F", bound=Callable[..., Any])


async def drain(
    messages: AsyncIterator[Any], context: grpc.aio.ServicerContext | None = None, limit_bytes: int = 64 << 20,
    seconds: float = 5.0,
) -> None:
    """Read what the client is still sending before answering with an error.

    A server that ends a client-streaming call while the client is still writing
    can make the client see INTERNAL instead of the real status (grpc/grpc#36066);
    reading the rest first (bounded in bytes and time) delivers the precise code.
    With the call's `context`, it reads beneath the request iterator, which a
    message that did not parse has ended, and skips messages that do not parse.
    """
    received = 0
    try:
        async with asyncio.timeout(seconds):
            while received <= limit_bytes:
                try:
                    message = await (context.read() if context is not None else anext(messages, grpc.aio.EOF))
                except DecodeError:
                    continue
                if message is grpc.aio.EOF:
                    return
                received += message.ByteSize()
    except Exception:  # noqa: BLE001 - the peer's stream is already being rejected
        return


def peer_status(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    """The status a server ended a call with: from its initial metadata when the aio
    client replaced it with INTERNAL (grpc/grpc#36066, see `EndsStream`)."""
    if exc.code() == grpc.StatusCode.INTERNAL:
        sent = dict(exc.initial_metadata() or ())
        name = sent.get(STATUS_KEY)
        if isinstance(name, str) and name in grpc.StatusCode.__members__:
            details = sent.get(DETAILS_KEY, "")
            return grpc.StatusCode[name], details if isinstance(details, str) else ""
    return exc.code(), exc.details() or ""


def peer_error(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """`exc`, or the same error with the status the server really sent (`peer_status`)."""
    code, details = peer_status(exc)
    if code == exc.code():
        return exc
    return grpc.aio.AioRpcError(code, exc.initial_metadata(), exc.trailing_metadata(), details,
                                exc.debug_error_string())


async def _abort(context: grpc.aio.ServicerContext, request: Any, exc: BaseException, name: str) -> None:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", name, exc_info=exc)
    elif out_of_space(exc):  # the operator's to fix: one line, no traceback
        log.warning("%s failed: %s", name, exc)
    if hasattr(request, "__aiter__") and getattr(exc, "drain", True):  # a client stream
        await drain(request, context)
    elif hasattr(request, "__aiter__"):
        # Metadata values are printable ASCII: other characters become "?", and the details stay short.
        details = "".join(c if " " <= c <= "~" else "?" for c in message[: MAX_STATUS_BYTES // 4])
        await context.send_initial_metadata(((STATUS_KEY, code.name), (DETAILS_KEY, details)))
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
            await _abort(context, request, exc, method.__qualname__)

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
            await _abort(context, request, exc, method.__qualname__)

    return wrapper


class Malformed:
    """Stands for a unary request that is not valid protobuf, until the handler answers it."""

    def __init__(self, error: Exception, size: int) -> None:
        self.error = error
        self.size = size  # bytes received


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the bytes were bad
            return Malformed(exc, len(raw))

    return parse


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    """INVALID_ARGUMENT for a unary request that does not parse (gRPC itself would answer
    UNKNOWN, with the parser's exception, before any servicer could translate it)."""

    def __init__(self) -> None:
        self._wrapped = Wrapped()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        return self._wrapped.get(handler_call_details.method, handler, lambda: _checked(handler))


def _checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` answering INVALID_ARGUMENT to a request that does not parse."""

    @contextlib.asynccontextmanager
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(f"malformed message: {request.error}"))
        yield request

    return guarded(handler, checked, _lenient(handler.request_deserializer))
