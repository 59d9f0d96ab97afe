"""The placement policy: one pure function from observations to decisions.

For an agent and a model with L stages, running stages 1..k at the edge and the
rest in the cloud is predicted to cost

    J(k) = sum(edge[1..k]) + [k<L] * (rtt + bytes(k)/bandwidth + queue_wait + sum(cloud[k+1..L]))
           + alpha * [k<L] * bytes(k)

seconds per request (alpha in seconds per byte prices the link). The cloud's queue
wait is predicted from the load that the plan itself puts on the cloud, so sending
everyone up raises everyone's cost. Two guards keep decisions steady: a switch must
gain a margin over the current placement (relative and absolute), and an agent
keeps a placement for a minimum time. At most a fraction of the fleet switches per
tick, largest gains first, so agents do not all move in the same instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# A link this slow, or a cloud this loaded, is as good as absent.
_UNUSABLE = 1e9
_MAX_UTILISATION = 0.95


@dataclass(frozen=True)
class ModelProfile:
    """What is known of a model: bytes sent when split after k (k = 0..L-1; index 0 is
    the input), and the cloud's measured compute seconds per example of each stage."""

    stage_bytes: tuple[int, ...]
    cloud_seconds: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.cloud_seconds)


@dataclass(frozen=True)
class AgentView:
    """One agent as measured: its link, its own stage times and its request rate per model."""

    rtt: float
    up_bytes_per_second: float
    reachable: bool = True
    edge_seconds: dict[str, tuple[float, ...]] = field(default_factory=dict)
    request_rate: dict[str, float] = field(default_factory=dict)  # examples per second


@dataclass(frozen=True)
class Observations:
    time: float
    models: dict[str, ModelProfile]
    agents: dict[str, AgentView]
    queue_wait: float = 0.0  # the cloud's measured mean queue wait, seconds
    cloud_busy: float = 0.0  # fraction of time the cloud's inference worker computes


@dataclass(frozen=True)
class Decision:
    split: int  # stages at the edge: 0 all cloud, L all edge
    since: float  # when it was taken
    cost: float  # predicted J at the time
    costs: tuple[float, ...] = ()  # J(k) for every k, for the log


@dataclass(frozen=True)
class PolicyConfig:
    alpha: float = 0.0  # seconds per byte sent
    alpha_per_model: dict[str, float] = field(default_factory=dict)
    min_gain: float = 0.10  # a switch must cut predicted cost by this fraction ...
    min_gain_seconds: float = 0.001  # ... and by this much
    min_dwell: float = 5.0  # seconds a placement is kept at least
    max_switch_fraction: float = 0.25  # of the agents serving a model, per tick

    def alpha_for(self, model: str) -> float:
        return self.alpha_per_model.get(model, self.alpha)


def _offload_seconds(profile: ModelProfile, k: int) -> float:
    return sum(profile.cloud_seconds[k:])


def costs(
    profile: ModelProfile, agent: AgentView, edge: tuple[float, ...], queue_wait: float, alpha: float
) -> tuple[float, ...]:
    """J(k) for k = 0..L for one agent and one model."""
    L = profile.num_stages
    result = []
    for k in range(L + 1):
        j = sum(edge[:k])
        if k < L:
            if not agent.reachable or agent.up_bytes_per_second <= 0:
                j += _UNUSABLE
            else:
                sent = profile.stage_bytes[k]
                j += agent.rtt + sent / agent.up_bytes_per_second + queue_wait + _offload_seconds(profile, k)
                j += alpha * sent
        result.append(j)
    return tuple(result)


def _f(utilisation: float) -> float:
    return utilisation / (1 - utilisation)


@dataclass(frozen=True)
class QueueModel:
    """The cloud's queue wait as a function of its utilisation (M/M/1-like), calibrated
    on the wait measured at the load measured. `other` is the load that no agent of
    the plan causes (applications calling the cloud directly)."""

    scale: float
    other: float

    @classmethod
    def calibrate(cls, obs: Observations, current_load: float) -> QueueModel:
        busy = min(obs.cloud_busy, _MAX_UTILISATION - 0.01)
        scale = obs.queue_wait / _f(busy) if busy > 0.01 and obs.queue_wait > 0 else DEFAULT_WAIT_SCALE
        return cls(scale=scale, other=max(obs.cloud_busy - current_load, 0.0))

    def wait(self, load: float) -> float:
        utilisation = self.other + load
        return _UNUSABLE if utilisation >= _MAX_UTILISATION else self.scale * _f(utilisation)


# Seconds of queue wait per unit of utilisation/(1-utilisation) before any is measured.
DEFAULT_WAIT_SCALE = 0.002


def _load(obs: Observations, plan: dict[tuple[str, str], int]) -> float:
    """Cloud compute seconds per second the fleet would cause under `plan`."""
    total = 0.0
    for (agent, model), k in plan.items():
        profile, view = obs.models.get(model), obs.agents.get(agent)
        if profile is None or view is None or k >= profile.num_stages:
            continue
        total += view.request_rate.get(model, 0.0) * _offload_seconds(profile, k)
    return total


def decide(
    obs: Observations, current: dict[tuple[str, str], Decision], config: PolicyConfig,
    pinned: frozenset[tuple[str, str]] = frozenset(),
) -> dict[tuple[str, str], Decision]:
    """New decisions for every (agent, model) that the observations cover."""
    plan = {key: d.split for key, d in current.items()}
    queue = QueueModel.calibrate(obs, _load(obs, plan))
    decisions = dict(current)
    candidates: list[tuple[float, tuple[str, str], Decision]] = []
    for agent, view in sorted(obs.agents.items()):
        for model, edge in sorted(view.edge_seconds.items()):
            profile = obs.models.get(model)
            key = (agent, model)
            if profile is None or len(edge) != profile.num_stages or key in pinned:
                continue
            others = {k: v for k, v in plan.items() if k != key}
            # Each option priced with the queue wait it would bring about.
            options = []
            for k in range(profile.num_stages + 1):
                wait = queue.wait(_load(obs, {**others, key: k}))
                options.append(costs(profile, view, edge, wait, config.alpha_for(model))[k])
            best = min(range(len(options)), key=lambda k: (options[k], -k))
            old = current.get(key)
            fresh = Decision(best, obs.time, options[best], tuple(options))
            if old is None:
                decisions[key], plan[key] = fresh, best
                continue
            decisions[key] = replace(old, costs=tuple(options))
            unreachable = not view.reachable and old.split < profile.num_stages
            gain = options[old.split] - options[best]
            worth = gain > max(config.min_gain * options[old.split], config.min_gain_seconds)
            settled = obs.time - old.since >= config.min_dwell
            if best != old.split and (unreachable or (worth and settled)):
                candidates.append((math.inf if unreachable else gain, key, fresh))
    # Largest gains first, a bounded number per tick: no herd moves at once.
    candidates.sort(key=lambda c: -c[0])
    per_model: dict[str, int] = {}
    for gain, key, fresh in candidates:
        agent, model = key
        serving = sum(1 for v in obs.agents.values() if model in v.edge_seconds)
        limit = max(1, math.floor(config.max_switch_fraction * serving))
        if gain != math.inf and per_model.get(model, 0) >= limit:
            continue
        # Re-price with the switches already made this tick.
        profile, view = obs.models[model], obs.agents[agent]
        others = {k: v for k, v in plan.items() if k != key}
        wait = queue.wait(_load(obs, {**others, key: fresh.split}))
        cost = costs(profile, view, view.edge_seconds[model], wait, config.alpha_for(model))[fresh.split]
        if gain != math.inf and cost >= decisions[key].costs[decisions[key].split]:
            continue
        decisions[key] = replace(fresh, cost=cost)
        plan[key] = fresh.split
        per_model[model] = per_model.get(model, 0) + 1
    return decisions
