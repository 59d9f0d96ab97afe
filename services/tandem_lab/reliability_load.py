"""Load: hundreds of agents on one coordinator, heartbeating while a job runs.

The agents are light clients in this process, each with its own channel and so its
own TLS connection and control stream (a real agent process each would not fit on
a small machine); the coordinator is a real process. Each agent heartbeats every
`interval` seconds and times the coordinator's acknowledgement; the agents a round
selects answer their task with a ready-made update, like real ones.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from tandem import certs, grpcserver, tls, training, wire, zoo
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job


class LightAgent:
    def __init__(self, target: str, certs_dir: Path, name: str, interval: float, update: dict[str, np.ndarray]) -> None:
        self.target, self.certs_dir, self.name, self.interval = target, certs_dir, name, interval
        self.update = update
        self.rtts: list[float] = []
        self.dropped = False
        self.tasks = 0
        self.uploads: dict[str, int] = {}  # status code name -> count

    async def run(self, stop: asyncio.Event) -> None:
        outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu")))
        sent: dict[int, float] = {}

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while True:
                yield await outgoing.get()

        async def heartbeats() -> None:
            seq = 0
            while True:
                await asyncio.sleep(self.interval)
                seq += 1
                sent[seq] = time.perf_counter()
                outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq)))

        async with grpcserver.secure_channel(self.target, tls.agent_credentials(self.certs_dir, self.name)) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            call = stub.Connect(requests())
            beating = asyncio.create_task(heartbeats())
            reader = asyncio.create_task(self._read(call, stub, sent))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            self.dropped = reader.done() and not stop.is_set()
            for task in (beating, reader, stopper):
                task.cancel()
            call.cancel()

    async def _read(self, call: Any, stub: coordinator_pb2_grpc.CoordinatorStub, sent: dict[int, float]) -> None:
        async for message in call:
            kind = message.WhichOneof("kind")
            if kind == "heartbeat_ack" and message.heartbeat_ack.seq in sent:
                self.rtts.append(time.perf_counter() - sent.pop(message.heartbeat_ack.seq))
            elif kind == "task":
                self.tasks += 1
                asyncio.create_task(self._answer(stub, message.task))

    async def _answer(self, stub: coordinator_pb2_grpc.CoordinatorStub, task: pb.TrainTask) -> None:
        header = pb.UpdateHeader(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                 num_examples=100, codec=task.codec, local_loss=0.5,
                                 content_sha256=wire.state_sha256(self.update))

        async def messages() -> AsyncIterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for chunk in wire.iter_chunks(self.update):
                yield pb.UpdateChunk(tensor=chunk)

        try:
            await stub.UploadUpdate(messages(), timeout=60)
            code = "OK"
        except grpc.aio.AioRpcError as exc:  # FAILED_PRECONDITION: a round that closed first, as real agents see
            code = exc.code().name
        self.uploads[code] = self.uploads.get(code, 0) + 1


async def run(work: Path, agents: int = 500, interval: float = 5.0, seconds: float = 60.0,
              per_round: int = 20) -> dict[str, Any]:
    names = [f"light-{i:04d}" for i in range(agents)]
    certs_dir = work / "certs"
    certs.init_deployment(certs_dir, names)
    cloud, ports = procs.start_cloud(certs_dir, work / "state", work / "cloud.log",
                                     extra=["--heartbeat", str(interval), "--placement-interval", "0"])
    target = f"localhost:{ports['port']}"
    process = psutil.Process(cloud.pid)
    idle_rss = process.memory_info().rss
    base = training.state_arrays(zoo.build_model("mlp", seed=0))
    # Codec "none" sends each tensor as one flat component.
    update = {name: np.full(value.size, 1e-3, np.float32) for name, value in base.items()}
    fleet = [LightAgent(target, certs_dir, name, interval, update) for name in names]
    stop = asyncio.Event()
    running = []
    peak_rss = idle_rss
    try:
        for agent in fleet:  # connect at a steady pace, as a fleet coming online would
            running.append(asyncio.create_task(agent.run(stop)))
            await asyncio.sleep(0.01)
        async with admin_channel(target, certs_dir) as channel:
            stub = admin_stub(channel)
            await wait_connected(stub, agents, timeout=300)
            connected_rss = process.memory_info().rss
            spec = admin_pb2.JobSpec(model="mlp", rounds=1000, min_clients=per_round, clients_per_round=per_round,
                                     round_deadline_seconds=30)
            job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
            for agent in fleet:
                agent.rtts.clear()  # measured while the job runs
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                peak_rss = max(peak_rss, process.memory_info().rss)
                await asyncio.sleep(0.5)
            job = await stub.StopJob(admin_pb2.StopJobRequest(job_id=job_id))
            rounds = len(job.rounds)
            final = await wait_job(stub, job_id, timeout=60, echo=False)
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        procs.stop(cloud)
    rtts = sorted(r for agent in fleet for r in agent.rtts)
    dropped = sum(agent.dropped for agent in fleet)
    p99 = float(np.percentile(rtts, 99)) if rtts else float("inf")
    print(f"  load: {agents} agents, {len(rtts)} heartbeats, p99 {1000 * p99:.1f} ms, {dropped} dropped streams, "
          f"{(connected_rss - idle_rss) / agents / 1024:.0f} KiB per agent, {rounds} rounds", flush=True)
    return {
        "agents": agents, "interval": interval, "seconds": seconds, "heartbeats": len(rtts),
        "heartbeat_p50_seconds": statistics.median(rtts) if rtts else None, "heartbeat_p99_seconds": p99,
        "heartbeat_max_seconds": rtts[-1] if rtts else None, "dropped_streams": dropped,
        "rss_idle_bytes": idle_rss, "rss_connected_bytes": connected_rss, "rss_peak_bytes": peak_rss,
        "rss_per_agent_bytes": (connected_rss - idle_rss) / agents, "rounds_closed": rounds,
        "job_state": final["state"], "tasks_received": sum(a.tasks for a in fleet),
        "uploads": {code: sum(a.uploads.get(code, 0) for a in fleet) for code in {c for a in fleet for c in a.uploads}},
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "load_heartbeat_p99_seconds": {
            "measured": round(result["heartbeat_p99_seconds"], 4), "goal": 1.0, "op": "<=",
            "met": result["heartbeat_p99_seconds"] <= 1.0,
            "how": f"99th percentile of heartbeat-to-acknowledgement time, {result['agents']} agents, while a job ran"},
        "load_dropped_streams": {
            "measured": result["dropped_streams"], "goal": 0, "op": "<=", "met": result["dropped_streams"] == 0,
            "how": "control streams that ended before the run did"},
    }
