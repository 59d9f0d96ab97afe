"""Shutdown and call hygiene: NOT_SERVING from the first moment of a stop, in-flight
uploads finish within the grace period and survive the restart, and a thousand
abandoned calls leave nothing behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.app import CloudConfig, Coordinator
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tests.support.clients import agent_channel, delta, header_for, start_job, streams, update_messages, wait_rounds

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config(tmp_path: Path, certs_dir: Path, port: int = 0) -> CloudConfig:
    return CloudConfig(listen=f"127.0.0.1:{port}", certs=certs_dir, state=tmp_path / "state", health="127.0.0.1:0",
                       heartbeat_interval=0.5, grace=5.0)


async def test_stop_says_not_serving_at_once_and_lets_an_upload_finish(tmp_path: Path, certs_dir: Path) -> None:
    first = Coordinator(config(tmp_path, certs_dir))
    await first.start()
    a, b = await streams(first.port, certs_dir, ["agent-0", "agent-1"])
    job = await start_job(first.port, certs_dir, model="mlp", rounds=1, min_clients=2, round_deadline_seconds=60)
    task = (await a.next("task")).task
    messages = update_messages(header_for(task), delta(0.01))
    halfway = asyncio.Event()

    async def slow() -> AsyncIterator[pb.UpdateChunk]:
        for index, message in enumerate(messages):
            if index == len(messages) // 2:
                halfway.set()
                await asyncio.sleep(1.0)  # the stop begins here, mid-upload
            yield message

    async with agent_channel(first.port, certs_dir, "agent-0") as channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{first.health_port}") as health:
        watch = health_pb2_grpc.HealthStub(health).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        await channel.channel_ready()  # connected before the stop: the upload is under way, not yet to begin

        async def upload() -> pb.UpdateReceipt:
            receipt: pb.UpdateReceipt = await stub.UploadUpdate(slow(), timeout=30)
            return receipt

        uploading = asyncio.create_task(upload())
        await halfway.wait()
        stopping = asyncio.create_task(first.stop())
        assert (await asyncio.wait_for(anext(aiter(watch)), 0.5)).status == NOT_SERVING
        receipt = await uploading  # finished within the grace period, acknowledged
        await stopping
    for s in (a, b):
        await s.close()
    assert not receipt.duplicate

    second = Coordinator(config(tmp_path, certs_dir, first.port))
    await second.start()
    try:
        again = await agent_send(second.port, certs_dir, "agent-0", update_messages(header_for(task), delta(0.01)))
        assert again.duplicate and again.digest == receipt.digest  # the acknowledged update survived
        await agent_send(second.port, certs_dir, "agent-1", update_messages(header_for(task), delta(0.02)))
        result = (await wait_rounds(second.port, certs_dir, job.job_id, 1)).rounds[0]
        assert list(result.agents) == ["agent-0", "agent-1"]
    finally:
        await second.stop()


async def agent_send(port: int, certs_dir: Path, agent: str, messages: list[pb.UpdateChunk]) -> pb.UpdateReceipt:
    async def stream() -> AsyncIterator[pb.UpdateChunk]:
        for message in messages:
            yield message

    async with agent_channel(port, certs_dir, agent) as channel:
        receipt: pb.UpdateReceipt = await coordinator_pb2_grpc.CoordinatorStub(channel).UploadUpdate(stream(), timeout=30)
        return receipt


async def test_a_thousand_abandoned_calls_leave_nothing_behind(coordinator: Coordinator, certs_dir: Path) -> None:
    """Cancelled and timed-out calls of every kind: open files and threads come back to
    where they were, and the server still answers."""
    process = psutil.Process()
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        await stub.Probe(pb.ProbeRequest(), timeout=5)  # the connection and its threads exist
        await asyncio.sleep(0.5)
        files, threads = process.num_fds(), threading.active_count()

        async def never() -> AsyncIterator[pb.UpdateChunk]:
            await asyncio.Event().wait()
            yield pb.UpdateChunk()

        for i in range(1000):
            if i % 4 == 0:  # a download cancelled after its first message
                call = stub.DownloadModel(pb.ModelRequest(model="mlp", version=0))
                call.cancel()
            elif i % 4 == 1:  # an upload that never sends, timed out
                try:
                    await stub.UploadUpdate(never(), timeout=0.005)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            elif i % 4 == 2:  # a control stream opened and cancelled
                stream = stub.Connect(never_messages())
                await asyncio.sleep(0)
                stream.cancel()
            else:  # a unary call cancelled in flight
                probe = stub.Probe(pb.ProbeRequest(payload=bytes(1024)), timeout=5)
                probe.cancel()
        await asyncio.sleep(1.0)
        assert await stub.Probe(pb.ProbeRequest(), timeout=5) is not None  # still serving
    await asyncio.sleep(0.5)
    assert process.num_fds() <= files + 2, (files, process.num_fds())
    assert threading.active_count() <= threads + 1, (threads, threading.active_count())


async def never_messages() -> AsyncIterator[pb.AgentMessage]:
    await asyncio.Event().wait()
    yield pb.AgentMessage()
