"""A staged rollout's policy and its verdict: plain values and arithmetic, no state.

A canary is judged on what the agents serving it report (`ServingSignals`, summed over
heartbeats and agents) against two references (docs/lifecycle.md, "Staged rollout"):
the rest of the fleet, which keeps serving the previous version over the same time
(error rate, latency), and the previous version itself, which each canary agent runs
on a sample of the same inputs after answering (agreement, confidence). No labels are
needed: a version that answers garbage disagrees with the one it replaces.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from tandem.errors import InvalidArgument
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb

# Agreement and confidence over fewer rows than this are noise: not judged.
MIN_COMPARED = 10
MAX_WINDOW_SECONDS = 7 * 86_400
_SHARE = re.compile(r"^(\d+(?:\.\d+)?)%$")
_AGENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


@dataclass(frozen=True)
class RolloutPolicy:
    """Who serves a promoted version first, for how long, and what counts as a regression
    (`admin_pb2.RolloutPolicy`; numbers left unset there take these defaults)."""

    canary: str = ""  # "N%" of the agents serving the model, or "a,b": agent names; "": no canary
    window: float = 60.0
    min_requests: int = 20
    max_error_rate: float = 0.01
    max_latency_ratio: float = 3.0
    min_agreement: float = 0.5
    max_confidence_drop: float = 0.2

    @property
    def staged(self) -> bool:
        return bool(self.canary)

    @property
    def share(self) -> float | None:
        """The canary's share of the agents serving the model (None: named agents)."""
        match = _SHARE.match(self.canary)
        return float(match.group(1)) / 100 if match else None

    @property
    def agents(self) -> tuple[str, ...]:
        return () if self.share is not None or not self.canary else tuple(self.canary.split(","))

    def validate(self) -> RolloutPolicy:
        if self.canary:
            share = self.share
            if share is not None:
                _check(0 < share <= 1, f"canary share must be in (0%, 100%], got {self.canary!r}")
            else:
                bad = [name for name in self.agents if not _AGENT.match(name)]
                _check(not bad, f"canary must be 'N%' or agent names 'a,b', got {self.canary!r}")
        _check(math.isfinite(self.window) and 0 < self.window <= MAX_WINDOW_SECONDS,
               f"canary window must be in (0, {MAX_WINDOW_SECONDS}] seconds, got {self.window}")
        _check(1 <= self.min_requests <= 10**9, f"canary min_requests must be >= 1, got {self.min_requests}")
        for name, value, top in (("max_error_rate", self.max_error_rate, 1.0),
                                 ("min_agreement", self.min_agreement, 1.0),
                                 ("max_confidence_drop", self.max_confidence_drop, 1.0),
                                 ("max_latency_ratio", self.max_latency_ratio, 1e6)):
            _check(math.isfinite(value) and 0 <= value <= top, f"canary {name} must be in [0, {top:g}], got {value}")
        _check(self.max_latency_ratio >= 1, f"canary max_latency_ratio must be >= 1, got {self.max_latency_ratio}")
        return self

    @classmethod
    def from_proto(cls, msg: admin_pb2.RolloutPolicy) -> RolloutPolicy:
        d = cls()

        def given(name: str, default: float) -> float:
            return float(getattr(msg, name)) if msg.HasField(name) else default

        return cls(
            canary=msg.canary.strip(), window=given("window_seconds", d.window),
            min_requests=int(given("min_requests", d.min_requests)),
            max_error_rate=given("max_error_rate", d.max_error_rate),
            max_latency_ratio=given("max_latency_ratio", d.max_latency_ratio),
            min_agreement=given("min_agreement", d.min_agreement),
            max_confidence_drop=given("max_confidence_drop", d.max_confidence_drop),
        ).validate()

    def to_proto(self) -> admin_pb2.RolloutPolicy:
        return admin_pb2.RolloutPolicy(
            canary=self.canary, window_seconds=self.window, min_requests=self.min_requests,
            max_error_rate=self.max_error_rate, max_latency_ratio=self.max_latency_ratio,
            min_agreement=self.min_agreement, max_confidence_drop=self.max_confidence_drop)


@dataclass
class Totals:
    """ServingSignals summed over heartbeats and agents."""

    requests: int = 0
    errors: int = 0
    latency_seconds: float = 0.0
    compared: int = 0
    agreed: int = 0
    confidence: float = 0.0
    previous_confidence: float = 0.0

    def add(self, s: pb.ServingSignals) -> None:
        self.requests += max(s.requests, 0)
        self.errors += max(s.errors, 0)
        self.latency_seconds += max(s.latency_seconds, 0.0) if math.isfinite(s.latency_seconds) else 0.0
        self.compared += max(s.compared, 0)
        self.agreed += min(max(s.agreed, 0), max(s.compared, 0))
        for name in ("confidence", "previous_confidence"):
            value = getattr(s, name)
            if math.isfinite(value) and value >= 0:
                setattr(self, name, getattr(self, name) + value)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def latency(self) -> float:
        return self.latency_seconds / self.requests if self.requests else 0.0

    @property
    def agreement(self) -> float:
        return self.agreed / self.compared if self.compared else 1.0

    @property
    def confidence_drop(self) -> float:
        return (self.previous_confidence - self.confidence) / self.compared if self.compared else 0.0

    def to_proto(self, model: str, version: int, previous: int = 0) -> pb.ServingSignals:
        return pb.ServingSignals(
            model=model, version=version, requests=self.requests, errors=self.errors,
            latency_seconds=self.latency_seconds, previous_version=previous, compared=self.compared,
            agreed=self.agreed, confidence=self.confidence, previous_confidence=self.previous_confidence)


class Verdict(StrEnum):
    WAIT = "wait"
    PROCEED = "proceed"
    ROLL_BACK = "roll back"


def judge(policy: RolloutPolicy, canary: Totals, baseline: Totals, elapsed: float) -> tuple[Verdict, str]:
    """What to do with a rollout now, and why. A regression rolls back as soon as the
    evidence is in; a healthy canary proceeds only once its window has passed."""
    if canary.requests < policy.min_requests:
        return Verdict.WAIT, f"waiting for traffic: the canary answered {canary.requests} of {policy.min_requests} requests"
    regressions = []
    if canary.error_rate > baseline.error_rate + policy.max_error_rate:
        regressions.append(f"error rate {canary.error_rate:.3f} > the fleet's {baseline.error_rate:.3f} "
                           f"+ {policy.max_error_rate:g}")
    if baseline.requests >= policy.min_requests and canary.latency > policy.max_latency_ratio * baseline.latency:
        regressions.append(f"mean latency {canary.latency * 1e3:.1f} ms > {policy.max_latency_ratio:g} x the "
                           f"fleet's {baseline.latency * 1e3:.1f} ms")
    if canary.compared >= MIN_COMPARED:
        if canary.agreement < policy.min_agreement:
            regressions.append(f"agreement with the previous version {canary.agreement:.2f} < "
                               f"{policy.min_agreement:g} on {canary.compared} rows")
        if canary.confidence_drop > policy.max_confidence_drop:
            regressions.append(f"mean confidence fell by {canary.confidence_drop:.2f} > "
                               f"{policy.max_confidence_drop:g} on {canary.compared} rows")
    if regressions:
        return Verdict.ROLL_BACK, "; ".join(regressions)
    summary = (f"{canary.requests} requests, error rate {canary.error_rate:.3f}, mean latency "
               f"{canary.latency * 1e3:.1f} ms" + (f", agreement {canary.agreement:.2f} on {canary.compared} rows"
                                                   if canary.compared else ""))
    if elapsed < policy.window:
        return Verdict.WAIT, f"healthy so far ({summary}); window ends in {policy.window - elapsed:.0f} s"
    return Verdict.PROCEED, f"canary healthy over {elapsed:.0f} s: {summary}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)
