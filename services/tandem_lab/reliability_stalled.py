"""Stalled uploads (issue 14, item 5): selected agents that send a header and a chunk of
their update, then go silent.

A real coordinator process (`--upload-idle-seconds`) and, in this process, `stalled`
`tandem_lab.raw_agent`s that stall and one that uploads its whole update. Each stalled
stream must be ended DEADLINE_EXCEEDED within the idle timeout (what it sent is kept
for a resume while the round is open), and once the round closes no partial upload may
be left on disk.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from tandem import training, wire, zoo
from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job
from tandem_lab.fleet import Fleet, make_certs
from tandem_lab.raw_agent import RawAgent

SLACK_SECONDS = 1.0  # scheduling on a loaded 2-core machine, beyond the timeout itself


def _partial_bytes(state: Path) -> tuple[int, int]:
    parts = list((state / "updates").glob("*/*/*.part"))
    return len(parts), sum(p.stat().st_size for p in parts if p.exists())


async def run(work: Path, stalled: int = 75, idle_seconds: float = 5.0) -> dict[str, Any]:
    names = [f"stalled-{i}" for i in range(stalled)]
    certs_dir = make_certs(work / "certs", [*names, "honest"])
    fleet = Fleet(work, certs_dir, {}, cloud_extra=["--upload-idle-seconds", str(idle_seconds)])
    agents = [RawAgent(fleet.target, certs_dir, name) for name in [*names, "honest"]]
    specs = wire.specs_of(training.state_arrays(zoo.build_model("mlp")))
    update = {name: np.full(spec.shape, 0.001, np.float32) for name, spec in specs.items()}
    deadline = max(10.0, 4 * idle_seconds)
    try:
        for agent in agents:
            await agent.connect(100)
        async with admin_channel(fleet.target, certs_dir) as channel:
            stub = admin_stub(channel)
            await wait_connected(stub, len(agents), timeout=60)
            spec = admin_pb2.JobSpec(model="mlp", rounds=1, min_clients=1, round_deadline_seconds=deadline)
            job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
            tasks = [await asyncio.wait_for(agent.tasks.get(), 30) for agent in agents]
            started = time.monotonic()
            results = await asyncio.gather(
                *(agent.upload(task, update, 100, stall_after=1) for agent, task in zip(agents[:-1], tasks)),
                agents[-1].upload(tasks[-1], update, 100))
            all_ended = time.monotonic() - started
            kept_while_open = _partial_bytes(fleet.work / "state")
            job = await wait_job(stub, job_id, timeout=deadline + 60, echo=False)
        left = _partial_bytes(fleet.work / "state")
    finally:
        for agent in agents:
            await agent.close()
        fleet.close()
    stalls = results[:-1]
    return {
        "stalled": stalled, "idle_seconds": idle_seconds, "round_deadline": deadline,
        "codes": sorted({code.name for code, _ in stalls}), "honest_code": results[-1][0].name,
        "ended_after_silence_seconds_max": round(max(s for _, s in stalls), 3),
        "ended_after_silence_seconds_median": round(float(np.median([s for _, s in stalls])), 3),
        "all_ended_seconds": round(all_ended, 3),
        "partials_kept_while_open": kept_while_open[0], "partial_bytes_kept_while_open": kept_while_open[1],
        "partials_left_after_close": left[0], "partial_bytes_left_after_close": left[1],
        "job_state": job["state"], "round_seconds": job["rounds"][0]["seconds"] if job["rounds"] else None,
    }


def targets(run: dict[str, Any]) -> dict[str, Any]:
    limit = run["idle_seconds"] + SLACK_SECONDS
    ended = run["ended_after_silence_seconds_max"]
    return {
        "stalled_uploads_ended_within_idle_timeout_seconds": {
            "measured": ended, "goal": limit, "op": "<=",
            "met": ended <= limit and run["codes"] == ["DEADLINE_EXCEEDED"],
            "how": f"the longest any of {run['stalled']} stalled upload streams stayed open after its last "
                   f"message, with --upload-idle-seconds {run['idle_seconds']:g} (+{SLACK_SECONDS:g} s of "
                   "scheduling); every one must end DEADLINE_EXCEEDED"},
        "stalled_uploads_disk_left_bytes": {
            "measured": run["partial_bytes_left_after_close"], "goal": 0, "op": "<=",
            "met": run["partial_bytes_left_after_close"] == 0 and run["job_state"] == "completed",
            "how": "bytes of partial uploads on disk once the round closed (kept for a resume while it was open: "
                   f"{run['partial_bytes_kept_while_open']})"},
    }
