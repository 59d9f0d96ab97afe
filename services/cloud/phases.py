"""Where a round's wall time goes: a breakdown by phase that sums to the round's seconds.

The coordinator times what it does (dispatch; each update's upload, validation and
fold; the close, evaluation and publication); each agent reports what it did for its
update (`UpdateHeader.phase_seconds`: download, train, encode). The update folded in
last is the round's critical path: its phases are the round's, and what its timings do
not explain until it was folded in is "wait" (the task's delivery, the agent's start,
agents waiting for a CPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

AGENT_PHASES = ("download", "train", "encode")  # reported by agents
UPDATE_PHASES = ("upload", "validate", "fold")  # measured by the coordinator, per update
CLOSE_PHASES = ("close", "evaluate", "publish")
ORDER = ("dispatch", *AGENT_PHASES, *UPDATE_PHASES, "wait", *CLOSE_PHASES)
MAX_SECONDS = 1e6  # an agent's claim beyond this is not a duration


def agent_reported(phase_seconds: Mapping[str, float]) -> dict[str, float]:
    """The phases an agent's update header may report: known names, finite, non-negative."""
    return {name: float(value) for name, value in phase_seconds.items()
            if name in AGENT_PHASES and math.isfinite(value) and 0.0 <= value <= MAX_SECONDS}


@dataclass
class Arrival:
    """One update's timings: when it was folded in (time.time()) and its phases."""

    at: float
    phases: dict[str, float]


@dataclass
class RoundClock:
    """The timings of one open round, filled in as it runs; `breakdown` at its close."""

    dispatched: float | None = None  # when the last task of the current attempt was sent
    dispatch: float = 0.0  # seconds spent selecting agents and sending tasks, every attempt
    arrivals: dict[str, Arrival] = field(default_factory=dict)  # agent -> its update's timings
    closing: dict[str, float] = field(default_factory=dict)  # close, evaluate, publish

    def dispatching(self, started: float) -> None:
        """Tasks of an attempt have gone out; `started` is when selecting began."""
        self.dispatched = time.time()
        self.dispatch += max(0.0, self.dispatched - started)

    def arrived(self, agent: str, phases: Mapping[str, float]) -> None:
        self.arrivals[agent] = Arrival(time.time(), dict(phases))

    def breakdown(self, seconds: float) -> dict[str, float]:
        """Seconds by phase (ORDER) that sum to the round's `seconds`; "wait" is the rest.
        An agent's claims are cut down to the time its update could have taken (from the
        dispatch to its arrival, less what the coordinator measured of it)."""
        out: dict[str, float] = {"dispatch": self.dispatch}
        if self.arrivals:
            last = max(self.arrivals.values(), key=lambda a: a.at)
            measured = {name: last.phases[name] for name in UPDATE_PHASES if name in last.phases}
            # Unknown for a round rebuilt after a restart: then the agent's claims are left out.
            room = max(0.0, last.at - self.dispatched - sum(measured.values())) if self.dispatched else 0.0
            for name in AGENT_PHASES:
                if name in last.phases and self.dispatched is not None:
                    out[name] = min(last.phases[name], room)
                    room -= out[name]
            out.update(measured)
        out.update(self.closing)
        out["wait"] = max(0.0, seconds - sum(out.values()))
        return {name: round(out[name], 4) for name in ORDER if name in out}


class Stopwatch:
    """Consecutive phases of one piece of work: `lap(name)` ends the phase running since
    the last lap (or the start) and names it."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now
