"""The median family of rules: numeric kernels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
