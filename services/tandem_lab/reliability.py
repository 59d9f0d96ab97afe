"""`make reliability`: the figures of trust under attack and failure, one target each.

    python -m tandem_lab.reliability --out bench/results/reliability.json
    python -m tandem_lab.reliability --only poison,crash --quick

Every scenario runs real processes on loopback (see each module's docstring):
poisoning (`reliability_poison`), agent churn (`reliability_churn`), coordinator
crashes (`reliability_crash`), link faults (`reliability_links`), many agents on
one coordinator (`reliability_load`), a 1 GB model moved both ways (`reliability_memory`),
fuzzing (`tandem_lab.fuzz`), a full disk with resume (`reliability_disk`), corrupt model files
(`reliability_corrupt`), one agent claiming a huge example count (`reliability_weights`),
stalled uploads (`reliability_stalled`). `--quick` is the size `make test` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tandem_lab.bench import machine

# Each is tandem_lab.reliability_NAME, except fuzz (tandem_lab.fuzz).
SCENARIOS = (
    "poison", "churn", "crash", "links", "load", "memory", "disk", "corrupt", "weights", "stalled", "connflood",
    "heartbeats", "fuzz",
)

FULL: dict[str, dict[str, Any]] = {
    "poison": {"agents": 8, "hostile": 2, "rounds": 10},
    "churn": {"agents": 10, "killed": 3, "rounds": 10},
    "crash": {"agents": 4, "rounds": 10, "kills": 5},
    "links": {"rounds": 10, "mean_fault_interval": 10.0},
    "load": {"agents": 500, "interval": 5.0, "seconds": 60.0},
    "memory": {"model": "mlp250m"},
    "corrupt": {"model": "mlp10m", "versions": 6},
    "fuzz": {"cases": 10_000},
    "disk": {"agents": 4, "rounds": 10, "fill_round": 3, "hold": 20.0},
    "weights": {"agents": 8, "rounds": 10},
    "stalled": {"stalled": 75, "idle_seconds": 5.0},
    "connflood": {"connections": 2000, "seconds": 20.0},
    "heartbeats": {"seconds": 20.0},
}
QUICK: dict[str, dict[str, Any]] = {
    "poison": {"agents": 5, "hostile": 1, "rounds": 3, "attacks": ("scale:-10",)},
    "churn": {"agents": 5, "killed": 1, "rounds": 3, "window": 0.5},
    "crash": {"agents": 3, "rounds": 4, "kills": 2},
    "links": {"rounds": 4, "mean_fault_interval": 3.0, "min_seconds": 15.0},
    "load": {"agents": 50, "interval": 1.0, "seconds": 10.0},
    "memory": {"model": "mlp250m"},  # the figure itself: about 40 s, 2.5 GB of memory and 4 GB of disk
    "corrupt": {"model": "mlp", "versions": 5},
    "fuzz": {"cases": 300},
    "disk": {"agents": 3, "rounds": 3, "fill_round": 1, "hold": 3.0, "deadline": 10.0},
    "weights": {"agents": 3, "rounds": 2},
    "stalled": {"stalled": 5, "idle_seconds": 1.0},
    "connflood": {"connections": 2000, "seconds": 8.0},
    "heartbeats": {"seconds": 4.0},
}


async def run_scenario(name: str, work: Path, sizes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scenario's raw result and its targets: every scenario module has `run` and `targets`."""
    if name == "fuzz":
        from tandem_lab import fuzz as module  # needs hypothesis, from the dev extra
    else:
        module = importlib.import_module(f"tandem_lab.reliability_{name}")
    result: dict[str, Any] = await module.run(work, **sizes)
    return result, module.targets(result)


async def run(only: list[str], quick: bool, work: Path) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    results: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for name in only:
        started = time.monotonic()
        print(f"{name} ...", flush=True)
        results[name], found = await run_scenario(name, work / name, sizes[name])
        results[name + "_seconds"] = round(time.monotonic() - started, 1)
        targets.update(found)
    return {"command": " ".join(sys.argv), "machine": machine(), "quick": quick, "sizes": {n: sizes[n] for n in only},
            "runs": results, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_lab.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="the small sizes `make test` runs")
    parser.add_argument("--work", type=Path, default=None, help="keep certificates, state and logs here")
    parser.add_argument("--out", type=Path, default=Path("bench/results/reliability.json"))
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {list(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix="tandem-reliability-") as tmp:
        report = asyncio.run(run(only, args.quick, args.work or Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{'target':<48} {'measured':>10} {'goal':>8}  met")
    for name, t in report["targets"].items():
        print(f"{name:<48} {t['measured']:>10} {t['op']:>2}{t['goal']:>6}  {'yes' if t['met'] else 'NO'}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
