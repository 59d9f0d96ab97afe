"""Coordinator memory under load: many agents upload top-k updates of a large model.

The agents here are light clients in this process (a control stream and uploads of
a pre-encoded update each), so that 64 of them fit on a small machine; the
coordinator is a real process whose resident memory is sampled throughout.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from tandem import certs, compression, deltas, grpcserver, tls, training, wire, zoo
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job

CODEC = "topk:0.01+int8"


async def _agent(target: str, certs_dir: Path, name: str, components: dict[str, np.ndarray], rounds: int) -> None:
    """Connect, and answer each task with the same pre-encoded update."""
    outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
    outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu")))

    async def requests() -> AsyncIterator[pb.AgentMessage]:
        while True:
            yield await outgoing.get()

    content = wire.state_sha256(components)
    chunks = list(wire.iter_chunks(components))
    async with grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, name)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        done = 0
        async for message in stub.Connect(requests()):
            if message.WhichOneof("kind") != "task":
                continue
            task = message.task
            header = pb.UpdateHeader(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                     num_examples=100, codec=task.codec, local_loss=1.0, content_sha256=content)

            async def upload(header: pb.UpdateHeader = header) -> AsyncIterator[pb.UpdateChunk]:
                yield pb.UpdateChunk(header=header)
                for chunk in chunks:
                    yield pb.UpdateChunk(tensor=chunk)

            await stub.UploadUpdate(upload(), timeout=600)
            done += 1
            if done >= rounds:
                return


async def run_rss(agents: int, model: str, rounds: int = 2) -> dict[str, Any]:
    arrays = training.state_arrays(zoo.build_model(model))
    full = sum(int(a.nbytes) for a in arrays.values())
    rng = np.random.default_rng(0)
    delta = {name: rng.standard_normal(a.shape, dtype=np.float32) * 1e-3 for name, a in arrays.items()}
    components = deltas.encode_all(delta, compression.parse_codec(CODEC))
    del arrays, delta
    names = [f"rss-{i}" for i in range(agents)]
    with tempfile.TemporaryDirectory(prefix="tandem-rss-") as tmp:
        work = Path(tmp)
        certs.init_deployment(work / "certs", names)
        cloud, ports = procs.start_cloud(work / "certs", work / "state", work / "cloud.log")
        process = psutil.Process(cloud.pid)
        target = f"localhost:{ports['port']}"
        peak = peak_anon = 0
        sampling = True
        timeline: list[tuple[float, int]] = []

        async def sample() -> None:
            nonlocal peak, peak_anon
            while sampling:
                info = process.memory_info()
                peak = max(peak, info.rss)
                peak_anon = max(peak_anon, info.rss - info.shared)  # RssAnon: not mapped files or libraries
                timeline.append((time.monotonic(), info.rss))
                await asyncio.sleep(0.02)

        try:
            clients = [asyncio.create_task(_agent(target, work / "certs", n, components, rounds)) for n in names]
            async with admin_channel(target, work / "certs") as channel:
                stub = admin_stub(channel)
                await wait_connected(stub, agents, timeout=300)
                await asyncio.sleep(1.0)
                idle_info = process.memory_info()
                idle, idle_anon = idle_info.rss, idle_info.rss - idle_info.shared
                sampler = asyncio.create_task(sample())
                started = time.monotonic()
                spec = admin_pb2.JobSpec(model=model, rounds=rounds, min_clients=agents, round_deadline_seconds=600,
                                         codec=CODEC)
                job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
                job = await wait_job(stub, job_id, timeout=0, echo=False)
                seconds = time.monotonic() - started
                sampling = False
                await sampler
            await asyncio.gather(*clients, return_exceptions=True)
            if job["state"] != "completed":
                raise RuntimeError(f"rss job ended {job['state']}: {job['message']}")
        finally:
            procs.stop(cloud)
    return {
        "agents": agents, "model": model, "model_bytes": full, "codec": CODEC, "rounds": rounds,
        "idle_rss_bytes": idle, "peak_rss_bytes": peak, "peak_growth_bytes": peak - idle, "seconds": seconds,
        "idle_anon_bytes": idle_anon, "peak_anon_bytes": peak_anon, "peak_anon_growth_bytes": peak_anon - idle_anon,
        "update_bytes": deltas.nbytes(components),
        "timeline_mb": [(round(t - timeline[0][0], 2), rss >> 20) for t, rss in timeline[::5]],
    }
