"""The state volume's free space: measured, exported, and kept as a reserve.

A coordinator whose disk fills must neither fail its jobs nor lose acknowledged
updates (issue 14). Below the reserve it refuses new uploads with RESOURCE_EXHAUSTED,
so that the space left goes to closing rounds whose updates are already acknowledged,
and it takes uploads again by itself once space returns: every check measures anew.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tandem import metrics
from tandem.errors import NoSpace

log = logging.getLogger(__name__)

# Room for the closes of rounds already under way: a new version, its delta and the
# job state are each about a model's size, and SQLite's WAL needs a little. 256 MiB
# covers the zoo's models but the largest; set a few times the largest model served.
DEFAULT_RESERVE_BYTES = 256 << 20
CHECK_INTERVAL_SECONDS = 2.0
# The health entry (grpc.health.v1) that is NOT_SERVING while free space is below the
# reserve. Not a gRPC service: probes of the server ("") do not see it (cloud.app says why).
HEALTH_NAME = "tandem.StateVolume"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the volume holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


class DiskMonitor:
    """Free space on the state volume against a reserve; `check` refuses an upload below it."""

    def __init__(self, directory: Path, reserve: int = DEFAULT_RESERVE_BYTES,
                 interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.directory = directory
        self.reserve = reserve
        self.interval = interval
        self.free = -1  # bytes, as last measured (-1: not yet)
        self.low = False  # free < reserve at the last measurement
        metrics.STATE_RESERVE_BYTES.set(reserve)

    def sample(self) -> int:
        """Measure now, export it, and log a crossing of the reserve (once per crossing)."""
        free = free_bytes(self.directory)
        low = free < self.reserve
        metrics.STATE_FREE_BYTES.set(free)
        metrics.STATE_LOW_SPACE.set(int(low))
        if low and not self.low:
            log.warning("state volume %s has %s free, below the reserve of %s: new uploads are refused "
                        "until space is freed", self.directory, mib(free), mib(self.reserve))
        elif self.low and not low:
            log.info("state volume %s has %s free again: uploads are taken", self.directory, mib(free))
        self.free, self.low = free, low
        return free

    def check(self) -> None:
        """Raise NoSpace (RESOURCE_EXHAUSTED) while free space is below the reserve."""
        free = self.sample()
        if free < self.reserve:
            raise NoSpace(f"the coordinator's state volume has {mib(free)} free, below its reserve of "
                          f"{mib(self.reserve)}: new uploads are refused until an operator frees space; "
                          "try again later")

    async def run(self, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Measure every `interval` seconds; `on_change(low)` at the start and at each crossing."""
        reported: bool | None = None
        while True:
            try:
                self.sample()
            except OSError as exc:  # the volume went away: say so, keep the last figures
                log.warning("cannot measure the state volume %s: %s", self.directory, exc)
            if self.low != reported:
                reported = self.low
                await on_change(self.low)
            await asyncio.sleep(self.interval)
