"""The agent's view of its link to the cloud: round-trip time and throughput from
real requests plus a small probe while idle, and whether to try the cloud at all.

Every sample errs one way: the call also waits for this agent's own CPU (a weak
device computing a request at the edge answers its probe late) and for queues behind
its own traffic, never less than the path needs. So the round trip is the least of
the recent samples and the throughput the greatest (BBR's min-RTT and max-bandwidth
filters); an average would price the cloud by how busy the edge is, and keep an agent
computing at the edge from ever seeing that the cloud is cheaper.

Requests of more than MEASURABLE_BYTES measure throughput, not the round trip, so
while they keep the link busy a small probe still goes every `interval` to refresh
the round trip (which also splits each request's time into waiting and moving).
A longer round trip shows only once the shorter samples have left the window: a test
that moved it sooner (three samples in a row well above it) fired on a weak agent
busy at the edge, whose answers run late for seconds at a time. The controller tests
for change points on what this reports (cloud.placement_filter).

After a call fails for a link reason the link counts as down for a short, growing
while: requests then go local at once instead of each waiting out a timeout. A
probe that succeeds brings it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from tandem import measurements, metrics

log = logging.getLogger(__name__)

# Codes that say "the link or the cloud is not there", as opposed to "this request".
LINK_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
})
# Below this many bytes a transfer measures latency, not throughput.
MEASURABLE_BYTES = 16 << 10
# A throughput probe sends this much up, when no request has measured it for a while.
THROUGHPUT_PROBE_BYTES = 64 << 10
THROUGHPUT_EVERY = 5  # probe intervals
# The estimates follow this many recent samples: a change of the link shows after at
# most that many (a deadline miss caps the uplink at once), a late sample not at all.
RTT_SAMPLES = 10  # 5 s of idle probes at a 0.5 s interval (the bench's), 20 s at the default 2 s
THROUGHPUT_SAMPLES = 3  # a second of requests at 3 a second; at the edge, three throughput probes


class LinkMonitor:
    def __init__(
        self, probe: Callable[[float, int], Awaitable[None]], interval: float,
        on_measure: Callable[[str, float], None] | None = None,
    ) -> None:
        self._probe = probe  # a call to the cloud: (timeout, bytes to send up)
        self.interval = interval
        self._on_measure = on_measure
        self.rtt: float | None = None
        self.bytes_per_second: dict[str, float] = {}
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)
        self._throughputs: dict[str, deque[float]] = {}
        self._down_until = 0.0
        self._down_for = 0.0
        self._last_measured = 0.0
        self._last_throughput = 0.0
        self._last_rtt = 0.0
        metrics.EDGE_LINK_UP.set(1)

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def success(self, seconds: float, sent: int = 0, received: int = 0) -> None:
        """A call to the cloud answered in `seconds` with these payload sizes."""
        self._last_measured = time.monotonic()
        if self._down_for:
            log.info("cloud reachable again")
        self._down_until, self._down_for = 0.0, 0.0
        metrics.EDGE_LINK_UP.set(1)
        if max(sent, received) < MEASURABLE_BYTES:
            self._last_rtt = self._last_measured
            self._rtts.append(seconds)
            self.rtt = min(self._rtts)
            metrics.EDGE_LINK_RTT.set(self.rtt)
            self._report(measurements.RTT_SECONDS, self.rtt)
            return
        # The time beyond one round trip went to moving the bytes.
        self._last_throughput = self._last_measured
        moving = max(seconds - (self.rtt or 0.0), seconds / 2, 1e-4)
        for direction, nbytes in (("up", sent), ("down", received)):
            if nbytes >= MEASURABLE_BYTES:
                samples = self._throughputs.setdefault(direction, deque(maxlen=THROUGHPUT_SAMPLES))
                samples.append(nbytes / moving)
                self._set_throughput(direction, max(samples))

    def too_slow(self, sent: int, seconds: float) -> None:
        """A call that sent `sent` bytes did not finish in `seconds`: the uplink moves less,
        whatever faster samples said before."""
        if sent >= MEASURABLE_BYTES and seconds > 0:
            bound = sent / seconds
            if self.bytes_per_second.get("up", float("inf")) > bound:
                self._throughputs["up"] = deque([bound], maxlen=THROUGHPUT_SAMPLES)
                self._set_throughput("up", bound)

    def _set_throughput(self, direction: str, value: float) -> None:
        self.bytes_per_second[direction] = value
        metrics.EDGE_LINK_BYTES_PER_SECOND.labels(direction).set(value)
        self._report(measurements.link_bytes_per_second(direction), value)

    def failure(self, code: grpc.StatusCode) -> None:
        """A call failed; if for a link reason, stop trying the cloud for a while."""
        if code not in LINK_CODES:
            return
        self._down_for = min(max(2 * self._down_for, 0.25), 5.0)
        self._down_until = time.monotonic() + self._down_for
        metrics.EDGE_LINK_UP.set(0)
        log.info("cloud call failed (%s); answering locally for %.2f s", code.name, self._down_for)

    def _report(self, name: str, value: float) -> None:
        if self._on_measure is not None:
            self._on_measure(name, value)

    async def run(self) -> None:
        """Probe whenever no call has measured the round trip for `interval` (requests
        too large to measure it may keep the link busy), or the link is down; send a
        larger probe when no call has measured its throughput for a while."""
        while True:
            await asyncio.sleep(self.interval / 4)
            now = time.monotonic()
            stale = now - self._last_rtt >= self.interval
            if not (stale or (not self.available() and self._down_for)):
                continue
            size = THROUGHPUT_PROBE_BYTES if now - self._last_throughput >= THROUGHPUT_EVERY * self.interval else 0
            start = time.perf_counter()
            try:
                await self._probe(max(self.interval, 2.0), size)
            except grpc.aio.AioRpcError as exc:
                self._last_measured = time.monotonic()
                self.failure(exc.code())
            else:
                self.success(time.perf_counter() - start, sent=size)
