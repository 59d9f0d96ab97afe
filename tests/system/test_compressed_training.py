"""Compressed federated training with real agent daemons (in this process, over real
mTLS sockets): every codec converges, downlink deltas reproduce the published
versions bit for bit, and transfers resume where they broke."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from cloud.app import Coordinator
from edge.agent import Agent, AgentConfig
from tandem import compression, wire
from tandem.transfer import Download
from tandem.v1 import admin_pb2, coordinator_pb2_grpc, tensor_pb2
from tandem.v1 import coordinator_pb2 as pb
from tests.support.clients import SPECS, ControlStream, agent_channel, delta, download, get_job, header_for, start_job, upload

# real federated training, one job per codec and strategy: 2-6 s each, ~40 s in all
pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def agents(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[list[Agent]]:
    """Three agent daemons on partitions of the reference workload."""
    stop = asyncio.Event()
    daemons = [
        Agent(AgentConfig(cloud=f"localhost:{coordinator.port}", certs=certs_dir, agent_id=f"agent-{i}",
                          data=f"digits:{i}/3", backoff_initial=0.1, backoff_max=1.0))
        for i in range(3)
    ]
    tasks = [asyncio.create_task(d.run(stop)) for d in daemons]
    async with asyncio.timeout(20):
        for daemon in daemons:
            await daemon.welcomed.wait()
    yield daemons
    stop.set()
    await asyncio.gather(*tasks)


async def run_job(port: int, certs_dir: Path, rounds: int, **spec: object) -> admin_pb2.Job:
    job = await start_job(port, certs_dir, model="mlp", rounds=rounds, min_clients=3, round_deadline_seconds=60,
                          eval="digits", **spec)
    async with asyncio.timeout(120):
        while True:
            job = await get_job(port, certs_dir, job.job_id)
            if job.state != admin_pb2.JOB_STATE_RUNNING:
                return job
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("update_codec", ["none", "fp16", "int8", "topk:0.05+int8", "topk:0.02", "auto"])
async def test_every_codec_converges(
    coordinator: Coordinator, certs_dir: Path, agents: list[Agent], update_codec: str
) -> None:
    job = await run_job(coordinator.port, certs_dir, rounds=5, codec=update_codec)
    assert job.state == admin_pb2.JOB_STATE_COMPLETED, job.message
    assert job.rounds[-1].accuracy > 0.85
    for r in job.rounds:
        assert set(r.codecs) == {"agent-0", "agent-1", "agent-2"}
        if update_codec != "auto":
            assert set(r.codecs.values()) == {update_codec}
    if update_codec == "auto":
        # Loopback is fast: once measured, every agent is given dense updates.
        assert set(job.rounds[-1].codecs.values()) == {"none"}


async def test_downlink_deltas_reproduce_every_published_version(
    coordinator: Coordinator, certs_dir: Path, agents: list[Agent]
) -> None:
    job = await run_job(coordinator.port, certs_dir, rounds=10, codec="topk:0.01+int8")
    assert job.state == admin_pb2.JOB_STATE_COMPLETED, job.message
    model_bytes = sum(spec.nbytes for spec in SPECS.values())
    for r in job.rounds[1:]:
        assert 0 < r.delta_bytes <= model_bytes / 20
        # after the first round, each agent fetched the delta, not the model
        assert r.bytes_down <= 3 * model_bytes / 10
    # Each agent verified the hash of every version it reconstructed (a mismatch is
    # retried and would show as a failed round); the held copy equals the published one.
    last = job.rounds[-1]
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        header, published = await download(coordinator_pb2_grpc.CoordinatorStub(channel), "mlp", last.version)
    for daemon in agents:
        await _run_until(lambda daemon=daemon: daemon.held["mlp"].version >= last.version - 1)
    held = agents[0].held["mlp"]
    _, previous = await _fetch(coordinator.port, certs_dir, held.version)
    assert held.sha256 == wire.state_sha256(previous)
    for name in held.arrays:
        assert np.array_equal(held.arrays[name], previous[name])
    assert header.sha256 == last.sha256 == wire.state_sha256(published)


async def _fetch(port: int, certs_dir: Path, version: int) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
    async with agent_channel(port, certs_dir, "agent-0") as channel:
        return await download(coordinator_pb2_grpc.CoordinatorStub(channel), "mlp", version)


async def _run_until(check: Callable[[], bool], timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_download_resumes_after_the_chunks_it_has(coordinator: Coordinator, certs_dir: Path) -> None:
    (stream,) = [ControlStream(coordinator.port, certs_dir, "agent-0")]
    await stream.open()
    try:
        task = (await _task(coordinator, certs_dir, stream))
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            full = [m async for m in stub.DownloadModel(pb.ModelRequest(model="mlp", version=task.base_version))]
            # A download that broke after 3 chunks: the next run asks for the rest only.
            broken = Download("mlp", task.base_version, task.base_sha256, SPECS)
            broken._begin(full[0].header)
            assert broken.assembler is not None
            for message in full[1:4]:
                broken.assembler.add(message.tensor)
            broken.chunks = 3
            arrays = await broken.run(stub, timeout=10)
            assert wire.state_sha256(arrays) == task.base_sha256
            assert broken.wire < sum(m.ByteSize() for m in full) * 0.9
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _ in stub.DownloadModel(pb.ModelRequest(model="mlp", version=task.base_version,
                                                                  skip_chunks=999)):
                    pass
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await stream.close()


async def _task(coordinator: Coordinator, certs_dir: Path, stream: ControlStream, **spec: object) -> pb.TrainTask:
    await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1, round_deadline_seconds=60,
                    **spec)
    return (await stream.next("task")).task


async def test_upload_resumes_from_the_last_received_chunk(coordinator: Coordinator, certs_dir: Path) -> None:
    stream = ControlStream(coordinator.port, certs_dir, "agent-0")
    await stream.open()
    try:
        task = await _task(coordinator, certs_dir, stream)
        header, chunks = _dense_update(task)
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            await _break_after(stub, header, chunks, 3)
            held = await _progress(stub, header)
            assert 0 < held <= 3
            parts = list((coordinator.store.directory / "updates").rglob("*.part"))
            assert len(parts) == 1  # what arrived waits on disk, not in memory

            resumed = pb.UpdateHeader()
            resumed.CopyFrom(header)
            resumed.skip_chunks = held
            receipt = await upload(stub, [pb.UpdateChunk(header=resumed),
                                          *(pb.UpdateChunk(tensor=c) for c in chunks[held:])])
        assert receipt.agent_id == "agent-0" and not receipt.duplicate
        assert receipt.bytes_received > sum(len(c.data) for c in chunks)  # counts every attempt
        assert not list((coordinator.store.directory / "updates").rglob("*.part"))
        job = await get_job(coordinator.port, certs_dir, task.job_id)
        assert list(job.rounds[0].agents if job.rounds else job.open_round.accepted_agents) == ["agent-0"]
    finally:
        await stream.close()


async def test_a_resume_that_cannot_be_honoured_starts_over(coordinator: Coordinator, certs_dir: Path) -> None:
    stream = ControlStream(coordinator.port, certs_dir, "agent-0")
    await stream.open()
    try:
        task = await _task(coordinator, certs_dir, stream)
        header, chunks = _dense_update(task)
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            await _break_after(stub, header, chunks, 2)
            held = await _progress(stub, header)
            wrong = pb.UpdateHeader()
            wrong.CopyFrom(header)
            wrong.skip_chunks = held + 1  # more than the coordinator holds
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await upload(stub, [pb.UpdateChunk(header=wrong), *(pb.UpdateChunk(tensor=c) for c in chunks[held + 1:])])
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "start over" in (err.value.details() or "")
            assert not list((coordinator.store.directory / "updates").rglob("*.part"))  # the partial is forgotten
            receipt = await upload(stub, [pb.UpdateChunk(header=header), *(pb.UpdateChunk(tensor=c) for c in chunks)])
        assert receipt.agent_id == "agent-0" and not receipt.duplicate
    finally:
        await stream.close()


def _dense_update(task: pb.TrainTask) -> tuple[pb.UpdateHeader, list[tensor_pb2.TensorChunk]]:
    """An update for `task` with codec none: its header (content hash set) and its chunks."""
    components = compression.ErrorFeedback(compression.parse_codec("none")).compress(delta(0.01))[0]
    return header_for(task, content_sha256=wire.state_sha256(components)), list(wire.iter_chunks(components))


async def _break_after(stub: coordinator_pb2_grpc.CoordinatorStub, header: pb.UpdateHeader,
                       chunks: list[tensor_pb2.TensorChunk], n: int) -> None:
    """Send the header and `n` chunks, then break the call, as a lost link does."""
    sent = asyncio.Event()

    async def part() -> AsyncIterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=header)
        for chunk in chunks[:n]:
            yield pb.UpdateChunk(tensor=chunk)
        sent.set()
        await asyncio.sleep(3600)  # the link "breaks" here

    call = stub.UploadUpdate(part())
    await sent.wait()
    await asyncio.sleep(0.3)  # let the server read what was sent
    call.cancel()


async def _progress(stub: coordinator_pb2_grpc.CoordinatorStub, header: pb.UpdateHeader) -> int:
    """The chunks the server holds of a broken upload, once it has noticed the break."""
    async with asyncio.timeout(10):
        while not (held := (await stub.UploadStatus(header)).chunks_received):
            await asyncio.sleep(0.02)
    return held


@pytest.mark.parametrize("strategy", [{"strategy": "fedprox", "mu": 0.01}, {"strategy": "fedadam"},
                                      {"strategy": "fedyogi"}])
async def test_every_strategy_converges(
    coordinator: Coordinator, certs_dir: Path, agents: list[Agent], strategy: dict[str, object]
) -> None:
    job = await run_job(coordinator.port, certs_dir, rounds=5, **strategy)
    assert job.state == admin_pb2.JOB_STATE_COMPLETED, job.message
    accuracies = [r.accuracy for r in job.rounds]
    assert accuracies[-1] > 0.8 and accuracies[-1] > accuracies[0]


async def test_hostile_sparse_encoding_is_invalid_argument(coordinator: Coordinator, certs_dir: Path) -> None:
    stream = ControlStream(coordinator.port, certs_dir, "agent-0")
    await stream.open()
    try:
        task = await _task(coordinator, certs_dir, stream, codec="topk:0.01+int8")
        good = compression.ErrorFeedback(compression.parse_codec(task.codec)).compress(delta(0.01))[0]
        name = sorted(SPECS)[0]
        huge_index = dict(good)
        k = compression.kept(compression.parse_codec(task.codec), SPECS[name].nbytes // 4)
        gaps = np.ones(k, np.uint64)
        gaps[-1] = 1 << 28  # the last index lands far outside the tensor
        huge_index[f"{name}#idx"] = compression._varint_encode(gaps)
        nan_scale = {**good, f"{name}#scale": np.array([np.nan], np.float32)}
        truncated = {**good, f"{name}#val": good[f"{name}#val"][:-1]}
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            for components in (huge_index, nan_scale, truncated):
                messages = [pb.UpdateChunk(header=header_for(task)),
                            *(pb.UpdateChunk(tensor=c) for c in wire.iter_chunks(components))]
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await upload(stub, messages)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    finally:
        await stream.close()
