"""An agent reduced to its wire behaviour, in the scenario's own process: a control
stream that says hello (claiming any example count) and collects tasks, and uploads of
made-up updates that may claim any count or stall part-way. The reliability scenarios
use it where the real agent (`edge.agent`) would refuse to misbehave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import grpc
import numpy as np

from tandem import grpcserver, tls, wire
from tandem.errors import peer_status
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc


class RawAgent:
    """One agent identity: `connect` opens its control stream; tasks arrive in `tasks`."""

    def __init__(self, target: str, certs_dir: Path, name: str) -> None:
        self.name = name
        self.channel = grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, name))
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.tasks: asyncio.Queue[pb.TrainTask] = asyncio.Queue()
        self._outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def connect(self, num_examples: int) -> None:
        self._outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=num_examples, device="cpu")))

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while (message := await self._outgoing.get()) is not None:
                yield message

        call = self.stub.Connect(requests())
        self._reader = asyncio.create_task(self._read(call))

    async def _read(self, call: AsyncIterator[pb.CoordinatorMessage]) -> None:
        try:
            async for message in call:
                if message.HasField("task"):
                    self.tasks.put_nowait(message.task)
                elif message.HasField("heartbeat_ack") or message.HasField("welcome"):
                    pass
        except grpc.aio.AioRpcError:
            pass

    async def upload(self, task: pb.TrainTask, arrays: Mapping[str, np.ndarray], num_examples: int,
                     stall_after: int | None = None, timeout: float = 120) -> tuple[grpc.StatusCode, float]:
        """Send `arrays` (dense float32) as the answer to `task`, claiming `num_examples`.
        With `stall_after`, only the header and that many chunks, then silence until the
        server ends the call. Returns the status and the seconds since the last message."""
        flat = {name: np.asarray(a, np.float32).reshape(-1) for name, a in arrays.items()}
        header = pb.UpdateHeader(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                 num_examples=num_examples, codec=task.codec, local_loss=0.5,
                                 content_sha256=wire.state_sha256(flat))
        last = time.monotonic()
        ended = asyncio.Event()  # lets a stalled request stream finish once the call is over

        async def stream() -> AsyncIterator[pb.UpdateChunk]:
            nonlocal last
            yield pb.UpdateChunk(header=header)
            for i, chunk in enumerate(wire.iter_chunks(flat)):
                if stall_after is not None and i >= stall_after:
                    break
                last = time.monotonic()
                yield pb.UpdateChunk(tensor=chunk)
            if stall_after is not None:
                last = time.monotonic()
                await ended.wait()  # silent, until the server ends the call

        try:
            await self.stub.UploadUpdate(stream(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return peer_status(exc)[0], time.monotonic() - last
        finally:
            ended.set()
        return grpc.StatusCode.OK, time.monotonic() - last

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self.channel.close()
