"""Coordinate-wise rules around the median: the median, the trimmed mean, and the mean
around the median.

The median and the trimmed mean weigh every agent alike (an attacker could claim any
example count). The mean around the median weighs by example counts capped at the
round's median count (`capped_weights`): what it keeps of a coordinate is no farther
from the median than the farthest honest value, so the weights only mix values the
honest ones bound, and no agent, whatever it claims, weighs more than the median one.

The mean around the median (MeaMed; Xie, Koyejo and Gupta, "Generalized
Byzantine-tolerant SGD", 2018) is a trimmed mean that cuts f values per coordinate,
the f farthest from the median, rather than f from each end. With non-IID agents the
honest values of a coordinate disagree, and f attackers all on one side (a sign flip)
shift the trimmed mean's rank window by f places towards them, and the median by f/2:
a bias of the order of the honest spread, in every coordinate, every round. Cutting
around the median drops those attackers instead of f honest values from the other end.
On the reference workload (8 agents, 2 sending -10x their update, 10 rounds, seed 1)
it ends at 0.913 where the trimmed mean ends at 0.800 and the median at 0.762.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cloud.aggregation.base import Round, Rule, register
from cloud.aggregation.defence import Defence


@register
class Median(Rule):
    """The coordinate-wise median."""

    name = "median"

    def problems(self, defence: Defence, n: int) -> list[str]:
        f = defence.hostile
        if 2 * f >= n:
            return [f"the median of {n} updates cannot outvote {f} hostile agents: it needs n > 2f"]
        return []

    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        out: np.ndarray = np.median(stack, axis=0).astype(np.float32)
        return out


@register
class TrimmedMean(Rule):
    """Per coordinate, the mean of what is left after cutting `trim_fraction` of the
    values from each end."""

    name = "trimmed_mean"
    parameters = frozenset({"trim_fraction"})

    def problems(self, defence: Defence, n: int) -> list[str]:
        f, fraction = defence.hostile, defence.trim_fraction
        if fraction * n < f:
            return [f"a trimmed mean cutting {fraction:g} of {n} updates from each end cuts "
                    f"{math.floor(fraction * n)}, fewer than the {f} hostile agents: "
                    f"trim_fraction must be >= f/n = {f / n:.3f}"]
        return []

    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        n = round_.n
        cut = math.floor(round_.defence.trim_fraction * n)
        ordered = np.sort(stack, axis=0)
        out: np.ndarray = ordered[cut : n - cut].mean(axis=0, dtype=np.float64).astype(np.float32)
        return out


@register
class MeanAroundMedian(Rule):
    """Per coordinate, the mean of the n - f values nearest the median, weighted by
    example counts capped at the median count."""

    name = "mean_around_median"

    def problems(self, defence: Defence, n: int) -> list[str]:
        f = defence.hostile
        if f < 1:
            return ["the mean around the median cuts the hostile_agents values farthest from the median "
                    "in each coordinate: declare hostile_agents >= 1"]
        if 2 * f >= n:
            return [f"the mean around the median of {n} updates cannot outvote {f} hostile agents: "
                    "it needs n > 2f"]
        return []

    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        return mean_around_median(stack, round_.defence.hostile, capped_weights(round_.weights))


def capped_weights(weights: Sequence[float]) -> np.ndarray:
    """Example counts capped at the round's median count. With fewer than half the agents
    hostile the median lies between honest counts, so a hostile agent claiming any count
    weighs at most what the median agent does. All zero (no counts): every agent alike."""
    w = np.maximum(np.asarray(weights, np.float64), 0.0)
    if w.size == 0:
        return w
    capped: np.ndarray = np.minimum(w, np.median(w))
    return capped if capped.sum() > 0 else np.ones_like(w)


def mean_around_median(stack: np.ndarray, cut: int, weights: np.ndarray) -> np.ndarray:
    """Per coordinate, the `weights`-weighted mean of the n - cut values nearest the
    coordinate-wise median of `stack` ([n, ...]): a trimmed mean whose cut of `cut`
    values is split between the two ends so that what is kept sits around the median."""
    n = stack.shape[0]
    distance = np.abs(stack - np.median(stack, axis=0))
    nearest = np.argsort(distance, axis=0, kind="stable")[: n - cut]  # [n - cut, ...] update indices
    del distance
    total = np.zeros(stack.shape[1:], np.float64)
    mixed = np.zeros(stack.shape[1:], np.float64)
    plain = np.zeros(stack.shape[1:], np.float64)
    for rows in nearest:  # one kept rank at a time: n x one tensor of memory, not more
        value = np.take_along_axis(stack, rows[None], axis=0)[0]
        w = weights[rows]
        mixed += w * value
        total += w
        plain += value
    # Where every kept agent claimed no examples, they count alike.
    return np.where(total > 0, mixed / np.maximum(total, 1e-300), plain / len(nearest)).astype(np.float32)
