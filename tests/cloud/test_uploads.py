"""Upload streams that stall or are refused (issue 14, items 5 and 7), against a real
coordinator over mutual TLS: a silent stream is ended DEADLINE_EXCEEDED within the idle
timeout and kept for a resume; kept partials go when their round or job ends; a refused
stream ends at its first bad message with its own code, and the rest is not read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest_asyncio

from cloud.app import CloudConfig, Coordinator
from tandem.errors import peer_status
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc, tensor_pb2
from tandem.v1 import coordinator_pb2 as pb
from tests.support.clients import (
    ControlStream,
    admin_channel,
    agent_channel,
    delta,
    get_job,
    header_for,
    start_job,
    update_messages,
)
from tests.support.waiting import wait_for

IDLE = 1.0


@pytest_asyncio.fixture
async def quick_idle(tmp_path: Path, certs_dir: Path) -> AsyncIterator[Coordinator]:
    """A coordinator that ends an upload after IDLE seconds without a message."""
    config = CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", heartbeat_interval=0.5,
                         grace=1.0, upload_idle_seconds=IDLE)
    server = Coordinator(config)
    await server.start()
    yield server
    await server.stop()


async def _round(server: Coordinator, certs_dir: Path, names: list[str], **spec: object
                 ) -> tuple[str, list[ControlStream], pb.TrainTask]:
    streams = [ControlStream(server.port, certs_dir, name) for name in names]
    for stream in streams:
        await stream.open()
    job = await start_job(server.port, certs_dir, model="mlp", rounds=2, min_clients=1, **spec)
    tasks = [(await s.next("task")).task for s in streams]
    return job.job_id, streams, tasks[0]


async def _stall(stub: coordinator_pb2_grpc.CoordinatorStub, task: pb.TrainTask, chunks: int,
                 silent: asyncio.Event) -> tuple[grpc.StatusCode, float]:
    """Send a header and `chunks` chunks of an update, then nothing until `silent` is set."""
    messages = update_messages(header_for(task, content_sha256="ab" * 32), delta(0.01))[: 1 + chunks]

    async def stream() -> AsyncIterator[pb.UpdateChunk]:
        for message in messages:
            yield message
        await silent.wait()

    start = time.monotonic()
    try:
        await stub.UploadUpdate(stream(), timeout=30)
    except grpc.aio.AioRpcError as exc:
        return peer_status(exc)[0], time.monotonic() - start
    return grpc.StatusCode.OK, time.monotonic() - start


def _parts(server: Coordinator) -> list[Path]:
    return sorted((server.config.state / "updates").glob("*/*/*.part"))


async def test_a_silent_upload_is_ended_within_the_idle_timeout_and_kept_for_resume(
    quick_idle: Coordinator, certs_dir: Path
) -> None:
    _, streams, task = await _round(quick_idle, certs_dir, ["agent-0"], round_deadline_seconds=60)
    never = asyncio.Event()
    async with agent_channel(quick_idle.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        code, seconds = await _stall(stub, task, 1, never)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert IDLE <= seconds < IDLE + 2.0  # not the call's own 30 s deadline
        # What arrived is kept: the agent may resume from it.
        header = header_for(task, content_sha256="ab" * 32)
        assert (await stub.UploadStatus(header, timeout=10)).chunks_received == 1
        assert len(_parts(quick_idle)) == 1
        # A header alone, then silence, is ended the same way.
        code, seconds = await _stall(stub, task, 0, never)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and seconds < IDLE + 2.0
    for stream in streams:
        await stream.close()


async def test_kept_partial_uploads_go_when_their_job_stops(quick_idle: Coordinator, certs_dir: Path) -> None:
    job_id, streams, task = await _round(quick_idle, certs_dir, ["agent-0"], round_deadline_seconds=60)
    async with agent_channel(quick_idle.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert (await _stall(stub, task, 2, asyncio.Event()))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(_parts(quick_idle)) == 1
        async with admin_channel(quick_idle.port, certs_dir) as admin:
            await admin_pb2_grpc.AdminStub(admin).StopJob(admin_pb2.StopJobRequest(job_id=job_id), timeout=10)
        assert _parts(quick_idle) == []  # freed at once, not at some later upload
        header = header_for(task, content_sha256="ab" * 32)
        assert (await stub.UploadStatus(header, timeout=10)).chunks_received == 0
    for stream in streams:
        await stream.close()


async def test_kept_partial_uploads_go_when_their_round_closes(quick_idle: Coordinator, certs_dir: Path) -> None:
    job_id, streams, task = await _round(quick_idle, certs_dir, ["agent-0", "agent-1"], round_deadline_seconds=3)
    async with (agent_channel(quick_idle.port, certs_dir, "agent-0") as ch0,
                agent_channel(quick_idle.port, certs_dir, "agent-1") as ch1):
        stalled = coordinator_pb2_grpc.CoordinatorStub(ch0)
        assert (await _stall(stalled, task, 2, asyncio.Event()))[0] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(_parts(quick_idle)) == 1
        honest = coordinator_pb2_grpc.CoordinatorStub(ch1)
        await honest.UploadUpdate(_iterate(update_messages(header_for(task), delta(0.02))), timeout=30)

        async def closed() -> bool:
            return bool((await get_job(quick_idle.port, certs_dir, job_id)).rounds)

        await wait_for(closed, timeout=15, interval=0.1, message="round 1 to close at its deadline")
        assert _parts(quick_idle) == []
    for stream in streams:
        await stream.close()


async def _iterate(messages: list[pb.UpdateChunk]) -> AsyncIterator[pb.UpdateChunk]:
    for message in messages:
        yield message


async def test_a_refused_upload_ends_at_its_first_bad_message_with_its_own_code(
    quick_idle: Coordinator, certs_dir: Path
) -> None:
    """Before: the coordinator read up to 128 MB more of a refused stream, and the client
    could still see INTERNAL. Now it stops at the first bad message, and the client sees
    the refusal's code every time."""
    _, streams, task = await _round(quick_idle, certs_dir, ["agent-0"], round_deadline_seconds=60,
                                    max_update_bytes=100_000)
    junk = pb.UpdateChunk(tensor=tensor_pb2.TensorChunk(name="x", data=b"\0" * (1 << 20)))
    cases: dict[str, tuple[list[pb.UpdateChunk], grpc.StatusCode]] = {
        "unknown job": ([pb.UpdateChunk(header=header_for(task, job_id="nope"))], grpc.StatusCode.NOT_FOUND),
        "another round": ([pb.UpdateChunk(header=header_for(task, round=7))], grpc.StatusCode.FAILED_PRECONDITION),
        "unknown tensor": ([pb.UpdateChunk(header=header_for(task)),
                            pb.UpdateChunk(tensor=tensor_pb2.TensorChunk(name="x", data=b"\0" * 16))],
                           grpc.StatusCode.INVALID_ARGUMENT),
        "over the job's size limit": (update_messages(header_for(task), delta(0.01)),
                                      grpc.StatusCode.RESOURCE_EXHAUSTED),
    }
    async with agent_channel(quick_idle.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for name, (leading, want) in cases.items():
            for _ in range(5):
                pulled = 0

                async def stream(leading: list[pb.UpdateChunk] = leading) -> AsyncIterator[pb.UpdateChunk]:
                    nonlocal pulled
                    for message in leading:
                        yield message
                    for _ in range(200):  # 200 MB, if anyone read it all
                        pulled += 1
                        yield junk

                try:
                    await stub.UploadUpdate(stream(), timeout=30)
                    got = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    got = peer_status(exc)[0]
                assert got == want, name
                # The server stopped reading: what the client could write is flow control's
                # window beyond the bad message, a few MB, not the 128 MB drained before.
                assert pulled < 24, (name, pulled)
    for stream_ in streams:
        await stream_.close()
