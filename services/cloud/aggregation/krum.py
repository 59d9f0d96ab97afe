"""Krum and Multi-Krum (Blanchard et al., 2017): keep the updates nearest their
neighbours, average those. Each agent counts alike (an attacker could claim any
example count)."""

from __future__ import annotations

import numpy as np

from cloud.aggregation.base import Round, Rule, register
from cloud.aggregation.defence import Defence


@register
class Krum(Rule):
    """The one update whose n - f - 2 nearest others are nearest."""

    name = "krum"

    def problems(self, defence: Defence, n: int) -> list[str]:
        f = defence.hostile
        if n <= 2 * f + 2:
            return [f"Krum needs n > 2f + 2 updates per round: n = {n}, f = {f}"]
        return []

    def averaged(self, defence: Defence, n: int) -> int:
        """How many of the best-scored updates are averaged (m)."""
        return 1

    def select(self, round_: Round) -> list[int]:
        n = round_.n
        distances = np.zeros((n, n), np.float64)
        for name in round_.names:
            stack = round_.stacked(name).reshape(n, -1).astype(np.float64)
            sq = np.square(stack).sum(axis=1)
            distances += np.maximum(sq[:, None] + sq[None, :] - 2 * stack @ stack.T, 0)
        return krum_choice(distances, round_.defence.hostile, self.averaged(round_.defence, n))

    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        out: np.ndarray = stack.mean(axis=0, dtype=np.float64).astype(np.float32)
        return out


@register
class MultiKrum(Krum):
    """The mean of the `krum_selected` best-scored updates (0: n - f)."""

    name = "multi_krum"
    parameters = frozenset({"krum_selected"})

    def averaged(self, defence: Defence, n: int) -> int:
        return defence.krum_selected or n - defence.hostile


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
