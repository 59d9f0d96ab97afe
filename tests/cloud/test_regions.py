"""The parent's side of regional aggregation (issue 20), against a real coordinator over
mutual TLS: a region's certificate is a member like an agent's, under its own id; its
partial aggregate weighs exactly its agents' total and counts its contributors towards
the quorum; an agent's certificate cannot upload one, a region cannot act as admin, and
jobs whose aggregation needs each agent's own update refuse partial sums, saying why.
And the arithmetic: FedAvg over two tiers against one flat coordinator."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.accumulator import Accumulator
from cloud.aggregation import weighting
from cloud.app import Coordinator
from tandem import certs, compression, grpcserver
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc
from tandem_cli.admin import agent_line, agent_rows
from tests.support.clients import (
    SPECS,
    ControlStream,
    admin_channel,
    agent_channel,
    delta,
    download,
    get_job,
    header_for,
    region_credentials,
    start_job,
    target,
    update_messages,
    upload,
    upload_code,
    wait_rounds,
)
from tests.support.waiting import wait_for


def _region(certs_dir: Path, name: str) -> grpc.ChannelCredentials:
    if not certs.region_paths(certs_dir, name)[0].exists():
        certs.add_region(certs_dir, name)
    return region_credentials(certs_dir, name)


async def test_a_regions_certificate_is_a_member_under_its_own_id_and_cannot_act_as_admin(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    # A region named like an agent is still not that agent.
    region = ControlStream(coordinator.port, certs_dir, "agent-0", credentials=_region(certs_dir, "agent-0"))
    agent = ControlStream(coordinator.port, certs_dir, "agent-0")
    try:
        assert (await region.open(agents=3)).agent_id == "region:agent-0"
        assert (await agent.open()).agent_id == "agent-0"
        async with admin_channel(coordinator.port, certs_dir) as channel:
            listed = (await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest())).agents
            lines = {r["agent_id"]: agent_line(r) for r in await agent_rows(admin_pb2_grpc.AdminStub(channel))}
        assert {a.agent_id for a in listed if a.connected} >= {"agent-0", "region:agent-0"}
        shown = {a.agent_id: a.agents for a in listed}
        assert shown["region:agent-0"] == 3 and shown["agent-0"] == 0  # the tree: a region and its agents
        assert "region of 3 agents" in lines["region:agent-0"] and "region of" not in lines["agent-0"]
        async with grpcserver.secure_channel(target(coordinator.port), _region(certs_dir, "agent-0")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await region.close()
        await agent.close()


async def test_a_partial_aggregate_weighs_its_total_and_counts_its_contributors(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    # min_clients 4: one agent and a region of three make the quorum; neither alone could.
    region = ControlStream(coordinator.port, certs_dir, "eu", credentials=_region(certs_dir, "eu"))
    agent = ControlStream(coordinator.port, certs_dir, "agent-1")
    try:
        await region.open(num_examples=3000, agents=3)
        await agent.open(num_examples=1000)
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=4,
                              round_deadline_seconds=60)
        region_task, agent_task = (await region.next("task")).task, (await agent.next("task")).task

        # An agent's certificate cannot upload a partial aggregate; its own update goes in after.
        async with agent_channel(coordinator.port, certs_dir, "agent-1") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            forged = update_messages(header_for(agent_task, num_examples=900, contributors=3), delta(0.5))
            assert await upload_code(stub, forged) == grpc.StatusCode.PERMISSION_DENIED
            await upload(stub, update_messages(header_for(agent_task, num_examples=100), delta(0.01)))
        # The region's mean of its agents' updates, weighing their total (2,400: more than
        # 3 x the median claim, so an agent's update would be capped; a partial is not).
        async with grpcserver.secure_channel(target(coordinator.port), _region(certs_dir, "eu")) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            await upload(stub, update_messages(header_for(region_task, num_examples=2400, contributors=3),
                                               delta(0.03)))
            done = await wait_rounds(coordinator.port, certs_dir, job.job_id, 1)
            _, base = await download(stub, "mlp", region_task.base_version)
            _, new = await download(stub, "mlp", done.rounds[0].version)
        expected = (100 * 0.01 + 2400 * 0.03) / 2500
        for name in base:
            np.testing.assert_allclose(new[name] - base[name], expected, rtol=1e-5, atol=1e-7)
        assert done.rounds[0].accepted == 2
    finally:
        await region.close()
        await agent.close()


@pytest.mark.parametrize(("settings", "why"), [
    ({"aggregator": "median"}, "aggregator median"),
    ({"clip_norm": 10.0}, "clipping each update's norm"),
])
async def test_jobs_that_need_each_agents_update_refuse_partial_aggregates_saying_why(
    coordinator: Coordinator, certs_dir: Path, settings: dict[str, object], why: str
) -> None:
    region = ControlStream(coordinator.port, certs_dir, "us", credentials=_region(certs_dir, "us"))
    agent = ControlStream(coordinator.port, certs_dir, "agent-0")
    try:
        await region.open(num_examples=3000, agents=3)
        await agent.open(num_examples=500)
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1,
                              round_deadline_seconds=60, **settings)
        task = (await agent.next("task")).task
        # The region is never selected: excluded from the job, saying why (`tandem job status`).
        status = await get_job(coordinator.port, certs_dir, job.job_id)
        (excluded,) = status.excluded
        assert excluded.agent == "region:us" and excluded.code == "FAILED_PRECONDITION"
        assert why in excluded.reason and "partial aggregate" in excluded.reason
        # A partial sent anyway (the region saw the task elsewhere) is refused: it was not
        # selected (the intake would refuse the partial sum too, saying the above).
        async with grpcserver.secure_channel(target(coordinator.port), _region(certs_dir, "us")) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await upload(stub, update_messages(header_for(task, num_examples=2400, contributors=3),
                                                   delta(0.03)))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await region.close()
        await agent.close()


async def test_a_job_only_regions_could_train_fails_saying_why(coordinator: Coordinator, certs_dir: Path) -> None:
    region = ControlStream(coordinator.port, certs_dir, "us", credentials=_region(certs_dir, "us"))
    try:
        await region.open(num_examples=3000, agents=3)
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=3,
                              round_deadline_seconds=60, aggregator="median")

        async def failed() -> admin_pb2.Job | None:
            status = await get_job(coordinator.port, certs_dir, job.job_id)
            return status if status.state == admin_pb2.JOB_STATE_FAILED else None

        status = await wait_for(failed, timeout=10, message="the job to fail")
        assert "no quorum possible" in status.message and "aggregator median" in status.message
    finally:
        await region.close()


def test_partial_weights_are_exact_and_outside_the_median_cap() -> None:
    result = weighting({"a": 100, "b": 120, "c": 10**9}, 1.0, exact={"region:eu": 5000})
    assert result.cap == 120.0
    assert result.weights == {"a": 100.0, "b": 120.0, "c": 120.0, "region:eu": 5000.0}
    assert result.capped == ("c",)


def test_fedavg_over_two_regions_matches_one_flat_coordinator_within_float32_rounding(tmp_path: Path) -> None:
    """Eight agents' updates folded by one coordinator, and by two regions of four whose
    weighted means the parent folds with their totals: the same mean, to float32 rounding
    (the fold order differs, and float32 sums are not associative)."""
    rng = np.random.default_rng(7)
    updates = [({name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for name, spec in SPECS.items()},
                int(rng.integers(50, 500))) for _ in range(8)]
    codec = compression.parse_codec("none")

    def mean_of(folds: list[tuple[dict[str, np.ndarray], float]], name: str) -> dict[str, np.ndarray]:
        acc = Accumulator(SPECS, tmp_path / f"{name}.sum")
        for tensors, weight in folds:
            acc.fold(weight, {k: v.reshape(-1) for k, v in tensors.items()}, codec)
        out = {k: np.asarray(v) for k, v in acc.mean().items()}
        acc.close()
        return out

    flat = mean_of([(t, float(n)) for t, n in updates], "flat")
    regions = [updates[:4], updates[4:]]
    partials = [(mean_of([(t, float(n)) for t, n in r], f"region{i}"), float(sum(n for _, n in r)))
                for i, r in enumerate(regions)]
    tiered = mean_of(partials, "parent")
    exact = {k: sum(n * t[k].astype(np.float64) for t, n in updates) / sum(n for _, n in updates) for k in flat}
    diff = max(float(np.max(np.abs(flat[k] - tiered[k]))) for k in flat)
    scale = max(float(np.max(np.abs(exact[k]))) for k in flat)
    assert diff <= 4 * np.finfo(np.float32).eps * scale, (diff, scale)
    # Both are float32 roundings of the same float64 mean.
    for k in flat:
        np.testing.assert_allclose(tiered[k], exact[k], rtol=0, atol=4 * np.finfo(np.float32).eps * scale)
