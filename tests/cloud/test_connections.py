"""Control streams against a real coordinator over mutual TLS: a Hello's claims are
bounded, heartbeats above an agent's rate end its stream with RESOURCE_EXHAUSTED while
other agents go on, and a second Connect of the same agent replaces the first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cloud.app import Coordinator
from cloud.limits import LimitsConfig
from cloud.service import MAX_HELLO_EXAMPLES
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tests.support.clients import agent_channel
from tests.support.deployment import Start
from tests.support.waiting import wait_for


class Stream:
    """One Connect call driven by the test: what it sent, what came back, how it ended."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.received: list[pb.CoordinatorMessage] = []
        self.welcomed = asyncio.Event()

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while (message := await self.outgoing.get()) is not None:
                yield message

        self.call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(requests(), timeout=30)
        self.ended: asyncio.Task[tuple[grpc.StatusCode, str]] = asyncio.create_task(self._read())

    async def _read(self) -> tuple[grpc.StatusCode, str]:
        try:
            async for message in self.call:
                self.received.append(message)
                if message.HasField("welcome"):
                    self.welcomed.set()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def hello(self, num_examples: int = 1000) -> None:
        self.outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=num_examples, device="cpu")))

    def heartbeat(self, seq: int) -> None:
        self.outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq)))

    def acks(self) -> int:
        return sum(1 for m in self.received if m.HasField("heartbeat_ack"))

    async def close(self) -> None:
        self.outgoing.put_nowait(None)
        self.call.cancel()
        await asyncio.gather(self.ended, return_exceptions=True)


async def test_a_hello_claiming_more_examples_than_any_device_holds_is_refused(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        for claim in (2**62, MAX_HELLO_EXAMPLES + 1, -1):
            stream = Stream(channel)
            stream.hello(claim)
            code, details = await stream.ended
            assert code == grpc.StatusCode.INVALID_ARGUMENT, claim
            assert "num_examples" in details and "1e+09" in details or claim < 0, details
        stream = Stream(channel)
        stream.hello(MAX_HELLO_EXAMPLES)  # the largest claim is still welcome
        await asyncio.wait_for(stream.welcomed.wait(), 10)
        await stream.close()
    assert coordinator.store.list_agents()[0].num_examples == MAX_HELLO_EXAMPLES


async def test_a_heartbeat_flood_ends_its_stream_and_another_agent_is_unaffected(
    limited: Start, certs_dir: Path
) -> None:
    server = await limited(heartbeats_per_second=5.0, heartbeat_burst=10)
    async with (agent_channel(server.port, certs_dir, "agent-0") as ch0,
                agent_channel(server.port, certs_dir, "agent-1") as ch1):
        flood, calm = Stream(ch0), Stream(ch1)
        for stream in (flood, calm):
            stream.hello()
            await asyncio.wait_for(stream.welcomed.wait(), 10)
        for seq in range(500):
            flood.heartbeat(seq)
        calm_acks = 0
        for seq in range(6):  # 4 per second: within its own limit
            calm.heartbeat(seq)
            await asyncio.sleep(0.25)
            calm_acks += 1
        code, details = await asyncio.wait_for(flood.ended, 10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "agent 'agent-0' is over its limit of 5 heartbeats per second" in details
        assert flood.acks() <= 10 + 5 * 2  # the burst, and what refilled while the test ran
        await wait_for(lambda: calm.acks() == calm_acks, timeout=5, message="every calm heartbeat answered")
        assert not calm.ended.done()  # agent-1's stream is open
        assert server.registry.connected() == ["agent-1"]
        await calm.close()


async def test_a_second_connect_of_the_same_agent_replaces_the_first(limited: Start, certs_dir: Path) -> None:
    server = await limited(connect_burst=5, connects_per_second=0.1)
    async with (agent_channel(server.port, certs_dir, "agent-0") as old_channel,
                agent_channel(server.port, certs_dir, "agent-0") as new_channel):
        # The first stream looks alive to the server (it might be a dead link not yet noticed).
        old, new = Stream(old_channel), Stream(new_channel)
        old.hello()
        await asyncio.wait_for(old.welcomed.wait(), 10)
        first = server.registry.get("agent-0")
        new.hello()
        await asyncio.wait_for(new.welcomed.wait(), 10)  # the reconnecting agent gets in
        code, details = await asyncio.wait_for(old.ended, 10)
        assert code == grpc.StatusCode.ABORTED and "replaced by a newer control stream" in details
        assert server.registry.get("agent-0") is not first and server.registry.connected() == ["agent-0"]
        new.heartbeat(1)
        await wait_for(lambda: new.acks() == 1, timeout=5, message="the new stream's heartbeat answered")

        # Many at once: each replaces the one before, at most the connect burst get in at all,
        # and one control stream is left.
        many = [Stream(new_channel) for _ in range(20)]
        for stream in many:
            stream.hello()
        await wait_for(lambda: sum(not s.ended.done() for s in [new, *many]) == 1, timeout=10,
                       message="all control streams of agent-0 but one ended")  # refusals come a second late
        ends = [s.ended.result()[0] for s in many if s.ended.done()]
        assert ends.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 20 - 4  # 5 in the burst, one used above
        assert server.registry.connected() == ["agent-0"]
        open_ = [s for s in [new, *many] if not s.ended.done()]
        assert len(open_) == 1
        for stream in [new, *many]:
            await stream.close()


@pytest.mark.parametrize("field", ["connects_per_second", "heartbeats_per_second", "heartbeat_burst",
                                   "connect_burst"])
def test_limits_config_refuses_non_positive_rates(field: str) -> None:
    with pytest.raises(ValueError, match="every limit must be positive"):
        LimitsConfig(**{field: 0})  # type: ignore[arg-type]
