"""FedAvg's mean, the default rule: weighted by examples, and the sum DP-FedAvg adds noise to."""

from __future__ import annotations

import numpy as np

from cloud.aggregation.base import Round, Rule, register
from cloud.aggregation.defence import Defence


@register
class Mean(Rule):
    """The example-weighted mean. Unbounded, it streams (the accumulator's running sum
    is this rule); with bounded norms or DP it runs at the round's close over the files."""

    name = "mean"
    streams = True
    private = True

    def problems(self, defence: Defence, n: int) -> list[str]:
        if defence.hostile > 0 and not defence.clips:
            return [f"a plain mean tolerates no hostile agent ({defence.hostile} declared): choose median, "
                    "trimmed_mean, krum or multi_krum, or bound the norms"]
        return []

    def aggregate(self, stack: np.ndarray, round_: Round) -> np.ndarray:
        defence = round_.defence
        if defence.private:
            # DP-FedAvg: every agent counts alike, the noise hides any one agent's clipped update.
            noise = (round_.rng or np.random.default_rng()).normal(
                0.0, defence.dp_noise_multiplier * defence.clip_norm, size=stack.shape[1:])
            out: np.ndarray = ((stack.sum(axis=0, dtype=np.float64) + noise) / round_.n).astype(np.float32)
            return out
        w = np.asarray(round_.weights, np.float64)
        mixed = np.tensordot(w / w.sum(), stack.astype(np.float64), axes=1)
        return mixed.astype(np.float32)
