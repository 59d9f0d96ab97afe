"""A job's config and agents' labels: what is accepted, what is refused and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tandem import config
from tandem.v1 import coordinator_pb2 as pb


def test_plain_values_cross_the_wire_unchanged() -> None:
    values = {"epochs": 3, "lr": 0.5, "flag": True, "name": "x", "big": -(1 << 63)}
    task = pb.TrainTask()
    config.to_proto(config.check(values), task.config)
    again = config.from_proto(pb.TrainTask.FromString(task.SerializeToString()).config)
    assert again == values and type(again["flag"]) is bool and type(again["epochs"]) is int


@pytest.mark.parametrize("bad, why", [
    ({"bad key": 1}, "not valid"), ({"x": float("nan")}, "finite"), ({"x": {"nested": 1}}, "plain value"),
    ({"x": "y" * 2000}, "at most 1024"), ({f"k{i}": i for i in range(65)}, "at most 64"), ({"x": 1 << 63}, "int64"),
    ({f"k{i}": "v" * 1000 for i in range(20)}, "16384"),
])
def test_malformed_configs_are_refused_saying_why(bad: dict[str, object], why: str) -> None:
    with pytest.raises(config.ConfigError, match=why):
        config.check(bad)


def test_command_line_pairs_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"a": 1, "b": "file"}))
    assert config.parse_pairs(["b=2.5", "c=true", "d=text"], config.load_file(path)) == {
        "a": 1, "b": 2.5, "c": True, "d": "text"}
    path.write_text("[1, 2]")
    with pytest.raises(config.ConfigError, match="JSON object"):
        config.load_file(path)
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_file(tmp_path / "missing.json")


def test_user_config_wins_over_the_training_fields() -> None:
    assert config.merged({"epochs": 5, "mu": 0.0}, {"epochs": 1, "x": "y"}) == {"epochs": 1, "mu": 0.0, "x": "y"}


def test_labels_and_selectors() -> None:
    assert config.parse_labels(["site=a", "tier=edge-1"]) == {"site": "a", "tier": "edge-1"}
    for bad in ("site", "=a", "si te=a", "site=a/b"):
        with pytest.raises(config.ConfigError):
            config.parse_label(bad)
    assert config.matches({"site": "a", "x": "y"}, {"site": "a"})
    assert not config.matches({"site": "b"}, {"site": "a"})
