"""Krum and Multi-Krum: numeric kernels."""

from __future__ import annotations

import numpy as np


def krum_choice(distances: np.ndarray, f: int, m: int) -> list[int]:
    """Multi-Krum (Blanchard et al., 2017): score each update by the summed squared
    distance to its n - f - 2 nearest others; the m best-scored are averaged."""
    n = distances.shape[0]
    k = max(1, n - f - 2)
    scores = []
    for i in range(n):
        others = np.delete(distances[i], i)
        scores.append(float(np.sort(others)[:k].sum()))
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())
