"""The load generator of `python -m tandem_lab bench infer`, run as its own process:
C concurrent clients (coroutines) over mutual TLS, each sending Infer requests back to
back, a channel per `--clients-per-channel` of them.

Timed mode (the default): warm up for `--warmup` seconds, then count the requests
that complete within the next `--seconds`; latencies are of those requests.
Data-set mode (`--inputs X.npy --labels Y.npy`): every row of X is sent once,
as a request of one row, and answers are scored against Y.

Writes one JSON object to `--out`. Imports no torch, so it starts in well under a
second and leaves the cores to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tandem import grpcserver, tls, wire
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

RPC_TIMEOUT = 30.0


def credentials(certs_dir: Path, who: str) -> grpc.ChannelCredentials:
    """`admin`, `agent:NAME` or `app:NAME`: whose certificate the clients present."""
    kind, _, name = who.partition(":")
    if kind == "admin":
        return tls.admin_credentials(certs_dir)
    if kind == "agent":
        return tls.agent_credentials(certs_dir, name)
    if kind == "app":
        return tls.app_credentials(certs_dir, name)
    raise ValueError(f"unknown credentials {who!r}: use admin, agent:NAME or app:NAME")


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max in milliseconds (zeros when there are none)."""
    if not latencies:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0}
    ms = np.asarray(latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(ms.mean()), "max": float(ms.max())}


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of this process ("loadgen") and of each watched process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"loadgen": usage.ru_utime + usage.ru_stime, **{n: process_cpu_seconds(p) for n, p in pids.items()}}


@dataclass
class Tally:
    """What the clients saw, shared by all of them (one event loop: no locks)."""

    window: tuple[float, float] = (0.0, float("inf"))
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    error_messages: dict[str, str] = field(default_factory=dict)
    versions: collections.Counter[int] = field(default_factory=collections.Counter)
    placements: collections.Counter[str] = field(default_factory=collections.Counter)
    correct: collections.Counter[str] = field(default_factory=collections.Counter)
    sent: int = 0

    def error(self, exc: grpc.aio.AioRpcError) -> None:
        name = exc.code().name
        self.errors[name] += 1
        self.error_messages.setdefault(name, str(exc.details()))

    def answered(self, response: pb.InferResponse, started: float, done: float) -> bool:
        """Count a successful response; True when it falls inside the measured window."""
        self.versions[response.version] += 1
        placement = pb.Placement.Name(response.placement).removeprefix("PLACEMENT_").lower()
        self.placements[placement] += 1
        if self.window[0] <= started and done <= self.window[1]:
            self.latencies.append(done - started)
            return True
        return False


async def timed_client(stub: Any, request: pb.InferRequest, tally: Tally, stop_at: float) -> None:
    while (started := time.perf_counter()) < stop_at:
        try:
            response = await stub.Infer(request, timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            tally.error(exc)
            continue
        tally.answered(response, started, time.perf_counter())


async def dataset_client(
    stub: Any, model: str, x: np.ndarray, y: np.ndarray, order: collections.deque[int], tally: Tally
) -> None:
    while order:
        i = order.popleft()
        started = time.perf_counter()
        try:
            response = await stub.Infer(pb.InferRequest(model=model, input=wire.to_proto(x[i : i + 1])),
                                        timeout=RPC_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            tally.error(exc)
            continue
        tally.answered(response, started, time.perf_counter())
        placement = pb.Placement.Name(response.placement).removeprefix("PLACEMENT_").lower()
        if int(np.argmax(wire.from_proto(response.output)[0])) == int(y[i]):
            tally.correct[placement] += 1


async def run(args: argparse.Namespace) -> dict[str, Any]:
    creds = credentials(args.certs, args.who)
    watch = {name: int(pid) for name, _, pid in (w.partition("=") for w in args.watch)}
    per = max(1, args.clients_per_channel)
    channels = [grpcserver.secure_channel(args.target, creds) for _ in range(-(-args.clients // per))]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), 30)
        stubs = [inference_pb2_grpc.InferenceStub(channels[i // per]) for i in range(args.clients)]
        tally = Tally()
        if args.inputs is not None:
            x, y = np.load(args.inputs), np.load(args.labels)
            order = collections.deque(range(len(x)))
            cpu, start = _cpu_seconds(watch), time.perf_counter()
            await asyncio.gather(*(dataset_client(s, args.model, x, y, order, tally) for s in stubs))
            end = time.perf_counter()
        else:
            rng = np.random.default_rng(0)
            requests = [
                pb.InferRequest(request_id=f"c{i}", model=args.model,
                                input=wire.to_proto(rng.normal(size=(args.rows, args.width)).astype(np.float32)))
                for i in range(args.clients)
            ]
            now = time.perf_counter()
            start, end = now + args.warmup, now + args.warmup + args.seconds
            tally.window = (start, end)
            cpu_box: list[dict[str, float]] = []

            async def mark_start() -> None:
                await asyncio.sleep(args.warmup)
                cpu_box.append(_cpu_seconds(watch))

            marker = asyncio.create_task(mark_start())
            await asyncio.gather(*(timed_client(s, r, tally, end) for s, r in zip(stubs, requests)))
            await marker
            cpu = cpu_box[0]
    finally:
        for channel in channels:
            await channel.close()
    wall = end - start
    completed = len(tally.latencies)
    out: dict[str, Any] = {
        "target": args.target, "model": args.model, "rows": args.rows, "clients": args.clients,
        "channels": len(channels), "seconds": wall, "requests": completed, "samples": completed * args.rows,
        "requests_per_second": completed / wall, "samples_per_second": completed * args.rows / wall,
        "latency_ms": percentiles(tally.latencies),
        "failures": sum(tally.errors.values()), "errors": dict(tally.errors), "error_messages": tally.error_messages,
        "versions": {str(k): v for k, v in sorted(tally.versions.items())},
        "placements": dict(tally.placements),
        # CPU use within the measured window, in cores: this process's and the watched ones'.
        "cores": {name: (seconds - cpu[name]) / wall for name, seconds in _cpu_seconds(watch).items()},
    }
    if args.inputs is not None:
        out["rows"] = 1
        out["examples"] = int(len(np.load(args.labels)))
        out["correct"] = dict(tally.correct)
        out["accuracy"] = sum(tally.correct.values()) / out["examples"]
    return out


async def spawn(args: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run `python -m tandem_lab.loadgen ARGS --out OUT` as a child process; its JSON."""
    out.unlink(missing_ok=True)
    with open(log, "ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tandem_lab.loadgen", *args, "--out", str(out),
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=asyncio.subprocess.STDOUT,
        )
        code = await proc.wait()
    if code != 0:
        raise RuntimeError(f"load generator exited with {code}; see {log}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    """Every sample of a /metrics page: (name, labels, value)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


async def wait_answering(
    target: str, name: str, creds: grpc.ChannelCredentials, model: str, timeout: float = 60
) -> None:
    """Return once `target` answers an Infer for `model` (an agent fetches its models first)."""
    deadline = time.monotonic() + timeout
    request = pb.InferRequest(model=model, input=wire.to_proto(np.zeros((1, 64), np.float32)))
    async with grpcserver.secure_channel(target, creds) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            try:
                await stub.Infer(request, timeout=5)
                return
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} does not answer {model}: {exc.code().name} {exc.details()}") from None
                await asyncio.sleep(0.2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tandem_lab.loadgen", description=__doc__)
    p.add_argument("--target", required=True, help="HOST:PORT of an Inference server")
    p.add_argument("--certs", type=Path, required=True)
    p.add_argument("--who", default="admin", help="client certificate: admin, agent:NAME or app:NAME")
    p.add_argument("--model", required=True)
    p.add_argument("--rows", type=int, default=1, help="rows per request")
    p.add_argument("--width", type=int, default=64, help="features per row")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--clients-per-channel", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--inputs", type=Path, default=None, help="data-set mode: .npy of inputs, each sent once")
    p.add_argument("--labels", type=Path, default=None, help="data-set mode: .npy of integer labels")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="also report the CPU use of process PID within the window; repeatable")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if (args.inputs is None) != (args.labels is None):
        p.error("--inputs and --labels go together")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
