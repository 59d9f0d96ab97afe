"""Adding an aggregation rule or a server strategy is one class in one place: the
registries feed JobSpec validation, the aggregation driver and the names clients see."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud import aggregation, strategies
from cloud.aggregation import Defence
from cloud.robust import aggregate, dense_from
from cloud.spec import JobSpec, ServerStrategy
from tandem.errors import InvalidArgument

ADMIN_PROTO = Path(__file__).resolve().parents[2] / "protos" / "tandem" / "v1" / "admin.proto"


@pytest.fixture
def coordinate_max() -> Iterator[str]:
    @aggregation.register
    class CoordinateMax(aggregation.Rule):
        """Per coordinate, the largest value. Withstands nobody, and says so."""

        name = "coordinate_max"

        def problems(self, defence: aggregation.Defence, n: int) -> list[str]:
            f = defence.hostile
            return [f"the largest value is any hostile agent's choice ({f} declared)"] if f > 0 else []

        def aggregate(self, stack: np.ndarray, round_: aggregation.Round) -> np.ndarray:
            out: np.ndarray = stack.max(axis=0)
            return out

    yield CoordinateMax.name
    aggregation.unregister(CoordinateMax.name)


def test_a_rule_registered_here_is_validated_and_aggregates(coordinate_max: str) -> None:
    spec = JobSpec(model="mlp", rounds=1, min_clients=3, defence=Defence(coordinate_max)).validate()
    assert coordinate_max in aggregation.names()
    assert not spec.defence.streams  # the close reads every update and calls the rule
    updates = [{"w": np.array([1.0, 5.0], np.float32)}, {"w": np.array([3.0, -2.0], np.float32)},
               {"w": np.array([2.0, 0.0], np.float32)}]
    out, report = aggregate(dense_from(updates), 3, ["w"], spec.defence, [1.0, 1.0, 1.0])
    assert out["w"].tolist() == [3.0, 5.0]
    assert report.selected is None
    with pytest.raises(InvalidArgument, match=r"the largest value is any hostile agent's choice \(1 declared\)"):
        JobSpec(model="mlp", rounds=1, min_clients=3, defence=Defence(coordinate_max, hostile=1)).validate()


def test_a_rule_taken_out_again_is_unknown() -> None:
    """The fixture unregisters its rule: whatever ran before, the name is free."""
    with pytest.raises(InvalidArgument, match=r"unknown aggregator 'coordinate_max'; known: \['mean', 'median', "):
        JobSpec(model="mlp", rounds=1, min_clients=3, defence=Defence("coordinate_max")).validate()


@pytest.fixture
def half_step() -> Iterator[str]:
    @strategies.register
    class HalfStep(strategies.FedAvg):
        """FedAvg with half the step by default."""

        name = "half_step"

        @classmethod
        def default_lr(cls, codec: str) -> float:
            return 0.5

    yield HalfStep.name
    strategies.unregister(HalfStep.name)


def test_a_strategy_registered_here_is_validated_and_steps(half_step: str) -> None:
    spec = JobSpec(model="mlp", rounds=1, min_clients=1, strategy=ServerStrategy(half_step)).validate()
    lr = spec.strategy.effective_server_lr(spec.transport.codec)
    assert lr == 0.5
    step = strategies.get(spec.strategy.name)(lr).step({"w": np.ones(2, np.float32)})
    assert step["w"].tolist() == [0.5, 0.5]
    with pytest.raises(InvalidArgument, match="mu is FedProx's parameter"):
        JobSpec(model="mlp", rounds=1, min_clients=1, strategy=ServerStrategy(half_step, mu=0.1)).validate()


def test_a_name_is_registered_once() -> None:
    with pytest.raises(ValueError, match="registered already"):
        aggregation.register(aggregation.Median)
    with pytest.raises(ValueError, match="registered already"):
        strategies.register(strategies.FedAdam)


def test_the_built_in_names_and_the_admin_api_comments_agree() -> None:
    assert aggregation.names() == ["mean", "median", "trimmed_mean", "mean_around_median", "krum", "multi_krum"]
    assert strategies.names() == ["fedavg", "fedprox", "fedadam", "fedyogi"]
    proto = ADMIN_PROTO.read_text()
    for field, names in (("aggregator", aggregation.names()), ("strategy", strategies.names())):
        comment = re.search(rf"((?:\s*//.*\n)+)\s*string {field} = \d+;", proto)
        assert comment is not None, field
        assert re.findall(r'"(\w+)"', comment.group(1)) == names, field
