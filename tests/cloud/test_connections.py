"""Control streams against a real coordinator over mutual TLS: a Hello's claims are
bounded, heartbeats above an agent's rate end its stream with RESOURCE_EXHAUSTED while
other agents go on, and a second Connect of the same agent is refused while the first
is live, and replaces it once silent for two heartbeat intervals."""

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


async def _beat(stream: Stream, interval: float = 0.2) -> None:
    """Heartbeats, as a live agent sends them, until cancelled."""
    seq = 0
    while True:
        seq += 1
        stream.heartbeat(seq)
        await asyncio.sleep(interval)


async def test_a_second_connect_of_a_live_agent_is_refused_and_the_first_keeps_its_stream(
    limited: Start, certs_dir: Path
) -> None:
    # Issue 16: the same agent id connected twice used to evict the first stream (ABORTED
    # "replaced by a newer control stream"), so two processes with one identity evicted
    # each other in turn. Now the second is refused while the first is heard from.
    server = await limited(connect_burst=5, connects_per_second=0.1)
    async with (agent_channel(server.port, certs_dir, "agent-0") as old_channel,
                agent_channel(server.port, certs_dir, "agent-0") as new_channel):
        old, new = Stream(old_channel), Stream(new_channel)
        old.hello()
        await asyncio.wait_for(old.welcomed.wait(), 10)
        beating = asyncio.create_task(_beat(old))
        first = server.registry.get("agent-0")
        assert first is not None and first.peer.startswith("ipv")
        new.hello()
        code, details = await asyncio.wait_for(new.ended, 10)
        assert code == grpc.StatusCode.ALREADY_EXISTS, details
        assert f"agent 'agent-0' is already connected from {first.peer}" in details, details
        assert not old.ended.done() and server.registry.get("agent-0") is first
        acks = old.acks()
        await wait_for(lambda: old.acks() > acks, timeout=5, message="the first stream's heartbeats still answered")

        # Many at once: every one refused (a duplicate, or over the connect rate), the first stays.
        many = [Stream(new_channel) for _ in range(20)]
        for stream in many:
            stream.hello()
        await wait_for(lambda: all(s.ended.done() for s in many), timeout=10,
                       message="every duplicate control stream of agent-0 ended")  # refusals come a second late
        ends = [s.ended.result()[0] for s in many]
        assert set(ends) <= {grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}, ends
        assert ends.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 20 - 4  # 5 in the burst, one used above
        assert not old.ended.done() and server.registry.get("agent-0") is first
        assert server.registry.connected() == ["agent-0"]
        beating.cancel()
        for stream in [old, new, *many]:
            await stream.close()


async def test_a_reconnect_after_a_silently_dropped_stream_gets_in_in_bounded_time(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    """The agent's old stream went silent (its link broke without the coordinator noticing:
    no FIN, no RST): the agent's new Connect is refused while the old one was heard within
    two heartbeat intervals, then replaces it; the old one ends ABORTED."""
    stale_after = coordinator.registry.stale_after
    assert stale_after == 2 * coordinator.config.heartbeat_interval
    async with (agent_channel(coordinator.port, certs_dir, "agent-0") as old_channel,
                agent_channel(coordinator.port, certs_dir, "agent-0") as new_channel):
        old = Stream(old_channel)
        old.hello()
        await asyncio.wait_for(old.welcomed.wait(), 10)
        old.heartbeat(1)  # then nothing more: the link is gone as far as the coordinator can tell
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = 0
        while True:  # as edge.agent retries ALREADY_EXISTS: within a heartbeat interval
            new = Stream(new_channel)
            new.hello()
            welcomed = asyncio.create_task(new.welcomed.wait())
            await asyncio.wait({welcomed, new.ended}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if new.welcomed.is_set():
                break
            code, details = new.ended.result()
            assert code == grpc.StatusCode.ALREADY_EXISTS, details
            refused += 1
            await asyncio.sleep(0.2)
        took = loop.time() - started
        assert refused >= 1 and took < stale_after + 2.0, (refused, took)
        code, details = await asyncio.wait_for(old.ended, 10)
        assert code == grpc.StatusCode.ABORTED and "silent for" in details, details
        new.heartbeat(1)
        await wait_for(lambda: new.acks() == 1, timeout=5, message="the new stream's heartbeat answered")
        assert coordinator.registry.connected() == ["agent-0"]
        await new.close()
        await old.close()


@pytest.mark.parametrize("field", ["connects_per_second", "heartbeats_per_second", "heartbeat_burst",
                                   "connect_burst"])
def test_limits_config_refuses_non_positive_rates(field: str) -> None:
    with pytest.raises(ValueError, match="every limit must be positive"):
        LimitsConfig(**{field: 0})  # type: ignore[arg-type]
