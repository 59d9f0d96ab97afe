"""Test-side clients: a minimal agent control stream and raw upload helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path

import grpc
import numpy as np

from tandem import grpcserver, tls, training, wire, zoo
from tandem.errors import peer_error, peer_status
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tests.support.waiting import wait_for

SPECS = wire.specs_of(training.state_arrays(zoo.build_model("mlp")))


def delta(value: float) -> dict[str, np.ndarray]:
    """A made-up update for the reference model: every weight moves by `value`."""
    return {name: np.full(spec.shape, value, dtype=np.float32) for name, spec in SPECS.items()}


def header_for(task: pb.TrainTask, **overrides: object) -> pb.UpdateHeader:
    """The header of an update that answers `task`, with fields to change for a test."""
    fields: dict[str, object] = dict(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                     num_examples=100, codec=task.codec, local_loss=0.5)
    fields.update(overrides)
    return pb.UpdateHeader(**fields)  # type: ignore[arg-type]


def target(port: int) -> str:
    return f"localhost:{port}"


def agent_channel(port: int, certs_dir: Path, name: str) -> grpc.aio.Channel:
    return grpcserver.secure_channel(target(port), tls.agent_credentials(certs_dir, name))


def region_credentials(certs_dir: Path, name: str) -> grpc.ChannelCredentials:
    """A region's certificate (`tandem certs add-region NAME`) towards its parent."""
    from tandem import certs

    cert, key = certs.region_paths(certs_dir, name)
    return tls.client_credentials(certs_dir, cert, key)


def admin_channel(port: int, certs_dir: Path) -> grpc.aio.Channel:
    return grpcserver.secure_channel(target(port), tls.admin_credentials(certs_dir))


class ControlStream:
    """An agent's control stream, driven by the test: says hello, collects messages."""

    def __init__(self, port: int, certs_dir: Path, name: str,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.name = name
        self.channel = grpcserver.secure_channel(
            target(port), credentials if credentials is not None else tls.agent_credentials(certs_dir, name))
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.messages: asyncio.Queue[pb.CoordinatorMessage] = asyncio.Queue()
        self._outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def open(self, num_examples: int = 1000, agents: int = 0) -> pb.Welcome:
        self._outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=num_examples, device="cpu",
                                                                  agents=agents)))

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while (message := await self._outgoing.get()) is not None:
                yield message

        self.call = self.stub.Connect(requests())
        self._reader = asyncio.create_task(self._read())
        welcome = await self.next("welcome")
        return welcome.welcome

    async def _read(self) -> None:
        try:
            async for message in self.call:
                self.messages.put_nowait(message)
        except grpc.aio.AioRpcError:
            pass

    async def next(self, kind: str, timeout: float = 10.0) -> pb.CoordinatorMessage:
        """The next message of `kind`, skipping others."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.messages.get()
                if message.WhichOneof("kind") == kind:
                    return message

    def heartbeat(self, seq: int, serving: Iterable[pb.ServingSignals] = ()) -> None:
        """Send a heartbeat carrying these serving signals (what an agent with --listen sends)."""
        self._outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, serving=list(serving))))

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close()


def update_messages(
    header: pb.UpdateHeader, arrays: Mapping[str, np.ndarray]
) -> list[pb.UpdateChunk]:
    """An upload of dense float32 tensors (codec "none": each tensor as a 1-D component)."""
    flat = {name: np.asarray(a).reshape(-1) for name, a in arrays.items()}
    return [pb.UpdateChunk(header=header), *(pb.UpdateChunk(tensor=c) for c in wire.iter_chunks(flat))]


async def upload(
    stub: coordinator_pb2_grpc.CoordinatorStub, messages: Iterable[pb.UpdateChunk]
) -> pb.UpdateReceipt:
    async def stream() -> AsyncIterator[pb.UpdateChunk]:
        for message in messages:
            yield message

    try:
        receipt: pb.UpdateReceipt = await stub.UploadUpdate(stream(), timeout=30)
    except grpc.aio.AioRpcError as exc:
        # The status the server sent, as agents read it: the aio client may report INTERNAL
        # for an upload refused while it still writes (grpc/grpc#36066, tandem.errors.EndsStream).
        raise peer_error(exc) from None
    return receipt


async def upload_code(stub: coordinator_pb2_grpc.CoordinatorStub, messages: Iterable[pb.UpdateChunk]) -> grpc.StatusCode:
    """The status code an upload ends with (OK when accepted), as the server sent it."""
    try:
        await upload(stub, messages)
    except grpc.aio.AioRpcError as exc:
        return peer_status(exc)[0]
    return grpc.StatusCode.OK


async def download(
    stub: coordinator_pb2_grpc.CoordinatorStub, model: str, version: int
) -> tuple[pb.ModelHeader, dict[str, np.ndarray]]:
    header: pb.ModelHeader | None = None
    assembler: wire.ChunkAssembler | None = None
    async for message in stub.DownloadModel(pb.ModelRequest(model=model, version=version), timeout=30):
        if message.HasField("header"):
            header = message.header
            assembler = wire.ChunkAssembler(
                {t.name: wire.spec_from_proto(t, 1 << 30) for t in header.tensors}
            )
        else:
            assert assembler is not None
            assembler.add(message.tensor)
    assert header is not None and assembler is not None
    return header, assembler.result()


async def start_job(port: int, certs_dir: Path, **spec: object) -> admin_pb2.Job:
    async with admin_channel(port, certs_dir) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        job: admin_pb2.Job = await stub.StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(**spec)))  # type: ignore[arg-type]
        return job


async def get_job(port: int, certs_dir: Path, job_id: str) -> admin_pb2.Job:
    """The job as the coordinator sees it now. Tests poll this many times a second, a new
    connection each time, while agents train in the same process: on a loaded 2-core
    machine one handshake can miss the server's 5 s deadline (CI saw "Handshake read
    failed"), so the call waits for a connection instead of failing on the first."""
    async with admin_channel(port, certs_dir) as channel:
        job: admin_pb2.Job = await admin_pb2_grpc.AdminStub(channel).GetJob(
            admin_pb2.GetJobRequest(job_id=job_id), wait_for_ready=True, timeout=30)
        return job


async def wait_rounds(port: int, certs_dir: Path, job_id: str, count: int) -> admin_pb2.Job:
    """The job once `count` of its rounds have closed."""
    async def closed() -> admin_pb2.Job | None:
        job = await get_job(port, certs_dir, job_id)
        return job if len(job.rounds) >= count else None

    return await wait_for(closed, timeout=30, interval=0.05, message=f"{count} rounds of job {job_id} to close")


async def streams(port: int, certs_dir: Path, names: list[str]) -> list[ControlStream]:
    """Open a control stream for each agent in `names`, in order."""
    opened = [ControlStream(port, certs_dir, name) for name in names]
    for stream in opened:
        await stream.open()
    return opened


async def send(port: int, certs_dir: Path, agent: str, task: pb.TrainTask, value: float) -> pb.UpdateReceipt:
    """Upload `agent`'s answer to `task`: every weight moved by `value`."""
    async with agent_channel(port, certs_dir, agent) as channel:
        return await upload(coordinator_pb2_grpc.CoordinatorStub(channel), update_messages(header_for(task), delta(value)))
