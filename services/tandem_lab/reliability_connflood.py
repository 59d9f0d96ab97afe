"""Unauthenticated connection flood: thousands of plain TCP connections that never start
TLS, against a coordinator under a 1,024 open-files limit, while honest agents connect.

Two coordinators: one whose soft limit is 1,024 under a higher hard limit (it raises its
own limit at start), one held to 1,024 for good (`prlimit --nofile=1024:1024`: then the
connection cap and the 5 s handshake deadline are all it has). The flood holds its
sockets open and sends nothing; every `interval` an honest agent opens a new channel and
its control stream, and the seconds until its Welcome are recorded.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from pathlib import Path
from typing import Any

import psutil

from tandem import grpcserver, tls
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tandem_cli import procs
from tandem_lab.fleet import make_certs

OPEN_FILES = 1024


async def honest_connect(target: str, certs_dir: Path, name: str, timeout: float = 30.0) -> float:
    """Seconds from a new channel to the Welcome on its control stream (inf if none came)."""
    start = time.monotonic()
    async with grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, name)) as channel:
        hello = pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu"))
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(iter([hello]), timeout=timeout,
                                                                    wait_for_ready=True)
        try:
            async for message in call:
                if message.HasField("welcome"):
                    return time.monotonic() - start
        except Exception:  # noqa: BLE001 - a failed connect is what this measures
            pass
        finally:
            call.cancel()
    return float("inf")


def open_flood(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that never send a byte (the server may close some at once)."""
    flood = []
    for _ in range(count):
        try:
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        except OSError:
            pass
    return flood


async def run_one(work: Path, certs_dir: Path, hard: int, connections: int, seconds: float,
                  interval: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    log = work / "cloud.log"
    prefix = ["prlimit", f"--nofile={OPEN_FILES}:{hard}", "--"]
    ready = work / "state.ready.json"
    proc = procs.tandem_process(["cloud", "--listen", "127.0.0.1:0", "--certs", str(certs_dir), "--state",
                                 str(work / "state"), "--metrics", "127.0.0.1:0", "--ready-file", str(ready),
                                 "--grace", "1"], log, prefix=prefix)
    try:
        port = procs.wait_ready(proc, ready, log, "coordinator")["port"]
        target = f"localhost:{port}"
        cloud = psutil.Process(proc.pid)
        before = await honest_connect(target, certs_dir, "honest-0")
        started = time.monotonic()
        flood = await asyncio.to_thread(open_flood, port, connections)
        opened = time.monotonic() - started
        peak_fds = cloud.num_fds()
        waits: list[float] = []
        index = 0
        while time.monotonic() - started < seconds:
            index += 1
            waits.append(await honest_connect(target, certs_dir, f"honest-{index % 4}"))
            peak_fds = max(peak_fds, cloud.num_fds())
            await asyncio.sleep(interval)
        alive = sum(1 for s in flood if _still_open(s))
        for sock in flood:
            sock.close()
        limit = cloud.rlimit(psutil.RLIMIT_NOFILE)
    finally:
        procs.stop(proc)
    text = log.read_text(errors="replace")
    return {
        "open_files_limit_given": [OPEN_FILES, hard], "open_files_limit_in_force": list(limit),
        "flood_connections": connections, "flood_open_seconds": round(opened, 2),
        "flood_still_open_at_end": alive, "coordinator_peak_fds": peak_fds,
        "honest_connect_seconds_before": round(before, 3),
        "honest_connect_seconds": [round(w, 3) for w in waits], "honest_connect_max_seconds": max(waits),
        "log_lines_fd_limit": text.count("File descriptor limit reached"),
        "log_bytes": len(text.encode()),
    }


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


async def run(work: Path, connections: int = 2000, seconds: float = 20.0, interval: float = 0.5) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < connections + 256 <= hard:  # this process holds the flood's sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    certs_dir = make_certs(work / "certs", [f"honest-{i}" for i in range(4)])
    runs: dict[str, Any] = {}
    # soft_1024: the coordinator may raise its soft limit up to ours (prlimit cannot go above it).
    for variant, hard_limit in (("soft_1024", hard), ("hard_1024", OPEN_FILES)):
        runs[variant] = await run_one(work / variant, certs_dir, hard_limit, connections, seconds, interval)
        r = runs[variant]
        print(f"  connflood {variant}: honest connects within {r['honest_connect_max_seconds']:.2f} s at most, "
              f"coordinator fds peak {r['coordinator_peak_fds']}", flush=True)
    return runs


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for variant, r in runs.items():
        worst = r["honest_connect_max_seconds"]
        out[f"connflood_{variant}_honest_connect_seconds"] = {
            "measured": round(worst, 3), "goal": 1.0, "op": "<=", "met": worst <= 1.0,
            "how": f"slowest of the honest agents' new connections (channel to Welcome) while "
                   f"{r['flood_connections']} silent TCP connections were held, open-files limit given "
                   f"{r['open_files_limit_given'][0]}:{r['open_files_limit_given'][1]}"}
    return out
