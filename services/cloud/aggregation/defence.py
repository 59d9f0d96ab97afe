"""A job's aggregation settings: the rule, bounds on update norms and on claimed example
counts, DP-FedAvg noise, and whether they can withstand the hostile agents the job declares."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cloud.aggregation.base import Rule, get, names


@dataclass(frozen=True)
class Defence:
    aggregator: str = "mean"
    trim_fraction: float = 0.0  # trimmed mean: the fraction cut from each end, per coordinate
    hostile: int = 0  # agents per round the job must tolerate (f)
    krum_selected: int = 0  # multi_krum: updates averaged (m); 0: n - f
    clip_norm: float = 0.0  # bound on each update's L2 norm; 0: none
    clip_to_median: bool = False  # bound each round at the median norm of its updates
    dp_noise_multiplier: float = 0.0  # z: Gaussian noise of std z * clip_norm on the sum; 0: no DP
    dp_delta: float = 1e-5
    # What one agent's claimed example count may do (issue 14): an update claiming more
    # than max_examples is refused, and every update weighs at most weight_cap x the
    # round's median claimed count, whatever the aggregator. At 1.0 an agent claiming
    # any count moves a round no more than an honest agent with the median count would;
    # honest agents above the median count weigh as the median one (no change on
    # balanced partitions; raise it for skewed ones whose agents are trusted).
    max_examples: int = 100_000_000
    weight_cap: float = 1.0

    @property
    def rule(self) -> Rule:
        return get(self.aggregator)

    @property
    def streams(self) -> bool:
        """Plain FedAvg: the running sum suffices."""
        return self.aggregator in names() and self.rule.streams and not self.clips and not self.private

    @property
    def clips(self) -> bool:
        return self.clip_norm > 0 or self.clip_to_median

    @property
    def private(self) -> bool:
        return self.dp_noise_multiplier > 0

    @property
    def partials_refused(self) -> str:
        """Why this aggregation cannot take a region's partial aggregate ("" if it can): a
        median, a trimmed mean, Krum, per-update clipping and DP need each agent's own
        update, which a weighted sum does not give."""
        if self.streams:
            return ""
        why = (f"aggregator {self.aggregator}" if not self.rule.streams else
               "differential privacy" if self.private else "clipping each update's norm")
        return (f"this job's aggregation ({why}) needs each agent's own update, which a region's partial aggregate "
                "(a sum) does not give: its agents must upload to this coordinator, or the region aggregate robustly "
                "and the job average regions in a job of its own")

    def problems(self, n: int) -> list[str]:
        """Why these settings cannot defend a round of `n` updates against `hostile` of
        them (empty: they can). `n` is the fewest updates a round may close with."""
        f, out = self.hostile, []
        if self.aggregator not in names():
            return [f"unknown aggregator {self.aggregator!r}; known: {names()}"]
        rule = self.rule
        if not 0 <= self.trim_fraction < 0.5:
            out.append(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.trim_fraction and "trim_fraction" not in rule.parameters:
            out.append("trim_fraction is the trimmed mean's parameter: use aggregator trimmed_mean")
        if f < 0:
            out.append(f"hostile agents must be >= 0, got {f}")
        out += rule.problems(self, n)
        if self.krum_selected and ("krum_selected" not in rule.parameters or not 1 <= self.krum_selected <= n - f):
            out.append(f"krum_selected must be in 1..n-f = {n - f} with aggregator multi_krum, "
                       f"got {self.krum_selected}")
        if not 1 <= self.max_examples <= 1 << 40:
            out.append(f"max_examples must be in 1..2^40, got {self.max_examples}")
        if not (math.isfinite(self.weight_cap) and 1.0 <= self.weight_cap <= 1e6):
            out.append(f"weight_cap must be in [1, 1e6] (a multiple of the median example count), "
                       f"got {self.weight_cap}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm >= 0):
            out.append(f"clip_norm must be >= 0, got {self.clip_norm}")
        if self.clip_norm and self.clip_to_median:
            out.append("clip_norm and clip_to_median exclude each other")
        if self.private:
            if not math.isfinite(self.dp_noise_multiplier):
                out.append("dp_noise_multiplier must be finite")
            if not self.clip_norm:
                out.append("differential privacy needs a fixed clip_norm (a bound derived from the updates "
                           "would leak them)")
            if not rule.private:
                out.append("differential privacy (DP-FedAvg) adds noise to the mean: use aggregator mean")
            if not 0 < self.dp_delta < 1:
                out.append(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        return out
