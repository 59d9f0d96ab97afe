"""Poisoning: honest agents and hostile ones on the reference workload, per aggregator.

Every run is a real coordinator and real agent processes; the hostile agents train
honestly and then send a poisoned update (`tandem_lab.hostile`). The all-honest
run (plain FedAvg, every agent honest) is the issue's yardstick. A second one is the
best any defence can do: FedAvg over the honest agents alone, on the same data
shares. With non-IID shares the hostile agents' data is lost to every defence, and
that costs accuracy however well the attack is stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2
from tandem_lab.fleet import Fleet, make_certs

ATTACKS = ("scale:-10", "noise:100")


# The trimmed means and the median: the target is met if one of them holds.
TRIMMED = ("trimmed_mean", "median", "mean_around_median")


def aggregators(agents: int, hostile: int) -> dict[str, dict[str, Any]]:
    """Per defence, its job settings. `mean_around_median` is the trimmed mean that cuts
    the f values farthest from the median (and weighs by capped example counts); the
    plain trimmed mean and median stay for comparison."""
    return {
        "fedavg": {},
        "trimmed_mean": {"aggregator": "trimmed_mean", "trim_fraction": hostile / agents, "hostile_agents": hostile},
        "median": {"aggregator": "median", "hostile_agents": hostile},
        "mean_around_median": {"aggregator": "mean_around_median", "hostile_agents": hostile},
        "multi_krum": {"aggregator": "multi_krum", "hostile_agents": hostile},
    }


async def run_one(work: Path, certs_dir: Path, names: list[str], hostile: int, attack: str, defence: dict[str, Any],
                  rounds: int, server_lr: float = 0.0, partitions: int = 0) -> dict[str, Any]:
    agents = {name: (attack if i >= len(names) - hostile else "") for i, name in enumerate(names)}
    fleet = Fleet(work, certs_dir, agents, partitions=partitions)
    started = time.monotonic()
    try:
        spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=len(names), round_deadline_seconds=30,
                                 eval="digits", seed=1, server_lr=server_lr, **defence)
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
              attacks: tuple[str, ...] = ATTACKS, server_lr: float = 0.0) -> dict[str, Any]:
    """Every run, the all-honest yardstick included, at `server_lr` (0: the job default, 1)."""
    names = [f"poison-{i}" for i in range(agents)]
    certs_dir = make_certs(work / "certs", names)
    runs: dict[str, Any] = {}
    runs["honest/fedavg"] = await run_one(work / "honest", certs_dir, names, 0, "", {}, rounds, server_lr)
    print(f"  poisoning: all honest, fedavg: {runs['honest/fedavg']['final_accuracy']:.4f}", flush=True)
    runs["honest_only/fedavg"] = await run_one(work / "honest-only", certs_dir, names[: agents - hostile], 0, "", {},
                                               rounds, server_lr, partitions=agents)
    print(f"  poisoning: the {agents - hostile} honest agents alone, fedavg: "
          f"{runs['honest_only/fedavg']['final_accuracy']:.4f}", flush=True)
    for attack in attacks:
        for name, defence in aggregators(agents, hostile).items():
            key = f"{attack}/{name}"
            runs[key] = await run_one(work / key.replace(":", "_").replace("/", "-"), certs_dir, names, hostile,
                                      attack, defence, rounds, server_lr)
            print(f"  poisoning: {key}: {runs[key]['final_accuracy']:.4f}", flush=True)
    return runs


def targets(runs: dict[str, Any]) -> dict[str, Any]:
    """Drops from the all-honest accuracy under attack, in points, per defence (its worst
    attack): the issue's target is the best of the trimmed means and the median."""
    honest = float(runs["honest/fedavg"]["final_accuracy"])
    worst: dict[str, float] = {}
    for key, r in runs.items():
        attack, name = key.split("/")
        if attack not in ("honest", "honest_only") and name != "fedavg":
            worst[name] = max(worst.get(name, 0.0), 100 * (honest - float(r["final_accuracy"])))
    best = min((worst[name], name) for name in TRIMMED if name in worst)
    out = {
        "poisoning_worst_trimmed_mean_or_median_drop_points": {
            "measured": round(best[0], 2), "goal": 2.0, "op": "<=", "met": best[0] <= 2.0, "aggregator": best[1],
            "how": "all-honest FedAvg final accuracy minus the worst run under attack of the best of "
                   f"{', '.join(TRIMMED)}, x100"},
    }
    ceiling = float(runs["honest_only/fedavg"]["final_accuracy"])
    floor = round(100 * (honest - ceiling), 2)  # accuracies are float32 fractions: compare rounded points
    out["poisoning_ceiling_drop_points"] = {
        "measured": floor, "goal": 2.0, "op": "<=", "met": floor <= 2.0,
        "how": "all-honest FedAvg minus FedAvg over the honest agents alone on the same shares, x100: the drop a "
               "perfect defence would show"}
    out["poisoning_best_defence_below_ceiling_points"] = {
        "measured": round(best[0] - floor, 2), "goal": 2.0, "op": "<=",
        "met": round(best[0] - floor, 2) <= 2.0, "aggregator": best[1],
        "how": f"FedAvg over the honest agents alone minus the worst run under attack of {best[1]}, x100"}
    for name, drop in worst.items():
        out[f"poisoning_worst_{name}_drop_points"] = {
            "measured": round(drop, 2), "goal": 2.0, "op": "<=", "met": drop <= 2.0,
            "how": f"all-honest FedAvg final accuracy minus the worst {name} run under attack, x100"}
    return out
