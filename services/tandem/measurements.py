"""The names of the measurements an agent sends in its heartbeats, built and parsed
in this one place: the edge (agent, router, link monitor) writes them, the cloud
(placement controller, codec choice) reads them, and neither knows the other's code.

Plain names are constants; names about one served model are the small records
below, whose `key` is the name on the wire and which `parse` turns back into records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

EXAMPLES = "examples"  # local training examples the agent holds
AGENTS = "agents"  # a region's connected agents, now (its Hello says how many it had when it connected)
REGION_ROUND_SECONDS = "region_round_seconds"  # a region's last round: from its parent's task to its partial
TRAIN_SECONDS = "train_seconds"  # the last local training's wall time
# Throughput of training transfers (model downloads, update uploads), smoothed.
UPLINK_BYTES_PER_SECOND = "uplink_bytes_per_second"
DOWNLINK_BYTES_PER_SECOND = "downlink_bytes_per_second"
# The link as inference requests and idle probes measure it (edge.link).
RTT_SECONDS = "rtt_seconds"
LINK_UP = "link_up"  # 1.0 while the agent tries the cloud, 0.0 while it answers locally


def link_bytes_per_second(direction: str) -> str:
    """Throughput of the link in one direction ("up" or "down") as requests and probes measure it."""
    return f"link_{direction}_bytes_per_second"


LINK_UP_BYTES_PER_SECOND = link_bytes_per_second("up")

_STAGE_SECONDS = "stage_seconds"
_EXAMPLES_PER_SECOND = "examples_per_second"
_CONFIDENCE_BELOW = "confidence_below"


@dataclass(frozen=True)
class StageSeconds:
    """Seconds per example of one stage (1-based) of a model the agent serves."""

    model: str
    stage: int

    @property
    def key(self) -> str:
        return f"{_STAGE_SECONDS}:{self.model}:{self.stage}"


@dataclass(frozen=True)
class ExamplesPerSecond:
    """Rows per second the agent's applications ask of a model."""

    model: str

    @property
    def key(self) -> str:
        return f"{_EXAMPLES_PER_SECOND}:{self.model}"


@dataclass(frozen=True)
class ConfidenceBelow:
    """Share of a model's edge answers less sure than `level`: what a cascade at that
    threshold would send up."""

    model: str
    level: float

    @property
    def key(self) -> str:
        return f"{_CONFIDENCE_BELOW}:{self.model}:{self.level:g}"


PerModel: TypeAlias = StageSeconds | ExamplesPerSecond | ConfidenceBelow


def parse(name: str) -> PerModel | None:
    """The record a per-model name stands for; None for any other name, or a malformed
    one (heartbeats come from peers: a bad name is skipped, never an error)."""
    kind, _, rest = name.partition(":")
    if kind == _STAGE_SECONDS:
        model, _, stage = rest.rpartition(":")
        # isdecimal, not isdigit: int() refuses digits such as "²" that isdigit accepts.
        return StageSeconds(model, int(stage)) if stage.isdecimal() else None
    if kind == _EXAMPLES_PER_SECOND:
        return ExamplesPerSecond(rest)
    if kind == _CONFIDENCE_BELOW:
        model, _, level = rest.rpartition(":")
        try:
            return ConfidenceBelow(model, float(level))
        except ValueError:
            return None
    return None
