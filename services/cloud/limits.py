"""Per-agent limits on the coordinator: streams open at once, requests per second and
request bytes per second, each agent counted on its own; and, on the control stream,
Connects and heartbeats per second (the servicer asks `connect` and `heartbeat`).

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
from tandem.certs import MEMBER_ROLES, Identity
from tandem.errors import Malformed, ResourceExhausted, TandemError, drain
from tandem.interceptors import Wrapped, guarded


@dataclass(frozen=True)
class LimitsConfig:
    """Generous defaults: well above what an honest agent does (an edge agent forwarding
    inference to the cloud makes ~1,300 calls per second on a 2-core machine)."""

    max_streams: int = 32  # streaming calls open at once, the control stream included
    requests_per_second: float = 5_000.0  # calls, sustained
    request_burst: int = 10_000  # calls at once above the sustained rate
    bytes_per_second: float = 256 << 20  # request bytes (uploads, mostly), sustained
    byte_burst: int = 1 << 30  # request bytes at once above the sustained rate
    roles: tuple[str, ...] = MEMBER_ROLES  # whose certificates are limited; admins and replicas are operators'
    # Control-stream messages. An agent heartbeats every few seconds (5 s by default, and at
    # once when it measured its link): 5 per second is ten times the fastest honest rate
    # at `--heartbeat 0.5`, and a flooding agent's stream ends after the burst.
    heartbeats_per_second: float = 5.0
    heartbeat_burst: int = 25
    # Connect calls. Agents reconnect with a backoff of 0.5 s and more; the burst lets a
    # flaky link reconnect a few times in a row, the rate bounds two processes sharing one
    # certificate that keep replacing each other's stream.
    connects_per_second: float = 1.0
    connect_burst: int = 10

    def __post_init__(self) -> None:
        if min(self.max_streams, self.requests_per_second, self.request_burst, self.bytes_per_second,
               self.byte_burst, self.heartbeats_per_second, self.heartbeat_burst, self.connects_per_second,
               self.connect_burst) <= 0:
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
    """One identity's counters, kept across its reconnects (a new stream refills nothing)."""

    who: str  # "agent 'edge-1'", for messages
    requests: TokenBucket
    bytes: TokenBucket
    heartbeats: TokenBucket
    connects: TokenBucket
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
        self._wrapped = Wrapped()

    def _peer(self, role: str, name: str) -> Peer:
        key = (role, name)
        if key not in self._peers:
            cfg, now = self.config, self._clock()
            self._peers[key] = Peer(f"{role} {name!r}",
                                   TokenBucket(cfg.requests_per_second, cfg.request_burst, cfg.request_burst, now),
                                   TokenBucket(cfg.bytes_per_second, cfg.byte_burst, cfg.byte_burst, now),
                                   TokenBucket(cfg.heartbeats_per_second, cfg.heartbeat_burst, cfg.heartbeat_burst, now),
                                   TokenBucket(cfg.connects_per_second, cfg.connect_burst, cfg.connect_burst, now))
        return self._peers[key]

    def connect(self, identity: Identity) -> Peer | None:
        """`identity`'s counters with one more Connect counted, or None when its role is not
        limited. Raises ResourceExhausted when it connects faster than its limit."""
        if identity.role not in self.config.roles:
            return None
        peer, cfg = self._peer(identity.role, identity.name), self.config
        if not peer.connects.take(1, self._clock()):
            raise _refused("connects", f"{peer.who} opened control streams faster than its limit of "
                           f"{cfg.connects_per_second:g} per second (bursts of {cfg.connect_burst}); "
                           f"retry in {peer.connects.wait(1):.2f} s")
        return peer

    def heartbeat(self, peer: Peer | None) -> None:
        """Count one heartbeat of `peer` (from `connect`); ResourceExhausted above its rate."""
        if peer is not None and not peer.heartbeats.take(1, self._clock()):
            cfg = self.config
            raise _refused("heartbeats", f"{peer.who} is over its limit of {cfg.heartbeats_per_second:g} heartbeats "
                           f"per second (bursts of {cfg.heartbeat_burst}); its control stream is closed")

    def admit(self, context: grpc.aio.ServicerContext, streaming: bool, size: int | Callable[[], int]) -> Peer | None:
        """The caller's counters with this call counted in, or None when it is not limited.
        Raises ResourceExhausted, saying which limit, when the call is over one. `size` may
        be a function, called only for a limited caller (a message's size costs a walk of it)."""
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
        self.charge(peer, size() if callable(size) else size)
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
        return self._wrapped.get(handler_call_details.method, handler, lambda: self._limited(handler))

    def _limited(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        client_stream = bool(handler.request_streaming)
        streaming = client_stream or bool(handler.response_streaming)

        async def enter(request: Any, context: grpc.aio.ServicerContext) -> tuple[Peer | None, Any]:
            try:
                peer = self.admit(context, streaming, 0 if client_stream else lambda: _size(request))
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
