"""What information planning needs: the planner's inputs varied one at a time, in process.

    python -m tandem_example_traffic.ablation [--days 20] [--workers 2] [--out bench/results/traffic-ablation.json]

No Tandem processes: every variant is one planner on the same days (seeds 10.., the held-out
days of `make traffic` at its defaults), a forecaster trained centrally in process where a
variant needs one (`make traffic` measures the federated one against it: within 1%). Each
variant's peak mean travel time of connected vehicles is reported per day and as the mean of
its per-day ratios to free-flow routing, with the standard error over days: days differ far
more than strategies do, so only paired ratios over many days say anything.

Variants (the speeds an edge's cost is priced with, and how often they are read):
- `oracle`: the smoothed speeds of every edge now, read at each request, the incident known at once;
- `oracle_each_minute`: the same speeds read once a minute;
- `detectors_each_second` / `_5s` / `_10s`: the detectors' smoothed speeds (no incident
  foreknowledge), read every 1, 5 or 10 s: what the cloud view holds with reports that often;
- `detectors_10s_hysteresis`: as `_10s`, keeping a vehicle's route unless another is 15% faster;
- `forecast_each_minute`: the 1-minute forecast from the last 10 per-minute readings.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem_example_traffic import compare, history, planners
from tandem_example_traffic.demand import Demand, peak_window
from tandem_example_traffic.network import Network, load_network
from tandem_example_traffic.sim import Planner, RouteRequest, Simulation
from tandem_example_traffic.task import predict
from tandem_example_traffic.windows import WINDOW, Readings, Windows, window_features

VARIANTS: dict[str, dict[str, Any]] = {
    "free_flow": {},
    "oracle": {},
    "oracle_each_minute": {"speeds": "oracle", "every": 60},
    "detectors_each_second": {"speeds": "detectors", "every": 1},
    "detectors_each_5s": {"speeds": "detectors", "every": 5},
    "detectors_each_10s": {"speeds": "detectors", "every": 10},
    "detectors_10s_hysteresis": {"speeds": "detectors", "every": 10, "hysteresis": 0.15},
    "forecast_each_minute": {"speeds": "forecast", "every": 60},
}
MINUTES = 60
FIRST_DAY = 10  # make traffic's held-out days at its defaults: --seed 0 --days 10


def _planner(variant: dict[str, Any], sim: Simulation, model: torch.nn.Module | None) -> Planner:
    network = sim.network
    free = network.speed_limit.astype(np.float32)
    held: dict[str, Any] = {"slot": None, "cost": None}

    def speeds() -> np.ndarray:
        if variant["speeds"] == "oracle":
            return sim.live_speed
        if variant["speeds"] == "detectors":
            return sim.detector_speed
        readings = sim.readings
        t = readings.speed.shape[0]
        if t < WINDOW or model is None:
            return readings.speed[-1] if t else network.speed_limit.copy()
        x = window_features(readings.speed[-WINDOW:], readings.occupancy[-WINDOW:], readings.flow[-WINDOW:], free,
                            t - 1, MINUTES)
        return predict(model, x)[:, 0] * free

    def plan(request: RouteRequest) -> list[str] | None:
        slot = int(request.time // variant["every"])
        if slot != held["slot"]:
            held["slot"], held["cost"] = slot, planners.costs_from_speeds(network, speeds())
        cost = held["cost"]
        best = network.shortest_path(request.edge, request.destination, cost)
        margin = variant.get("hysteresis", 0.0)
        own = sim.remaining_route(request.vehicle) if margin else ()
        return planners.keep_or_best(network, request, best, own, cost, margin)

    return plan


def run_day(job: tuple[int, str, str | None]) -> tuple[int, str, float, int]:
    """One variant on one day: (day, variant, peak mean travel time of connected vehicles, how many)."""
    day, name, model_path = job
    network = load_network("braunschweig")
    demand = Demand.generate(network, seed=day, minutes=MINUTES)
    torch.set_num_threads(1)  # as many simulations as cores run at once
    model = torch.load(model_path, weights_only=False) if model_path else None
    with Simulation(network, demand, districts=network.districts(3), connected_share=0.3) as sim:
        chosen: Callable[[], Planner] = {
            "free_flow": lambda: planners.free_flow(network), "oracle": lambda: planners.oracle(sim),
        }.get(name, lambda: _planner(VARIANTS[name], sim, model))
        sim.planner = chosen()
        result = sim.run()
    start, end = peak_window(MINUTES)
    times = [t.travel_time for t in result.trips if t.connected and t.arrival == t.arrival and start <= t.depart < end]
    return day, name, float(np.mean(times)), len(times)


def train_forecaster(network: Network, work: Path) -> Path:
    """make traffic's history (10 days, 3 districts, seed 0) and a model trained centrally on it."""
    history.generate(network, 3, 10, work, 0, MINUTES)
    with np.load(work / "all.npz") as arrays:
        model = compare.train_central(Windows.of(Readings.of(dict(arrays))), 0, 16)
    path = work / "central.pt"
    torch.save(model, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem_example_traffic.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=20, help="planning days (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="simulations at once (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    p.add_argument("--out", type=Path, default=Path("bench/results/traffic-ablation.json"))
    args = p.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or args.days < 2 or args.workers < 1:
        p.error(f"unknown variants {unknown} (choose from {list(VARIANTS)})" if unknown
                else "--days must be at least 2 and --workers at least 1")
    if "free_flow" not in names:
        names.insert(0, "free_flow")  # every ratio is to it
    per_day: dict[str, dict[int, float]] = {n: {} for n in names}
    with tempfile.TemporaryDirectory(prefix="tandem-ablation-") as tmp:
        model = str(train_forecaster(load_network("braunschweig"), Path(tmp))) if "forecast_each_minute" in names else None
        jobs = [(day, name, model) for day in range(FIRST_DAY, FIRST_DAY + args.days) for name in names]
        # spawn, not fork: a forked child of a process whose torch has started its threads hangs in its first forward pass
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for day, name, mean, vehicles in pool.map(run_day, jobs):
                per_day[name][day] = mean
                print(f"day {day} {name}: {mean:.1f} s over {vehicles} connected vehicles", flush=True)
    base = np.array([per_day["free_flow"][d] for d in sorted(per_day["free_flow"])])
    summary = {}
    for name, days in per_day.items():
        ratios = np.array([days[d] for d in sorted(days)]) / base
        summary[name] = {"peak_mean_s": float(np.mean(list(days.values()))), "vs_free_flow": float(ratios.mean()),
                         "stderr": float(ratios.std(ddof=1) / np.sqrt(len(ratios)))}
        print(f"{name:<26} {summary[name]['peak_mean_s']:7.1f} s   vs free flow {ratios.mean():.3f} "
              f"+- {summary[name]['stderr']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"name": "traffic-ablation", "days": args.days, "first_day": FIRST_DAY,
                                    "summary": summary, "per_day": per_day}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
