"""A staged rollout end to end (issue 16): a real coordinator and two real edge agents
serving inference over mutual TLS, under steady traffic. A version that answers garbage
is served by the canary agent, caught by its agreement with the previous version and
rolled back automatically; a healthy one proceeds to both agents. No request fails
in either, and the agent that is not the canary never serves the version under test."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest_asyncio

from cloud.app import Coordinator
from edge.app import EdgeApp
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from tests.cloud.test_lifecycle import history
from tests.support.clients import admin_channel
from tests.support.inference import app_stub, arrays_for, inputs, request, serve, start_edge
from tests.support.waiting import wait_for

AGENTS = ("agent-4", "agent-5")


@dataclass
class Traffic:
    """Requests to every agent, one after another per agent, until stopped."""

    answered: dict[str, Counter[int]] = field(default_factory=dict)  # agent -> version -> answers
    failed: list[str] = field(default_factory=list)

    async def run(self, agent: str, stub: inference_pb2_grpc.InferenceStub, stop: asyncio.Event) -> None:
        counts = self.answered.setdefault(agent, Counter())
        while not stop.is_set():
            try:
                response = await stub.Infer(request("mlp", inputs(4)), timeout=10)
                counts[response.version] += 1
            except grpc.aio.AioRpcError as exc:
                self.failed.append(f"{agent}: {exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.01)


@dataclass
class Fleet:
    coordinator: Coordinator
    certs_dir: Path
    apps: dict[str, EdgeApp]
    traffic: Traffic

    async def promote(self, version: int, **policy: object) -> None:
        async with admin_channel(self.coordinator.port, self.certs_dir) as channel:
            await admin_pb2_grpc.AdminStub(channel).PromoteModel(admin_pb2.PromoteModelRequest(
                model="mlp", version=version, rollout=admin_pb2.RolloutPolicy(**policy)))

    async def ended(self, version: int) -> admin_pb2.RolloutStatus:
        async def done() -> admin_pb2.RolloutStatus | None:
            rollouts = [r for r in (await history(self.coordinator, self.certs_dir)).rollouts if r.version == version]
            return rollouts[0] if rollouts and rollouts[0].state != "canary" else None

        ended: admin_pb2.RolloutStatus = await wait_for(done, timeout=60, interval=0.2, message=f"v{version}'s rollout")
        return ended

    def held(self) -> dict[str, int]:
        return {name: app.agent.models.held_version("mlp") for name, app in self.apps.items()}


@pytest_asyncio.fixture
async def fleet(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[Fleet]:
    await serve(coordinator.models, "mlp", arrays_for("mlp", seed=1))
    apps = {name: await start_edge(coordinator.port, certs_dir, ("mlp=edge",), agent_id=name) for name in AGENTS}
    stop = asyncio.Event()
    runners = [asyncio.create_task(app.run(stop)) for app in apps.values()]
    await wait_for(lambda: all(app.agent.models.held_version("mlp") == 1 for app in apps.values()),
                   message="both agents serving v1")
    channels, traffic = [], Traffic()
    for name, app in apps.items():
        channel, stub = app_stub(app, certs_dir)
        channels.append(channel)
        runners.append(asyncio.create_task(traffic.run(name, stub, stop)))
    # Both agents have said (in a heartbeat) that they serve mlp: either can be the canary.
    await wait_for(lambda: set(coordinator.rollouts._serves.get("mlp", {})) == set(AGENTS),
                   message="both agents' serving signals")
    yield Fleet(coordinator, certs_dir, apps, traffic)
    stop.set()
    await asyncio.gather(*runners)
    for channel in channels:
        await channel.close()


async def test_a_garbage_version_is_rolled_back_and_a_healthy_one_proceeds(fleet: Fleet) -> None:
    garbage = await fleet.coordinator.models.publish("mlp", arrays_for("mlp", seed=2))  # another network altogether
    await fleet.promote(garbage.version, canary="50%", window_seconds=60, min_requests=20)
    rollout = await fleet.ended(garbage.version)
    assert rollout.state == "rolled-back", rollout
    assert "agreement with the previous version" in rollout.reason, rollout.reason
    [canary] = rollout.canary_agents
    [other] = set(AGENTS) - {canary}
    assert fleet.traffic.answered[canary][garbage.version] > 0  # the canary did serve it
    assert fleet.traffic.answered[other][garbage.version] == 0  # the rest never did
    await wait_for(lambda: fleet.held() == {canary: 1, other: 1}, message="the canary back on v1")
    assert (await history(fleet.coordinator, fleet.certs_dir)).serving_version == 1

    rng = np.random.default_rng(0)
    nudged = {k: v + rng.normal(scale=1e-4, size=v.shape).astype(np.float32) for k, v in arrays_for("mlp", 1).items()}
    healthy = await fleet.coordinator.models.publish("mlp", nudged)
    await fleet.promote(healthy.version, canary="50%", window_seconds=2, min_requests=20)
    rollout = await fleet.ended(healthy.version)
    assert rollout.state == "promoted", rollout
    await wait_for(lambda: set(fleet.held().values()) == {healthy.version}, message="everyone on the healthy version")
    assert (await history(fleet.coordinator, fleet.certs_dir)).serving_version == healthy.version
    await asyncio.sleep(0.5)  # a few more answers from the new version at both agents
    assert all(fleet.traffic.answered[a][healthy.version] > 0 for a in AGENTS)
    assert fleet.traffic.failed == []
