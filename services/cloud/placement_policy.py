"""The placement policy: one pure function from observations to decisions.

For an agent and a model with L stages, running stages 1..k at the edge and the
rest in the cloud is predicted to cost

    J(k) = sum(edge[1..k]) + [k<L] * (rtt + bytes(k)/bandwidth + queue_wait + sum(cloud[k+1..L]))
           + alpha * [k<L] * bytes(k)

seconds per request (alpha in seconds per byte prices the link). The cloud's queue
wait is predicted from the load that the plan itself puts on the cloud, so sending
everyone up raises everyone's cost. Three guards keep decisions steady: a switch must
gain a margin over the current placement (relative and absolute) on `confirm_ticks`
consecutive ticks, and then goes to the option cheapest summed over those ticks (two
options within a millisecond of each other on one tick do not decide it); and an
agent keeps a placement for a minimum time, unless its link changed at a point since
(cloud.placement_filter), in which case the ticks before the change do not count
either. At most a fraction of the fleet switches per tick, largest gains first, so
agents do not all move in the same instant.
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
    # model -> {t: fraction of recent examples whose confidence was below t}
    confidence_below: dict[str, dict[float, float]] = field(default_factory=dict)

    def sent_up(self, model: str, threshold: float) -> float | None:
        """Fraction of examples a cascade at `threshold` would send up: measured at the
        smallest measured threshold at or above it (an upper bound), None if unknown."""
        measured = self.confidence_below.get(model, {})
        above = [t for t in measured if t >= threshold]
        return measured[min(above)] if above else None


@dataclass(frozen=True)
class Observations:
    time: float
    models: dict[str, ModelProfile]
    agents: dict[str, AgentView]
    queue_wait: float = 0.0  # the cloud's measured mean queue wait, seconds
    cloud_busy: float = 0.0  # fraction of time the cloud's inference worker computes


@dataclass(frozen=True)
class CascadeOption:
    """A cascade the operator asks for on a model: the edge answers when its confidence
    is at least `threshold`, else `cloud_model` (default: the same) answers in the cloud.

    On latency alone a cascade never beats running everything at the edge, so asking
    for one means the edge's own answers are not good enough when it is unsure. The
    options are then the cascade itself (option L + 1) and sending every input to the
    cloud's model (option 0); splits of the edge model are off the table."""

    threshold: float
    cloud_model: str = ""

    @property
    def all_cloud(self) -> str:
        return f"cascade:{ALL_UP}" + (f":{self.cloud_model}" if self.cloud_model else "")


# A cascade threshold above any confidence: every input goes to the cloud's model.
ALL_UP = 1.01


@dataclass(frozen=True)
class Decision:
    split: int  # stages at the edge: 0 all cloud, L all edge, L + 1 the model's cascade
    since: float  # when it was taken
    cost: float  # predicted J at the time
    costs: tuple[float, ...] = ()  # J(k) for every k, for the log
    streak: int = 0  # consecutive ticks on which another option beat this one by the margin
    pending: tuple[float, ...] = ()  # J(k) summed over those ticks
    link_changed: float = -math.inf  # time of the agent's last link change point


@dataclass(frozen=True)
class PolicyConfig:
    alpha: float = 0.0  # seconds per byte sent
    alpha_per_model: dict[str, float] = field(default_factory=dict)
    min_gain: float = 0.10  # a switch must cut predicted cost by this fraction ...
    min_gain_seconds: float = 0.001  # ... and by this much
    min_dwell: float = 5.0  # seconds a placement is kept at least, unless the link changes at a point
    confirm_ticks: int = 2  # consecutive ticks on which a switch must gain the margin
    max_switch_fraction: float = 0.25  # of the agents serving a model, per tick
    cascades: dict[str, CascadeOption] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.confirm_ticks < 1:
            raise ValueError(f"--confirm-ticks must be at least 1, got {self.confirm_ticks}")
        if not self.min_dwell >= 0:
            raise ValueError(f"--min-dwell must be >= 0 seconds, got {self.min_dwell:g}")

    def alpha_for(self, model: str) -> float:
        return self.alpha_per_model.get(model, self.alpha)


def _offload_seconds(profile: ModelProfile, k: int) -> float:
    return sum(profile.cloud_seconds[k:])


def costs(
    profile: ModelProfile, agent: AgentView, edge: tuple[float, ...], queue_wait: float, alpha: float
) -> tuple[float, ...]:
    """J(k) for k = 0..L for one agent and one model."""
    L = profile.num_stages  # noqa: N806 - the L of J(k) in the docs
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


def cascade_cost(
    profile: ModelProfile, cloud: ModelProfile, agent: AgentView, edge: tuple[float, ...], sent_up: float,
    queue_wait: float, alpha: float,
) -> float:
    """J of a cascade: the whole model here, and for the fraction `sent_up` of examples the
    input goes up to the cloud's model as well."""
    if not agent.reachable or agent.up_bytes_per_second <= 0:
        return sum(edge) + (_UNUSABLE if sent_up > 0 else 0.0)
    sent = profile.stage_bytes[0]
    up = agent.rtt + sent / agent.up_bytes_per_second + queue_wait + sum(cloud.cloud_seconds) + alpha * sent
    return sum(edge) + sent_up * up


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


def _load(obs: Observations, config: PolicyConfig, plan: dict[tuple[str, str], int]) -> float:
    """Cloud compute seconds per second the fleet would cause under `plan`."""
    total = 0.0
    for (agent, model), k in plan.items():
        profile, view = obs.models.get(model), obs.agents.get(agent)
        if profile is None or view is None or k == profile.num_stages:
            continue
        rate = view.request_rate.get(model, 0.0)
        option = config.cascades.get(model)
        if option is None:
            if k < profile.num_stages:
                total += rate * _offload_seconds(profile, k)
            continue
        cloud = obs.models.get(option.cloud_model or model)
        up = 1.0 if k == 0 else view.sent_up(model, option.threshold)
        if cloud is not None and up is not None:
            total += rate * up * sum(cloud.cloud_seconds)
    return total


def _price(
    obs: Observations, config: PolicyConfig, queue: QueueModel, plan: dict[tuple[str, str], int],
    key: tuple[str, str], k: int,
) -> float:
    """J of option k for one (agent, model), with the queue wait that the plan, this
    option included, would bring about; infinite for a cascade that cannot be priced."""
    agent, model = key
    profile, view = obs.models[model], obs.agents[agent]
    edge, alpha = view.edge_seconds[model], config.alpha_for(model)
    wait = queue.wait(_load(obs, config, {**plan, key: k}))
    option = config.cascades.get(model)
    if option is None:
        return costs(profile, view, edge, wait, alpha)[k] if k <= profile.num_stages else math.inf
    cloud = obs.models.get(option.cloud_model or model)
    if cloud is None or 0 < k <= profile.num_stages:
        return math.inf
    if k == 0:  # every input to the cloud's model, nothing computed here
        return costs(replace(cloud, stage_bytes=profile.stage_bytes[:1] + cloud.stage_bytes[1:]), view,
                     edge, wait, alpha)[0]
    up = view.sent_up(model, option.threshold)
    return math.inf if up is None else cascade_cost(profile, cloud, view, edge, up, wait, alpha)


def decide(
    obs: Observations, current: dict[tuple[str, str], Decision], config: PolicyConfig,
    pinned: frozenset[tuple[str, str]] = frozenset(), changed: frozenset[str] = frozenset(),
) -> dict[tuple[str, str], Decision]:
    """New decisions for every (agent, model) that the observations cover; `changed`:
    the agents whose link changed at a point since the last call."""
    plan = {key: d.split for key, d in current.items()}
    queue = QueueModel.calibrate(obs, _load(obs, config, plan))
    decisions = dict(current)
    candidates: list[tuple[float, tuple[str, str], Decision]] = []
    for agent, view in sorted(obs.agents.items()):
        for model, edge in sorted(view.edge_seconds.items()):
            profile = obs.models.get(model)
            key = (agent, model)
            if profile is None or len(edge) != profile.num_stages or key in pinned:
                continue
            count = profile.num_stages + (2 if model in config.cascades else 1)
            options = [_price(obs, config, queue, plan, key, k) for k in range(count)]
            best = min(range(count), key=lambda k: (options[k], -k))
            old = current.get(key)
            fresh = Decision(best, obs.time, options[best], tuple(options))
            if old is None or old.split >= count:
                decisions[key], plan[key] = fresh, best
                continue
            unreachable = not view.reachable and old.split != profile.num_stages and best == profile.num_stages
            if unreachable:
                decisions[key] = replace(old, costs=tuple(options), streak=0, pending=())
                candidates.append((math.inf, key, fresh))
                continue
            held = _held(old, options, best, config, obs.time if agent in changed else None)
            decisions[key] = held
            settled = obs.time - old.since >= config.min_dwell or held.link_changed > old.since
            if held.streak >= config.confirm_ticks and settled:
                # The option cheapest over the streak, not on this tick alone.
                pick = min(range(count), key=lambda k: (held.pending[k], -k))
                if pick != old.split:
                    chosen = Decision(pick, obs.time, options[pick], tuple(options), link_changed=held.link_changed)
                    candidates.append((options[old.split] - options[pick], key, chosen))
    # Largest gains first, a bounded number per tick: no herd moves at once.
    candidates.sort(key=lambda c: -c[0])
    per_model: dict[str, int] = {}
    for gain, key, fresh in candidates:
        model = key[1]
        serving = sum(1 for v in obs.agents.values() if model in v.edge_seconds)
        limit = max(1, math.floor(config.max_switch_fraction * serving))
        if gain != math.inf and per_model.get(model, 0) >= limit:
            continue
        # Re-price with the switches already made this tick.
        cost = _price(obs, config, queue, plan, key, fresh.split)
        if gain != math.inf and cost >= _price(obs, config, queue, plan, key, decisions[key].split):
            continue
        decisions[key] = replace(fresh, cost=cost)
        plan[key] = fresh.split
        per_model[model] = per_model.get(model, 0) + 1
    return decisions


def _held(
    old: Decision, options: list[float], best: int, config: PolicyConfig, change_point: float | None
) -> Decision:
    """The placement held, with its streak carried on (another option gained the margin
    on this tick too), restarted (the link changed at a point) or ended."""
    gain = options[old.split] - options[best]
    worth = gain > max(config.min_gain * options[old.split], config.min_gain_seconds)
    link_changed = old.link_changed if change_point is None else change_point
    if not worth:
        return replace(old, costs=tuple(options), streak=0, pending=(), link_changed=link_changed)
    if change_point is not None or not old.streak or len(old.pending) != len(options):
        return replace(old, costs=tuple(options), streak=1, pending=tuple(options), link_changed=link_changed)
    pending = tuple(a + b for a, b in zip(old.pending, options))
    return replace(old, costs=tuple(options), streak=old.streak + 1, pending=pending, link_changed=link_changed)
