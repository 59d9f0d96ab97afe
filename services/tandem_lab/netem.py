"""Real network conditions and weak devices for tests and benchmarks (root only).

- `ShapedLink`: a network namespace joined to the host by a veth pair; bandwidth
  shaped in the kernel with `tc tbf` in both directions, changeable while it runs;
  `cut()` takes the link down (packets vanish, nothing is refused), `restore()`
  brings it back. This kernel has no `netem`, so delay cannot come from `tc`.
- `DelayRelay`: an asyncio TCP relay in the path that holds each chunk for half the
  round-trip time in each direction (plus jitter, order kept), and emulates loss the
  way an application sees it over TCP: with probability `loss` a chunk waits a
  retransmission timeout more.
- `CpuLimit`: a cgroup v1 CPU quota, so a process behaves like a weaker device.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import time
from pathlib import Path

RTO_SECONDS = 0.2  # what a lost segment costs an application over TCP, about


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def unavailable_reason() -> str | None:
    """Why shaped links cannot be made here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root for ip netns and tc"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if probe.returncode != 0:
        return f"ip netns refused: {probe.stderr.decode().strip()}"
    return None


def _burst_bytes(rate_bits: float) -> int:
    # tbf needs a bucket of at least one timer tick's worth of bytes at the rate.
    return max(16 << 10, int(rate_bits / 8 / 100))


def _bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for suffix, factor in units.items():
        if rate.endswith(suffix):
            return float(rate[: -len(suffix)]) * factor
    raise ValueError(f"rate {rate!r}: use a number with kbit, mbit or gbit")


class ShapedLink:
    """Namespace `tandem-N` behind veth `tdmN-h` (host, HOST_IP) / `tdmN-e` (namespace)."""

    def __init__(self, index: int) -> None:
        if not 0 <= index < 250:
            raise ValueError("index must be in 0..249")
        self.ns = f"tandem-{index}"
        self.host_if, self.ns_if = f"tdm{index}-h", f"tdm{index}-e"
        self.host_ip, self.ns_ip = f"10.204.{index}.1", f"10.204.{index}.2"
        self.rate = ""

    def up(self, rate: str) -> ShapedLink:
        self.down()
        _run("ip", "netns", "add", self.ns)
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _run("ip", "link", "set", self.ns_if, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        self._ns("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        self._ns("ip", "link", "set", self.ns_if, "up")
        self._ns("ip", "link", "set", "lo", "up")
        self.set_rate(rate)
        return self

    def _ns(self, *args: str) -> None:
        _run("ip", "netns", "exec", self.ns, *args)

    def set_rate(self, rate: str) -> None:
        """Shape both directions to `rate` (tc syntax, e.g. 20mbit), at once."""
        bits = _bits(rate)
        tbf = ["tbf", "rate", rate, "burst", str(_burst_bytes(bits)), "latency", "200ms"]
        _run("tc", "qdisc", "replace", "dev", self.host_if, "root", *tbf)  # cloud -> edge
        self._ns("tc", "qdisc", "replace", "dev", self.ns_if, "root", *tbf)  # edge -> cloud
        self.rate = rate

    def cut(self) -> None:
        """Take the link down: packets vanish; nothing answers, nothing refuses."""
        _run("ip", "link", "set", self.host_if, "down")

    def restore(self) -> None:
        _run("ip", "link", "set", self.host_if, "up")

    def prefix(self) -> list[str]:
        """Command prefix that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


class DelayRelay:
    """host:port -> target, adding delay, jitter and TCP-like loss stalls; settable live."""

    def __init__(self, target: tuple[str, int], rtt: float = 0.0, jitter: float = 0.0, loss: float = 0.0,
                 seed: int = 0) -> None:
        self.target = target
        self.rtt, self.jitter, self.loss = rtt, jitter, loss
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str) -> None:
        self._server = await asyncio.start_server(self._handle, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._connections.discard(task)
            return
        try:
            await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            for w in (writer, upstream_writer):
                with contextlib.suppress(Exception):
                    w.close()
            self._connections.discard(task)

    def _hold(self) -> float:
        extra = RTO_SECONDS if self.loss and self._random.random() < self.loss else 0.0
        return max(0.0, self.rtt / 2 + self._random.uniform(-self.jitter, self.jitter)) + extra

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Each chunk leaves `hold` after it arrived, never before the one ahead of it."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                release, data = item
                delay = release - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        last = 0.0
        try:
            while data := await reader.read(1 << 16):
                last = max(last, time.monotonic() + self._hold())
                queue.put_nowait((last, data))
            queue.put_nowait(None)
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(Exception):
                writer.close()


class CpuLimit:
    """A cgroup v1 CPU quota: `share` of one core (0.2 = a fifth) for the processes added."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, name: str, share: float) -> None:
        if not 0 < share <= 64:
            raise ValueError("share must be a positive number of cores")
        self.path = self.ROOT / f"tandem-{name}"
        self.share = share

    def __enter__(self) -> CpuLimit:
        self.path.mkdir(exist_ok=True)
        # A short period (the default is 100 ms) spreads the quota thinly: a throttled
        # process stalls for milliseconds at a time, like a slow CPU, not for 95 ms.
        # The kernel's smallest quota is 1 ms.
        period = max(10_000, int(1_000 / self.share) + 1)
        (self.path / "cpu.cfs_period_us").write_text(str(period))
        (self.path / "cpu.cfs_quota_us").write_text(str(int(self.share * period)))
        return self

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc: object) -> None:
        # Processes still inside go back to the root group before the group is removed.
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.ROOT / "cgroup.procs").write_text(pid)
            self.path.rmdir()
