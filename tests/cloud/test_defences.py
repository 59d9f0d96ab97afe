"""Robust aggregation and DP-FedAvg in real jobs on a real coordinator, over real uploads."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from cloud.app import Coordinator
from tandem.v1 import coordinator_pb2_grpc
from tests.support.clients import agent_channel, download, send, start_job, streams, wait_rounds

AGENTS = [f"agent-{i}" for i in range(5)]


async def run_round(coordinator: Coordinator, certs_dir: Path, values: list[float], **spec: object) -> np.ndarray:
    """One round in which agent i sends an update moving every weight by values[i];
    returns the change of the published model from its base, per weight."""
    opened = await streams(coordinator.port, certs_dir, AGENTS[: len(values)])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=len(values), **spec)
        tasks = [(await s.next("task")).task for s in opened]
        for agent, task, value in zip(AGENTS, tasks, values):
            await send(coordinator.port, certs_dir, agent, task, value)
        result = (await wait_rounds(coordinator.port, certs_dir, job.job_id, 1)).rounds[0]
        async with agent_channel(coordinator.port, certs_dir, AGENTS[0]) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            _, base = await download(stub, "mlp", tasks[0].base_version)
            _, new = await download(stub, "mlp", result.version)
        return np.concatenate([(new[k] - base[k]).ravel() for k in sorted(base)])
    finally:
        for s in opened:
            await s.close()


HOSTILE = [0.01, 0.01, 0.012, 0.008, -10.0]


@pytest.mark.parametrize(("spec", "expected"), [
    ({}, np.mean(HOSTILE)),  # plain FedAvg (equal example counts): dragged to -1.99
    ({"aggregator": "median", "hostile_agents": 1}, 0.01),
    ({"aggregator": "trimmed_mean", "trim_fraction": 0.2, "hostile_agents": 1}, 0.01),
    ({"aggregator": "krum", "hostile_agents": 1}, 0.01),
    ({"aggregator": "multi_krum", "hostile_agents": 1, "krum_selected": 2}, 0.01),
    ({"aggregator": "mean_around_median", "hostile_agents": 1}, 0.01),
], ids=["mean", "median", "trimmed_mean", "krum", "multi_krum", "mean_around_median"])
async def test_a_hostile_update_moves_only_the_mean(
    coordinator: Coordinator, certs_dir: Path, spec: dict[str, object], expected: float
) -> None:
    change = await run_round(coordinator, certs_dir, HOSTILE, **spec)
    np.testing.assert_allclose(change, expected, atol=2.5e-3 if spec else 1e-5)


async def test_norms_are_bounded_at_the_median(coordinator: Coordinator, certs_dir: Path) -> None:
    before = REGISTRY.get_sample_value("tandem_coordinator_updates_clipped_total") or 0.0
    change = await run_round(coordinator, certs_dir, [0.01, 0.01, 0.01, 0.01, 100.0], clip_to_median=True)
    np.testing.assert_allclose(change, 0.01, atol=1e-5)  # the outlier scaled down to the median norm
    assert REGISTRY.get_sample_value("tandem_coordinator_updates_clipped_total") == before + 1


async def test_dp_job_reports_privacy_spent_per_round(coordinator: Coordinator, certs_dir: Path) -> None:
    opened = await streams(coordinator.port, certs_dir, AGENTS[:2])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=2, min_clients=2, clip_norm=0.5,
                              dp_noise_multiplier=1.1, dp_delta=1e-5)
        for number in (1, 2):
            tasks = [(await s.next("task")).task for s in opened]
            assert {t.round for t in tasks} == {number}
            for agent, task in zip(AGENTS, tasks):
                await send(coordinator.port, certs_dir, agent, task, 0.01)
            done = await wait_rounds(coordinator.port, certs_dir, job.job_id, number)
        first, second = (r.epsilon for r in done.rounds)
        assert 0 < first < second  # composition: two rounds spend more than one
        gauge = REGISTRY.get_sample_value("tandem_coordinator_dp_epsilon", {"job_id": job.job_id})
        assert gauge == pytest.approx(second)
    finally:
        for s in opened:
            await s.close()


@pytest.mark.parametrize(("spec", "reason"), [
    ({"aggregator": "krum", "hostile_agents": 1, "min_clients": 4}, "Krum needs n > 2f + 2"),
    ({"aggregator": "trimmed_mean", "trim_fraction": 0.1, "hostile_agents": 2, "min_clients": 8},
     "trim_fraction must be >= f/n = 0.250"),
    ({"dp_noise_multiplier": 1.0, "min_clients": 2}, "differential privacy needs a fixed clip_norm"),
    ({"aggregator": "mean_around_median", "hostile_agents": 2, "min_clients": 4}, "it needs n > 2f"),
])
async def test_a_job_that_cannot_defend_itself_is_refused_at_start(
    coordinator: Coordinator, certs_dir: Path, spec: dict[str, object], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, **spec)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (err.value.details() or "")
