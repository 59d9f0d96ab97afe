"""What an edge agent's Inference server answered between two heartbeats, per model
version: the serving signals (coordinator.proto, `ServingSignals`) by which the
coordinator judges a staged rollout's canary (issue 16).

Sums and counts only, never rates or means, so that the coordinator adds intervals
and agents up. This module owns the counters; the router (edge.router) and the
canary's comparison (edge.shadow) feed them, the heartbeat (edge.agent) drains them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tandem import metrics
from tandem.staged import StagedModel
from tandem.v1 import coordinator_pb2 as pb


@dataclass(frozen=True)
class Comparison:
    """One batch of a canary's answers compared with the previous version's (edge.shadow)."""

    rows: int
    agreed: int
    confidence: float = 0.0  # sums over the rows of each version's top-class probability
    previous_confidence: float = 0.0


@dataclass
class _Counts:
    requests: int = 0
    errors: int = 0
    latency_seconds: float = 0.0
    previous_version: int = 0
    compared: int = 0
    agreed: int = 0
    confidence: float = 0.0
    previous_confidence: float = 0.0


class Signals:
    """The counters since the last `drain`, per (model, version)."""

    def __init__(self, served: Callable[[], Iterable[StagedModel]]) -> None:
        self._served = served  # the versions served now: each gets an entry, requests or not
        self._counts: dict[tuple[str, int], _Counts] = {}

    def answered(self, model: str, version: int, seconds: float, failed: bool) -> None:
        """One request that `version` answered (or failed, `failed`) in `seconds`."""
        counts = self._entry(model, version)
        counts.requests += 1
        counts.errors += int(failed)
        counts.latency_seconds += seconds

    def compared(self, model: str, version: int, previous_version: int, comparison: Comparison) -> None:
        """`version`'s answers compared with `previous_version`'s on the same inputs."""
        counts = self._entry(model, version)
        if counts.previous_version != previous_version:
            # Compared with another version earlier in the interval (a rollback and a new
            # rollout since): the message has room for one, the newest.
            counts.previous_version, counts.compared, counts.agreed = previous_version, 0, 0
            counts.confidence = counts.previous_confidence = 0.0
        counts.compared += comparison.rows
        counts.agreed += comparison.agreed
        counts.confidence += comparison.confidence
        counts.previous_confidence += comparison.previous_confidence

    def drain(self) -> list[pb.ServingSignals]:
        """The signals since the last drain, and zero them: one entry for every version
        served now (requests may be 0) and for every other version that answered."""
        for served in self._served():
            self._entry(served.model, served.version)
        counts, self._counts = self._counts, {}
        drained = []
        for (model, version), c in sorted(counts.items()):
            if c.compared:
                metrics.EDGE_CANARY_AGREEMENT.labels(model).set(c.agreed / c.compared)
            drained.append(pb.ServingSignals(
                model=model, version=version, requests=c.requests, errors=c.errors, latency_seconds=c.latency_seconds,
                previous_version=c.previous_version, compared=c.compared, agreed=c.agreed, confidence=c.confidence,
                previous_confidence=c.previous_confidence,
            ))
        return drained

    def _entry(self, model: str, version: int) -> _Counts:
        counts = self._counts.get((model, version))
        if counts is None:
            counts = self._counts[(model, version)] = _Counts()
        return counts
