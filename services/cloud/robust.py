"""Aggregation that hostile agents cannot steer, and client-level differential privacy.

A job's `Defence` picks the aggregator (mean, coordinate-wise median, trimmed mean,
mean around the median, Krum or Multi-Krum), an optional bound on each update's L2
norm (fixed, or the median norm of the round), and optionally DP-FedAvg noise. Plain
FedAvg streams: each update is folded into a running sum as it arrives (`Accumulator`).
These cannot: they need every update of the round at once. They run at the round's close over the
updates' durable files, one tensor at a time, so the memory they take is bounded by
(updates in the round) x (largest tensor), never by (updates) x (model).

Robust aggregators weigh every agent alike (an attacker could claim any example
count); FedAvg weighs by examples. The mean around the median weighs by example
counts capped at the round's median count (`capped_weights`): what it keeps of a
coordinate is no farther from the median than the farthest honest value, so the
weights only mix values the honest ones bound, and no agent, whatever it claims,
weighs more than the median one.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.aggregation.krum import krum_choice
from cloud.aggregation.median import capped_weights, mean_around_median
from cloud.store import UpdateRow
from cloud.tensorfile import TensorFile
from tandem import compression
from tandem.codec import TensorSpec

AGGREGATORS = ("mean", "median", "trimmed_mean", "mean_around_median", "krum", "multi_krum")

# One update's dense value of one tensor: (update index, tensor name) -> array.
Dense = Callable[[int, str], np.ndarray]


@dataclass(frozen=True)
class Defence:
    aggregator: str = "mean"
    trim_fraction: float = 0.0  # trimmed mean: the fraction cut from each end, per coordinate
    hostile: int = 0  # agents per round the job must tolerate (f)
    krum_selected: int = 0  # multi_krum: updates averaged (m); 0: n - f
    clip_norm: float = 0.0  # bound on each update's L2 norm; 0: none
    clip_to_median: bool = False  # bound each round at the median norm of its updates
    dp_noise_multiplier: float = 0.0  # z: Gaussian noise of std z * clip_norm on the sum; 0: no DP
    dp_delta: float = 1e-5

    @property
    def streams(self) -> bool:
        """Plain FedAvg: the running sum suffices."""
        return self.aggregator == "mean" and not self.clips and not self.private

    @property
    def clips(self) -> bool:
        return self.clip_norm > 0 or self.clip_to_median

    @property
    def private(self) -> bool:
        return self.dp_noise_multiplier > 0

    def problems(self, n: int) -> list[str]:
        """Why these settings cannot defend a round of `n` updates against `hostile` of
        them (empty: they can). `n` is the fewest updates a round may close with."""
        f, out = self.hostile, []
        if self.aggregator not in AGGREGATORS:
            return [f"unknown aggregator {self.aggregator!r}; known: {list(AGGREGATORS)}"]
        if not 0 <= self.trim_fraction < 0.5:
            out.append(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.trim_fraction and self.aggregator != "trimmed_mean":
            out.append("trim_fraction is the trimmed mean's parameter: use aggregator trimmed_mean")
        if f < 0:
            out.append(f"hostile agents must be >= 0, got {f}")
        if self.aggregator == "trimmed_mean" and self.trim_fraction * n < f:
            out.append(f"a trimmed mean cutting {self.trim_fraction:g} of {n} updates from each end cuts "
                       f"{math.floor(self.trim_fraction * n)}, fewer than the {f} hostile agents: "
                       f"trim_fraction must be >= f/n = {f / n:.3f}")
        if self.aggregator == "median" and 2 * f >= n:
            out.append(f"the median of {n} updates cannot outvote {f} hostile agents: it needs n > 2f")
        if self.aggregator == "mean_around_median":
            if f < 1:
                out.append("the mean around the median cuts the hostile_agents values farthest from the median "
                           "in each coordinate: declare hostile_agents >= 1")
            elif 2 * f >= n:
                out.append(f"the mean around the median of {n} updates cannot outvote {f} hostile agents: "
                           "it needs n > 2f")
        if self.aggregator in ("krum", "multi_krum") and n <= 2 * f + 2:
            out.append(f"Krum needs n > 2f + 2 updates per round: n = {n}, f = {f}")
        if self.aggregator == "mean" and f > 0 and not self.clips:
            out.append(f"a plain mean tolerates no hostile agent ({f} declared): choose median, trimmed_mean, "
                       "krum or multi_krum, or bound the norms")
        if self.krum_selected and (self.aggregator != "multi_krum" or not 1 <= self.krum_selected <= n - f):
            out.append(f"krum_selected must be in 1..n-f = {n - f} with aggregator multi_krum, "
                       f"got {self.krum_selected}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            out.append(f"clip_norm must be >= 0, got {self.clip_norm}")
        if self.clip_norm and self.clip_to_median:
            out.append("clip_norm and clip_to_median exclude each other")
        if self.private:
            if not math.isfinite(self.dp_noise_multiplier):
                out.append("dp_noise_multiplier must be finite")
            if not self.clip_norm:
                out.append("differential privacy needs a fixed clip_norm (a bound derived from the updates "
                           "would leak them)")
            if self.aggregator != "mean":
                out.append("differential privacy (DP-FedAvg) adds noise to the mean: use aggregator mean")
            if not 0 < self.dp_delta < 1:
                out.append(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        return out


def norms(dense: Dense, n: int, names: Sequence[str]) -> np.ndarray:
    """Each update's L2 norm over all its tensors."""
    squares = np.zeros(n, np.float64)
    for name in names:
        for i in range(n):
            squares[i] += float(np.square(dense(i, name), dtype=np.float64).sum())
    return np.sqrt(squares)


def clip_scales(update_norms: np.ndarray, bound: float) -> np.ndarray:
    """Per update, the factor that brings its norm down to `bound` (1 where it is within)."""
    scales: np.ndarray = np.minimum(1.0, bound / np.maximum(update_norms, 1e-30)).astype(np.float32)
    return scales


def _stack(dense: Dense, rows: Sequence[int], name: str, scales: np.ndarray) -> np.ndarray:
    return np.stack([scales[i] * dense(i, name) for i in rows])


def aggregate(
    dense: Dense, n: int, names: Sequence[str], defence: Defence, weights: Sequence[float],
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], Report]:
    """The round's aggregate delta, tensor by tensor from `dense`, and what was done."""
    scales = np.ones(n, np.float32)
    report = Report(n=n)
    if defence.clips:
        update_norms = norms(dense, n, names)
        bound = defence.clip_norm or float(np.median(update_norms))
        scales = clip_scales(update_norms, bound)
        report.clip_bound, report.clipped = bound, int((scales < 1).sum())
    rows = list(range(n))
    if defence.aggregator in ("krum", "multi_krum"):
        distances = np.zeros((n, n), np.float64)
        for name in names:
            stack = _stack(dense, rows, name, scales).reshape(n, -1).astype(np.float64)
            sq = np.square(stack).sum(axis=1)
            distances += np.maximum(sq[:, None] + sq[None, :] - 2 * stack @ stack.T, 0)
        m = 1 if defence.aggregator == "krum" else (defence.krum_selected or n - defence.hostile)
        rows = krum_choice(distances, defence.hostile, m)
        report.selected = rows
    out: dict[str, np.ndarray] = {}
    w = np.asarray(weights, np.float64)
    capped = capped_weights(weights)
    for name in names:
        stack = _stack(dense, rows, name, scales)
        if defence.aggregator == "median":
            out[name] = np.median(stack, axis=0).astype(np.float32)
        elif defence.aggregator == "trimmed_mean":
            cut = math.floor(defence.trim_fraction * n)
            ordered = np.sort(stack, axis=0)
            out[name] = ordered[cut : n - cut].mean(axis=0, dtype=np.float64).astype(np.float32)
        elif defence.aggregator == "mean_around_median":
            out[name] = mean_around_median(stack, defence.hostile, capped)
        elif defence.aggregator in ("krum", "multi_krum"):
            out[name] = stack.mean(axis=0, dtype=np.float64).astype(np.float32)
        elif defence.private:
            # DP-FedAvg: every agent counts alike, the noise hides any one agent's clipped update.
            noise = (rng or np.random.default_rng()).normal(
                0.0, defence.dp_noise_multiplier * defence.clip_norm, size=stack.shape[1:])
            out[name] = ((stack.sum(axis=0, dtype=np.float64) + noise) / n).astype(np.float32)
        else:  # the example-weighted mean of the clipped updates
            mixed = np.tensordot(w / w.sum(), stack.astype(np.float64), axes=1)
            out[name] = mixed.astype(np.float32)
    return out, report


@dataclass
class Report:
    n: int
    clip_bound: float = 0.0
    clipped: int = 0
    selected: list[int] | None = None  # Krum: the updates averaged


def dense_from(updates: Sequence[Mapping[str, np.ndarray]]) -> Dense:
    """`Dense` over in-memory dense updates (the tests')."""
    return lambda i, name: updates[i][name]


class UpdateFiles:
    """`dense(i, name)` over a round's durable update files: one tensor of one update
    read and decoded at a time (any codec), so a pass over the round holds n x one tensor."""

    def __init__(self, updates: Sequence[UpdateRow], specs: Mapping[str, TensorSpec]) -> None:
        self._updates = updates
        self._specs = specs
        self._files: list[Mapping[str, np.ndarray]] = []

    def __enter__(self) -> UpdateFiles:
        for update in self._updates:
            if update.path is None:
                raise ValueError(f"the update of {update.agent} has no file left to aggregate")
            self._files.append(TensorFile(Path(update.path)).arrays())
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.clear()

    def dense(self, i: int, name: str) -> np.ndarray:
        out = np.zeros(self._specs[name].shape, np.float32)
        compression.accumulate(out, name, self._files[i], compression.parse_codec(self._updates[i].codec), 1.0)
        return out
