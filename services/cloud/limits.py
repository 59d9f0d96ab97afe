"""Per-agent limits on the coordinator: streams open at once, requests per second and
request bytes per second, each agent counted on its own.

An agent over a limit gets RESOURCE_EXHAUSTED saying which limit and by how much;
nothing waits and nothing is shared, so one agent hammering the coordinator slows
no other (beyond the CPU its refused calls cost). The identity is the one in the
peer's certificate. Installed as a server interceptor, so every RPC is covered,
Inference included (an edge agent forwards its applications' requests with its own
certificate: the default rate leaves room for that).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from tandem import tls
from tandem.certs import ROLE_AGENT
from tandem.errors import Malformed, ResourceExhausted, TandemError, drain
from tandem.interceptors import guarded


@dataclass(frozen=True)
class LimitsConfig:
    """Generous defaults: well above what an honest agent does (an edge agent forwarding
    inference to the cloud makes ~1,300 calls per second on a 2-core machine)."""

    max_streams: int = 32  # streaming calls open at once, the control stream included
    requests_per_second: float = 5_000.0  # calls, sustained
    request_burst: int = 10_000  # calls at once above the sustained rate
    bytes_per_second: float = 256 << 20  # request bytes (uploads, mostly), sustained
    byte_burst: int = 1 << 30  # request bytes at once above the sustained rate
    roles: tuple[str, ...] = (ROLE_AGENT,)  # whose certificates are limited; admins and replicas are operators'

    def __post_init__(self) -> None:
        if min(self.max_streams, self.requests_per_second, self.request_burst, self.bytes_per_second,
               self.byte_burst) <= 0:
            raise ValueError(f"every limit must be positive: {self}")


@dataclass
class TokenBucket:
    """`capacity` tokens at most, refilled at `rate` per second."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` if the bucket holds it. More than the capacity is taken from a full
        bucket, leaving a debt, so that a single large message is never refused forever."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < min(amount, self.capacity):
            return False
        self.tokens -= amount
        return True

    def wait(self, amount: float) -> float:
        """Seconds until `amount` could be taken."""
        return max(0.0, min(amount, self.capacity) - self.tokens) / self.rate


@dataclass
class Peer:
    who: str  # "agent 'edge-1'", for messages
    requests: TokenBucket
    bytes: TokenBucket
    streams: int = 0


def _refused(limit: str, message: str) -> ResourceExhausted:
    return ResourceExhausted(message, reason=f"limit_{limit}")  # the reason labels rejection metrics


def _size(request: Any) -> int:
    if isinstance(request, Message):
        return request.ByteSize()
    return request.size if isinstance(request, Malformed) else 0


class AgentLimits(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no types
    def __init__(self, config: LimitsConfig = LimitsConfig(), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._peers: dict[tuple[str, str], Peer] = {}

    def _peer(self, role: str, name: str) -> Peer:
        key = (role, name)
        if key not in self._peers:
            cfg, now = self.config, self._clock()
            self._peers[key] = Peer(f"{role} {name!r}",
                                   TokenBucket(cfg.requests_per_second, cfg.request_burst, cfg.request_burst, now),
                                   TokenBucket(cfg.bytes_per_second, cfg.byte_burst, cfg.byte_burst, now))
        return self._peers[key]

    def admit(self, context: grpc.aio.ServicerContext, streaming: bool, size: int) -> Peer | None:
        """The caller's counters with this call counted in, or None when it is not limited.
        Raises ResourceExhausted, saying which limit, when the call is over one."""
        try:
            identity = tls.peer_identity(context)
        except TandemError:
            return None  # the servicer refuses it
        if identity.role not in self.config.roles:
            return None
        peer, cfg, now = self._peer(identity.role, identity.name), self.config, self._clock()
        if streaming and peer.streams >= cfg.max_streams:
            raise _refused("streams", f"{peer.who} has {peer.streams} streams open, its limit; close one first")
        if not peer.requests.take(1, now):
            raise _refused("requests", f"{peer.who} is over its limit of {cfg.requests_per_second:g} requests per "
                           f"second (bursts of {cfg.request_burst}); retry in {peer.requests.wait(1):.2f} s")
        self.charge(peer, size)
        if streaming:
            peer.streams += 1
        return peer

    def charge(self, peer: Peer, size: int) -> None:
        if size and not peer.bytes.take(size, self._clock()):
            cfg = self.config
            raise _refused("bytes", f"{peer.who} is over its limit of {cfg.bytes_per_second / 2**20:g} MiB per "
                           f"second of requests (bursts of {cfg.byte_burst / 2**20:g} MiB); "
                           f"retry in {peer.bytes.wait(size):.2f} s")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        client_stream = bool(handler.request_streaming)
        streaming = client_stream or bool(handler.response_streaming)

        async def enter(request: Any, context: grpc.aio.ServicerContext) -> tuple[Peer | None, Any]:
            try:
                peer = self.admit(context, streaming, 0 if client_stream else _size(request))
            except ResourceExhausted as exc:
                if client_stream:  # read a little of what is on its way, so the client sees this status
                    await drain(request, context, limit_bytes=8 << 20, seconds=0.5)
                await context.abort(exc.code, str(exc))
            return peer, (_Metered(request, self, peer) if client_stream and peer is not None else request)

        @contextlib.asynccontextmanager
        async def limited(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            peer, request = await enter(request, context)
            try:
                yield request
            finally:
                if streaming and peer is not None:
                    peer.streams -= 1

        return guarded(handler, limited)


class _Metered:
    """A limited call's request stream: each message's bytes are charged to its agent. Past
    the limit it raises ResourceExhausted once, then passes the rest through uncharged (the
    servicer reads them only to answer with that status)."""

    def __init__(self, messages: AsyncIterator[Any], limits: AgentLimits, peer: Peer) -> None:
        self._messages, self._limits, self._peer = messages, limits, peer
        self._refused = False

    def __aiter__(self) -> _Metered:
        return self

    async def __anext__(self) -> Any:
        message = await anext(self._messages)
        if not self._refused:
            try:
                self._limits.charge(self._peer, _size(message))
            except ResourceExhausted:
                self._refused = True
                raise
        return message
