"""The placement controller in a real coordinator with a real agent: decisions go down
the control stream and are applied, operators read and pin them, pins hold."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cloud.app import CloudConfig, Coordinator
from cloud.placement import ControllerConfig
from cloud.placement_policy import PolicyConfig
from cloud.store import Store
from edge.app import EdgeApp
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tests.support.clients import admin_channel, agent_channel
from tests.support.inference import arrays_for, serve, start_edge
from tests.support.waiting import wait_for


@pytest_asyncio.fixture
async def placed(tmp_path: Path, certs_dir: Path) -> AsyncIterator[tuple[Coordinator, EdgeApp]]:
    """A coordinator whose controller decides every 0.2 s, and an agent serving cnn."""
    config = CloudConfig(
        listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", heartbeat_interval=0.3, grace=0.5,
        placement=ControllerConfig(interval=0.2, policy=PolicyConfig(min_dwell=0.5)),
    )
    coordinator = Coordinator(config)
    await coordinator.start()
    await serve(coordinator.models, "cnn", arrays_for("cnn", seed=1))
    app = await start_edge(coordinator.port, certs_dir, ("cnn=edge",))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    await wait_for(lambda: app.agent.models.held_version("cnn") == 1)
    yield coordinator, app
    stop.set()
    await runner
    await coordinator.stop()


def agent_placement(app: EdgeApp) -> str:
    assert app.agent.router is not None
    return str(app.agent.router.placement("cnn"))


async def placements(coordinator: Coordinator, certs_dir: Path) -> list[admin_pb2.PlacementInfo]:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        response = await admin_pb2_grpc.AdminStub(channel).ListPlacements(admin_pb2.ListPlacementsRequest(model="cnn"))
        return list(response.placements)


async def test_decisions_reach_the_agent_within_a_heartbeat(
    placed: tuple[Coordinator, EdgeApp], certs_dir: Path
) -> None:
    coordinator, app = placed
    # The agent reports its stage times and link in heartbeats; the cloud profiles its own.
    await wait_for(lambda: ("agent-5", "cnn") in coordinator.placement.decisions, timeout=30)
    listed = await placements(coordinator, certs_dir)
    assert [(p.agent, p.model, p.pinned) for p in listed] == [("agent-5", "cnn", False)]
    assert len(listed[0].predicted_seconds) == 6  # J(k) for k = 0..5
    await wait_for(lambda: agent_placement(app) == listed[0].placement, timeout=0.3 + 0.2 + 0.5)


async def test_a_pin_holds_until_unpinned_and_survives_restarts(
    placed: tuple[Coordinator, EdgeApp], certs_dir: Path
) -> None:
    coordinator, app = placed
    await wait_for(lambda: ("agent-5", "cnn") in coordinator.placement.decisions, timeout=30)
    async with admin_channel(coordinator.port, certs_dir) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        pinned = await admin.PinPlacement(admin_pb2.PinPlacementRequest(agent="agent-5", model="cnn",
                                                                        placement="split:2"))
        assert (pinned.placement, pinned.pinned) == ("split:2", True)
        await wait_for(lambda: agent_placement(app) == "split:2", timeout=1.0)
        await asyncio.sleep(1.5)  # several controller ticks
        assert agent_placement(app) == "split:2"
        assert Store(coordinator.config.state).pins() == {("agent-5", "cnn"): "split:2"}  # durable

        for request, code in [
            (admin_pb2.PinPlacementRequest(agent="agent-5", model="cnn", placement="split:9"),
             grpc.StatusCode.INVALID_ARGUMENT),
            (admin_pb2.PinPlacementRequest(agent="agent-5", model="cnn", placement="sideways"),
             grpc.StatusCode.INVALID_ARGUMENT),
            (admin_pb2.PinPlacementRequest(agent="agent-5", model="nope", placement="edge"), grpc.StatusCode.NOT_FOUND),
            (admin_pb2.PinPlacementRequest(model="cnn", placement="edge"), grpc.StatusCode.INVALID_ARGUMENT),
            (admin_pb2.PinPlacementRequest(agent="x" * 300, model="cnn", placement="edge"),
             grpc.StatusCode.INVALID_ARGUMENT),  # not an agent name: never a metric label
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.PinPlacement(request)
            assert err.value.code() == code, err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.UnpinPlacement(admin_pb2.UnpinPlacementRequest(agent="agent-1", model="cnn"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        unpinned = await admin.UnpinPlacement(admin_pb2.UnpinPlacementRequest(agent="agent-5", model="cnn"))
        assert not unpinned.pinned
        chosen = unpinned.placement
        await wait_for(lambda: agent_placement(app) == chosen, timeout=2.0)
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminStub(channel).PinPlacement(
                admin_pb2.PinPlacementRequest(agent="agent-5", model="cnn", placement="edge"))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_placement_command_shows_pins_and_unpins(
    placed: tuple[Coordinator, EdgeApp], certs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tandem_cli.main import main

    coordinator, app = placed
    await wait_for(lambda: ("agent-5", "cnn") in coordinator.placement.decisions, timeout=30)
    where = ["--cloud", f"localhost:{coordinator.port}", "--certs", str(certs_dir)]
    assert await asyncio.to_thread(main, ["placement", "pin", "agent-5", "cnn", "split:3", *where]) == 0
    await wait_for(lambda: agent_placement(app) == "split:3", timeout=1.0)
    assert await asyncio.to_thread(main, ["placement", "show", "--json", *where]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("["):])
    assert [(p["agent"], p["placement"], p["pinned"]) for p in shown] == [("agent-5", "split:3", True)]
    assert await asyncio.to_thread(main, ["placement", "unpin", "agent-5", "cnn", *where]) == 0
    assert await asyncio.to_thread(main, ["placement", "unpin", "agent-5", "cnn", *where]) == 1  # NOT_FOUND
    assert "NOT_FOUND" in capsys.readouterr().err


async def test_the_status_command_shows_agents_jobs_models_and_placements(
    placed: tuple[Coordinator, EdgeApp], certs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tandem_cli.main import main

    coordinator, _ = placed
    await wait_for(lambda: ("agent-5", "cnn") in coordinator.placement.decisions, timeout=30)
    where = ["--cloud", f"localhost:{coordinator.port}", "--certs", str(certs_dir)]
    start = ["job", "start", "--model", "mlp", "--rounds", "3", "--min-clients", "2", "--deadline", "60", *where]
    assert await asyncio.to_thread(main, start) == 0
    job_id = capsys.readouterr().out.strip()

    assert await asyncio.to_thread(main, ["status", "--json", *where]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(a["agent_id"], a["connected"]) for a in status["agents"]] == [("agent-5", True)]
    assert [(j["job_id"], j["state"]) for j in status["jobs"]] == [(job_id, "running")]
    assert [(m["model"], m["version"]) for m in status["models"]] == [("cnn", 1), ("mlp", 1)]  # mlp: the job's start
    assert [(p["agent"], p["model"]) for p in status["placements"]] == [("agent-5", "cnn")]

    assert await asyncio.to_thread(main, ["status", *where]) == 0
    text = capsys.readouterr().out
    for line in ("agents: 1 connected of 1", "jobs: 1 running of 1", "models: 2 published", "placements: 1"):
        assert line in text
    assert job_id in text and "agent-5" in text
