"""What an agent's claimed example count may weigh in its round (issue 14).

FedAvg weighs each update by the examples its agent claims, and nothing but the agent
vouches for that number: one agent claiming 2^40 examples would own the round. So every
update weighs at most `factor` x the round's median claimed count, whatever the
aggregator. With fewer than half the agents lying the median lies between honest
counts, so at factor 1 an agent claiming any count moves the round no more than an
honest agent with the median count would (an honest agent with more examples than the
median is weighed as the median one, too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Weighting:
    """A round's weights: each agent's claim, cut down to `cap`."""

    cap: float  # examples: the most any update weighs (factor x the median claim)
    weights: Mapping[str, float]  # agent -> the examples its update weighs
    capped: tuple[str, ...]  # agents whose claims were over the cap, sorted


def cap_of(counts: list[int], factor: float) -> float:
    """`factor` x the median of `counts` (0 for none)."""
    return factor * float(np.median(counts)) if counts else 0.0


def weighting(claims: Mapping[str, int], factor: float, exact: Mapping[str, int] | None = None) -> Weighting:
    """Each agent's claimed example count, capped at `factor` x the round's median claim;
    `exact` weights (regions' partial aggregates, whose agents' claims the region capped)
    are taken as they are, and count in neither the median nor the cap."""
    cap = cap_of(list(claims.values()), factor)
    return Weighting(
        cap=cap,
        weights={**{agent: min(float(n), cap) for agent, n in claims.items()},
                 **{member: float(n) for member, n in (exact or {}).items()}},
        capped=tuple(sorted(agent for agent, n in claims.items() if n > cap)),
    )
