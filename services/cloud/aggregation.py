"""FedAvg over deltas, folded one update at a time so memory stays O(model size)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

Loader = Callable[[], Mapping[str, np.ndarray]]


def fedavg(base: Mapping[str, np.ndarray], updates: Iterable[tuple[int, Loader]]) -> dict[str, np.ndarray]:
    """base + sum(n_i * delta_i) / sum(n_i); each delta is loaded only when folded in."""
    total = {name: np.zeros_like(array, dtype=np.float32) for name, array in base.items()}
    weight = 0
    for num_examples, load in updates:
        delta = load()
        for name, acc in total.items():
            acc += np.float32(num_examples) * delta[name]
        weight += num_examples
    if weight <= 0:
        raise ValueError("fedavg needs at least one update with examples")
    return {name: (base[name] + total[name] / np.float32(weight)).astype(base[name].dtype) for name in base}
