"""A region as a real process, killed (SIGKILL) mid-round and started again on its state:
the parent's job completes, and the partial aggregate counts every update the region
acknowledged before it died. Real `tandem cloud`, `tandem region` and `tandem edge`
processes over mutual TLS."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tandem import certs
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli import procs
from tests.support.clients import admin_channel, get_job, start_job
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.process]


async def open_round(port: int, certs_dir: Path) -> admin_pb2.OpenRound | None:
    """The region's open local round, if any."""
    async with admin_channel(port, certs_dir) as channel:
        jobs = await admin_pb2_grpc.AdminStub(channel).ListJobs(admin_pb2.ListJobsRequest(), wait_for_ready=True,
                                                                 timeout=10)
    running = [j for j in jobs.jobs if j.state == admin_pb2.JOB_STATE_RUNNING and j.HasField("open_round")]
    return running[0].open_round if running else None


async def test_a_region_killed_mid_round_loses_no_acknowledged_update(tmp_path: Path) -> None:
    deployment = tmp_path / "certs"
    certs.init_deployment(deployment, ["agent-0", "agent-1", "agent-2"])
    certs.add_region(deployment, "west")
    started = []
    try:
        cloud, ports = procs.start_cloud(deployment, tmp_path / "cloud", tmp_path / "cloud.log")
        started.append(cloud)
        parent = f"localhost:{ports['port']}"
        # The region's rounds need all three of its agents. The third is frozen (SIGSTOP)
        # once connected: selected with the others, it trains nothing, so the region's
        # round stays open with two acknowledged updates.
        region_flags = ["--min-clients", "3"]
        region, region_ports = procs.start_region(parent, deployment, "west", tmp_path / "west", tmp_path / "west.log",
                                                  extra=region_flags)
        started.append(region)
        port = region_ports["port"]
        agents = [procs.start_agent(f"localhost:{port}", deployment, f"agent-{i}", f"digits:{i}/3",
                                    tmp_path / f"agent-{i}.log", extra=["--no-warmup"]) for i in range(3)]
        started += agents

        async def connected() -> bool:
            async with admin_channel(port, deployment) as channel:
                listed = await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(),
                                                                            wait_for_ready=True, timeout=10)
            return sum(a.connected for a in listed.agents) == 3

        await wait_for(connected, timeout=90, interval=0.2, message="three agents connected to the region")
        agents[2].send_signal(signal.SIGSTOP)
        job = await start_job(ports["port"], deployment, model="mlp", rounds=1, min_clients=1,
                              round_deadline_seconds=120, epochs=1)

        async def two_acknowledged() -> bool:
            rnd = await open_round(port, deployment)
            return rnd is not None and len(rnd.accepted_agents) == 2

        await wait_for(two_acknowledged, timeout=60, interval=0.2, message="two updates acknowledged by the region")
        region.send_signal(signal.SIGKILL)  # mid-round: two updates acknowledged, nothing sent up
        region.wait()
        region, _ = procs.start_region(parent, deployment, "west", tmp_path / "west", tmp_path / "west2.log",
                                       listen=f"127.0.0.1:{port}", extra=region_flags)
        started.append(region)
        agents[2].send_signal(signal.SIGCONT)  # it reconnects to the region and trains its task

        async def ended() -> admin_pb2.Job | None:
            status = await get_job(ports["port"], deployment, job.job_id)
            return status if status.state != admin_pb2.JOB_STATE_RUNNING else None

        done = await wait_for(ended, timeout=120, interval=0.2, message="the parent's job to end")
        assert done.state == admin_pb2.JOB_STATE_COMPLETED, done.message
        assert list(done.rounds[0].agents) == ["region:west"]
        # The partial is the three agents': the two acknowledged before the kill, and the third.
        async with admin_channel(port, deployment) as channel:
            jobs = await admin_pb2_grpc.AdminStub(channel).ListJobs(admin_pb2.ListJobsRequest(), timeout=10)
        (local,) = [j for j in jobs.jobs if j.state == admin_pb2.JOB_STATE_COMPLETED]
        assert sorted(local.rounds[0].agents) == ["agent-0", "agent-1", "agent-2"]
    finally:
        for proc in reversed(started):
            procs.stop(proc)
