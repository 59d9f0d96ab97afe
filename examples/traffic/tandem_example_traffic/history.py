"""Sensor history for training the speed forecaster: several simulated days, per district.

Each day is a `Demand` with its own seed (same profile, different trips) simulated in SUMO
with nobody guided (connected_share 0), exactly `minutes` long. Every other training day
(the first, third, ...) and the held-out test day have an incident, each on the edge and at
the time its seed draws, so that the history holds days with and without one.

Files, one set per district i (the district's edges only) and one for all edges together
(district -1, for the centrally trained upper bound). This format is a contract with the
forecasting code:

    district-{i}.npz, all.npz            the training days
    district-{i}-test.npz, all-test.npz  the held-out day (a seed no training day uses)

    speed       float32 [D, T, E]  mean speed per interval, m/s (the speed limit when empty)
    occupancy   float32 [D, T, E]  percent of the edge covered by vehicles, 0-100
    flow        float32 [D, T, E]  vehicles that entered the edge in the interval
    free_speed  float32 [E]        the edges' speed limits, m/s
    edges       str [E]            edge ids
    interval    float              seconds per interval
    district    int                the district's index, -1 for all

Alongside, days.json records the network, the districts' edges and each day's seed and
incident, so a comparison can replay the held-out day exactly.

Training days use seeds seed, seed + 1, ..., seed + days - 1; the test day uses seed + days.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .demand import BASE_RATE, PEAK_RATE, Demand
from .network import Network, load_network
from .sim import Readings, Simulation


def simulate_day(network: Network, seed: int, minutes: int, interval: float, incident: bool, *,
                 base_rate: float = BASE_RATE, peak_rate: float = PEAK_RATE) -> tuple[Demand, Readings]:
    """One unguided day's demand and readings, exactly `minutes` long ([minutes * 60 / interval, E])."""
    demand = Demand.generate(network, seed, minutes, base_rate=base_rate, peak_rate=peak_rate, incident=incident)
    with Simulation(network, demand, None, connected_share=0.0, interval=interval) as sim:
        result = sim.run(until=demand.duration)
    return demand, result.readings


def _arrays(days: Sequence[Readings], columns: np.ndarray, network: Network, district: int) -> dict[str, Any]:
    return {
        "speed": np.stack([day.speed[:, columns] for day in days]).astype(np.float32),
        "occupancy": np.stack([day.occupancy[:, columns] for day in days]).astype(np.float32),
        "flow": np.stack([day.flow[:, columns] for day in days]).astype(np.float32),
        "free_speed": network.speed_limit[columns].astype(np.float32),
        "edges": np.array([network.edges[i] for i in columns], dtype=str),
        "interval": np.array(days[0].interval, dtype=np.float64),
        "district": np.array(district, dtype=np.int64),
    }


def generate(network: Network, districts: int, days: int, out_dir: Path | str, seed: int = 0, minutes: int = 60,
             interval: float = 60.0, *, base_rate: float = BASE_RATE, peak_rate: float = PEAK_RATE) -> list[Path]:
    """Simulate `days` training days and one test day; write the files above; return their paths."""
    if days < 1 or districts < 1:
        raise ValueError(f"history: days={days} and districts={districts} must be at least 1")
    if (minutes * 60) % interval:
        raise ValueError(f"history: a day of {minutes} minutes is not a whole number of {interval} s intervals")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = network.districts(districts)
    seeds = [seed + d for d in range(days)]
    test_seed = seed + days
    rates = {"base_rate": base_rate, "peak_rate": peak_rate}
    train = [simulate_day(network, s, minutes, interval, d % 2 == 0, **rates) for d, s in enumerate(seeds)]
    test = simulate_day(network, test_seed, minutes, interval, True, **rates)
    written: list[Path] = []
    groups = [(i, f"district-{i}", part) for i, part in enumerate(parts)] + [(-1, "all", list(network.edges))]
    for index, stem, edges in groups:
        columns = np.array([network.index[edge] for edge in edges], dtype=np.int64)
        for suffix, readings in (("", [r for _, r in train]), ("-test", [test[1]])):
            path = out / f"{stem}{suffix}.npz"
            np.savez(path, **_arrays(readings, columns, network, index))
            written.append(path)
    meta = {
        "network": network.name, "minutes": minutes, "interval": interval, **rates,
        "districts": parts,
        "days": [{"seed": s, "incident": asdict(d.incident) if d.incident else None} for s, (d, _) in zip(seeds, train)],
        "test": {"seed": test_seed, "incident": asdict(test[0].incident) if test[0].incident else None},
    }
    (out / "days.json").write_text(json.dumps(meta, indent=1) + "\n")
    written.append(out / "days.json")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tandem_example_traffic.history",
                                     description="Simulate unguided days in SUMO and write per-district sensor history.")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the .npz files into")
    parser.add_argument("--network", default="braunschweig", help="network name (default: braunschweig)")
    parser.add_argument("--districts", type=int, default=2, help="number of districts (default: 2)")
    parser.add_argument("--days", type=int, default=6, help="training days; one more is simulated for the test (default: 6)")
    parser.add_argument("--minutes", type=int, default=60, help="simulated minutes per day (default: 60)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per reading (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="first day's seed; days use seed..seed+days (default: 0)")
    args = parser.parse_args(argv)
    network = load_network(args.network)
    for path in generate(network, args.districts, args.days, args.out, args.seed, args.minutes, args.interval):
        if path.suffix == ".npz":
            with np.load(path) as data:
                print(f"{path}: speed/occupancy/flow {list(data['speed'].shape)} (days, intervals, edges), "
                      f"district {int(data['district'])}")
        else:
            print(f"{path}: seeds and incidents of the days")


if __name__ == "__main__":
    main()
