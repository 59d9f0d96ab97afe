"""Weight claim: honest agents and one that claims a huge example count (issue 14, item 1).

Real coordinator and real honest agent processes on the reference workload; the
attacker is a `tandem_lab.raw_agent` in this process whose Hello and every update
claim `claim` examples, and whose update is small noise (no training: a plausible norm,
wrong direction). Three runs of plain FedAvg: without the attacker, with it under the
default cap (`weight_cap` 1.0: no update weighs more than the round's median claim),
and with it and the cap as good as off (`weight_cap` 10^6), which is FedAvg as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud.service import MAX_HELLO_EXAMPLES  # the most a Hello may declare, and so claim
from tandem import training, wire, zoo
from tandem.v1 import admin_pb2
from tandem_lab.fleet import Fleet, make_certs
from tandem_lab.raw_agent import RawAgent

ATTACKER = "claimer"


async def _attack(agent: RawAgent, claim: int, noise: float, seed: int) -> None:
    """Answer every task with noise, claiming `claim` examples, until cancelled."""
    specs = wire.specs_of(training.state_arrays(zoo.build_model("mlp")))
    rng = np.random.default_rng(seed)
    while True:
        task = await agent.tasks.get()
        arrays = {name: rng.normal(0.0, noise, spec.shape).astype(np.float32) for name, spec in specs.items()}
        await agent.upload(task, arrays, claim)


async def run_one(work: Path, certs_dir: Path, names: list[str], rounds: int, claim: int, noise: float,
                  weight_cap: float | None) -> dict[str, Any]:
    """One FedAvg job; `weight_cap` None runs without the attacker."""
    fleet = Fleet(work, certs_dir, {name: "" for name in names}, partitions=len(names))
    attacker = RawAgent(fleet.target, certs_dir, ATTACKER) if weight_cap is not None else None
    attacking: asyncio.Task[None] | None = None
    started = time.monotonic()
    try:
        if attacker is not None:
            await attacker.connect(claim)
            attacking = asyncio.create_task(_attack(attacker, claim, noise, seed=1))
        clients = len(names) + (attacker is not None)
        spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=clients, round_deadline_seconds=60,
                                 eval="digits", seed=1, weight_cap=weight_cap or 0.0,
                                 max_examples=max(claim, 100_000_000))
        job = await fleet.run_job(spec, connected=clients, stop_after=120 + 20 * rounds)
    finally:
        if attacking is not None:
            attacking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attacking
        if attacker is not None:
            await attacker.close()
        fleet.close()
    weights = []  # per round: what the attacker weighed, over the median claim
    for r in job["rounds"]:
        if ATTACKER in r["agents"] and r["example_cap"]:
            median = r["example_cap"] / (weight_cap or 1.0)
            # Its claim, unless the coordinator recorded capping it: a round that let
            # the claim through uncapped weighs claim / median, far over 1.
            weighed = r["example_cap"] if ATTACKER in r["capped_agents"] else claim
            weights.append(weighed / median)
    return {
        "state": job["state"], "rounds_closed": len(job["rounds"]), "weight_cap": weight_cap,
        "accuracy": [r["accuracy"] for r in job["rounds"]],
        "final_accuracy": job["rounds"][-1]["accuracy"] if job["rounds"] else 0.0,
        "capped_agents": [r["capped_agents"] for r in job["rounds"]],
        "example_cap": [r["example_cap"] for r in job["rounds"]],
        "attacker_weight_over_median": weights, "seconds": round(time.monotonic() - started, 1),
    }


async def run(work: Path, agents: int = 8, rounds: int = 10, claim: int = MAX_HELLO_EXAMPLES, noise: float = 0.01
              ) -> dict[str, Any]:
    names = [f"honest-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", [*names, ATTACKER])
    runs: dict[str, Any] = {"claim": claim, "noise": noise}
    for key, cap in (("honest", None), ("capped", 1.0), ("uncapped", 1e6)):
        runs[key] = await run_one(work / key, certs_dir, names, rounds, claim, noise, cap)
        print(f"  weight claim: {key}: accuracy {runs[key]['final_accuracy']:.4f}", flush=True)
    return runs


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    capped = runs["capped"]
    worst = max(capped["attacker_weight_over_median"], default=float("inf"))
    drop = round(100 * (runs["honest"]["final_accuracy"] - capped["final_accuracy"]), 2)
    return {
        "weight_claim_weight_over_median_agent": {
            "measured": round(worst, 4), "goal": 1.0, "op": "<=", "met": worst <= 1.0 + 1e-9,
            "how": f"the most an agent claiming {runs['claim']} examples weighed in any round of a FedAvg job, "
                   "over the round's median claimed count (an honest agent with the median count weighs 1)"},
        "weight_claim_accuracy_drop_points": {
            "measured": drop, "goal": 5.0, "op": "<=", "met": drop <= 5.0,
            "how": "final accuracy without the attacker minus with it under the default cap, x100 "
                   f"(without the cap: {runs['uncapped']['final_accuracy']:.4f})"},
    }
