"""The agent's view of its link to the cloud: round-trip time and throughput from
real requests plus a small probe while idle, and whether to try the cloud at all.

After a call fails for a link reason the link counts as down for a short, growing
while: requests then go local at once instead of each waiting out a timeout. A
probe that succeeds brings it back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from tandem import metrics

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
_EWMA = 0.3


def _average(previous: float | None, sample: float) -> float:
    return sample if previous is None else (1 - _EWMA) * previous + _EWMA * sample


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
        self._down_until = 0.0
        self._down_for = 0.0
        self._last_measured = 0.0
        self._last_throughput = 0.0
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
            self.rtt = _average(self.rtt, seconds)
            metrics.EDGE_LINK_RTT.set(self.rtt)
            self._report("rtt_seconds", self.rtt)
            return
        # The time beyond one round trip went to moving the bytes.
        self._last_throughput = self._last_measured
        moving = max(seconds - (self.rtt or 0.0), seconds / 2, 1e-4)
        for direction, nbytes in (("up", sent), ("down", received)):
            if nbytes >= MEASURABLE_BYTES:
                sample, old = nbytes / moving, self.bytes_per_second.get(direction)
                # A step change (more than 2x either way) is taken at once; smaller changes are smoothed.
                value = sample if old is None or not 0.5 <= sample / old <= 2 else _average(old, sample)
                self.bytes_per_second[direction] = value
                metrics.EDGE_LINK_BYTES_PER_SECOND.labels(direction).set(value)
                self._report(f"link_{direction}_bytes_per_second", value)

    def too_slow(self, sent: int, seconds: float) -> None:
        """A call that sent `sent` bytes did not finish in `seconds`: the uplink moves less."""
        if sent >= MEASURABLE_BYTES and seconds > 0:
            bound = sent / seconds
            if self.bytes_per_second.get("up", float("inf")) > bound:
                self.bytes_per_second["up"] = bound
                metrics.EDGE_LINK_BYTES_PER_SECOND.labels("up").set(bound)
                self._report("link_up_bytes_per_second", bound)

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
        """Probe whenever no request has measured the link for `interval`, or it is down;
        send a larger probe when no request has measured its throughput for a while."""
        while True:
            await asyncio.sleep(self.interval / 4)
            now = time.monotonic()
            idle = now - self._last_measured >= self.interval
            if not (idle or (not self.available() and self._down_for)):
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
