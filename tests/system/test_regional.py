"""Regional aggregators with real agent daemons (in this process, over real mutual TLS
sockets): the same agents under two regions train the same model as under one flat
coordinator, for FedAvg and FedAdam; a region's agents download the parent's version
from the region; a region killed mid-round and started again on its state loses no
update it acknowledged; a version the parent serves is served by the region."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from region.app import Region, RegionConfig

from cloud.app import CloudConfig, Coordinator
from cloud.store import JobState
from cloud.tensorfile import read_tensors
from edge.agent import Agent, AgentConfig
from tandem import certs
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli.admin import agent_line, agent_rows
from tests.support.clients import admin_channel, get_job, start_job
from tests.support.waiting import wait_for

# real federated training over two tiers: 10-30 s each
pytestmark = pytest.mark.slow

AGENT_NAMES = [f"agent-{i}" for i in range(4)]
REGIONS = ["north", "south"]


@pytest.fixture(scope="module")
def regional_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("regional-certs")
    certs.init_deployment(directory, AGENT_NAMES)
    for name in REGIONS:
        certs.add_region(directory, name)
    return directory


@asynccontextmanager
async def coordinator(state: Path, certs_dir: Path) -> AsyncIterator[Coordinator]:
    server = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=state, heartbeat_interval=0.5,
                                     grace=1.0))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def agents(ports: list[int], certs_dir: Path, fallback: int | None = None) -> AsyncIterator[list[Agent]]:
    """One daemon per agent, agent i on partition i of 4, connected to ports[i]."""
    stop = asyncio.Event()
    fallbacks = (f"localhost:{fallback}",) if fallback else ()
    daemons = [Agent(AgentConfig(cloud=f"localhost:{port}", certs=certs_dir, agent_id=name,
                                 data=f"digits:{i}/{len(AGENT_NAMES)}", backoff_initial=0.1, backoff_max=0.5,
                                 fallbacks=fallbacks))
               for i, (name, port) in enumerate(zip(AGENT_NAMES, ports, strict=True))]
    tasks = [asyncio.create_task(d.run(stop)) for d in daemons]
    try:
        async with asyncio.timeout(30):
            for daemon in daemons:
                await daemon.welcomed.wait()
        yield daemons
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def region_config(name: str, parent: int, state: Path, certs_dir: Path, min_clients: int = 2) -> RegionConfig:
    return RegionConfig(parent=f"localhost:{parent}", name=name, certs=certs_dir, listen="127.0.0.1:0",
                        state=state, min_clients=min_clients, heartbeat_interval=0.5, backoff_initial=0.1, backoff_max=0.5)


@asynccontextmanager
async def regions(parent: int, tmp: Path, certs_dir: Path) -> AsyncIterator[list[Region]]:
    async with AsyncExitStack() as stack:
        started = []
        for name in REGIONS:
            region = Region(region_config(name, parent, tmp / name, certs_dir))
            await region.start()
            stack.push_async_callback(region.stop)
            started.append(region)
        yield started


async def finished(port: int, certs_dir: Path, job_id: str, timeout: float = 120) -> admin_pb2.Job:
    async def done() -> admin_pb2.Job | None:
        job = await get_job(port, certs_dir, job_id)
        return job if job.state != admin_pb2.JOB_STATE_RUNNING else None

    return await wait_for(done, timeout=timeout, interval=0.2, message=f"job {job_id} to end")


def final_model(server: Coordinator, job: admin_pb2.Job) -> dict[str, np.ndarray]:
    return read_tensors(Path(server.models.version(job.spec.model, job.version).path))


# weight_cap high enough never to bind: a region caps its own agents against their own median
# (docs/scale-out.md), so where a cap binds two tiers weigh differently from one.
SPEC = dict(model="mlp", rounds=3, min_clients=4, round_deadline_seconds=60, eval="digits", seed=7,
            weight_cap=100.0)


async def _flat_and_two_tier(tmp: Path, certs_dir: Path, **spec: object) -> tuple[admin_pb2.Job, admin_pb2.Job,
                                                                                      float]:
    async with coordinator(tmp / "flat", certs_dir) as flat:
        async with agents([flat.port] * 4, certs_dir):
            job = await start_job(flat.port, certs_dir, **{**SPEC, **spec})
            flat_job = await finished(flat.port, certs_dir, job.job_id)
            flat_model = final_model(flat, flat_job)
    async with coordinator(tmp / "parent", certs_dir) as parent:
        async with regions(parent.port, tmp, certs_dir) as (north, south):
            async with agents([north.port, north.port, south.port, south.port], certs_dir):
                job = await start_job(parent.port, certs_dir, **{**SPEC, **spec})
                tiered_job = await finished(parent.port, certs_dir, job.job_id)
                tiered_model = final_model(parent, tiered_job)
                # Every agent trained from its region: the parent sent each version to
                # the two regions, never to an agent.
                for region in (north, south):
                    relayed = [r for r in region.coordinator.store.list_jobs() if r.spec.parent_job == job.job_id]
                    assert len(relayed) == SPEC["rounds"]
                    assert all(r.state == JobState.COMPLETED for r in relayed)
    worst = max(float(np.max(np.abs(flat_model[k] - tiered_model[k]))) for k in flat_model)
    return flat_job, tiered_job, worst


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
async def test_two_tiers_train_the_flat_model(tmp_path: Path, regional_certs: Path, strategy: str) -> None:
    flat, tiered, worst = await _flat_and_two_tier(tmp_path, regional_certs, strategy=strategy)
    assert flat.state == tiered.state == admin_pb2.JOB_STATE_COMPLETED, (flat.message, tiered.message)
    for r in tiered.rounds:
        assert sorted(r.agents) == ["region:north", "region:south"]  # one partial aggregate each
    # float32 sums in another order: rounding, nothing more (docs/scale-out.md states the bound).
    print(f"{strategy}: max abs difference to flat {worst:.3g}")
    assert worst <= 1e-5, worst
    assert abs(flat.rounds[-1].accuracy - tiered.rounds[-1].accuracy) <= 0.01
    assert tiered.rounds[-1].accuracy > 0.7  # it learns (3 rounds; FedAdam from 0.1 to ~0.75)


async def test_a_region_stopped_mid_round_loses_no_acknowledged_update(tmp_path: Path, regional_certs: Path) -> None:
    async with coordinator(tmp_path / "parent", regional_certs) as parent:
        config = region_config("north", parent.port, tmp_path / "north", regional_certs, min_clients=4)
        north = Region(config)
        await north.start()
        try:
            async with agents([north.port] * 4, regional_certs) as daemons:
                # The region's round needs all four agents; one ignores its task until the
                # region has gone and come back, so the round stays open with three.
                late = daemons[3]
                late.trainer.on_task = lambda task: None  # type: ignore[method-assign]
                job = await start_job(parent.port, regional_certs, **{**SPEC, "min_clients": 1, "rounds": 1})

                def acknowledged() -> int:
                    relayed = [r for r in north.coordinator.store.list_jobs() if r.spec.parent_job == job.job_id]
                    return len(north.coordinator.store.list_updates(relayed[0].job_id, 1)) if relayed else 0

                await wait_for(lambda: acknowledged() == 3, timeout=60, message="three updates in the region")
                await north.stop()  # mid-round: three updates acknowledged to their agents, nothing sent up
                del late.trainer.on_task
                north = Region(replace(config, listen=f"127.0.0.1:{north.port}"))
                await north.start()
                done = await finished(parent.port, regional_certs, job.job_id)
                partials = parent.store.list_updates(job.job_id, 1)
        finally:
            await north.stop()
    assert done.state == admin_pb2.JOB_STATE_COMPLETED, done.message
    assert [(u.agent, u.contributors) for u in partials] == [("region:north", 4)]  # the three and the late one


async def test_a_version_the_parent_serves_is_served_by_the_region(tmp_path: Path, regional_certs: Path) -> None:
    async with coordinator(tmp_path / "parent", regional_certs) as parent:
        async with regions(parent.port, tmp_path, regional_certs) as (north, south):
            async with agents([north.port, north.port, south.port, south.port], regional_certs):
                job = await start_job(parent.port, regional_certs, **{**SPEC, "min_clients": 2, "rounds": 1,
                                                                     "promote": "on-complete"})
                done = await finished(parent.port, regional_certs, job.job_id)
                assert done.state == admin_pb2.JOB_STATE_COMPLETED, done.message
                served = parent.models.serving("mlp")
                assert served is not None

                def region_serves() -> bool:
                    row = north.coordinator.models.serving("mlp")
                    return row is not None and row.sha256 == served.sha256

                await wait_for(region_serves, timeout=30, message="the region to serve the parent's version")
                async with admin_channel(north.port, regional_certs) as channel:
                    listed = await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest())
                assert {a.agent_id for a in listed.agents if a.connected} == set(AGENT_NAMES[:2])


async def test_agents_of_a_lost_region_fail_over_to_another(tmp_path: Path, regional_certs: Path) -> None:
    async with coordinator(tmp_path / "parent", regional_certs) as parent:
        async with regions(parent.port, tmp_path, regional_certs) as (north, south):
            async with agents([north.port, north.port, south.port, south.port], regional_certs,
                              fallback=south.port) as daemons:
                await wait_for(lambda: len(north.coordinator.registry.connected()) == 2, timeout=10,
                               message="two agents in the north")
                await north.stop()  # the region is lost: its agents go to their fallback
                await wait_for(lambda: len(south.coordinator.registry.connected()) == 4, timeout=30,
                               message="all four agents in the south")
                assert all(d.welcomed.is_set() for d in daemons)
                before = sample("tandem_region_partials_total", outcome="ready")
                job = await start_job(parent.port, regional_certs, **{**SPEC, "min_clients": 4, "rounds": 1})
                done = await finished(parent.port, regional_certs, job.job_id)
                partials = parent.store.list_updates(job.job_id, 1)
                assert sample("tandem_region_agents") == 4

                async def shown() -> str:  # the tree at the parent: the region, its agents, its round's time
                    async with admin_channel(parent.port, regional_certs) as channel:
                        rows = await agent_rows(admin_pb2_grpc.AdminStub(channel))
                    return next((agent_line(r) for r in rows if r["agent_id"] == "region:south" and r["connected"]
                                 and "last round" in agent_line(r)), "")

                line = await wait_for(shown, timeout=10, message="the region's round in tandem agents")
                assert "region of 4 agents, last round " in line
    assert done.state == admin_pb2.JOB_STATE_COMPLETED, done.message
    assert [(u.agent, u.contributors) for u in partials] == [("region:south", 4)]
    assert sample("tandem_region_partials_total", outcome="ready") == before + 1
    assert sample("tandem_tier_info", tier="region", name="south") == 1


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0
