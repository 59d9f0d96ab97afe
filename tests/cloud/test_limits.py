"""Per-agent limits (streams, request rate, request bytes), and replays and stale updates,
against a real coordinator: an agent over a limit is refused with RESOURCE_EXHAUSTED while
another is served as usual; a replay counts once; an update for a closed round or an
unknown base is stale."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cloud.app import Coordinator
from cloud.limits import TokenBucket
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tests.support.clients import (
    ControlStream,
    agent_channel,
    delta,
    get_job,
    header_for,
    start_job,
    update_messages,
    upload,
    upload_code,
)
from tests.support.deployment import Start


def test_token_bucket_refills_and_lets_one_oversized_message_through_from_full() -> None:
    bucket = TokenBucket(rate=10.0, capacity=20.0, tokens=20.0, stamp=0.0)
    assert all(bucket.take(1, 0.0) for _ in range(20)) and not bucket.take(1, 0.0)
    assert bucket.wait(1) == pytest.approx(0.1)
    assert bucket.take(1, 0.1) and not bucket.take(1, 0.1)
    assert not bucket.take(50, 1.0)  # 10 tokens: not full, so not even the capacity's worth
    assert bucket.take(50, 10.0) and bucket.tokens == -30.0  # full: taken, leaving a debt
    assert not bucket.take(1, 12.0) and bucket.take(1, 13.2)


async def probe(stub: coordinator_pb2_grpc.CoordinatorStub) -> tuple[grpc.StatusCode, str, float]:
    start = time.perf_counter()
    try:
        await stub.Probe(pb.ProbeRequest(reply_bytes=16), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", time.perf_counter() - start
    return grpc.StatusCode.OK, "", time.perf_counter() - start


async def test_agent_over_its_request_rate_is_refused_and_others_are_not_slowed(
    limited: Start, certs_dir: Path
) -> None:
    server = await limited(requests_per_second=20.0, request_burst=40)
    async with (agent_channel(server.port, certs_dir, "agent-0") as hammer_channel,
                agent_channel(server.port, certs_dir, "agent-1") as calm_channel):
        hammer, calm = (coordinator_pb2_grpc.CoordinatorStub(c) for c in (hammer_channel, calm_channel))
        baseline = [(await probe(calm))[2] for _ in range(10)]
        done = asyncio.Event()
        hammered: list[tuple[grpc.StatusCode, str, float]] = []

        async def hammering() -> None:
            while not done.is_set():
                hammered.append(await probe(hammer))

        start = time.perf_counter()
        workers = [asyncio.create_task(hammering()) for _ in range(16)]
        await asyncio.sleep(0.2)
        during = []
        for _ in range(20):  # agent-1 stays within its own 20 per second (bursts of 40)
            during.append(await probe(calm))
            await asyncio.sleep(0.02)
        done.set()
        await asyncio.gather(*workers)
        seconds = time.perf_counter() - start

    codes = Counter(code for code, _, _ in hammered)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.OK] <= 40 + 20 * seconds + 2  # the burst, and the refill while it lasted
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 4 * codes[grpc.StatusCode.OK]
    refused = next(details for code, details, _ in hammered if code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "agent 'agent-0' is over its limit of 20 requests per second" in refused
    # agent-1 is served all the while, at about its usual latency.
    assert [code for code, _, _ in during] == [grpc.StatusCode.OK] * 20
    assert statistics.median(t for _, _, t in during) < max(5 * statistics.median(baseline), 0.05)


async def hold_upload(stub: coordinator_pb2_grpc.CoordinatorStub, release: asyncio.Event) -> grpc.aio.StreamUnaryCall:
    """An upload stream that stays open, sending nothing, until `release`."""

    async def nothing_yet() -> AsyncIterator[pb.UpdateChunk]:
        await release.wait()
        return
        yield  # an async generator that yields nothing

    return stub.UploadUpdate(nothing_yet(), timeout=30)


async def code_of(call: grpc.aio.Call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_agent_over_its_stream_limit_is_refused_and_others_still_open_streams(
    limited: Start, certs_dir: Path
) -> None:
    server = await limited(max_streams=3)
    release, later = asyncio.Event(), asyncio.Event()
    control = ControlStream(server.port, certs_dir, "agent-0")
    await control.open()  # the control stream is one of agent-0's three
    try:
        async with (agent_channel(server.port, certs_dir, "agent-0") as ch0,
                    agent_channel(server.port, certs_dir, "agent-1") as ch1):
            s0, s1 = coordinator_pb2_grpc.CoordinatorStub(ch0), coordinator_pb2_grpc.CoordinatorStub(ch1)
            held = [await hold_upload(s0, release) for _ in range(2)]
            others = [await hold_upload(s1, later) for _ in range(3)]
            await asyncio.sleep(0.3)
            refused = await hold_upload(s0, later)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await refused
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "agent 'agent-0' has 3 streams open, its limit" in (error.value.details() or "")
            assert not any(call.done() for call in [*held, *others])  # agent-1's three are open too

            # Streams that end free their place: agent-0 may open another.
            release.set()
            assert [await code_of(call) for call in held] == [grpc.StatusCode.INVALID_ARGUMENT] * 2  # no header
            again = await hold_upload(s0, later)
            await asyncio.sleep(0.3)
            assert not again.done()
            later.set()
            assert await code_of(again) == grpc.StatusCode.INVALID_ARGUMENT
            assert [await code_of(c) for c in others] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    finally:
        await control.close()


async def open_round(
    port: int, certs_dir: Path, agents: list[str], **spec: object
) -> tuple[str, pb.TrainTask, list[ControlStream]]:
    """A job whose round 1 is open with `agents` selected: (job id, agent 0's task, control streams)."""
    streams = [ControlStream(port, certs_dir, name) for name in agents]
    for stream in streams:
        await stream.open()
    spec.setdefault("min_clients", len(agents))
    job = await start_job(port, certs_dir, model="mlp", rounds=2, **spec)
    tasks = [(await s.next("task")).task for s in streams]
    return job.job_id, tasks[0], streams


async def test_agent_over_its_upload_bytes_is_refused_mid_upload_and_others_upload(
    limited: Start, certs_dir: Path
) -> None:
    update_bytes = sum(a.nbytes for a in delta(0.01).values())  # about 1.2 MB
    server = await limited(bytes_per_second=64 << 10, byte_burst=int(1.5 * update_bytes))
    job_id, task, streams = await open_round(server.port, certs_dir, ["agent-0", "agent-1"],
                                             round_deadline_seconds=60)
    try:
        async with (agent_channel(server.port, certs_dir, "agent-0") as ch0,
                    agent_channel(server.port, certs_dir, "agent-1") as ch1):
            s0, s1 = coordinator_pb2_grpc.CoordinatorStub(ch0), coordinator_pb2_grpc.CoordinatorStub(ch1)
            messages = update_messages(header_for(task), delta(0.01))
            assert not (await upload(s0, messages)).duplicate
            with pytest.raises(grpc.aio.AioRpcError) as error:  # the re-send does not fit what is left
                await upload(s0, messages)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            refused = str(error.value.details())
            assert "agent 'agent-0' is over its limit of 0.0625 MiB per second of requests" in refused
            receipt = await upload(s1, update_messages(header_for(task), delta(-0.01)))
            assert receipt.agent_id == "agent-1" and not receipt.duplicate
        job = await get_job(server.port, certs_dir, job_id)
        assert [r.accepted for r in job.rounds] == [2] or list(job.open_round.accepted_agents) == ["agent-0", "agent-1"]
    finally:
        for stream in streams:
            await stream.close()


# ---- replays and stale updates ----------------------------------------------------------


async def test_replays_count_once_and_cannot_change_an_update(coordinator: Coordinator, certs_dir: Path) -> None:
    job_id, task, streams = await open_round(coordinator.port, certs_dir, ["agent-0", "agent-1"],
                                             round_deadline_seconds=60)
    try:
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            messages = update_messages(header_for(task), delta(0.01))
            # Byte-identical re-sends racing each other: one is accepted, the others are duplicates.
            receipts = await asyncio.gather(*(upload(stub, messages) for _ in range(4)))
            assert sorted(r.duplicate for r in receipts) == [False, True, True, True]
            assert len({r.digest for r in receipts}) == 1
            # The same tensors with another weight or loss are another update: a conflict.
            for changed in (dict(num_examples=999), dict(local_loss=0.25)):
                code = await upload_code(stub, update_messages(header_for(task, **changed), delta(0.01)))
                assert code == grpc.StatusCode.ALREADY_EXISTS, changed
        job = await get_job(coordinator.port, certs_dir, job_id)
        assert list(job.open_round.accepted_agents) == ["agent-0"] and job.open_round.rejected == 2
    finally:
        for stream in streams:
            await stream.close()


async def test_updates_for_a_closed_round_or_an_unknown_base_are_stale(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    # Three selected, quorum two: the round closes at its deadline without agent-2's update.
    job_id, task, streams = await open_round(coordinator.port, certs_dir, ["agent-0", "agent-1", "agent-2"],
                                             min_clients=2, round_deadline_seconds=2.0)
    try:
        stale = grpc.StatusCode.FAILED_PRECONDITION
        async with (agent_channel(coordinator.port, certs_dir, "agent-0") as ch0,
                    agent_channel(coordinator.port, certs_dir, "agent-1") as ch1,
                    agent_channel(coordinator.port, certs_dir, "agent-2") as ch2):
            s0, s1, s2 = (coordinator_pb2_grpc.CoordinatorStub(c) for c in (ch0, ch1, ch2))
            mine = update_messages(header_for(task), delta(0.01))
            await upload(s0, mine)
            await upload(s1, update_messages(header_for(task), delta(0.02)))
            assert await upload_code(s2, update_messages(header_for(task, base_version=999), delta(0.03))) == stale
            second = (await streams[2].next("task", timeout=10)).task  # round 2 opened after the deadline
            assert (second.round, second.base_version) == (2, task.base_version + 1)

            # agent-2 was selected for round 1 but did not answer in time: round 1 is closed.
            assert await upload_code(s2, update_messages(header_for(task), delta(0.03))) == stale
            # Round 2 trains from the new version: the previous one, and one that never existed, are stale.
            for base in (task.base_version, second.base_version + 5):
                code = await upload_code(s2, update_messages(header_for(second, base_version=base), delta(0.03)))
                assert code == stale, base
            # agent-0's accepted round-1 update: a replay is still a duplicate, a change a conflict.
            assert (await upload(s0, mine)).duplicate
            changed = update_messages(header_for(task), delta(0.05))
            assert await upload_code(s0, changed) == grpc.StatusCode.ALREADY_EXISTS
        job = await get_job(coordinator.port, certs_dir, job_id)
        assert (job.rounds[0].accepted, list(job.rounds[0].agents)) == (2, ["agent-0", "agent-1"])
        assert job.open_round.round == 2 and list(job.open_round.accepted_agents) == []
    finally:
        for stream in streams:
            await stream.close()
