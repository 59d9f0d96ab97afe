"""Link faults: an agent behind a relay that resets, stalls and drops its connections
several times a minute keeps training and keeps answering its local application.

The flaky agent serves `mlp` split after stage 1 (so requests need the link), and a
local application calls it at a steady rate with a deadline; a second agent has a
clean link. Every round needs both updates, so each round shows the flaky agent's
training getting through.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem import certs, grpcserver, tls, training, wire, zoo
from tandem.v1 import admin_pb2, inference_pb2_grpc
from tandem.v1 import inference_pb2 as ipb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, publish_serving, wait_connected, wait_job
from tandem_lab.faults import FaultRelay

APP = "camera"


async def _local_application(port: int, certs_dir: Path, rate: float, stop: asyncio.Event) -> dict[str, Any]:
    """Requests at `rate` per second with a 1 s deadline, each counted by outcome and placement."""
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    x = wire.to_proto(np.zeros((1, 64), np.float32))
    async with grpcserver.secure_channel(f"localhost:{port}", tls.app_credentials(certs_dir, APP)) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                answer = await stub.Infer(ipb.InferRequest(model="mlp", input=x, deadline_ms=1000), timeout=2)
                key = ipb.Placement.Name(answer.placement)
            except grpc.aio.AioRpcError as exc:
                key = f"failed:{exc.code().name}"
            outcomes[key] = outcomes.get(key, 0) + 1
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - start)))
    return {"outcomes": outcomes, "requests": len(latencies),
            "p99_seconds": float(np.percentile(latencies, 99)) if latencies else 0.0}


async def run(work: Path, rounds: int = 10, mean_fault_interval: float = 10.0, rate: float = 20.0,
              seed: int = 0, min_seconds: float = 120.0) -> dict[str, Any]:
    """Jobs of `rounds` rounds, one after another, for at least `min_seconds` (a job alone
    is over in seconds on a good link), while the local application keeps calling."""
    names = ["flaky-0", "steady-0"]
    certs_dir = work / "certs"
    certs.init_deployment(certs_dir, names)
    certs.add_client(certs_dir, APP)
    cloud, ports = procs.start_cloud(certs_dir, work / "state", work / "cloud.log")
    direct = f"localhost:{ports['port']}"
    relay = FaultRelay(("127.0.0.1", ports["port"]), mean_fault_interval, seed)
    await relay.start()
    agents = []
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        async with admin_channel(direct, certs_dir) as channel:
            stub = admin_stub(channel)
            initial = training.state_arrays(zoo.build_model("mlp", seed=1))
            await publish_serving(stub, "mlp", initial)
            flaky, ready = procs.start_serving_agent(
                f"localhost:{relay.port}", certs_dir, "flaky-0", "digits:0/2", work / "flaky-0.log",
                ["mlp=split:1"], extra=["--cloud-timeout", "0.5"])
            agents.append(flaky)
            agents.append(procs.start_agent(direct, certs_dir, "steady-0", "digits:1/2", work / "steady-0.log"))
            await wait_connected(stub, 2, timeout=180)
            application = asyncio.create_task(_local_application(ready["inference_port"], certs_dir, rate, stop))
            jobs: list[dict[str, Any]] = []
            while not jobs or time.monotonic() - started < min_seconds:
                spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=2, round_deadline_seconds=60,
                                         eval="digits", seed=len(jobs) + 1)
                job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
                jobs.append(await wait_job(stub, job_id, timeout=1800, echo=False))
            stop.set()
            served = await application
    finally:
        stop.set()
        for proc in [*agents, cloud]:
            procs.stop(proc)
        await relay.close()
    closed = [r for job in jobs for r in job["rounds"]]
    contributed = sum(1 for r in closed if "flaky-0" in r["agents"])
    failed = sum(n for key, n in served["outcomes"].items() if key.startswith("failed"))
    print(f"  links: {len(relay.events)} faults, flaky agent in {contributed}/{len(closed)} rounds, "
          f"{failed} of {served['requests']} local requests failed", flush=True)
    completed = all(job["state"] == "completed" for job in jobs)
    return {"job_state": "completed" if completed else "failed", "jobs": len(jobs), "rounds": len(closed),
            "flaky_agent_rounds": contributed,
            "faults": relay.events, "local_application": served, "failed_requests": failed,
            "seconds": time.monotonic() - started}


def targets(run_: dict[str, Any]) -> dict[str, Any]:
    minutes = run_["seconds"] / 60
    return {
        "links_failed_local_requests": {
            "measured": run_["failed_requests"], "goal": 0, "op": "<=", "met": run_["failed_requests"] == 0,
            "how": "failed requests of the flaky agent's local application over the whole run"},
        "links_faults_per_minute": {
            "measured": round(len(run_["faults"]) / minutes, 2), "goal": 2, "op": ">=",
            "met": len(run_["faults"]) / minutes >= 2, "how": "faults injected by the relay / minutes of the run"},
        "links_flaky_agent_kept_training": {
            "measured": run_["flaky_agent_rounds"], "goal": run_["rounds"], "op": ">=",
            "met": run_["job_state"] == "completed" and run_["flaky_agent_rounds"] >= run_["rounds"],
            "how": "rounds that included the flaky agent's update (every round needs it)"},
    }
