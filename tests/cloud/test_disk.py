"""A full disk (issue 14, item 3): on a real small filesystem (a tmpfs of 20 MB as the
state directory, filled with a ballast file), a round whose close meets a full disk
stays open and closes once space returns, with every acknowledged update; uploads are
refused below the reserve and taken again by themselves; a job start says why it failed."""

from __future__ import annotations

import argparse
import errno
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from cloud.app import CloudConfig, Coordinator
from cloud.disk import HEALTH_NAME
from tandem.errors import NO_SPACE_MESSAGE, NoSpace, out_of_space, peer_status, status_of
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem_lab.volume import SmallVolume
from tests.support.clients import (
    SPECS,
    agent_channel,
    delta,
    download,
    get_job,
    header_for,
    send,
    start_job,
    streams,
    update_messages,
    upload,
    wait_rounds,
)
from tests.support.waiting import wait_for

UPDATE_BYTES = sum(spec.nbytes for spec in SPECS.values())  # a dense mlp update, as `send` uploads it


@asynccontextmanager
async def coordinator_on(state: Path, certs_dir: Path, reserve: int, port: int = 0) -> AsyncIterator[Coordinator]:
    server = Coordinator(CloudConfig(listen=f"127.0.0.1:{port}", certs=certs_dir, state=state, health="127.0.0.1:0",
                                     heartbeat_interval=0.5, grace=0.5, disk_reserve=reserve))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def deferred() -> float:
    return REGISTRY.get_sample_value("tandem_coordinator_rounds_deferred_no_space_total") or 0.0


def test_out_of_space_errors_are_resource_exhausted(tmp_path: Path) -> None:
    # A real SQLITE_FULL: SQLite refuses to grow a database past max_page_count as it
    # refuses a full disk.
    db = sqlite3.connect(tmp_path / "full.db")
    db.execute("CREATE TABLE t (x BLOB)")
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", (bytes(1 << 16),))
    db.close()
    for exc in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
                full.value):
        assert out_of_space(exc)
        assert status_of(exc) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NO_SPACE_MESSAGE)
    assert not out_of_space(OSError(errno.EIO, "I/O error"))
    assert status_of(OSError(errno.EIO, "I/O error")) == (grpc.StatusCode.INTERNAL, "internal error")
    assert status_of(NoSpace("below the reserve"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_job_start_on_a_full_disk_says_why(small_volume: SmallVolume, certs_dir: Path) -> None:
    async with coordinator_on(small_volume.path, certs_dir, reserve=0) as server:
        small_volume.fill()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await start_job(server.port, certs_dir, model="mlp", rounds=1, min_clients=1)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details() == NO_SPACE_MESSAGE
        small_volume.empty()
        job = await start_job(server.port, certs_dir, model="mlp", rounds=1, min_clients=1)
        assert job.state == admin_pb2.JOB_STATE_RUNNING


async def test_uploads_are_refused_below_the_reserve_and_taken_again_when_space_returns(
    small_volume: SmallVolume, certs_dir: Path
) -> None:
    async with coordinator_on(small_volume.path, certs_dir, reserve=4 << 20) as server:
        (a,) = await streams(server.port, certs_dir, ["agent-0"])
        health = grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}")
        try:
            job = await start_job(server.port, certs_dir, model="mlp", rounds=1, min_clients=1,
                                  round_deadline_seconds=60)
            task = (await a.next("task")).task
            small_volume.fill(leave=2 << 20)
            async with agent_channel(server.port, certs_dir, "agent-0") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await upload(coordinator_pb2_grpc.CoordinatorStub(channel),
                                 update_messages(header_for(task), delta(0.01)))
            code, details = peer_status(refused.value)  # an upload refused at once (errors.EndsStream)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "below its reserve of 4.0 MiB" in details
            assert REGISTRY.get_sample_value("tandem_coordinator_state_low_space") == 1
            assert REGISTRY.get_sample_value("tandem_coordinator_state_reserve_bytes") == 4 << 20

            # Health: the state volume's entry says so; the server stays SERVING (Kubernetes keeps routing).
            stub = health_pb2_grpc.HealthStub(health)

            async def status(service: str) -> int:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                return int(response.status)

            async def is_(wanted: int) -> bool:
                return await status(HEALTH_NAME) == wanted

            await wait_for(lambda: is_(health_pb2.HealthCheckResponse.NOT_SERVING), timeout=10, interval=0.2,
                           message="the state volume's health to say NOT_SERVING")
            assert await status("") == health_pb2.HealthCheckResponse.SERVING

            small_volume.empty()  # no restart, nothing to do: the next upload is taken
            receipt = await send(server.port, certs_dir, "agent-0", task, 0.01)
            assert not receipt.duplicate
            assert REGISTRY.get_sample_value("tandem_coordinator_state_low_space") == 0
            assert (await wait_rounds(server.port, certs_dir, job.job_id, 1)).rounds[0].accepted == 1
            await wait_for(lambda: is_(health_pb2.HealthCheckResponse.SERVING), timeout=10, interval=0.2,
                           message="the state volume's health to say SERVING again")
        finally:
            await health.close()
            await a.close()


async def test_a_round_that_cannot_close_for_space_stays_open_and_closes_once_space_returns(
    small_volume: SmallVolume, certs_dir: Path
) -> None:
    async with coordinator_on(small_volume.path, certs_dir, reserve=256 << 10) as server:
        a, b = await streams(server.port, certs_dir, ["agent-0", "agent-1"])
        try:
            job = await start_job(server.port, certs_dir, model="mlp", rounds=2, min_clients=2,
                                  round_deadline_seconds=60)
            task = (await a.next("task")).task
            await b.next("task")
            before = deferred()
            await send(server.port, certs_dir, "agent-0", task, 0.01)
            # Room for agent-1's update (above the reserve), not for the version the close writes.
            small_volume.fill(leave=UPDATE_BYTES + (512 << 10))
            second = await send(server.port, certs_dir, "agent-1", task, 0.03)
            assert not second.duplicate  # acknowledged: it must reach the model
            await wait_for(lambda: deferred() > before, timeout=10, message="the close to meet the full disk")
            stalled = await get_job(server.port, certs_dir, job.job_id)
            assert stalled.state == admin_pb2.JOB_STATE_RUNNING, stalled.message
            assert "waits for space" in stalled.message
            assert not stalled.rounds and sorted(stalled.open_round.accepted_agents) == ["agent-0", "agent-1"]

            small_volume.empty()
            closed = (await wait_rounds(server.port, certs_dir, job.job_id, 1)).rounds[0]
            assert (closed.accepted, list(closed.agents)) == (2, ["agent-0", "agent-1"])
            assert (await get_job(server.port, certs_dir, job.job_id)).message == ""
            # Both updates are in it: FedAvg of +0.01 and +0.03 (equal example counts) moves every weight by 0.02.
            async with agent_channel(server.port, certs_dir, "agent-0") as channel:
                stub = coordinator_pb2_grpc.CoordinatorStub(channel)
                _, old = await download(stub, "mlp", task.base_version)
                _, new = await download(stub, "mlp", closed.version)
            for name in old:
                np.testing.assert_allclose(new[name] - old[name], 0.02, atol=1e-6)

            task2 = (await a.next("task")).task
            assert task2.round == 2
            for i, s in enumerate((a, b)):
                await send(server.port, certs_dir, s.name, task2, 0.01 * i)
            done = await wait_rounds(server.port, certs_dir, job.job_id, 2)
            assert done.state == admin_pb2.JOB_STATE_COMPLETED
        finally:
            for s in (a, b):
                await s.close()


async def test_a_round_that_could_not_close_for_space_closes_after_a_restart(
    small_volume: SmallVolume, certs_dir: Path
) -> None:
    async with coordinator_on(small_volume.path, certs_dir, reserve=256 << 10) as first:
        port = first.port
        a, b = await streams(port, certs_dir, ["agent-0", "agent-1"])
        job = await start_job(port, certs_dir, model="mlp", rounds=1, min_clients=2, round_deadline_seconds=60)
        task = (await a.next("task")).task
        before = deferred()
        await send(port, certs_dir, "agent-0", task, 0.01)
        small_volume.fill(leave=UPDATE_BYTES + (512 << 10))
        await send(port, certs_dir, "agent-1", task, 0.03)
        await wait_for(lambda: deferred() > before, timeout=10, message="the close to meet the full disk")
        for s in (a, b):
            await s.close()
    small_volume.empty()
    # Nothing was marked failed: the restarted coordinator resumes the round with both updates.
    async with coordinator_on(small_volume.path, certs_dir, reserve=256 << 10, port=port) as second:
        a, b = await streams(second.port, certs_dir, ["agent-0", "agent-1"])
        try:
            result = await wait_rounds(second.port, certs_dir, job.job_id, 1)
            assert (result.state, list(result.rounds[0].agents)) == (admin_pb2.JOB_STATE_COMPLETED,
                                                                     ["agent-0", "agent-1"])
            assert not list((small_volume.path / "models").rglob("*.tmp"))
        finally:
            for s in (a, b):
                await s.close()


def test_the_reserve_flag_reads_sizes() -> None:
    from tandem_cli.commands.cloud import parse_bytes

    assert [parse_bytes(t) for t in ("256M", "2G", "1.5GiB", "4096", "0")] == [256 << 20, 2 << 30, 3 << 29, 4096, 0]
    for bad in ("lots", "-1M", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_bytes(bad)
