"""`make traffic`: the smart-traffic application end to end, with real Tandem processes.

1. History: SUMO simulates `--days` days of the network with no guidance; each
   district's detector readings go to its own file (history.py).
2. Tandem: a coordinator, and one `tandem edge` agent per district (its road-side unit),
   each reaching the coordinator through a relay that can cut its link; each agent
   trains on its own district's file only, and serves Inference.
3. Forecasting, federated: a `traffic-speed` job across the district agents, promoted
   at completion, so that the agents serve it; compared on the held-out day with each
   district's model trained alone, a central model and the naive baselines (compare.py).
4. Planning: the same held-out day (demand, incident, seed) simulated once per strategy:
   SUMO's default routes, free-flow shortest path, edge-only, cloud-only, Tandem's
   collaborative planning and an oracle; district 0's link is cut for part of the peak.

Writes `--out` (JSON: runs, summary and `targets`), a PNG beside it, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tandem import certs, tasks
from tandem.transfer import Download
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job
from tandem_example_traffic import compare, history, planners
from tandem_example_traffic.demand import Demand, peak_window
from tandem_example_traffic.network import Network, load_network
from tandem_example_traffic.planning import CloudView, Link, Planners, RoadSideUnit
from tandem_example_traffic.sim import Planner, Result, Simulation
from tandem_lab.bench import _target, machine
from tandem_lab.relay import Relay

log = logging.getLogger(__name__)

CLIENT = "rsu"  # the road-side units' certificate toward their agents
MIN_MINUTES = 20  # windows.min_intervals() at one-minute intervals
STRATEGIES = ("no_guidance", "free_flow", "edge", "cloud", "collaborative", "oracle")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tandem_example_traffic.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="braunschweig", choices=("braunschweig", "osm"),
                   help="the road network shipped with SUMO (default %(default)s)")
    p.add_argument("--districts", type=int, default=3, help="districts, one edge agent each (default %(default)s)")
    p.add_argument("--days", type=int, default=10, help="simulated days of history (default %(default)s)")
    p.add_argument("--minutes", type=int, default=60, help="simulated minutes per day (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the history and the held-out day (default %(default)s)")
    p.add_argument("--connected-share", type=float, default=0.3,
                   help="share of vehicles that ask for routes (default %(default)s)")
    p.add_argument("--planning-days", type=int, default=20,
                   help="held-out days each strategy is simulated on (travel times vary much from day to day; "
                        "default %(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="federated rounds (default %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round (default %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/results/traffic.json"), help="JSON (default %(default)s)")
    p.add_argument("--work", type=Path, default=None, help="keep the run's files here (default: a temporary directory)")
    args = p.parse_args(argv)
    for name, low in (("districts", 1), ("days", 1), ("planning_days", 1), ("rounds", 1), ("epochs", 1),
                      ("minutes", MIN_MINUTES)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}"
                    + (" (a forecast needs 10 minutes of history and 10 ahead)" if name == "minutes" else ""))
    if not 0 <= args.connected_share <= 1:
        p.error("--connected-share must be between 0 and 1")
    return args


async def _download(target: str, certs_dir: Path, model: str, version: int) -> dict[str, np.ndarray]:
    """The version's tensors, checked against its recorded sha256 (tandem.transfer, as agents fetch)."""
    async with admin_channel(target, certs_dir) as channel:
        listed = await admin_stub(channel).ListModelVersions(admin_pb2.ListModelVersionsRequest(model=model))
        [row] = [v for v in listed.versions if v.version == version]
        download = Download(model, version, row.sha256, tasks.get(model).specs)
        return await download.run(coordinator_pb2_grpc.CoordinatorStub(channel), timeout=120)


class Fleet:
    """The coordinator and one serving agent per district, each behind a cuttable relay."""

    def __init__(self, work: Path, districts: int) -> None:
        self.work, self.n = work, districts
        self.certs = work / "certs"
        self.relays: list[Relay] = []
        self.procs: list[Any] = []
        self.inference_ports: list[int] = []
        self.target = ""

    async def start(self, data: Path) -> None:
        names = [f"district-{i}" for i in range(self.n)]
        certs.init_deployment(self.certs, names)
        certs.add_client(self.certs, CLIENT)
        cloud, ports = procs.start_cloud(self.certs, self.work / "state", self.work / "cloud.log",
                                         extra=["--placement-interval", "0"])
        self.procs.append(cloud)
        self.target = f"localhost:{ports['port']}"
        for i, name in enumerate(names):
            relay = Relay("127.0.0.1", ports["port"])
            await relay.start()
            self.relays.append(relay)
            agent, ready = procs.start_serving_agent(
                f"localhost:{relay.port}", self.certs, name, str(data / f"district-{i}.npz"),
                self.work / f"{name}.log", ["traffic-speed=edge"], extra=["--tasks", "traffic-speed"])
            self.procs.append(agent)
            self.inference_ports.append(int(ready["inference_port"]))

    async def close(self) -> None:
        for proc in reversed(self.procs):
            procs.stop(proc)
        for relay in self.relays:
            await relay.close()


async def train(fleet: Fleet, data: Path, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    async with admin_channel(fleet.target, fleet.certs) as channel:
        stub = admin_stub(channel)
        await wait_connected(stub, fleet.n, timeout=120)
        spec = admin_pb2.JobSpec(model="traffic-speed", rounds=args.rounds, min_clients=fleet.n,
                                 round_deadline_seconds=600, eval=str(data / "all-test.npz"), seed=args.seed,
                                 epochs=args.epochs, batch_size=256, learning_rate=1e-3, promote="on-complete")
        job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
        job = await wait_job(stub, job_id, timeout=0, echo=True)
    if job["state"] != "completed":
        raise RuntimeError(f"the federated job {job['state']}: {job['message']}; logs in {fleet.work}")
    return job, await _download(fleet.target, fleet.certs, "traffic-speed", job["version"])


def summarise(result: Result, demand: Demand, network: Network, window: tuple[float, float],
              cut: tuple[float, float], cut_district: int) -> dict[str, Any]:
    """Connected vehicles' travel times overall, in the congested period and during the cut;
    delay is the travel time beyond the trip's free-flow shortest path at the speed limits."""
    free = network.free_flow_cost()
    ideal = {trip.id: sum(free[e] for e in trip.route) for trip in demand.trips}

    def stats(keep: Callable[[float], bool]) -> dict[str, float]:
        kept = [t for t in result.trips if t.connected and t.arrival == t.arrival and keep(t.depart)]
        times = np.array([t.travel_time for t in kept])
        if not len(times):
            return {"vehicles": 0, "mean": float("nan"), "p95": float("nan"), "total_delay": float("nan")}
        delay = sum(max(t.travel_time - ideal[t.vehicle], 0.0) for t in kept)
        return {"vehicles": int(len(times)), "mean": float(times.mean()), "p95": float(np.percentile(times, 95)),
                "total_delay": float(delay)}

    in_cut = [r for r in result.requests if cut[0] <= r.time < cut[1] and r.district == cut_district]
    bins = np.arange(0, demand.duration + 300, 300)
    trips = [t for t in result.trips if t.connected and t.arrival == t.arrival]
    series = [float(np.mean([t.travel_time for t in trips if lo <= t.depart < hi] or [np.nan]))
              for lo, hi in zip(bins[:-1], bins[1:])]
    return {
        "all": stats(lambda _: True), "congested": stats(lambda d: window[0] <= d < window[1]),
        "cut": stats(lambda d: cut[0] <= d < cut[1]), "requests": len(result.requests),
        "failed_requests": result.failed_requests, "failed_requests_during_cut": sum(not r.answered for r in in_cut),
        "teleports": result.teleports, "travel_time_by_departure_5min": series,
    }


def pooled(days: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each strategy over every planning day: means of the days' means (weighted by vehicles),
    p95 as the days' mean p95, counts and delays summed."""
    out: dict[str, dict[str, Any]] = {}
    for name in days[0]:
        runs = [d[name] for d in days]
        entry: dict[str, Any] = {}
        for period in ("all", "congested", "cut"):
            parts = [r[period] for r in runs if r[period]["vehicles"]]
            vehicles = sum(p["vehicles"] for p in parts)
            entry[period] = {
                "vehicles": vehicles,
                "mean": sum(p["mean"] * p["vehicles"] for p in parts) / vehicles if vehicles else float("nan"),
                "p95": float(np.mean([p["p95"] for p in parts])) if parts else float("nan"),
                "total_delay": float(sum(p["total_delay"] for p in parts)),
            }
        for key in ("requests", "failed_requests", "failed_requests_during_cut", "teleports", "inference_failures"):
            if key in runs[0]:
                entry[key] = sum(r[key] for r in runs)
        if "placements" in runs[0]:  # where the district agents answered the forecasts, per district
            entry["placements"] = [{k: sum(r["placements"][i].get(k, 0) for r in runs)
                                    for k in {k for r in runs for k in r["placements"][i]}}
                                   for i in range(len(runs[0]["placements"]))]
        series = np.array([r["travel_time_by_departure_5min"] for r in runs], dtype=float)
        entry["travel_time_by_departure_5min"] = [float(v) for v in np.nanmean(series, axis=0)]
        out[name] = entry
    return out


def run_strategy(name: str, network: Network, demand: Demand, districts: list[list[str]], fleet: Fleet,
                 args: argparse.Namespace, cut: tuple[float, float], loop: asyncio.AbstractEventLoop,
                 day_intervals: int) -> tuple[Result, dict[str, Any]]:
    """One simulated day under `name` (in a worker thread: libsumo blocks)."""
    sim = Simulation(network, demand, districts=districts, connected_share=args.connected_share, seed=demand.seed)
    extra: dict[str, Any] = {}
    units: list[RoadSideUnit] = []
    try:
        planner: Planner | None
        if name == "no_guidance":
            planner = None
        elif name == "free_flow":
            planner = planners.free_flow(network)
        elif name == "oracle":
            planner = planners.oracle(sim)
        else:
            cloud, links = CloudView(), [Link() for _ in districts]
            units = [RoadSideUnit(i, edges, network, f"localhost:{fleet.inference_ports[i]}", fleet.certs, CLIENT,
                                  links[i], cloud, day_intervals, lambda: sim.detector_speed)
                     for i, edges in enumerate(districts)]
            plans = Planners(network, units, cloud, lambda: sim.readings, lambda: sim.time, sim.interval,
                             sim.remaining_route)
            chosen = {"edge": plans.edge, "cloud": plans.cloud_only, "collaborative": plans.collaborative}[name]

            def planner_with_cut(request: Any) -> list[str] | None:
                down = cut[0] <= sim.time < cut[1]
                if down == links[0].up:  # the link changes: the agent's real one too
                    links[0].up = not down
                    relay = fleet.relays[0]
                    loop.call_soon_threadsafe(relay.cut if down else relay.restore)
                return chosen(request)

            planner = planner_with_cut
        sim.planner = planner
        result = sim.run()
        if units:
            extra = {"inference_failures": sum(u.inference_failures for u in units),
                     "placements": [u.placements for u in units]}
    finally:
        sim.close()
        for unit in units:
            unit.close()
        fleet.relays[0].restore()
    return result, extra


def targets(summary: dict[str, dict[str, Any]], forecast: dict[str, Any]) -> dict[str, Any]:
    congested = {name: s["congested"]["mean"] for name, s in summary.items()}
    collab = summary["collaborative"]
    out = {
        "travel_time_vs_oracle": _target(
            congested["collaborative"] / congested["oracle"], 1.05, "<=",
            "collaborative mean travel time of connected vehicles departing in the peak / the oracle's"),
        "travel_time_vs_free_flow": _target(
            congested["collaborative"] / congested["free_flow"], 0.90, "<=",
            "collaborative mean travel time in the peak / free-flow shortest path's"),
    }
    worst = max(collab[p]["mean"] / min(summary["edge"][p]["mean"], summary["cloud"][p]["mean"])
                for p in ("all", "congested", "cut"))
    out["travel_time_vs_best_single"] = _target(
        worst, 1.0, "<=", "collaborative mean travel time / the better of edge-only and cloud-only, worst of the "
                          "periods all, congested and cut")
    regimes = forecast["regimes"]
    out["forecast_mae_vs_central"] = _target(
        regimes["federated"]["mae"] / regimes["central"]["mae"], 1.10, "<=",
        "federated MAE (km/h, held-out day, every district) / centrally trained MAE")
    out["forecast_mae_vs_local"] = _target(
        max(regimes["federated"]["districts"][d]["mae"] / local["mae"] for d, local in regimes["local"]["districts"].items()),
        1.0, "<=", "federated MAE / the district's own model trained alone, on that district's held-out day: the "
                   "worst district")
    out["failed_route_requests_during_cut"] = _target(
        float(collab["failed_requests_during_cut"]), 0.0, "<=",
        "collaborative route requests from the cut district, during the cut, that got no route")
    return out


async def main_async(args: argparse.Namespace) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tandem-traffic-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        network = load_network(args.network)
        print(f"history: {args.days} days of {args.minutes} simulated minutes on {args.network} ...", flush=True)
        await asyncio.to_thread(history.generate, network, args.districts, args.days, data, args.seed, args.minutes)
        districts = network.districts(args.districts)
        fleet = Fleet(work, args.districts)
        try:
            await fleet.start(data)
            print(f"federated: {args.rounds} rounds across {args.districts} district agents ...", flush=True)
            job, weights = await train(fleet, data, args)
            print("comparing forecasters on the held-out day ...", flush=True)
            forecast = await asyncio.to_thread(
                compare.compare, [data / f"district-{i}.npz" for i in range(args.districts)],
                [data / f"district-{i}-test.npz" for i in range(args.districts)], data / "all.npz",
                data / "all-test.npz", weights, args.seed, args.rounds * args.epochs)
            peak = peak_window(args.minutes)
            cut = (peak[0] + (peak[1] - peak[0]) / 3, peak[1])
            day_intervals = int(args.minutes * 60 // 60)
            loop = asyncio.get_running_loop()
            days: list[dict[str, dict[str, Any]]] = []
            for day in range(args.planning_days):  # the held-out day first, then days never seen at all
                demand = Demand.generate(network, seed=args.seed + args.days + day, minutes=args.minutes)
                summary: dict[str, dict[str, Any]] = {}
                for name in STRATEGIES:
                    print(f"planning, day {day + 1} of {args.planning_days}: {name} ...", flush=True)
                    result, extra = await asyncio.to_thread(run_strategy, name, network, demand, districts, fleet,
                                                            args, cut, loop, day_intervals)
                    summary[name] = {**summarise(result, demand, network, peak, cut, 0), **extra}
                days.append(summary)
            summary = pooled(days)
        finally:
            await fleet.close()
    output: dict[str, Any] = {
        "name": "traffic", "command": " ".join(["python -m tandem_example_traffic.bench", *sys.argv[1:]]),
        "machine": machine(), "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "peak_seconds": list(peak), "cut_seconds": list(cut), "cut_district": 0,
        "forecast": forecast, "federated_job": {"rounds": job["rounds"], "version": job["version"]},
        "planning": summary, "planning_days": days, "targets": targets(summary, forecast),
        "wall_seconds": time.monotonic() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2, default=float))
    plot(output, args.out.with_suffix(".png"))
    print_table(output)
    return 0


def plot(output: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, s in output["planning"].items():
        series = s["travel_time_by_departure_5min"]
        left.plot([5 * i + 2.5 for i in range(len(series))], series, label=name, marker=".")
    for bound, style in ((output["peak_seconds"], "0.9"), (output["cut_seconds"], "#fdd")):
        left.axvspan(bound[0] / 60, bound[1] / 60, color=style, zorder=0)
    left.set(xlabel="departure (simulated minute)", ylabel="mean travel time of connected vehicles (s)",
             title="Travel time per strategy (grey: peak, red: district 0's link cut)")
    left.legend(fontsize=8)
    regimes = output["forecast"]["regimes"]
    horizons = [k.removeprefix("mae_") for k in regimes["central"] if k.startswith("mae_")]
    for name, r in regimes.items():
        right.plot(horizons, [r[f"mae_{h}"] for h in horizons], label=name, marker="o")
    right.set(xlabel="horizon", ylabel="MAE (km/h), held-out day", title="Speed forecast error per horizon")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(output: dict[str, Any]) -> None:
    print(f"\n{'strategy':<14} {'mean s':>8} {'p95 s':>8} {'peak mean':>10} {'cut mean':>9} {'failed':>7}")
    for name, s in output["planning"].items():
        print(f"{name:<14} {s['all']['mean']:>8.1f} {s['all']['p95']:>8.1f} {s['congested']['mean']:>10.1f} "
              f"{s['cut']['mean']:>9.1f} {s['failed_requests']:>7}")
    print(f"\n{'forecast':<20} " + " ".join(f"{k:>10}" for k in ("mae", "mae_1min", "mae_5min", "mae_10min")))
    for name, r in output["forecast"]["regimes"].items():
        print(f"{name:<20} " + " ".join(f"{r.get(k, float('nan')):>10.2f}"
                                         for k in ("mae", "mae_1min", "mae_5min", "mae_10min")))
    print()
    for name, t in output["targets"].items():
        print(f"{'met ' if t['met'] else 'MISS'} {name:<34} {t['measured']:.4g} {t['op']} {t['goal']:.4g}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        return asyncio.run(main_async(args))
    except (RuntimeError, ValueError, OSError) as exc:  # a failed run: one line, its logs named in it
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
