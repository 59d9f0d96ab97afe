"""Coordinator crash: SIGKILL at random moments of a job, restarted each time on the same state.

The same job runs twice with the same seeds, agents and data: once undisturbed,
once with the coordinator killed in `kills` random rounds, at a random moment of
each (uploads, aggregation and publication are all in progress at some point of a
round), and restarted on the same port and state directory. Agents reconnect by themselves.

The job averages with `trimmed_mean` at trim 0: the plain mean of the updates,
taken per coordinate over the sorted values, so its bits do not depend on the
order in which updates arrived. FedAvg's streaming sum (`cloud/accumulator.py`)
folds each update in as it arrives, and float addition is not associative: two
undisturbed FedAvg runs already differ in the last bits from the second round on,
whenever arrivals come in another order. Agents train deterministically (fixed
seeds, one torch thread), so equal updates and an order-free mean give equal models.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, job_dict, wait_connected, wait_job
from tandem_lab.fleet import Fleet, make_certs
from tandem_lab.reliability_churn import acknowledged


async def _job(fleet: Fleet, spec: admin_pb2.JobSpec, agents: int) -> str:
    async with admin_channel(fleet.target, fleet.certs_dir) as channel:
        stub = admin_stub(channel)
        await wait_connected(stub, agents, timeout=180)
        return str((await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id)


async def _state(fleet: Fleet, job_id: str) -> dict[str, Any]:
    async with admin_channel(fleet.target, fleet.certs_dir) as channel:
        # wait_for_ready: a poll may fall on the coordinator restarting (the scenario's point).
        return job_dict(await admin_stub(channel).GetJob(admin_pb2.GetJobRequest(job_id=job_id), timeout=10,
                                                         wait_for_ready=True))


async def run_one(work: Path, certs_dir: Path, names: list[str], rounds: int, kill_rounds: list[int],
                  rng: random.Random) -> dict[str, Any]:
    """The job, with the coordinator killed once in each of `kill_rounds`, at a random
    moment within half a second of that round's opening (uploads, aggregation or
    publication under way), and restarted at once."""
    # A fixed port, so that the agents find the coordinator again after each restart.
    fleet = Fleet(work, certs_dir, {n: "" for n in names}, listen=f"127.0.0.1:{procs.free_port()}")
    spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=len(names), round_deadline_seconds=300,
                             eval="digits", seed=1, aggregator="trimmed_mean")
    kills: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        job_id = await _job(fleet, spec, len(names))
        for target in kill_rounds:
            while (job := await _state(fleet, job_id))["state"] == "running" and job["current_round"] < target:
                await asyncio.sleep(0.02)
            if job["state"] != "running":
                break
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            job = await _state(fleet, job_id)
            fleet.cloud.send_signal(signal.SIGKILL)
            fleet.cloud.wait()
            kills.append({"at_seconds": round(time.monotonic() - started, 2), "round": job["current_round"],
                          "accepted_in_round": len(job.get("open_round", {}).get("accepted_agents", []))})
            fleet.start_cloud()
        async with admin_channel(fleet.target, certs_dir) as channel:
            job = await wait_job(admin_stub(channel), job_id, timeout=1800, echo=False)
    finally:
        fleet.close()
    acked = acknowledged(work, names)
    included = {(r["round"], agent) for r in job["rounds"] for agent in r["agents"]}
    return {
        "state": job["state"], "rounds": len(job["rounds"]), "kills": kills,
        "final_sha256": job["rounds"][-1]["sha256"] if job["rounds"] else "",
        "final_accuracy": job["rounds"][-1]["accuracy"] if job["rounds"] else 0.0,
        "round_sha256": [r["sha256"] for r in job["rounds"]], "round_seconds": [r["seconds"] for r in job["rounds"]],
        "acknowledged": len(acked), "acknowledged_lost": sorted(acked - included),
        "seconds": time.monotonic() - started,
    }


async def run(work: Path, agents: int = 4, rounds: int = 10, kills: int = 5, seed: int = 0) -> dict[str, Any]:
    names = [f"crash-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", names)
    rng = random.Random(seed)
    calm = await run_one(work / "calm", certs_dir, names, rounds, [], rng)
    kill_rounds = sorted(rng.sample(range(1, rounds + 1), min(kills, rounds)))
    crashed = await run_one(work / "crashed", certs_dir, names, rounds, kill_rounds, rng)
    same = crashed["final_sha256"] == calm["final_sha256"]
    print(f"  crash: {len(crashed['kills'])} kills, final model {'identical' if same else 'differs'}, "
          f"{len(crashed['acknowledged_lost'])} acknowledged updates lost", flush=True)
    return {"calm": calm, "crashed": crashed, "identical_final_model": same}


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    crashed = runs["crashed"]
    return {
        "crash_job_completed": {
            "measured": int(crashed["state"] == "completed"), "goal": 1, "op": ">=",
            "met": crashed["state"] == "completed", "how": "1 if the job killed 5 times completed all its rounds"},
        "crash_acknowledged_updates_lost": {
            "measured": len(crashed["acknowledged_lost"]), "goal": 0, "op": "<=",
            "met": not crashed["acknowledged_lost"],
            "how": "updates an agent logged as acknowledged that are missing from their round"},
        "crash_identical_final_model": {
            "measured": int(runs["identical_final_model"]), "goal": 1, "op": ">=",
            "met": bool(runs["identical_final_model"]),
            "how": "1 if the final model's sha256 equals the undisturbed run's"},
    }
