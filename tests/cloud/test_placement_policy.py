"""The placement policy on synthetic observations: each regime picks the right split,
alpha trades latency for bytes, hysteresis holds under noise, the fleet does not herd."""

from __future__ import annotations

import random
from dataclasses import replace

from cloud.observations import agent_view
from cloud.placement import split_text
from cloud.placement_policy import (
    AgentView,
    CascadeOption,
    Decision,
    ModelProfile,
    Observations,
    PolicyConfig,
    costs,
    decide,
)
from edge.link import THROUGHPUT_EVERY, THROUGHPUT_PROBE_BYTES, LinkMonitor
from tandem import staged

_, STAGES = staged.describe("cnn")
CNN = ModelProfile(
    stage_bytes=(3 * 96 * 96 * 4, *(s.output_bytes for s in STAGES[:-1])),
    cloud_seconds=(0.0003, 0.0003, 0.0002, 0.0002, 0.0002),
)
L = CNN.num_stages
WEAK = (0.012, 0.010, 0.008, 0.008, 0.008)  # a fifth of a core
STRONG = (0.0004, 0.0003, 0.0002, 0.0002, 0.0002)
MBIT = 1e6 / 8  # bytes per second


def view(edge: tuple[float, ...], mbit: float, rtt: float, reachable: bool = True, rate: float = 5.0) -> AgentView:
    return AgentView(rtt=rtt, up_bytes_per_second=mbit * MBIT, reachable=reachable,
                     edge_seconds={"cnn": edge}, request_rate={"cnn": rate})


def once(agent: AgentView, config: PolicyConfig = PolicyConfig()) -> int:
    obs = Observations(time=0.0, models={"cnn": CNN}, agents={"a": agent})
    return decide(obs, {}, config)[("a", "cnn")].split


def test_each_regime_picks_the_right_split() -> None:
    assert once(view(WEAK, mbit=100, rtt=0.005)) == 0  # weak edge, fast link: offload everything
    assert once(view(STRONG, mbit=2, rtt=0.080)) == L  # strong edge, slow link: run it all here
    middle = once(view((0.002, 0.002, 0.015, 0.015, 0.015), mbit=20, rtt=0.010))
    assert 0 < middle < L  # in between, a middle split wins
    assert once(view(WEAK, mbit=100, rtt=0.005, reachable=False)) == L  # no link: all edge


def test_costs_follow_the_formula() -> None:
    agent = view(WEAK, mbit=8, rtt=0.01)
    j = costs(CNN, agent, WEAK, queue_wait=0.002, alpha=1e-7)
    k = 2
    expected = sum(WEAK[:k]) + 0.01 + CNN.stage_bytes[k] / 1e6 + 0.002 + sum(CNN.cloud_seconds[k:]) + 1e-7 * CNN.stage_bytes[k]
    assert abs(j[k] - expected) < 1e-12
    assert j[L] == sum(WEAK)


def test_alpha_trades_latency_for_bytes() -> None:
    agent = view(WEAK, mbit=100, rtt=0.005)
    splits = [once(agent, PolicyConfig(alpha=a)) for a in (0.0, 2e-7, 1e-6, 1e-3)]
    assert splits == sorted(splits) and splits[0] == 0 and splits[-1] == L  # pricier bytes: deeper splits


def test_hysteresis_holds_under_noise() -> None:
    rng = random.Random(0)
    config = PolicyConfig(min_dwell=5.0)
    decisions: dict[tuple[str, str], Decision] = {}
    switches = 0
    for tick in range(200):
        noisy = view(tuple(s * rng.uniform(0.9, 1.1) for s in WEAK), mbit=100 * rng.uniform(0.9, 1.1),
                     rtt=0.005 * rng.uniform(0.8, 1.2))
        new = decide(Observations(time=tick * 0.5, models={"cnn": CNN}, agents={"a": noisy}), decisions, config)
        if decisions and new[("a", "cnn")].split != decisions[("a", "cnn")].split:
            switches += 1
        decisions = new
    assert switches == 0


def test_a_real_change_switches_after_the_dwell_time() -> None:
    config = PolicyConfig(min_dwell=5.0)
    fast = Observations(time=0.0, models={"cnn": CNN}, agents={"a": view(WEAK, mbit=100, rtt=0.001)})
    decisions = decide(fast, {}, config)
    start = decisions[("a", "cnn")].split
    slow = view(WEAK, mbit=2, rtt=0.080)
    early = decide(Observations(time=2.0, models={"cnn": CNN}, agents={"a": slow}), decisions, config)
    assert early[("a", "cnn")].split == start  # too soon after the last switch
    assert early[("a", "cnn")].streak == 1  # but the gain is counted from now
    late = decide(Observations(time=6.0, models={"cnn": CNN}, agents={"a": slow}), early, config)
    assert late[("a", "cnn")].split == L != start


def test_the_fleet_does_not_herd_into_the_cloud() -> None:
    """Eight weak agents on a fast link all prefer the cloud alone; together they would
    swamp it. The switches come a few per tick, and stop where the queue says so."""
    config = PolicyConfig(min_dwell=0.0, max_switch_fraction=0.25)
    agents = {f"a{i}": view(WEAK, mbit=100, rtt=0.005, rate=300.0) for i in range(8)}
    decisions = {(name, "cnn"): Decision(L, 0.0, sum(WEAK)) for name in agents}
    in_cloud = []
    for tick in range(1, 10):
        decisions = decide(Observations(time=float(tick), models={"cnn": CNN}, agents=agents, cloud_busy=0.0),
                           decisions, config)
        in_cloud.append(sum(d.split < L for d in decisions.values()))
    steps = [b - a for a, b in zip([0, *in_cloud], in_cloud)]
    assert max(steps) <= 2, in_cloud  # a quarter of eight per tick at most
    load = in_cloud[-1] * 300.0 * sum(CNN.cloud_seconds)
    assert 0 < in_cloud[-1] < 8 and load < 0.95, in_cloud  # not everyone: the cloud would saturate


def test_pinned_placements_are_left_alone() -> None:
    obs = Observations(time=10.0, models={"cnn": CNN}, agents={"a": view(WEAK, mbit=100, rtt=0.005)})
    current = {("a", "cnn"): Decision(L, 0.0, 1.0)}
    assert decide(obs, current, PolicyConfig(), pinned=frozenset({("a", "cnn")}))[("a", "cnn")].split == L


def test_a_cascade_is_weighed_against_sending_everything_to_the_cloud_model() -> None:
    """With a cascade asked for, the edge's own answers are not enough when it is unsure:
    the choice is the cascade or the cloud's model for everything, never the edge alone."""
    small = ModelProfile(stage_bytes=(256, 128), cloud_seconds=(0.0001, 0.0001))
    big = ModelProfile(stage_bytes=(256, 8192, 8192, 8192), cloud_seconds=(0.002, 0.002, 0.002, 0.002))
    config = PolicyConfig(cascades={"small": CascadeOption(0.9, "big")})

    def choose(mbit: float, rtt: float, up: float | None) -> tuple[int, tuple[float, ...]]:
        agent = AgentView(rtt=rtt, up_bytes_per_second=mbit * MBIT, edge_seconds={"small": (0.001, 0.001)},
                          request_rate={"small": 5.0},
                          confidence_below={"small": {0.9: up}} if up is not None else {})
        obs = Observations(time=0.0, models={"small": small, "big": big}, agents={"a": agent})
        d = decide(obs, {}, config)[("a", "small")]
        return d.split, d.costs

    split, j = choose(mbit=100, rtt=0.080, up=0.2)  # a distant cloud: answer most here
    assert split == 3 and j[1] == j[2] == float("inf")  # option L + 1: the cascade
    assert abs(j[3] - (0.002 + 0.2 * (0.080 + 256 / (100 * MBIT) + 0.008))) < 1e-3
    assert choose(mbit=100, rtt=0.001, up=0.9)[0] == 0  # unsure edge, near cloud: all to the big model
    assert choose(mbit=100, rtt=0.080, up=None)[0] == 0  # not measured yet: cannot price the cascade
    assert split_text("mlp-small", 0, PolicyConfig(cascades={"mlp-small": CascadeOption(0.9, "mlp-heavy")})) == \
        "cascade:1.01:mlp-heavy"


def test_an_agent_busy_at_the_edge_still_sees_that_the_cloud_is_cheaper() -> None:
    """bench_placement's 20 Mbit/s, 30 ms phase with four agents: they had gone to the
    edge in the 2 Mbit/s phase and stayed there for all 30 s, though all-cloud answered
    in 95 ms and the edge in 150 ms. A weak agent computing at the edge answers most of
    its probes late (its CPU quota goes to the model), so its samples run high: the
    averaged round trip came to 45-85 ms and the throughput to 1.5-2 MB/s, which priced
    the cloud no cheaper than the edge. What the cloud would cost is what the probes
    that were not held up measured."""
    rtt, up, size = 0.030, 2.5e6, THROUGHPUT_PROBE_BYTES

    async def never(timeout: float, size: int) -> None:
        raise AssertionError("not probed in this test")

    measurements: dict[str, float] = {}
    link = LinkMonitor(never, interval=0.5, on_measure=measurements.__setitem__)
    rng = random.Random(1)
    for probe in range(60):  # 30 s of idle probes, every fifth one a throughput probe
        late = rng.uniform(0.020, 0.090) if rng.random() < 0.6 else 0.0
        if probe % THROUGHPUT_EVERY == THROUGHPUT_EVERY - 1:
            link.success(rtt + size / up + late, sent=size)
        else:
            link.success(rtt + late)
    edge = (0.035, 0.025, 0.025, 0.025, 0.015)  # the bench's weak agent: 125 ms all at the edge
    measurements.update({f"stage_seconds:cnn:{i}": s for i, s in enumerate(edge, start=1)})
    measurements["examples_per_second:cnn"] = 3.0
    cloud = replace(CNN, cloud_seconds=(0.006, 0.005, 0.004, 0.003, 0.002))  # the bench cloud's 20 ms
    obs = Observations(time=60.0, models={"cnn": cloud}, agents={"a": agent_view(measurements)})
    held = {("a", "cnn"): Decision(L, 0.0, sum(edge))}
    for tick in range(PolicyConfig().confirm_ticks):  # a gain must hold on consecutive ticks
        held = decide(replace(obs, time=60.0 + tick), held, PolicyConfig(min_dwell=5.0))
    decided = held[("a", "cnn")]
    assert decided.split == 0, [round(1000 * c) for c in decided.costs]
    assert 0.090 < decided.cost < 0.105  # 30 ms + 110 KB at 2.5 MB/s + 20 ms, give or take the probes' floor
