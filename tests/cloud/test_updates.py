"""Update validation, identity, idempotency and FedAvg against a real coordinator.

Agents here are test-driven control streams, so each rejection can be provoked
precisely; the real agent daemon is exercised in test_e2e.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest_asyncio

from cloud.app import Coordinator
from tandem import wire
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc, tensor_pb2
from tests.support.clients import (
    ControlStream,
    admin_channel,
    agent_channel,
    delta,
    download,
    get_job,
    header_for,
    start_job,
    update_messages,
    upload,
    upload_code,
)


@pytest_asyncio.fixture
async def round_one(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[tuple[str, pb.TrainTask]]:
    """A job whose round 1 is open with agent-0 and agent-1 selected; yields (job id, task)."""
    streams = [ControlStream(coordinator.port, certs_dir, f"agent-{i}") for i in range(2)]
    for stream in streams:
        await stream.open()
    job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=2, min_clients=2,
                          round_deadline_seconds=60)
    tasks = [(await s.next("task")).task for s in streams]
    assert {t.round for t in tasks} == {1}
    yield job.job_id, tasks[0]
    for stream in streams:
        await stream.close()


async def test_each_invalid_update_gets_its_status_code(
    coordinator: Coordinator, certs_dir: Path, round_one: tuple[str, pb.TrainTask]
) -> None:
    job_id, task = round_one
    good = delta(0.01)
    nan = delta(0.01)
    nan["0.0.weight" if "0.0.weight" in nan else sorted(nan)[0]][0, 0] = np.nan
    wrong_shape = {**good, sorted(good)[0]: np.zeros((3, 3), np.float32)}
    wrong_dtype = {**good, sorted(good)[0]: good[sorted(good)[0]].astype(np.float16)}
    missing = {k: v for k, v in good.items() if k != sorted(good)[0]}
    extra = {**good, "rogue.weight": np.zeros(4, np.float32)}
    first_chunk = next(wire.iter_chunks({sorted(good)[0]: good[sorted(good)[0]]}))
    overrun = [pb.UpdateChunk(header=header_for(task)), pb.UpdateChunk(tensor=first_chunk),
               pb.UpdateChunk(tensor=first_chunk)]
    huge = pb.UpdateChunk(tensor=tensor_pb2.TensorChunk(name=sorted(good)[0], data=b"\0" * (9 << 20)))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    stale = grpc.StatusCode.FAILED_PRECONDITION
    cases: list[tuple[str, list[pb.UpdateChunk], grpc.StatusCode]] = [
        ("no header", update_messages(header_for(task), good)[1:], invalid),
        ("unknown job", update_messages(header_for(task, job_id="nope"), good), grpc.StatusCode.NOT_FOUND),
        ("future round", update_messages(header_for(task, round=5), good), stale),
        ("stale base version", update_messages(header_for(task, base_version=task.base_version + 7), good), stale),
        ("wrong codec", update_messages(header_for(task, codec="zip"), good), invalid),
        ("no examples", update_messages(header_for(task, num_examples=0), good), invalid),
        ("more examples than declared", update_messages(header_for(task, num_examples=10**6), good), invalid),
        ("non-finite loss", update_messages(header_for(task, local_loss=float("inf")), good), invalid),
        ("non-finite values", update_messages(header_for(task), nan), invalid),
        ("values that would overflow the sum", update_messages(header_for(task), delta(1e37)), invalid),
        ("wrong shape", update_messages(header_for(task), wrong_shape), invalid),
        ("wrong dtype", update_messages(header_for(task), wrong_dtype), invalid),
        ("missing tensor", update_messages(header_for(task), missing), invalid),
        ("unknown tensor", update_messages(header_for(task), extra), invalid),
        ("chunk overruns", overrun, invalid),
        ("two headers", [pb.UpdateChunk(header=header_for(task))] * 2, invalid),
    ]
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        got = {name: await upload_code(stub, messages) for name, messages, _ in cases}
    assert got == {name: code for name, _, code in cases}

    # Nothing was accepted, the round is still open, and the rejections were counted.
    job = await get_job(coordinator.port, certs_dir, job_id)
    assert job.open_round.round == 1 and list(job.open_round.accepted_agents) == []
    # Counted against round 1: every case that names it (not: no header, unknown job, future round).
    assert job.open_round.rejected == len(cases) - 3

    # A message over the server's size limit is refused by gRPC itself.
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert await upload_code(stub, [pb.UpdateChunk(header=header_for(task)), huge]) == \
            grpc.StatusCode.RESOURCE_EXHAUSTED

    # The same agent's valid update is still welcome afterwards.
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        receipt = await upload(coordinator_pb2_grpc.CoordinatorStub(channel), update_messages(header_for(task), good))
    assert receipt.agent_id == "agent-0" and not receipt.duplicate


async def test_identity_idempotency_and_fedavg(
    coordinator: Coordinator, certs_dir: Path, round_one: tuple[str, pb.TrainTask]
) -> None:
    job_id, task = round_one
    a, b = delta(0.01), delta(-0.03)
    async with (agent_channel(coordinator.port, certs_dir, "agent-0") as ch0,
                agent_channel(coordinator.port, certs_dir, "agent-1") as ch1,
                agent_channel(coordinator.port, certs_dir, "agent-2") as ch2,
                admin_channel(coordinator.port, certs_dir) as admin):
        s0, s1, s2 = (coordinator_pb2_grpc.CoordinatorStub(c) for c in (ch0, ch1, ch2))
        first = await upload(s0, update_messages(header_for(task, num_examples=100), a))
        assert first.agent_id == "agent-0" and not first.duplicate

        # A byte-identical re-send is a duplicate; a different one is a conflict.
        again = await upload(s0, update_messages(header_for(task, num_examples=100), a))
        assert again.duplicate and again.digest == first.digest
        assert await upload_code(s0, update_messages(header_for(task, num_examples=100), b)) == \
            grpc.StatusCode.ALREADY_EXISTS
        # agent-2 was not selected; the admin certificate may not upload at all.
        assert await upload_code(s2, update_messages(header_for(task), a)) == grpc.StatusCode.FAILED_PRECONDITION
        assert await upload_code(coordinator_pb2_grpc.CoordinatorStub(admin), update_messages(header_for(task), a)) \
            == grpc.StatusCode.PERMISSION_DENIED
        job = await get_job(coordinator.port, certs_dir, job_id)
        assert list(job.open_round.accepted_agents) == ["agent-0"]

        # agent-1's update is its own, not a duplicate of agent-0's, and closes the round.
        second = await upload(s1, update_messages(header_for(task, num_examples=300), b))
        assert second.agent_id == "agent-1" and not second.duplicate
        for _ in range(100):
            job = await get_job(coordinator.port, certs_dir, job_id)
            if job.rounds:
                break
            await _sleep()
        result = job.rounds[0]
        assert (result.accepted, result.version, list(result.agents)) == (2, task.base_version + 1,
                                                                          ["agent-0", "agent-1"])

        # FedAvg weighted by examples, each capped at the round's median count (200):
        # base + (100 a + 200 b) / 300, with the published hash.
        _, base = await download(s0, "mlp", task.base_version)
        header, new = await download(s0, "mlp", result.version)
        assert header.sha256 == result.sha256 == wire.state_sha256(new)
        assert (result.example_cap, list(result.capped_agents)) == (200, ["agent-1"])
        for name in base:
            np.testing.assert_allclose(new[name], base[name] + (100 * a[name] + 200 * b[name]) / 300, atol=1e-6)

        # After the round closed: an acknowledged re-send is still a duplicate; anything else is stale.
        assert (await upload(s1, update_messages(header_for(task, num_examples=300), b))).duplicate
        assert await upload_code(s2, update_messages(header_for(task), a)) == grpc.StatusCode.FAILED_PRECONDITION


async def _sleep() -> None:
    import asyncio

    await asyncio.sleep(0.05)


async def test_update_over_the_jobs_size_limit_is_resource_exhausted(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    stream = ControlStream(coordinator.port, certs_dir, "agent-3")
    await stream.open()
    try:
        await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1,
                        round_deadline_seconds=60, max_update_bytes=100_000)
        task = (await stream.next("task")).task
        async with agent_channel(coordinator.port, certs_dir, "agent-3") as channel:
            code = await upload_code(coordinator_pb2_grpc.CoordinatorStub(channel),
                                     update_messages(header_for(task), delta(0.01)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await stream.close()
