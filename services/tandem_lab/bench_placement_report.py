"""What `bench_placement` measured, summarised: per run and phase the latency, failures
and bytes; the per-phase oracle; the targets of the placement issue; a table; a plot.

Latency statistics take every request sent in a phase (failed ones at the time they
took); the whole-trace figures leave the cut out (every placement answers locally
there, so it says nothing about placement, and it has a target of its own).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

STAGES = 5  # cnn
FAILED_OK = "OK"
# A phase change calls for a new placement when keeping the old one would cost at
# least this much more than the best static placement of the new phase (the policy's
# own default margin).
MARGIN = 1.10


def split_of(text: str) -> int:
    if text == "edge":
        return STAGES
    if text == "cloud":
        return 0
    return int(text.partition(":")[2]) if text.startswith("split:") else -1


def _target(measured: float, goal: float, op: str, how: str) -> dict[str, Any]:
    met = measured <= goal if op == "<=" else measured >= goal
    return {"measured": measured, "goal": goal, "op": op, "met": bool(met), "how": how}


def _bounds(run: dict[str, Any], agent: int) -> list[tuple[float, float]]:
    shift = agent * float(run.get("offset", 0.0))
    return [(p["start"] + shift, p["end"] + shift) for p in run["phases"]]


def by_phase(run: dict[str, Any]) -> list[list[list[Any]]]:
    """Requests of all agents grouped by the phase (of their own agent's trace) they were sent in."""
    groups: list[list[list[Any]]] = [[] for _ in run["phases"]]
    for index, agent in enumerate(run["per_agent"]):
        bounds = _bounds(run, index)
        for r in agent["requests"]:
            for phase, (start, end) in enumerate(bounds):
                if start <= r[0] < end:
                    groups[phase].append(r)
                    break
    return groups


def stats(requests: list[list[Any]], deadline: float) -> dict[str, Any]:
    ms = np.asarray([r[1] for r in requests], dtype=float) * 1000
    where: dict[str, int] = {}
    for r in requests:
        where[r[2] or "failed"] = where.get(r[2] or "failed", 0) + 1
    return {
        "requests": len(requests), "mean_ms": float(ms.mean()) if len(ms) else 0.0,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else 0.0,
        "failed": sum(1 for r in requests if r[3] != FAILED_OK),
        "late": sum(1 for r in requests if r[1] > deadline), "answered_at": where,
    }


def summarise(run: dict[str, Any], deadline: float) -> dict[str, Any]:
    groups = by_phase(run)
    phases = []
    for i, (phase, group) in enumerate(zip(run["phases"], groups)):
        up = sum(a["phase_bytes"][i][0] for a in run["per_agent"] if i < len(a["phase_bytes"]))
        down = sum(a["phase_bytes"][i][1] for a in run["per_agent"] if i < len(a["phase_bytes"]))
        phases.append({"phase": phase["name"], **stats(group, deadline), "bytes_up": up, "bytes_down": down})
    kept = [r for p, g in zip(run["phases"], groups) if p["rate"] != "cut" for r in g]
    return {
        "mode": run["mode"], "agents": run["agents"], "phases": phases, "trace": stats(kept, deadline),
        "bytes": sum(p["bytes_up"] + p["bytes_down"] for p in phases),
    }


def _in_force(changes: list[list[Any]], initial: str, at: float) -> str:
    current = initial
    for t, text in changes:
        if t >= at:
            break
        current = text
    return current


def adaptation(run: dict[str, Any], static: dict[str, dict[str, Any]], oracle: list[str | None]) -> dict[str, Any]:
    """Per agent and phase change: placement in force, whether a change was called for,
    seconds to the first change; switches per phase."""
    changes_needed, reactions, switches = [], [], []
    for index, agent in enumerate(run["per_agent"]):
        bounds = _bounds(run, index)
        applied = agent["applied"]
        for i, (phase, (start, end)) in enumerate(zip(run["phases"], bounds)):
            inside = [c for c in applied if start <= c[0] < end]
            switches.append(len(inside))
            if i == 0 or phase["rate"] == "cut":
                continue
            before = _in_force(applied, run["initial"], start)
            best = oracle[i]
            needed = False
            if best is not None and before in static:
                mine, top = static[before]["phases"][i]["mean_ms"], static[best]["phases"][i]["mean_ms"]
                needed = mine > MARGIN * top
            first = inside[0][0] - start if inside else None
            row = {"agent": agent["name"], "phase": phase["name"], "in_force": before, "oracle": best,
                   "change_needed": needed, "seconds_to_change": first,
                   "new": inside[0][1] if inside else None}
            changes_needed.append(row)
            if needed:
                reactions.append(first if first is not None else end - start)
    return {"changes": changes_needed, "reaction_seconds": reactions, "max_switches_per_phase": max(switches, default=0)}


def queue_wait(run: dict[str, Any]) -> list[list[float]]:
    """[seconds since the trace start, mean queue wait in the second before (s), queue rows,
    fraction of that second the cloud spent computing stages]."""
    start, end = _trace_window(run)
    out = []
    for (t0, a), (t1, b) in zip(run["cloud"], run["cloud"][1:]):
        if start <= t1 <= end and t1 > t0:
            count = b["wait_count"] - a["wait_count"]
            out.append([t1 - start, (b["wait_sum"] - a["wait_sum"]) / count if count > 0 else 0.0, b["queue_rows"],
                        (b.get("busy", 0.0) - a.get("busy", 0.0)) / (t1 - t0)])
    return out


def _trace_window(run: dict[str, Any]) -> tuple[float, float]:
    return run["phases"][0]["start"], run["phases"][-1]["end"] + run["offset"] * (run["agents"] - 1)


def _most_within(events: list[tuple[float, str]], window: float) -> int:
    """Most distinct agents among `events` (time, agent) that fall within one `window`."""
    events = sorted(events)
    return max((len({a for u, a in events[i:] if u < t + window}) for i, (t, _) in enumerate(events)), default=0)


def herd(run: dict[str, Any], window: float = 1.0) -> dict[str, Any]:
    """Most agents that changed placement within one second during the trace: as applied
    (agents' logs), and as decided by the controller, split into switches the policy chose
    among reachable options and switches forced by an agent's link being down (every
    option but all-edge priced unusable)."""
    start, end = _trace_window(run)
    applied = [(c[0], a["name"]) for a in run["per_agent"] for c in a["applied"] if start <= c[0] < end]
    last: dict[str, str] = {a["name"]: run["initial"] for a in run["per_agent"]}
    chosen: list[tuple[float, str]] = []
    forced: list[tuple[float, str]] = []
    for d in run["decisions"]:
        if d["placement"] == last.get(d["agent"]):
            continue  # a re-send (reconnect), not a switch
        last[d["agent"]] = d["placement"]
        if start <= d["t"] < end:
            unusable = bool(d["costs_ms"]) and all(c >= 1e9 for c in d["costs_ms"][:-1])
            (forced if unusable else chosen).append((d["t"], d["agent"]))
    return {"applied": _most_within(applied, window), "chosen": _most_within(chosen, window),
            "forced": _most_within(forced, window), "chosen_switches": len(chosen), "forced_switches": len(forced)}


def build(runs: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any], command: str) -> dict[str, Any]:
    deadline = args.deadline_ms / 1000
    summaries = [summarise(r, deadline) for r in runs]
    static = {s["mode"]: s for s in summaries if s["agents"] == 1 and s["mode"] != "adaptive"}
    single = next((s for s in summaries if s["agents"] == 1 and s["mode"] == "adaptive"), None)
    names = [p["name"] for p in runs[0]["phases"]] if runs else []
    oracle: list[str | None] = []
    for i, name in enumerate(names):
        options = {m: s["phases"][i]["mean_ms"] for m, s in static.items() if s["phases"][i]["requests"]}
        oracle.append(min(options, key=lambda m: options[m]) if options and name != "cut" else None)
    result: dict[str, Any] = {
        "name": "placement", "command": command, "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot", "work", "keep", "from_raw")},
        "summary": summaries, "oracle": {"per_phase": oracle}, "targets": {},
    }
    result["config"]["out"] = str(args.out)
    targets = result["targets"]
    if static and all(o is not None for o, n in zip(oracle, names) if n != "cut"):
        groups = {m: by_phase(r) for r, m in ((r, r["mode"]) for r in runs if r["agents"] == 1)}
        picked = [r for i, m in enumerate(oracle) if m is not None for r in groups[m][i]]
        result["oracle"]["trace"] = stats(picked, deadline)
        result["oracle"]["phases"] = [static[m]["phases"][i] if m else None for i, m in enumerate(oracle)]
    if single is not None and "trace" in result["oracle"]:
        targets["latency_vs_oracle"] = _target(
            single["trace"]["mean_ms"] / result["oracle"]["trace"]["mean_ms"], 1.10, "<=",
            "adaptive mean latency over the trace without the cut / the per-phase oracle's (best static placement "
            "of each phase, chosen after the fact, same trace)")
    ends = [static[m]["trace"]["mean_ms"] for m in ("edge", "cloud") if m in static]
    if ends and "trace" in result["oracle"]:  # what no controller could beat here
        result["oracle"]["vs_all_edge_or_cloud"] = result["oracle"]["trace"]["mean_ms"] / min(ends)
    if single is not None and ends:
        targets["latency_vs_all_edge_or_cloud"] = _target(
            single["trace"]["mean_ms"] / min(ends), 0.6, "<=",
            "adaptive mean latency over the trace without the cut / the better of all-edge's and all-cloud's")
    adaptive_runs = [r for r in runs if r["mode"] == "adaptive"]
    if adaptive_runs and static:
        adapt = {f"agents={r['agents']}": adaptation(r, static, oracle) for r in adaptive_runs}
        result["adaptation"] = adapt
        reactions = [x for a in adapt.values() for x in a["reaction_seconds"]]
        targets["reaction_seconds"] = _target(
            max(reactions, default=0.0), 5.0, "<=",
            "slowest time from a phase change to the agent's first new placement, over the phase changes where "
            f"the placement in force did >{MARGIN:.2f}x worse than the phase's best static placement (all runs)")
        targets["switches_per_phase"] = _target(
            max(a["max_switches_per_phase"] for a in adapt.values()), 1, "<=",
            "most placement changes an adaptive agent applied within one phase (from its log)")
    cut = [s for s in summaries if s["mode"] == "adaptive" and any(p["phase"] == "cut" for p in s["phases"])]
    if cut:
        targets["cut_failures"] = _target(
            sum(p["failed"] for s in cut for p in s["phases"] if p["phase"] == "cut"), 0, "<=",
            "failed requests sent during the cut, adaptive runs (1 and 4 agents)")
    fleet = next((r for r in runs if r["mode"] == "adaptive" and r["agents"] > 1), None)
    if fleet is not None:
        waits = queue_wait(fleet)
        result["fleet"] = {
            "agents": fleet["agents"], "queue_wait": waits, "herd": herd(fleet),
            "max_queue_wait_seconds": max((w[1] for w in waits), default=0.0),
            "mean_cloud_busy": float(np.mean([w[3] for w in waits])) if waits else 0.0,
            "max_cloud_busy": max((w[3] for w in waits), default=0.0),
        }
        targets["fleet_queue_wait_seconds"] = _target(
            max((w[1] for w in waits), default=0.0), deadline / 5, "<=",
            f"{fleet['agents']} adaptive agents: largest mean queue wait of the cloud over any 1 s of the trace "
            "(/metrics sum and count deltas); goal a fifth of the request deadline")
        flips = result["fleet"]["herd"]
        targets["fleet_herd"] = _target(
            flips["chosen"], fleet["agents"] - 1, "<=",
            f"most of the {fleet['agents']} agents (same trace, no offset) whose placement the controller changed within "
            "one second, by choice among reachable options (switches forced by a dead link are reported apart: "
            "fleet.herd.forced)")
    result["runs"] = runs
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = [s for s in result["summary"]]
    if not rows:
        return
    names = [p["phase"] for p in rows[0]["phases"]]
    head = f"{'placement':<12}" + "".join(f" {n:>15}" for n in names) + f" {'trace':>8} {'failed':>6} {'MB':>6}"
    print("\nmean/p95 latency (ms) per phase; trace = mean without the cut; MB through the relays")
    print(head)
    lines = [(f"{s['mode']} x{s['agents']}" if s["agents"] > 1 else s["mode"], s) for s in rows]
    for label, s in lines:
        cells = "".join(f" {p['mean_ms']:>7.0f}/{p['p95_ms']:<7.0f}" for p in s["phases"])
        failed = sum(p["failed"] for p in s["phases"])
        print(f"{label:<12}{cells} {s['trace']['mean_ms']:>8.1f} {failed:>6} {s['bytes'] / 1e6:>6.1f}")
    oracle = result["oracle"]
    if "trace" in oracle:
        cells = "".join(f" {p['mean_ms']:>7.0f}/{p['p95_ms']:<7.0f}" if p else f" {'-':>15}" for p in oracle["phases"])
        print(f"{'oracle':<12}{cells} {oracle['trace']['mean_ms']:>8.1f}")
        print(f"{'(its pick)':<12}" + "".join(f" {m or '-':>15}" for m in oracle["per_phase"]))
    if "vs_all_edge_or_cloud" in oracle:
        print(f"oracle / better of all-edge and all-cloud: {oracle['vs_all_edge_or_cloud']:.3f}")
    fleet = result.get("fleet")
    if fleet:
        h = fleet["herd"]
        print(f"{fleet['agents']} agents: cloud queue wait <= {1000 * fleet['max_queue_wait_seconds']:.1f} ms per second, "
              f"cloud busy {100 * fleet['mean_cloud_busy']:.0f}% on average (max {100 * fleet['max_cloud_busy']:.0f}%); "
              f"most agents switching within one second: {h['chosen']} by choice ({h['chosen_switches']} switches), "
              f"{h['forced']} forced by a dead link ({h['forced_switches']}), {h['applied']} as applied")
    print()
    for name, t in result["targets"].items():
        print(f"{'met ' if t['met'] else 'MISS'} {name:<30} {t['measured']:.4g} {t['op']} {t['goal']:.4g}")


def _steps(applied: list[list[Any]], initial: str, start: float, end: float) -> tuple[list[float], list[int]]:
    """The split point in force from `start` to `end` as step coordinates (seconds since `start`)."""
    xs, ys = [0.0], [split_of(_in_force(applied, initial, start))]
    for t, text in applied:
        if start < t < end:
            xs.append(t - start)
            ys.append(split_of(text))
    xs.append(end - start)
    ys.append(ys[-1])
    return xs, ys


def plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'tandem[bench]')")
        return
    runs = {(r["mode"], r["agents"]): r for r in result["runs"]}
    single = runs.get(("adaptive", 1))
    fleet = next((r for r in result["runs"] if r["mode"] == "adaptive" and r["agents"] > 1), None)
    base = next(iter(runs.values()))
    t0 = base["phases"][0]["start"]
    fig, axes = plt.subplots(3 if fleet else 2, 1, figsize=(11, 10 if fleet else 7), sharex=True)

    def phases(ax: Any, run: dict[str, Any]) -> None:
        start = run["phases"][0]["start"]
        for p in run["phases"]:
            if p["rate"] == "cut":
                ax.axvspan(p["start"] - start, p["end"] - start, color="0.85")
            ax.axvline(p["start"] - start, color="0.6", lw=0.8)

    ax = axes[0]
    for mode, style in (("edge", "C1"), ("cloud", "C2"), *((m, f"C{3 + i}") for i, m in enumerate(
            ("split:1", "split:2", "split:3", "split:4"))), ("adaptive", "C0")):
        run = runs.get((mode, 1))
        if run is None:
            continue
        start = run["phases"][0]["start"]
        reqs = [r for r in run["per_agent"][0]["requests"] if start <= r[0] < run["phases"][-1]["end"]]
        if not reqs:
            continue
        t = np.asarray([r[0] - start for r in reqs])
        ms = np.asarray([r[1] * 1000 for r in reqs])
        bins = np.floor(t / 2).astype(int)
        xs = [2 * b + 1 for b in np.unique(bins)]
        ys = [ms[bins == b].mean() for b in np.unique(bins)]
        ax.plot(xs, ys, color=style, lw=2.2 if mode == "adaptive" else 1.0, label=mode,
                alpha=1.0 if mode in ("adaptive", "edge", "cloud") else 0.5)
    ax.set_yscale("log")
    ax.set_ylabel("latency, 2 s means (ms)")
    if ax.get_lines():
        ax.legend(ncol=7, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    phases(ax, base)
    for p in base["phases"]:
        ax.text(p["start"] - t0 + 1, ax.get_ylim()[1], p["name"], va="top", fontsize=8, color="0.3")
    if single is not None:
        ax = axes[1]
        start = single["phases"][0]["start"]
        xs, ys = _steps(single["per_agent"][0]["applied"], single["initial"], start, single["phases"][-1]["end"])
        ax.step(xs, ys, where="post", label="adaptive (as the agent applied it)")
        for i, (p, m) in enumerate(zip(single["phases"], result["oracle"]["per_phase"])):
            if m is not None:
                ax.hlines(split_of(m), p["start"] - start, p["end"] - start, colors="C3", linestyles="dashed",
                          label="per-phase oracle" if i == 0 else None)
        ax.set_ylabel("split point k (stages at the edge)")
        ax.set_yticks(range(STAGES + 1))
        ax.legend(fontsize=8)
        phases(ax, single)
    if fleet is not None:
        ax = axes[2]
        start = fleet["phases"][0]["start"]
        for i, agent in enumerate(fleet["per_agent"]):
            xs, ys = _steps(agent["applied"], fleet["initial"], start, _trace_window(fleet)[1])
            ax.step(xs, [y + 0.07 * i for y in ys], where="post", lw=1, label=agent["name"])
        ax.set_ylabel(f"k, {fleet['agents']} agents")
        ax.legend(fontsize=8, loc="upper left")
        twin = ax.twinx()
        waits = queue_wait(fleet)
        twin.plot([w[0] for w in waits], [1000 * w[1] for w in waits], color="k", lw=0.8, label="cloud queue wait")
        twin.set_ylabel("cloud queue wait (ms)")
        phases(ax, fleet)
    axes[-1].set_xlabel("seconds since the trace started")
    axes[-1].set_xlim(0, base["phases"][-1]["end"] - t0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
