"""What the placement policy sees of each agent, tick by tick: its stage times filtered
over recent ticks, and which agents' links changed at a point this tick.

An agent's edge stage times swing from tick to tick (under a CPU quota stage 1 of `cnn`
read anywhere from 16 to 47 ms, depending on whether a sample crossed a throttled
period), and a split priced from one such reading can tie with all-cloud to the
millisecond. So each stage is priced from a window of its last `stage_window` readings,
as the agent prices its link by a window of samples (edge.link), not by the newest one:
by the window's upper quartile. The readings of a stage the agent does not run come
from profiling one example every few seconds, which a CPU quota rarely throttles, so
they read low against the same stage run at the request rate (the bench's weak agent
went to split:1 on a fast link on such readings, and answered slower than all-cloud);
the upper quartile leans toward the loaded cost without taking the single worst one.

The link estimates arrive filtered already. What the controller adds is a change-point
test (Edgent maps bandwidth states with online change-point detection; a ratio test is
enough here): the newest estimate against the long-run one, the median of the ticks
since the last change. A change point tells the policy that the placement it holds was
taken on another link, so it need not wait out its dwell time, and that costs summed
over the ticks before it no longer count.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field, replace

from cloud.placement_policy import AgentView, Observations

log = logging.getLogger(__name__)

STAGE_WINDOW = 10  # ticks: ten seconds at the default interval
LINK_WINDOW = 10  # ticks of link estimates that make the long-run one
UP_CHANGE_RATIO = 2.0  # uplink bandwidth halved or doubled ...
RTT_CHANGE_RATIO = 1.5  # ... or the round trip 1.5x longer or shorter ...
RTT_CHANGE_SECONDS = 0.010  # ... and by 10 ms at least (a few ms of jitter on a LAN is no change)


def changed(rtt: float, up: float, long_rtt: float, long_up: float) -> bool:
    """Whether the link estimates (rtt, up) differ from the long-run ones by more than the ratios."""
    if (up > 0) != (long_up > 0):
        return True
    if up > 0 and max(up / long_up, long_up / up) >= UP_CHANGE_RATIO:
        return True
    low, high = sorted((rtt, long_rtt))
    return high - low >= RTT_CHANGE_SECONDS and high >= RTT_CHANGE_RATIO * low


def upper_quartile(values: tuple[float, ...]) -> float:
    """The 75th percentile by nearest rank (one of the values, no interpolation)."""
    ordered = sorted(values)
    return ordered[math.ceil(0.75 * len(ordered)) - 1]


@dataclass
class _History:
    stages: dict[str, deque[tuple[float, ...]]] = field(default_factory=dict)
    link: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=LINK_WINDOW))
    reachable: bool = True


class ObservationFilter:
    """Keeps each agent's recent readings; `apply` gives the filtered observations and the
    agents whose link changed at a point since the last call."""

    def __init__(self, stage_window: int = STAGE_WINDOW) -> None:
        self._stage_window = stage_window
        self._agents: dict[str, _History] = {}

    def apply(self, obs: Observations) -> tuple[Observations, frozenset[str]]:
        for gone in set(self._agents) - set(obs.agents):
            del self._agents[gone]  # a reconnected agent starts afresh
        agents: dict[str, AgentView] = {}
        change_points: set[str] = set()
        for name, view in obs.agents.items():
            history = self._agents.setdefault(name, _History(reachable=view.reachable))
            if self._link_changed(history, view):
                change_points.add(name)
                log.info("placement: link of %s changed (rtt %.1f ms, up %.2f MB/s)", name, 1000 * view.rtt,
                         view.up_bytes_per_second / 1e6)
            agents[name] = replace(view, edge_seconds=self._stages(history, view))
        return replace(obs, agents=agents), frozenset(change_points)

    def _stages(self, history: _History, view: AgentView) -> dict[str, tuple[float, ...]]:
        filtered = {}
        for model, seconds in view.edge_seconds.items():
            window = history.stages.get(model)
            if window is None or (window and len(window[-1]) != len(seconds)):
                window = history.stages[model] = deque(maxlen=self._stage_window)
            window.append(seconds)
            filtered[model] = tuple(upper_quartile(s) for s in zip(*window))
        return filtered

    @staticmethod
    def _link_changed(history: _History, view: AgentView) -> bool:
        came_back = view.reachable and not history.reachable
        history.reachable = view.reachable
        if not view.reachable:
            return False  # the policy moves an unreachable agent to the edge anyway
        point = (view.rtt, view.up_bytes_per_second)
        if came_back:
            history.link.clear()
            history.link.append(point)
            return True
        if history.link:
            long_rtt = statistics.median(r for r, _ in history.link)
            long_up = statistics.median(u for _, u in history.link)
            if changed(*point, long_rtt, long_up):
                history.link.clear()  # the ticks since the change are the new long run
                history.link.append(point)
                return True
        history.link.append(point)
        return False
