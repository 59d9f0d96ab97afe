"""Poisoning: honest agents and hostile ones on the reference workload, per aggregator.

Every run is a real coordinator and real agent processes; the hostile agents train
honestly and then send a poisoned update (`tandem_cli.hostile`). The all-honest
run (plain FedAvg, every agent honest) is the yardstick.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2
from tandem_cli.fleet import Fleet, make_certs

ATTACKS = ("scale:-10", "noise:100")


def aggregators(agents: int, hostile: int) -> dict[str, dict[str, Any]]:
    return {
        "fedavg": {},
        "trimmed_mean": {"aggregator": "trimmed_mean", "trim_fraction": hostile / agents, "hostile_agents": hostile},
        "median": {"aggregator": "median", "hostile_agents": hostile},
        "multi_krum": {"aggregator": "multi_krum", "hostile_agents": hostile},
    }


async def run_one(work: Path, certs_dir: Path, names: list[str], hostile: int, attack: str, defence: dict[str, Any],
                  rounds: int) -> dict[str, Any]:
    agents = {name: (attack if i >= len(names) - hostile else "") for i, name in enumerate(names)}
    fleet = Fleet(work, certs_dir, agents)
    started = time.monotonic()
    try:
        spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=len(names), round_deadline_seconds=30,
                                 eval="digits", seed=1, **defence)
        # Poisoned FedAvg can diverge until honest agents' updates are no longer finite and
        # are refused: its rounds then never reach quorum. It is stopped and reported as it stands.
        job = await fleet.run_job(spec, stop_after=60 + 10 * rounds)
    finally:
        fleet.close()
    return {
        "attack": attack if hostile else "none", "hostile": hostile, "agents": len(names), "spec": defence,
        "state": job["state"], "rounds_closed": len(job["rounds"]),
        "accuracy": [r["accuracy"] for r in job["rounds"]],
        "final_accuracy": job["rounds"][-1]["accuracy"] if job["rounds"] else 0.0,
        "seconds": time.monotonic() - started,
    }


async def run(work: Path, agents: int = 8, hostile: int = 2, rounds: int = 10,
              attacks: tuple[str, ...] = ATTACKS) -> dict[str, Any]:
    names = [f"poison-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", names)
    runs: dict[str, Any] = {}
    runs["honest/fedavg"] = await run_one(work / "honest", certs_dir, names, 0, "", {}, rounds)
    print(f"  poisoning: all honest, fedavg: {runs['honest/fedavg']['final_accuracy']:.4f}", flush=True)
    for attack in attacks:
        for name, defence in aggregators(agents, hostile).items():
            key = f"{attack}/{name}"
            runs[key] = await run_one(work / key.replace(":", "_").replace("/", "-"), certs_dir, names, hostile,
                                      attack, defence, rounds)
            print(f"  poisoning: {key}: {runs[key]['final_accuracy']:.4f}", flush=True)
    return runs


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    """Drops from the all-honest accuracy under attack, in points: the issue's target
    (trimmed mean or median), and the best defence measured."""
    honest = float(runs["honest/fedavg"]["final_accuracy"])

    def drop(aggregators: tuple[str, ...]) -> float:
        return max(100 * (honest - float(r["final_accuracy"]))
                   for key, r in runs.items() if key.split("/")[1] in aggregators)

    worst = drop(("trimmed_mean", "median"))
    krum = drop(("multi_krum",))
    return {
        "poisoning_worst_trimmed_mean_or_median_drop_points": {
            "measured": round(worst, 2), "goal": 2.0, "op": "<=", "met": worst <= 2.0,
            "how": "all-honest FedAvg final accuracy minus the worst trimmed-mean/median run under attack, x100"},
        "poisoning_worst_multi_krum_drop_points": {
            "measured": round(krum, 2), "goal": 2.0, "op": "<=", "met": krum <= 2.0,
            "how": "all-honest FedAvg final accuracy minus the worst Multi-Krum run under attack, x100"},
    }
