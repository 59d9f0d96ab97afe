"""The federated benchmark's summary: issue 18's first-round target is one line of its `targets`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tandem_lab.bench import summarise, targets


def _run(seconds: list[float]) -> dict[str, Any]:
    rounds = [{"seconds": s, "accuracy": 0.9, "bytes_up": 10, "bytes_down": 20} for s in seconds]
    return {"codec": "none", "rounds": rounds, "train_seconds_by_agent": [0.2], "model_transfer_seconds": 0.1,
            "wire_bytes_up": 100, "wire_bytes_down": 100}


def test_a_cold_first_round_misses_the_target() -> None:
    cold = summarise(_run([6.0, 0.5, 0.4, 0.6, 0.5]), clients=2, full=1000)
    assert cold["first_round_seconds"] == 6.0 and cold["mean_round_seconds"] == 1.6
    line = targets({"none": cold}, clients=2, full=1000)["first_round_vs_median"]
    assert line["measured"] == 12.0 and line["goal"] == 1.5 and line["op"] == "<=" and not line["met"]
    warm = summarise(_run([0.6, 0.5, 0.4, 0.6, 0.5]), clients=2, full=1000)
    assert targets({"none": warm}, clients=2, full=1000)["first_round_vs_median"]["met"]


def test_flower_is_compared_on_mean_seconds_per_round_first_round_included() -> None:
    from tandem_lab.bench import flower_targets

    tandem = summarise(_run([0.6, 0.5, 0.4, 0.6, 0.5]), clients=2, full=1000)  # mean 0.52
    lines = flower_targets({"none": tandem}, {"flwr": "1.42.0", "round_seconds": [2.0, 0.3, 0.3, 0.3, 0.3]})
    line = lines["seconds_per_round_vs_flower[none]"]
    assert abs(line["measured"] - 0.52 / 0.64) < 1e-9 and line["goal"] == 1.0 and line["met"]


def test_flower_reads_the_reference_partitions(tmp_path: Path) -> None:
    from tandem import data
    from tandem_lab.bench_flower import write_data

    write_data(tmp_path, 3)
    with np.load(tmp_path / "client-1.npz") as written:
        part = data.load_data("digits:1/3")
        assert np.array_equal(written["x"], part.x) and np.array_equal(written["y"], part.y)
    with np.load(tmp_path / "test.npz") as written:
        assert written["x"].shape == (450, 64)
