"""The processes of `make bench-scale`: a real `tandem cloud`, real `tandem region`
processes under it, fleets of light agents (tandem_lab.scale_agents) in processes of
their own, and probes: light members in the benchmark's own process, timing their
heartbeats to a coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tandem import measurements
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub
from tandem_lab.loadgen import metric, scrape
from tandem_lab.scale_agents import LightAgent, Tally

PROBE_TASK = "bench-scale-probe"  # offered by the probes alone: no job selects them


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@dataclass
class Server:
    """A coordinator process: the cloud, or a region (`name`)."""

    name: str
    proc: subprocess.Popen[bytes]
    ports: dict[str, Any]
    state: Path
    log: Path
    rss_idle: int = 0

    @property
    def target(self) -> str:
        return f"localhost:{self.ports['port']}"

    def received_bytes(self) -> float:
        """Update bytes the coordinator received so far (its metrics)."""
        return metric(scrape(self.ports["metrics_port"]), "tandem_coordinator_received_bytes_total", kind="update")


def start_cloud(certs: Path, work: Path, heartbeat: float) -> Server:
    proc, ports = procs.start_cloud(certs, work / "cloud", work / "cloud.log",
                                    extra=["--heartbeat", str(heartbeat), "--placement-interval", "0"])
    return Server("cloud", proc, ports, work / "cloud", work / "cloud.log")


def launch_region(certs: Path, work: Path, name: str, parent: int, min_clients: int, per_round: int,
                  heartbeat: float, listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen[bytes], Path]:
    """Start `tandem region NAME` under the coordinator on port `parent`; its ready file."""
    state = work / name
    ready = work / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    proc = procs.tandem_process(
        ["region", "--parent", f"localhost:{parent}", "--id", name, "--certs", str(certs), "--listen", listen,
         "--state", str(state), "--metrics", "127.0.0.1:0", "--min-clients", str(min_clients),
         "--clients-per-round", str(per_round), "--heartbeat", str(heartbeat), "--ready-file", str(ready)],
        work / f"{name}.log")
    return proc, ready


def start_regions(certs: Path, work: Path, names: Sequence[str], parent: int, per_round: Sequence[int],
                  heartbeat: float) -> list[Server]:
    """Every region at once (they import torch side by side), then each one's ready file."""
    launched = [launch_region(certs, work, name, parent, n, n, heartbeat) for name, n in zip(names, per_round,
                                                                                            strict=True)]
    servers = []
    try:
        for name, (proc, ready) in zip(names, launched, strict=True):
            ports = procs.wait_ready(proc, ready, work / f"{name}.log", f"region {name}", timeout=180)
            servers.append(Server(name, proc, ports, work / name, work / f"{name}.log"))
    except BaseException:
        for proc, _ in launched:
            procs.stop(proc)
        raise
    return servers


async def wait_members(server: Server, certs: Path, members: int, agents: int, timeout: float) -> None:
    """Until `server` has `members` connected and they stand for `agents` agents in all (a
    region counts its own; a light agent or a probe counts none here)."""
    deadline = time.monotonic() + timeout
    async with admin_channel(server.target, certs) as channel:
        stub = admin_stub(channel)
        from tandem.v1 import admin_pb2

        while True:
            listed = (await stub.ListAgents(admin_pb2.ListAgentsRequest())).agents
            connected = [a for a in listed if a.connected]
            # A region's count as its heartbeats say (AgentInfo.agents repeats its Hello's).
            held = sum(int(a.measurements.get(measurements.AGENTS, a.agents)) for a in connected)
            if len(connected) >= members and held >= agents:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.name}: {len(connected)} of {members} members connected, holding "
                                   f"{held} of {agents} agents, after {timeout:.0f} s; see {server.log}")
            await asyncio.sleep(0.5)


@dataclass
class Fleet:
    """A process of light agents (python -m tandem_lab.scale_agents)."""

    proc: asyncio.subprocess.Process
    agents: int
    out: Path
    log: Path
    connected: int = 0
    failed_connects: int = 0
    updated: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, certs: Path, groups: Sequence[str], agents: int, shapes: Path, codec: str,
                    interval: float, out: Path, log: Path) -> Fleet:
        args = [sys.executable, "-m", "tandem_lab.scale_agents", "--certs", str(certs), "--shapes", str(shapes),
                "--codec", codec, "--interval", str(interval), "--out", str(out)]
        for group in groups:
            args += ["--group", group]
        with open(log, "ab") as sink:
            proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=sink)
        fleet = cls(proc, agents, out, log)
        fleet.watcher = asyncio.create_task(fleet._watch())
        return fleet

    async def _watch(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            status = json.loads(line)
            self.connected = status.get("connected", self.connected)
            self.updated.set()
        self.updated.set()

    async def wait_connected(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self.connected < self.agents:
                    if self.proc.returncode is not None:
                        raise RuntimeError(f"a fleet exited with {self.proc.returncode}; see {self.log}")
                    self.updated.clear()
                    await self.updated.wait()
        except TimeoutError:
            raise RuntimeError(f"{self.connected} of a fleet's {self.agents} agents connected after {timeout:.0f} s; "
                               f"see {self.log}") from None

    async def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def stop(self, timeout: float = 120) -> dict[str, Any]:
        """Close its streams; what it measured."""
        with contextlib.suppress(ConnectionError):
            await self.command("stop")
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
        except TimeoutError:
            self.kill()
            raise RuntimeError(f"a fleet did not stop in {timeout:.0f} s; see {self.log}") from None
        if self.watcher is not None:
            self.watcher.cancel()
        if code != 0:
            raise RuntimeError(f"a fleet exited with {code}; see {self.log}")
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


class Probes:
    """Light members beside the regions, timing their heartbeats to the coordinator: the
    regions' own heartbeats are timed by nobody (an agent does not read its acknowledgements)."""

    def __init__(self, target: str, certs: Path, names: Sequence[str], interval: float) -> None:
        self.tally = Tally(measuring=False)
        self.stop_event = asyncio.Event()
        self.members = [LightAgent(target, certs, name, self.tally, None, interval=interval, offers=(PROBE_TASK,),
                                   examples=0) for name in names]
        self.running = [asyncio.create_task(m.run(self.stop_event)) for m in self.members]

    async def wait_connected(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.tally.connected < len(self.members):
                self.tally.changed.clear()
                await self.tally.changed.wait()

    def measure(self) -> None:
        self.tally.rtts.clear()
        self.tally.measuring = True

    async def stop(self) -> dict[str, Any]:
        self.tally.measuring = False
        self.stop_event.set()
        await asyncio.gather(*self.running, return_exceptions=True)
        return {"members": len(self.members), "rtts": list(self.tally.rtts), "drops": self.tally.drops,
                "drop_reasons": dict(self.tally.reasons)}


def stop_all(servers: Sequence[Server | None]) -> None:
    for server in servers:
        if server is not None:
            procs.stop(server.proc)
