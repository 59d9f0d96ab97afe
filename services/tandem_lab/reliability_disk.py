"""A full disk with resume: the coordinator's state volume fills up in the middle of a job.

The state directory is a small tmpfs (`tandem_lab.volume`; mounting needs root). In
round `fill_round` the last agent is held (SIGSTOP) until the others have delivered;
then a ballast file takes the free space but room for one more update, the held agent
goes on, its update is accepted, above the reserve, and the round's close finds no room
for the new version. Holding the agent is what makes the close meet a full disk every
time: left to run, it could deliver before the ballast is written (CI saw that). The
disk stays full for `hold` seconds once the close was deferred (uploads meanwhile are
refused with RESOURCE_EXHAUSTED), then the ballast is deleted. The job must still be running while the disk is full, must
complete once space returns, and every update an agent logged as acknowledged must be
in its round.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tandem import training
from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, job_dict, wait_connected, wait_job
from tandem_lab import volume
from tandem_lab.fleet import Fleet, make_certs
from tandem_lab.reliability_churn import acknowledged

RESERVE = 1 << 20  # the coordinator's --disk-reserve here: a small volume, a small reserve


def _scrape(port: int, name: str) -> float:
    """One sample's value from the coordinator's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def run(
    work: Path,
    agents: int = 4,
    rounds: int = 10,
    fill_round: int = 3,
    hold: float = 20.0,
    deadline: float = 30.0,
    size: int = 64 << 20,
) -> dict[str, Any]:
    reason = volume.unavailable()
    if reason is not None:
        print(f"  disk: skipped: {reason}", flush=True)
        return {"skipped": reason}
    names = [f"disk-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", names)
    update_bytes = sum(spec.nbytes for spec in training.state_specs("mlp").values())  # a dense update (codec none)
    with volume.SmallVolume(work / "state", size) as state:
        fleet = Fleet(work, certs_dir, {n: "" for n in names}, cloud_extra=["--disk-reserve", str(RESERVE)])
        try:
            result = await _run(fleet, state, names, rounds, fill_round, hold, deadline, update_bytes)
        finally:
            for proc in fleet.procs.values():  # a held agent would not heed the stop
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
            fleet.close()
    acked = acknowledged(work, names)
    job = result["job"]
    included = {(r["round"], agent) for r in job["rounds"] for agent in r["agents"]}
    lost = sorted(acked - included)
    print(
        f"  disk: full for {hold:.0f} s in round {result['filled_in_round']}: job {job['state']}, "
        f"{len(lost)} of {len(acked)} acknowledged updates lost, resumed in {result['resume_seconds']} s",
        flush=True,
    )
    return {
        "agents": agents,
        "rounds": len(job["rounds"]),
        "state": job["state"],
        "volume_bytes": size,
        "reserve_bytes": RESERVE,
        "hold_seconds": hold,
        "deadline": deadline,
        **{k: v for k, v in result.items() if k != "job"},
        "acknowledged": len(acked),
        "acknowledged_lost": lost,
        "round_seconds": [r["seconds"] for r in job["rounds"]],
        "attempts": [r["attempts"] for r in job["rounds"]],
    }


async def _run(
    fleet: Fleet,
    state: volume.SmallVolume,
    names: list[str],
    rounds: int,
    fill_round: int,
    hold: float,
    deadline: float,
    update_bytes: int,
) -> dict[str, Any]:
    spec = admin_pb2.JobSpec(
        model="mlp", rounds=rounds, min_clients=len(names), round_deadline_seconds=deadline, eval="digits", seed=1
    )
    metrics_port = int(fleet.ports["metrics_port"])
    async with admin_channel(fleet.target, fleet.certs_dir) as channel:
        stub = admin_stub(channel)
        await wait_connected(stub, len(names), timeout=180)
        held = fleet.procs[names[-1]]
        if fill_round <= 1:  # before the job starts: it cannot have trained yet
            os.kill(held.pid, signal.SIGSTOP)
        job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id

        async def job() -> dict[str, Any]:
            return job_dict(await stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id), timeout=10))

        if fill_round > 1:
            await _hold_after(names[-1], held.pid, fill_round - 1, job)
        while True:  # all but the held agent's update of round `fill_round` in
            current = await job()
            accepted = len(current.get("open_round", {}).get("accepted_agents", []))
            if (
                current["state"] != "running"
                or current["current_round"] > fill_round
                or (current["current_round"] == fill_round and accepted >= len(names) - 1)
            ):
                break
            await asyncio.sleep(0.01)
        filled_in, closed_at_fill = current["current_round"], len(current["rounds"])
        state.fill(leave=update_bytes + (256 << 10))
        filled_at = time.monotonic()
        os.kill(held.pid, signal.SIGCONT)
        waited = 0.0  # for the close to meet the full disk: the held agent delivers, the close is deferred
        while _scrape(metrics_port, "tandem_coordinator_rounds_deferred_no_space_total") < 1 and waited < 120:
            await asyncio.sleep(0.1)
            waited += 0.1
        await asyncio.sleep(hold)
        while_full = await job()
        deferred = _scrape(metrics_port, "tandem_coordinator_rounds_deferred_no_space_total")
        refused = _scrape(metrics_port, 'tandem_coordinator_updates_rejected_total{reason="no_space"}')
        closed_before = len(while_full["rounds"])
        free = state.empty()
        freed_at = time.monotonic()
        while len((current := await job())["rounds"]) <= closed_before and current["state"] == "running":
            await asyncio.sleep(0.05)
        resumed = time.monotonic() - freed_at
        final = await wait_job(stub, job_id, timeout=1800, echo=False)
    return {
        "job": final,
        "filled_in_round": filled_in,
        "full_seconds": round(freed_at - filled_at, 1),
        "state_while_full": while_full["state"],
        "message_while_full": while_full["message"],
        "rounds_closed_while_full": closed_before - closed_at_fill,
        "closes_deferred": int(deferred),
        "uploads_refused_no_space": int(refused),
        "free_bytes_after": free,
        "resume_seconds": round(resumed, 2),
    }


async def _hold_after(name: str, pid: int, round_: int, job: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Stop agent `name` (SIGSTOP) as soon as its update of `round_` is in: it then waits
    for that round to close and for a new model, so it cannot deliver the next one yet."""
    while True:
        current = await job()
        if (
            current["state"] != "running"
            or current["current_round"] > round_
            or (current["current_round"] == round_ and name in current.get("open_round", {}).get("accepted_agents", []))
        ):
            break
        await asyncio.sleep(0.01)
    os.kill(pid, signal.SIGSTOP)


def targets(run: dict[str, Any]) -> dict[str, Any]:
    if "skipped" in run:
        return {}
    survived = run["state_while_full"] == "running" and run["state"] == "completed"
    return {
        "disk_job_survived_and_completed": {
            "measured": int(survived),
            "goal": 1,
            "op": ">=",
            "met": survived,
            "how": "1 if the job was still running while the state volume was full and completed once space returned",
        },
        "disk_acknowledged_updates_lost": {
            "measured": len(run["acknowledged_lost"]),
            "goal": 0,
            "op": "<=",
            "met": not run["acknowledged_lost"],
            "how": "updates an agent logged as acknowledged that are missing from their round",
        },
        "disk_resume_seconds": {
            "measured": run["resume_seconds"],
            "goal": 10,
            "op": "<=",
            "met": run["resume_seconds"] <= 10,
            "how": "seconds from deleting the ballast to the next round closing",
        },
    }
