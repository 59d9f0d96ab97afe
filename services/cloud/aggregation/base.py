"""What an aggregation rule is, and the registry that finds one by the name a job gives.

A rule says whether it streams, what it needs to withstand f hostile agents out of n,
optionally which updates to keep, and how one tensor's values across the kept updates
become the aggregate. The driver (`cloud.robust.aggregate`) bounds norms, asks the rule
to select, then walks the tensors one at a time, so a rule never holds more than
(updates) x (one tensor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, TypeVar

import numpy as np

if TYPE_CHECKING:
    from cloud.aggregation.defence import Defence


@dataclass(frozen=True)
class Round:
    """What a rule sees of the round it aggregates."""

    n: int  # updates in the round
    names: Sequence[str]  # the model's tensors
    defence: Defence
    weights: Sequence[float]  # the example counts the agents claim (hostile ones may lie)
    stacked: Callable[[str], np.ndarray]  # one tensor of every update, norm-bounded: [n, ...] float32
    rng: np.random.Generator | None = None  # for rules that add noise; None: a fresh one


class Rule(ABC):
    """One aggregation rule. Subclass it, set `name`, override `aggregate` (and
    `problems` if it withstands hostile agents only under conditions), and `@register` it."""

    name: ClassVar[str]
    # The running sum of updates as they arrive suffices (cloud.accumulator): no update
    # files are read at the close. Only the example-weighted mean can.
    streams: ClassVar[bool] = False
    # The Defence fields this rule reads beyond `hostile`; setting another rule's is refused.
    parameters: ClassVar[frozenset[str]] = frozenset()
    # DP-FedAvg's noise can be added to it: its output is a sum over agents divided by n.
    private: ClassVar[bool] = False

    def problems(self, defence: Defence, n: int) -> list[str]:
        """Why this rule cannot withstand `defence.hostile` of `n` updates (empty: it can)."""
        return []

    def select(self, round_: Round) -> list[int] | None:
        """The updates to aggregate, in ascending order (None: all of them)."""
        return None

    @abstractmethod
    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        """One tensor's aggregate (float32) from its values in the selected updates, `stack` [k, ...]."""


_RULES: dict[str, Rule] = {}

R = TypeVar("R", bound=Rule)


def register(cls: type[R]) -> type[R]:
    """Class decorator: jobs may name the rule `cls.name` as their aggregator from now on."""
    if cls.name in _RULES:
        raise ValueError(f"aggregator {cls.name!r} is registered already")
    _RULES[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget a rule (tests register toy rules and take them out again)."""
    del _RULES[name]


def names() -> list[str]:
    """Every registered rule's name, in the order they were registered (the default first)."""
    return list(_RULES)


def get(name: str) -> Rule:
    try:
        return _RULES[name]
    except KeyError:
        raise KeyError(f"unknown aggregator {name!r}; known: {names()}") from None
