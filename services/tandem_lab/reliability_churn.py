"""Agent churn: agents SIGKILLed at random moments of every round, restarted after a delay.

Each round needs `agents - killed` updates, so it can close on quorum while the
killed agents are away. Acknowledged updates are read from the agents' own logs
(an agent logs "update DIGEST accepted" once it holds the coordinator's receipt);
every one of them must be in its round.
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, job_dict
from tandem_lab.fleet import Fleet, make_certs

ACKED = re.compile(r"job (\S+) round (\d+): trained .* update [0-9a-f]+ accepted")


async def _churn(fleet: Fleet, names: list[str], killed: int, rounds: int, rng: random.Random,
                 events: list[dict[str, Any]], window: float) -> None:
    """In every round: `killed` agents die at a random moment, each restarted 1-4 s later.
    Cancelled, it lets no restart happen afterwards."""
    pending: set[asyncio.Task[None]] = set()
    try:
        async with admin_channel(fleet.target, fleet.certs_dir) as channel:
            stub = admin_stub(channel)
            seen = 0
            while seen < rounds:
                jobs = (await stub.ListJobs(admin_pb2.ListJobsRequest())).jobs
                job = job_dict(jobs[-1]) if jobs else None
                current = job["open_round"]["round"] if job and "open_round" in job else 0
                if current > seen:
                    seen = current
                    for name in rng.sample(names, killed):
                        task = asyncio.create_task(
                            _kill_and_restart(fleet, name, names.index(name), rng, current, events, window))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                if job and job["state"] != "running":
                    break
                await asyncio.sleep(0.05)
            await asyncio.Event().wait()  # until cancelled: restarts still due go ahead meanwhile
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _kill_and_restart(fleet: Fleet, name: str, index: int, rng: random.Random, round_: int,
                            events: list[dict[str, Any]], window: float) -> None:
    await asyncio.sleep(rng.uniform(0.0, window))
    proc = fleet.procs[name]
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    down = rng.uniform(1.0, 4.0)
    events.append({"round": round_, "agent": name, "down_seconds": round(down, 2)})
    await asyncio.sleep(down)
    fleet.start_agent(name, index)


def acknowledged(work: Path, names: list[str]) -> set[tuple[int, str]]:
    out = set()
    for name in names:
        log = work / f"{name}.log"
        for match in ACKED.finditer(log.read_text() if log.exists() else ""):
            out.add((int(match.group(2)), name))
    return out


async def run_one(work: Path, certs_dir: Path, names: list[str], killed: int, rounds: int, deadline: float,
                  seed: int, window: float) -> dict[str, Any]:
    fleet = Fleet(work, certs_dir, {name: "" for name in names})
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=len(names) - killed,
                                 round_deadline_seconds=deadline, eval="digits", seed=1)
        churn = asyncio.create_task(_churn(fleet, names, killed, rounds, random.Random(seed), events, window)) if killed else None
        job = await fleet.run_job(spec)
    finally:
        if churn is not None:
            churn.cancel()
            await asyncio.gather(churn, return_exceptions=True)
        fleet.close()
    acked = acknowledged(work, names)
    included = {(r["round"], agent) for r in job["rounds"] for agent in r["agents"]}
    return {
        "agents": len(names), "killed_per_round": killed, "rounds": len(job["rounds"]),
        "final_accuracy": job["rounds"][-1]["accuracy"], "kills": events,
        "round_seconds": [r["seconds"] for r in job["rounds"]], "attempts": [r["attempts"] for r in job["rounds"]],
        "deadline": deadline, "acknowledged": len(acked), "acknowledged_lost": sorted(acked - included),
        "seconds": time.monotonic() - started,
    }


async def run(work: Path, agents: int = 10, killed: int = 3, rounds: int = 10, deadline: float = 60.0,
              seed: int = 0, window: float = 2.0) -> dict[str, Any]:
    """`window`: each kill comes at a random moment within this many seconds of the round's opening."""
    names = [f"churn-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", names)
    calm = await run_one(work / "calm", certs_dir, names, 0, rounds, deadline, seed, window)
    print(f"  churn: no churn: {calm['final_accuracy']:.4f}", flush=True)
    churn = await run_one(work / "churn", certs_dir, names, killed, rounds, deadline, seed, window)
    print(f"  churn: {killed} of {agents} killed per round: {churn['final_accuracy']:.4f}, "
          f"{len(churn['acknowledged_lost'])} acknowledged updates lost", flush=True)
    return {"calm": calm, "churn": churn}


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    churn, calm = runs["churn"], runs["calm"]
    late = sum(1 for s, a in zip(churn["round_seconds"], churn["attempts"]) if a > 1 or s > churn["deadline"])
    drop = 100 * (calm["final_accuracy"] - churn["final_accuracy"])
    return {
        "churn_rounds_missing_quorum_or_deadline": {
            "measured": late, "goal": 0, "op": "<=", "met": late == 0,
            "how": "rounds of the churn run that needed a second attempt or ran past their deadline"},
        "churn_acknowledged_updates_lost": {
            "measured": len(churn["acknowledged_lost"]), "goal": 0, "op": "<=",
            "met": not churn["acknowledged_lost"],
            "how": "updates an agent logged as acknowledged that are missing from their round"},
        "churn_accuracy_drop_points": {
            "measured": round(drop, 2), "goal": 1.0, "op": "<=", "met": drop <= 1.0,
            "how": "final accuracy without churn minus with churn, x100"},
    }
