"""A round's aggregate at its close: norm bounds, then the job's rule, one tensor at a time.

A job's `Defence` picks the rule (`cloud.aggregation`: mean, coordinate-wise median,
trimmed mean, mean around the median, Krum or Multi-Krum), an optional bound on each
update's L2 norm (fixed, or the median norm of the round), and optionally DP-FedAvg
noise. Plain FedAvg streams: each update is folded into a running sum as it arrives
(`Accumulator`). The rest cannot: they need every update of the round at once. They run
at the round's close over the updates' durable files, one tensor at a time, so the
memory they take is bounded by (updates in the round) x (largest tensor), never by
(updates) x (model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.aggregation import Defence, Round
from cloud.store import UpdateRow
from cloud.tensorfile import TensorFile
from tandem import compression
from tandem.wire import TensorSpec

# One update's dense value of one tensor: (update index, tensor name) -> array.
Dense = Callable[[int, str], np.ndarray]


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
    rule = defence.rule
    scales = np.ones(n, np.float32)
    report = Report(n=n)
    if defence.clips:
        update_norms = norms(dense, n, names)
        bound = defence.clip_norm or float(np.median(update_norms))
        scales = clip_scales(update_norms, bound)
        report.clip_bound, report.clipped = bound, int((scales < 1).sum())
    everyone = list(range(n))
    round_ = Round(n=n, names=names, defence=defence, weights=weights,
                   stacked=lambda name: _stack(dense, everyone, name, scales), rng=rng)
    report.selected = rule.select(round_)
    rows = everyone if report.selected is None else report.selected
    return {name: rule.aggregate(_stack(dense, rows, name, scales), round_) for name in names}, report


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
