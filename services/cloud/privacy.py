"""The privacy a DP-FedAvg job has spent: epsilon at its delta after a number of rounds.

Each round is one Gaussian mechanism on the sum of clipped updates, with noise
multiplier z. Agents are not sampled by a random process the accountant could
model (a round takes whoever is connected and selected), so no amplification by
sampling is claimed: the sampling rate is 1. Opacus' RDP accountant composes the
rounds.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    if noise_multiplier <= 0 or rounds <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # imported on first use: it loads much of opacus

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, rounds)]
    return float(accountant.get_epsilon(delta))
