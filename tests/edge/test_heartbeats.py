"""The agent's heartbeats stay under the coordinator's rate limit however often new
measurements come in (an upload several times a second set one off each time, and a
single agent training fast rounds had its control stream closed every few seconds)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.agent import EARLY_HEARTBEAT_GAP, Agent, AgentConfig
from tandem.v1 import coordinator_pb2 as pb


async def test_measurements_bring_a_heartbeat_forward_but_no_more_than_two_a_second() -> None:
    agent = Agent(AgentConfig(cloud="localhost:1", certs=Path("."), agent_id="a", data="digits:0/4"))
    outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
    beats = asyncio.create_task(agent._heartbeats(outgoing, interval=5.0))
    try:
        await asyncio.sleep(0.1)
        agent._measured.set()  # one new measurement: sent at once, not 5 s later
        await asyncio.sleep(0.05)
        assert outgoing.qsize() == 1
        # A new measurement every 10 ms for 2 s.
        for _ in range(200):
            agent._measured.set()
            await asyncio.sleep(0.01)
        sent = outgoing.qsize()
        assert 2 <= sent <= 1 + round(2.5 / EARLY_HEARTBEAT_GAP), sent
    finally:
        beats.cancel()
