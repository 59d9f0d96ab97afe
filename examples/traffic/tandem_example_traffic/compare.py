"""Offline comparison of training regimes for the speed forecaster, on the same held-out day.

    python -m tandem_example_traffic.compare DIR [--epochs 3] [--seed 0] [--federated W.safetensors] [--out R.json]

DIR holds the readings the SUMO side writes: `district-{i}.npz` (a district's training
days), `district-{i}-test.npz` (its held-out day), `all.npz` and `all-test.npz` (every
district's segments). Regimes, each scored with the task's own `evaluate` (km/h):

- `last_value`: the speed now persists (naive);
- `historical_average`: the mean speed of that segment at that time of day over the
  training days (a district's own days; `all.npz`'s for the city);
- `local`: one model per district trained on its own file only, each scored on its own
  district's held-out day;
- `central`: one model trained on `all.npz`, scored on each district's held-out day;
- `federated`: given weights (the model Tandem trained federated), scored the same way.

Every regime is scored on each district's test file; its figures are the mean over
all of those examples (a district weighs by its examples) and, under `districts`, each
district's. Single-model regimes are also scored on `all-test.npz` (`all`). Fairness:
local and central models start from the same initial weights (the task's build at
`seed`) and train the same number of epochs over their data (every example is seen
`epochs` times; central takes more steps, having more data), with the same config.
A federated model is comparable when its job ran rounds * local epochs = `epochs`
(each example seen as often) from `--seed` = `seed`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tandem import tasks
from tandem.task import Config, TrainContext
from tandem_example_traffic.task import SpeedTask, scores, setting
from tandem_example_traffic.windows import HORIZONS, WINDOW, Readings, Windows, starts

TASK = "tandem_example_traffic.task:SpeedTask"  # loads whether or not the package is installed
REGIMES = ("last_value", "historical_average", "local", "central", "federated")
FAIRNESS = ("local and central start from the same initial weights (build at the seed) and train the same "
            "epochs over their own data, with the same config; federated is comparable when rounds x local "
            "epochs = epochs")


def _task() -> tuple[tasks.LoadedTask, SpeedTask]:
    loaded = tasks.get(TASK)
    assert isinstance(loaded.task, SpeedTask)
    return loaded, loaded.task


def train_model(data: Windows, seed: int, epochs: int, config: Config | None = None, *, stream: int = 0) -> nn.Module:
    """A model built at `seed` and trained `epochs` epochs on `data` with the task's own
    loop (shuffles seeded by (seed, stream))."""
    loaded, task = _task()
    model = loaded.build(seed)
    context = TrainContext(round=1, seed=seed * 1_000 + stream, device="cpu")
    task.train(model, data, {**(config or {}), "epochs": epochs}, context)
    return model


def train_local(districts: Sequence[Windows], seed: int, epochs: int, config: Config | None = None) -> list[nn.Module]:
    """One model per district, each trained only on its own examples."""
    return [train_model(data, seed, epochs, config, stream=1 + i) for i, data in enumerate(districts)]


def train_central(data: Windows, seed: int, epochs: int, config: Config | None = None) -> nn.Module:
    """One model trained on every district's examples."""
    return train_model(data, seed, epochs, config)


def last_value(data: Windows) -> np.ndarray:
    """The naive forecast: the latest speed ratio, at every horizon."""
    return np.repeat(data.x[:, -1, :1], len(HORIZONS), axis=1)


def historical_average(train: Readings, test: Readings) -> np.ndarray:
    """For each example of `Windows.of(test)`, in its order, the mean speed ratio of that
    edge at each target's time of day over the days of `train` (edges matched by id)."""
    if train.intervals != test.intervals or train.interval != test.interval:
        raise ValueError(f"the training readings have days of {train.intervals} x {train.interval} s intervals, "
                         f"the test readings {test.intervals} x {test.interval} s: times of day do not match")
    index = {str(edge): i for i, edge in enumerate(train.edges)}
    unknown = [str(edge) for edge in test.edges if str(edge) not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} test edges have no training readings (first: {unknown[0]!r})")
    columns = [index[str(edge)] for edge in test.edges]
    mean = (train.speed / train.free_speed).mean(axis=0)[:, columns]  # [T, E_test]
    times = starts(test.intervals)
    per_time = np.stack([mean[times.start + h:times.stop + h] for h in HORIZONS], axis=-1)  # [S, E, H]
    return np.broadcast_to(per_time, (test.days, *per_time.shape)).reshape(-1, len(HORIZONS)).astype(np.float32)


def pooled(parts: Mapping[str, Mapping[str, float]], sizes: Mapping[str, int]) -> dict[str, float]:
    """Metrics over the union of the parts' examples: MAE and loss weighted by examples,
    RMSE as the root of the weighted mean square."""
    total = sum(sizes.values())
    keys = next(iter(parts.values())).keys()
    result = {}
    for key in keys:
        if key.startswith("rmse"):
            result[key] = float(np.sqrt(sum(parts[p][key] ** 2 * sizes[p] for p in parts) / total))
        else:
            result[key] = float(sum(parts[p][key] * sizes[p] for p in parts) / total)
    return result


def _regime(per_district: dict[str, dict[str, float]], sizes: dict[str, int],
            city: dict[str, float] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {**pooled(per_district, sizes), "examples": sum(sizes.values()),
                              "districts": per_district}
    if city is not None:
        result["all"] = city
    return result


def compare(train_files: list[Path], test_files: list[Path], all_train: Path, all_test: Path,
            federated: Mapping[str, np.ndarray] | None, seed: int, epochs: int,
            config: Config | None = None) -> dict[str, Any]:
    """Every regime's errors in km/h on the held-out day (see the module's docstring):
    {"seed", "epochs", "horizons", "fairness", "train_examples", "regimes": {regime:
    {"mae", "rmse", "loss", "mae_1min", "rmse_1min", ..., "examples", "districts":
    {name: metrics}, "all": metrics (single-model regimes)}}}. `federated` absent
    (None) leaves its regime out. Deterministic in (files, seed, epochs, config) on one
    machine and torch thread count."""
    if not train_files or len(train_files) != len(test_files):
        raise ValueError(f"need one test file per training file, got {len(train_files)} and {len(test_files)}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    loaded, task = _task()
    delta = setting(config or {}, "huber_delta", 0.1)
    names = [Path(path).name.removesuffix(".npz") for path in train_files]
    if len(set(names)) != len(names):
        raise ValueError(f"district files must have distinct names, got {names}")
    train = [Readings.load(path) for path in train_files]
    test = [Readings.load(path) for path in test_files]
    for name, a, b, path in zip(names, train, test, test_files):
        if a.district != b.district:
            raise ValueError(f"{name} is district {a.district}, but its test file {path} is district {b.district}")
    city_train, city_test = Readings.load(all_train), Readings.load(all_test)
    windows = {name: Windows.of(r) for name, r in zip(names, test)}
    city_windows = Windows.of(city_test)
    sizes = {name: len(w) for name, w in windows.items()}
    settings = dict(config or {})

    def of_model(model: nn.Module) -> dict[str, Any]:
        return _regime({name: task.evaluate(model, w, settings) for name, w in windows.items()}, sizes,
                       task.evaluate(model, city_windows, settings))

    def of_forecasts(forecast: Callable[[str, Windows], np.ndarray]) -> dict[str, Any]:
        return _regime({name: scores(forecast(name, w), w, delta) for name, w in windows.items()}, sizes,
                       scores(forecast("all", city_windows), city_windows, delta))

    history = {**dict(zip(names, train)), "all": city_train}
    tested = {**dict(zip(names, test)), "all": city_test}
    regimes: dict[str, dict[str, Any]] = {
        "last_value": of_forecasts(lambda name, w: last_value(w)),
        "historical_average": of_forecasts(lambda name, w: historical_average(history[name], tested[name])),
    }
    training = [Windows.of(r) for r in train]
    local = train_local(training, seed, epochs, settings)
    regimes["local"] = _regime({name: task.evaluate(model, windows[name], settings)
                                for name, model in zip(names, local)}, sizes)
    central = Windows.of(city_train)
    regimes["central"] = of_model(train_central(central, seed, epochs, settings))
    if federated is not None:
        model = loaded.build(seed)
        loaded.load_arrays(model, federated)
        regimes["federated"] = of_model(model)
    return {"seed": seed, "epochs": epochs, "window": WINDOW, "horizons": list(HORIZONS), "fairness": FAIRNESS,
            "train_examples": {**{name: len(w) for name, w in zip(names, training)}, "all": len(central)},
            "regimes": regimes}


def files_in(directory: Path) -> tuple[list[Path], list[Path], Path, Path]:
    """(train_files, test_files, all_train, all_test) of a directory laid out as the
    module's docstring says; ValueError naming what is missing."""
    train = sorted(directory.glob("district-*.npz"), key=lambda p: (len(p.name), p.name))
    train = [p for p in train if not p.name.endswith("-test.npz")]
    tests = [p.with_name(p.name.removesuffix(".npz") + "-test.npz") for p in train]
    wanted = [*tests, directory / "all.npz", directory / "all-test.npz"]
    missing = [str(p) for p in wanted if not p.is_file()]
    if not train or missing:
        raise ValueError(f"{directory}: needs district-I.npz files, each with district-I-test.npz, and all.npz and "
                         f"all-test.npz; missing {missing or ['district-*.npz']}")
    return train, tests, directory / "all.npz", directory / "all-test.npz"


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors or .npz file, by name."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    from safetensors.numpy import load_file  # Tandem's model files

    return dict(load_file(str(path)))


def table(result: Mapping[str, Any]) -> str:
    """The regimes' MAE (km/h) overall and per horizon, one line each."""
    regimes: Mapping[str, Mapping[str, Any]] = result["regimes"]
    columns = [key for key in next(iter(regimes.values())) if key.startswith("mae")]
    lines = [f"{'regime':<20}" + "".join(f"{c:>12}" for c in columns) + f"{'examples':>10}"]
    for name, row in regimes.items():
        lines.append(f"{name:<20}" + "".join(f"{row[c]:>12.3f}" for c in columns) + f"{row['examples']:>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_example_traffic.compare",
                                     description="Compare the speed forecaster's training regimes (MAE in km/h).")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--federated", type=Path, help="the federated model's weights (.safetensors or .npz)")
    parser.add_argument("--out", type=Path, help="write the full result as JSON here")
    args = parser.parse_args(argv)
    try:
        weights = load_weights(args.federated) if args.federated else None
        result = compare(*files_in(args.directory), weights, args.seed, args.epochs)
    except (ValueError, OSError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
