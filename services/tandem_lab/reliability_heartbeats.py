"""Heartbeat flood: one agent sends heartbeats on its control stream as fast as it can,
reconnecting whenever the coordinator ends the stream, while a calm agent heartbeats at
its usual rate. Measured: the coordinator process's CPU time (psutil) over the flood,
minus the same span without it, with the per-agent limits on and with them off (rates
of 1e9: what the coordinator did before it had them)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from tandem import grpcserver, tls
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tandem_cli import procs
from tandem_lab.fleet import make_certs

UNLIMITED = ["--agent-heartbeats-per-second", "1e9", "--agent-connects-per-second", "1e9"]


async def flood(target: str, certs_dir: Path, until: float) -> dict[str, Any]:
    """Heartbeats as fast as the stream takes them; a new stream each time one ends."""
    ends: Counter[str] = Counter()
    acks = 0
    async with grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, "flood")) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        while time.monotonic() < until:
            async def messages() -> AsyncIterator[pb.AgentMessage]:
                yield pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu"))
                seq = 0
                while time.monotonic() < until:
                    seq += 1
                    yield pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq))

            call = stub.Connect(messages(), timeout=max(0.1, until - time.monotonic()))
            try:
                async for message in call:
                    acks += message.HasField("heartbeat_ack")
                ends["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                ends[exc.code().name] += 1
    return {"acks": acks, "stream_ends": dict(ends)}


async def calm(target: str, certs_dir: Path, until: float, interval: float) -> dict[str, Any]:
    """A heartbeat every `interval`: how many were answered, how the stream ended."""
    sent, acks, ended = 0, 0, "open"
    outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
    outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu")))

    async def messages() -> AsyncIterator[pb.AgentMessage]:
        while (message := await outgoing.get()) is not None:
            yield message

    async with grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, "calm")) as channel:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(messages())

        async def read() -> None:
            nonlocal acks
            async for message in call:
                acks += message.HasField("heartbeat_ack")

        reader = asyncio.create_task(read())
        while time.monotonic() < until:
            sent += 1
            outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=sent)))
            await asyncio.sleep(interval)
        await asyncio.sleep(0.5)
        if reader.done() and reader.exception() is not None:
            ended = str(reader.exception())[:200]
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return {"sent": sent, "acks": acks, "ended": ended}


async def run_one(work: Path, certs_dir: Path, extra: list[str], seconds: float) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    proc, ports = procs.start_cloud(certs_dir, work / "state", work / "cloud.log", extra=["--heartbeat", "1", *extra])
    try:
        target, cloud = f"localhost:{ports['port']}", psutil.Process(proc.pid)
        await asyncio.sleep(1.0)
        start, cpu = time.monotonic(), sum(cloud.cpu_times()[:2])
        quiet = await calm(target, certs_dir, start + seconds, 0.5)
        idle_cpu = (sum(cloud.cpu_times()[:2]) - cpu) / (time.monotonic() - start)
        start, cpu = time.monotonic(), sum(cloud.cpu_times()[:2])
        flooded, calm_during = await asyncio.gather(flood(target, certs_dir, start + seconds),
                                                    calm(target, certs_dir, start + seconds, 0.5))
        flood_cpu = (sum(cloud.cpu_times()[:2]) - cpu) / (time.monotonic() - start)
    finally:
        procs.stop(proc)
    return {"seconds": seconds, "cpu_cores_without_flood": round(idle_cpu, 4), "cpu_cores_during_flood": round(flood_cpu, 4),
            "flood_cost_cores": round(flood_cpu - idle_cpu, 4), "flood": flooded, "calm_without_flood": quiet,
            "calm_during_flood": calm_during}


async def run(work: Path, seconds: float = 20.0) -> dict[str, Any]:
    certs_dir = make_certs(work / "certs", ["flood", "calm"])
    runs = {"limited": await run_one(work / "limited", certs_dir, [], seconds),
            "unlimited": await run_one(work / "unlimited", certs_dir, UNLIMITED, seconds)}
    for name, r in runs.items():
        print(f"  heartbeats {name}: the flood cost the coordinator {r['flood_cost_cores']:.3f} cores "
              f"({r['flood']['acks']} heartbeats answered)", flush=True)
    return runs


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    limited = runs["limited"]
    cost, calm = limited["flood_cost_cores"], limited["calm_during_flood"]
    return {
        "heartbeats_flood_cost_cores": {
            "measured": cost, "goal": 0.10, "op": "<=", "met": cost <= 0.10,
            "how": "coordinator CPU time over the flood per second, minus the same without it (default limits); "
                   f"with the limits off it was {runs['unlimited']['flood_cost_cores']:.3f}"},
        "heartbeats_calm_agent_unanswered": {
            "measured": calm["sent"] - calm["acks"], "goal": 0, "op": "<=",
            "met": calm["acks"] == calm["sent"] and calm["ended"] == "open",
            "how": "heartbeats of a calm agent left unanswered during the flood (its stream must stay open)"},
    }
