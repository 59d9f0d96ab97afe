"""What `make bench-scale` measured, as targets, a table and a figure."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

Window = tuple[float, float]


def quantiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"heartbeats": 0, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(samples, [50, 99])
    return {"heartbeats": len(samples), "p50": float(p50), "p99": float(p99), "max": float(max(samples))}


def by_window(rtts: list[tuple[float, float]], windows: dict[str, Window]) -> dict[str, dict[str, Any]]:
    """Heartbeat round trips (acknowledged at, seconds) summarised per time window."""
    return {name: quantiles([r for t, r in rtts if start <= t <= end]) for name, (start, end) in windows.items()}


def timeline(rtts: list[tuple[float, float]], start: float, step: float = 1.0) -> list[list[float]]:
    """[seconds since `start`, p99 of that step's round trips, heartbeats] per `step`."""
    bins: dict[int, list[float]] = {}
    for t, r in rtts:
        bins.setdefault(int((t - start) // step), []).append(r)
    return [[k * step, float(np.percentile(v, 99)), len(v)] for k, v in sorted(bins.items())]


def net_of_idle(run: dict[str, Any]) -> float:
    """The cloud's CPU seconds per round less what it spends with no job (heartbeats,
    probes, housekeeping: the idle window's rate over the job's wall time)."""
    job = run["job"]
    return float(job["cpu_seconds_per_round"]["cloud"] - run["idle_cores"]["cloud"] * job["seconds"] / job["rounds"])


def _target(measured: float | None, goal: float, op: str, how: str) -> dict[str, Any]:
    if measured is None or not math.isfinite(measured):
        return {"measured": measured, "goal": goal, "op": op, "met": False, "how": how}
    met = measured <= goal if op == "<=" else measured >= goal
    return {"measured": measured, "goal": goal, "op": op, "met": met, "how": how}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tree, one = result.get("hierarchical"), result.get("flat")
    if tree:
        tiers = {name: t["job"]["p99"] for name, t in tree["tiers"].items()}
        worst = max(tiers.values(), key=lambda v: math.inf if v is None else v)
        shown = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} none" for k, v in tiers.items())
        out["heartbeat_p99_seconds"] = _target(worst, 1.0, "<=", (
            f"99th percentile heartbeat-to-acknowledgement seconds while the job ran, the worse tier ({shown}); "
            f"{tree['agents']} agents over {tree['regions']} regions, heartbeats every {tree['heartbeat']:g} s"))
        out["dropped_streams"] = _target(tree["dropped_streams"], 0, "<=",
                                         "control streams (agents' and probes') that broke after they opened")
    if tree and one:
        out["cloud_bytes_per_round_vs_flat"] = _target(
            tree["job"]["bytes_up_per_round"] / one["job"]["bytes_up_per_round"], 0.1, "<=",
            f"update bytes into the cloud per round (RoundResult.bytes_up), {tree['regions']} regions / flat, "
            f"{tree['selected']} selected agents, codec {tree['codec']}")
        out["cloud_cpu_per_round_vs_flat"] = _target(
            tree["job"]["cpu_seconds_per_round"]["cloud"] / one["job"]["cpu_seconds_per_round"]["cloud"], 0.1, "<=",
            "the cloud process's CPU seconds over the job / rounds, hierarchical / flat (idle work included)")
        out["cloud_cpu_per_round_vs_flat"]["net_of_idle"] = net_of_idle(tree) / net_of_idle(one)
    real = result.get("real") or {}
    equality = real.get("equality")
    if equality:
        out["model_max_abs_diff_vs_flat"] = _target(
            equality["max_abs_diff"], 1e-5, "<=",
            f"largest |flat - two-tier| coordinate of the final models, {equality['agents']} real agents, "
            f"{equality['rounds']} rounds, FedAvg, codec none (sha256 equal: {equality['sha256_equal']})")
        if "flat_again_max_abs_diff_by_round" in equality:
            out["model_max_abs_diff_vs_flat"]["flat_vs_flat_again"] = equality["flat_again_max_abs_diff_by_round"][-1]
        out["accuracy_diff_vs_flat"] = _target(
            abs(equality["flat"]["accuracy"] - equality["hierarchical"]["accuracy"]), 0.01, "<=",
            "|final test accuracy flat - two-tier|")
    kill = real.get("region_kill")
    if kill:
        out["acked_updates_lost_region_kill"] = _target(
            kill["acked_lost"], 0, "<=",
            f"updates a region acknowledged before SIGKILL ({kill['acked_before_kill']}) missing from the partial "
            f"it sent up after its restart; job {kill['job_state']}")
        out["region_kill_job_completed"] = _target(
            1.0 if kill["job_state"] == "completed" else 0.0, 1.0, ">=", "the job completed after the kill")
    for name, why in SKIPPED.items():
        if name not in out:
            out[name] = {"measured": None, "goal": None, "op": None, "met": None, "skipped": why}
    return out


# The targets, and the flag that leaves each out.
SKIPPED = {
    "heartbeat_p99_seconds": "--skip-light or --phases", "cloud_bytes_per_round_vs_flat": "--skip-light or --phases",
    "cloud_cpu_per_round_vs_flat": "--skip-light or --phases", "model_max_abs_diff_vs_flat": "--real-agents 0",
    "acked_updates_lost_region_kill": "--kill-agents 0",
}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.1f}"


def print_table(result: dict[str, Any]) -> None:
    tree, one = result.get("hierarchical"), result.get("flat")
    runs = [("hierarchical", tree), ("flat", one)]
    for name, run in runs:
        if not run:
            continue
        print(f"\n{name}: {run['agents']} agents" + (f" over {run['regions']} regions" if name == "hierarchical" else "")
              + f", heartbeats every {run['heartbeat']:g} s, connected in {run['connect_seconds']:.0f} s")
        for tier, windows in run["tiers"].items():
            for window, q in windows.items():
                print(f"  {tier:<24} {window:<5} {q['heartbeats']:>8} heartbeats  p50 {_ms(q['p50']):>8} ms  "
                      f"p99 {_ms(q['p99']):>8} ms  max {_ms(q['max']):>8} ms")
        job = run["job"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in job["cpu_seconds_per_round"].items())
        print(f"  cloud bytes/round {job['bytes_up_per_round']:,.0f}; CPU s/round: {cpu}; median round "
              f"{statistics.median(job['round_seconds']):.2f} s; dropped streams {run['dropped_streams']}")
    if tree:
        mem = tree["memory"]
        print(f"  memory per agent: region {mem['region_rss_per_agent_bytes'] / 1024:.0f} KiB, cloud "
              f"{mem['cloud_rss_per_agent_bytes'] / 1024:.2f} KiB (flat: "
              f"{one['memory']['cloud_rss_per_agent_bytes'] / 1024 if one else math.nan:.0f} KiB), light agent "
              f"(client side) {mem['fleet_rss_per_light_agent_bytes'] / 1024:.0f} KiB")
    print()
    for name, t in result["targets"].items():
        if "skipped" in t:
            print(f"skip {name:<34} ({t['skipped']})")
            continue
        shown = "none" if t["measured"] is None else f"{t['measured']:.4g}"
        print(f"{'met ' if t['met'] else 'MISS'} {name:<34} {shown} {t['op']} {t['goal']:.4g}")


def plot(result: dict[str, Any], path: Path) -> None:
    """Heartbeat p99 per second for each tier against time, rounds shaded, and each
    process group's CPU per round (needs matplotlib: pip install 'tandem[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tandem[bench]')")
        return
    tree, one = result.get("hierarchical"), result.get("flat")
    if not tree:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for tier, points in tree["timelines"].items():
        if points:
            left.plot([p[0] for p in points], [p[1] for p in points], label=tier)
    for start, end in tree["job"]["round_spans"]:
        left.axvspan(start, end, color="0.9")
    left.axhline(1.0, color="red", linestyle="--", linewidth=0.8, label="1 s")
    left.set_yscale("log")
    left.set_xlabel("seconds since the idle window began (rounds shaded)")
    left.set_ylabel("heartbeat p99 per second (s)")
    left.set_title(f"{tree['agents']} agents, {tree['regions']} regions")
    left.legend(fontsize=8)
    groups = list(tree["job"]["cpu_seconds_per_round"])
    values = [tree["job"]["cpu_seconds_per_round"][g] for g in groups]
    right.bar(groups, values, label="hierarchical")
    if one:
        right.bar(["flat cloud"], [one["job"]["cpu_seconds_per_round"]["cloud"]], color="grey")
    right.set_ylabel("CPU seconds per round")
    right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
