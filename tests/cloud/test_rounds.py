"""Round life cycle against an in-process coordinator: retries, reconnects, restarts, stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from cloud.app import CloudConfig, Coordinator
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc
from tests.support.clients import (
    admin_channel,
    agent_channel,
    delta,
    header_for,
    send,
    start_job,
    streams,
    update_messages,
    upload_code,
    wait_rounds,
)


async def test_round_missing_quorum_is_retried(coordinator: Coordinator, certs_dir: Path) -> None:
    a, b = await streams(coordinator.port, certs_dir, ["agent-0", "agent-1"])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=2,
                              round_deadline_seconds=1.0)
        task = (await a.next("task")).task
        await b.next("task")
        await send(coordinator.port, certs_dir, "agent-0", task, 0.01)
        # agent-1 stays silent: the deadline passes with 1 of 2 updates, and the round opens again.
        again = (await b.next("task", timeout=10)).task  # the second attempt's task
        assert again.round == 1
        await send(coordinator.port, certs_dir, "agent-1", again, 0.02)
        result = (await wait_rounds(coordinator.port, certs_dir, job.job_id, 1)).rounds[0]
        assert (result.accepted, result.attempts) == (2, 2)
    finally:
        for s in (a, b):
            await s.close()


async def test_reconnecting_agent_gets_its_task_again(coordinator: Coordinator, certs_dir: Path) -> None:
    a, b = await streams(coordinator.port, certs_dir, ["agent-0", "agent-1"])
    try:
        await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=2, round_deadline_seconds=60)
        first = (await a.next("task")).task
        await a.close()
        (a,) = await streams(coordinator.port, certs_dir, ["agent-0"])
        again = (await a.next("task")).task
        assert (again.job_id, again.round, again.base_version) == (first.job_id, first.round, first.base_version)
    finally:
        for s in (a, b):
            await s.close()


async def test_stopping_a_job_refuses_its_uploads(coordinator: Coordinator, certs_dir: Path) -> None:
    (a,) = await streams(coordinator.port, certs_dir, ["agent-0"])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=3, min_clients=1,
                              round_deadline_seconds=60)
        task = (await a.next("task")).task
        async with admin_channel(coordinator.port, certs_dir) as channel:
            stopped = await admin_pb2_grpc.AdminStub(channel).StopJob(admin_pb2.StopJobRequest(job_id=job.job_id))
        assert stopped.state == admin_pb2.JOB_STATE_STOPPED
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            code = await upload_code(coordinator_pb2_grpc.CoordinatorStub(channel),
                                     update_messages(header_for(task), delta(0.01)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        await a.close()


async def test_restart_keeps_acknowledged_updates_and_answers_resends_as_duplicates(
    tmp_path: Path, certs_dir: Path
) -> None:
    config = CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", heartbeat_interval=0.5,
                         grace=0.5)
    first = Coordinator(config)
    await first.start()
    a, b = await streams(first.port, certs_dir, ["agent-0", "agent-1"])
    job = await start_job(first.port, certs_dir, model="mlp", rounds=1, min_clients=2, round_deadline_seconds=60)
    task = (await a.next("task")).task
    receipt = await send(first.port, certs_dir, "agent-0", task, 0.01)
    for s in (a, b):
        await s.close()
    await first.stop()

    second = Coordinator(CloudConfig(listen=f"127.0.0.1:{first.port}", certs=certs_dir, state=tmp_path / "state",
                                     heartbeat_interval=0.5, grace=0.5))
    await second.start()
    try:
        # Before any agent reconnects, the resumed round already takes uploads; a re-send
        # of the acknowledged update (its receipt lost, say) is a duplicate, not a second vote.
        again = await send(second.port, certs_dir, "agent-0", task, 0.01)
        assert again.duplicate and again.digest == receipt.digest
        await send(second.port, certs_dir, "agent-1", task, 0.03)
        result = (await wait_rounds(second.port, certs_dir, job.job_id, 1)).rounds[0]
        assert (result.accepted, list(result.agents)) == (2, ["agent-0", "agent-1"])
    finally:
        await second.stop()


async def test_concurrent_uploads_are_spooled_apart(tmp_path: Path, certs_dir: Path) -> None:
    # Three dense updates arriving at once: each has a spool file of its own, and none is left behind.
    server = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state",
                                     heartbeat_interval=0.5, grace=0.5))
    await server.start()
    opened = await streams(server.port, certs_dir, ["agent-0", "agent-1", "agent-2"])
    try:
        job = await start_job(server.port, certs_dir, model="mlp", rounds=1, min_clients=3, round_deadline_seconds=60)
        task = (await opened[0].next("task")).task
        receipts = await asyncio.gather(*(send(server.port, certs_dir, f"agent-{i}", task, 0.01 * i) for i in range(3)))
        assert sorted(r.agent_id for r in receipts) == ["agent-0", "agent-1", "agent-2"]
        result = (await wait_rounds(server.port, certs_dir, job.job_id, 1)).rounds[0]
        assert result.accepted == 3
        assert not list((tmp_path / "state" / "updates").rglob("*.part"))
    finally:
        for s in opened:
            await s.close()
        await server.stop()
