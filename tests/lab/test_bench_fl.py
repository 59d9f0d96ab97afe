"""The federated benchmark's summary: issue 18's first-round target is one line of its `targets`."""

from __future__ import annotations

from typing import Any

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
