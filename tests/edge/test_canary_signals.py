"""Staged rollouts at the edge (issue 16): an agent keeps the version it served before
and swaps it back with no download; its heartbeats carry what each version answered;
and as a canary it compares the new version's answers with the previous one's.

The signals are read where the coordinator receives them: each heartbeat that reaches
its control stream is recorded on the way in (`heard`), and the stream goes on as ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from cloud.app import Coordinator
from cloud.service import CoordinatorService
from cloud.store import VersionRow
from edge.app import EdgeApp
from edge.shadow import compare
from tandem import wire
from tandem.v1 import coordinator_pb2 as cpb
from tandem.v1 import inference_pb2_grpc
from tests.support.inference import app_stub, arrays_for, close, forward, inputs, request, serve, start_edge
from tests.support.waiting import wait_for


@dataclass
class Heard:
    """The serving signals of every heartbeat the coordinator received."""

    heartbeats: list[list[cpb.ServingSignals]] = field(default_factory=list)

    def total(self, model: str, version: int) -> cpb.ServingSignals:
        """One version's signals added up over every heartbeat so far (as the coordinator would)."""
        total = cpb.ServingSignals(model=model, version=version)
        for entry in (s for beat in self.heartbeats for s in beat if (s.model, s.version) == (model, version)):
            total.requests += entry.requests
            total.errors += entry.errors
            total.latency_seconds += entry.latency_seconds
            total.previous_version = entry.previous_version or total.previous_version
            total.compared += entry.compared
            total.agreed += entry.agreed
            total.confidence += entry.confidence
            total.previous_confidence += entry.previous_confidence
        return total


@dataclass
class Edge:
    app: EdgeApp
    stub: inference_pb2_grpc.InferenceStub
    heard: Heard
    first: dict[str, VersionRow]  # the serving version 1 of each model


@pytest.fixture
def heard(monkeypatch: pytest.MonkeyPatch) -> Heard:
    """Record the heartbeats that reach the coordinator's control streams opened from now on."""
    recorded = Heard()
    read = CoordinatorService._read

    async def recording_read(self: CoordinatorService, session: Any, messages: AsyncIterator[cpb.AgentMessage],
                             *rest: Any) -> Exception | None:
        async def tap() -> AsyncIterator[cpb.AgentMessage]:
            async for message in messages:
                if message.HasField("heartbeat"):
                    recorded.heartbeats.append(list(message.heartbeat.serving))
                yield message

        return await read(self, session, tap(), *rest)

    monkeypatch.setattr(CoordinatorService, "_read", recording_read)
    return recorded


@pytest_asyncio.fixture
async def edge(coordinator: Coordinator, certs_dir: Path, heard: Heard) -> AsyncIterator[Edge]:
    """mlp and mlp-small v1 serving; an agent serving mlp at the edge and mlp-small as a
    cascade that never sends a row up (so every answer is the edge's own)."""
    first = {name: await serve(coordinator.models, name, arrays_for(name, seed=1)) for name in ("mlp", "mlp-small")}
    app = await start_edge(coordinator.port, certs_dir, ("mlp=edge", "mlp-small=cascade:0"))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    await wait_for(lambda: app.agent.models.held_version("mlp") == 1 and app.agent.models.held_version("mlp-small") == 1)
    channel, stub = app_stub(app, certs_dir)
    yield Edge(app, stub, heard, first)
    await channel.close()
    stop.set()
    await runner


def downloads() -> float:
    """DownloadModel calls this process made, whatever their outcome."""
    return sum(sample.value for family in REGISTRY.collect() if family.name == "tandem_rpc_client_handled"
               for sample in family.samples
               if sample.name.endswith("_total") and sample.labels.get("method") == "DownloadModel")


def notice(coordinator: Coordinator, row: VersionRow, canary: bool = False) -> None:
    """What the coordinator's rollout sends: a canary's serving notice, or the rollback's."""
    coordinator.registry.broadcast(cpb.CoordinatorMessage(model=cpb.ModelNotice(
        model=row.model, version=row.version, sha256=row.sha256, serving=True, canary=canary)))


async def compared(edge: Edge, model: str, version: int, rows: int) -> cpb.ServingSignals:
    """Ask `model` until the heartbeats report `rows` rows of `version` compared."""

    async def enough() -> bool:
        await edge.stub.Infer(request(model, inputs(16)))
        return edge.heard.total(model, version).compared >= rows

    await wait_for(enough, message=f"{rows} rows of {model} v{version} compared")
    return edge.heard.total(model, version)


async def test_the_previous_version_is_served_again_at_once_without_a_download(coordinator: Coordinator,
                                                                              edge: Edge) -> None:
    models, x = edge.app.agent.models, inputs(2)
    before = downloads()
    second = await serve(coordinator.models, "mlp", arrays_for("mlp", seed=2))
    await wait_for(lambda: models.held_version("mlp") == 2)
    assert downloads() == before + 1
    assert models.previous("mlp") is None  # held, but not a canary: nothing to compare it with
    coordinator.models.rollback("mlp", "test")  # the serving notice names v1 again
    await wait_for(lambda: models.held_version("mlp") == 1)
    response = await edge.stub.Infer(request("mlp", x))
    assert response.version == 1
    close(response, forward("mlp", arrays_for("mlp", 1), x))
    # v2 is the previous version now: promoted again, it is back as fast.
    coordinator.models.promote("mlp", 2, "test")
    await wait_for(lambda: models.held_version("mlp") == 2)
    close(await edge.stub.Infer(request("mlp", x)), forward("mlp", arrays_for("mlp", 2), x))
    assert downloads() == before + 1
    # At once: the notice's handling swaps the versions, with nothing to wait for.
    models.announce("mlp", 1, edge.first["mlp"].sha256, serving=True)
    assert models.held_version("mlp") == 1
    models.announce("mlp", 2, second.sha256, serving=True)
    assert models.held_version("mlp") == 2
    assert downloads() == before + 1


async def test_each_version_counts_its_requests_errors_and_seconds(edge: Edge) -> None:
    for _ in range(3):
        await edge.stub.Infer(request("mlp", inputs(4)))
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the caller's mistake: not the version's
        await edge.stub.Infer(request("mlp", inputs(1, width=3)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Activations that overflow the last layer: the version answers infinities, an error.
    last = arrays_for("mlp", 1)["2.weight"]
    overflowing = (3e38 * np.sign(last[:1])).astype(np.float32)
    answer = await edge.stub.Infer(request("mlp", overflowing, start_layer=2))
    assert not np.isfinite(wire.from_proto(answer.output)).all()

    await wait_for(lambda: edge.heard.total("mlp", 1).requests == 4, message="4 requests of mlp v1 reported")
    beats = len(edge.heard.heartbeats)
    await wait_for(lambda: len(edge.heard.heartbeats) > beats + 1)  # and nothing more comes
    total = edge.heard.total("mlp", 1)
    assert (total.requests, total.errors) == (4, 1)
    assert 0 < total.latency_seconds < 4 * 5.0
    assert total.compared == 0  # no canary here
    # Every heartbeat names each version the agent serves, requests or not.
    assert all({("mlp", 1), ("mlp-small", 1)} <= {(s.model, s.version) for s in beat} for beat in edge.heard.heartbeats)
    assert edge.heard.total("mlp-small", 1).requests == 0


async def test_a_canary_reports_how_it_agrees_with_the_version_it_replaced(coordinator: Coordinator,
                                                                           edge: Edge) -> None:
    models = edge.app.agent.models
    # A broken version: another model's weights, ten times over. Its canary agrees little.
    broken = await coordinator.models.publish("mlp", {k: v * 10 for k, v in arrays_for("mlp", seed=2).items()})
    notice(coordinator, broken, canary=True)
    await wait_for(lambda: models.held_version("mlp") == broken.version)
    previous = models.previous("mlp")
    assert previous is not None and previous.version == 1
    signals = await compared(edge, "mlp", broken.version, rows=128)
    assert signals.previous_version == 1
    assert signals.agreed / signals.compared < 0.5, signals
    assert 0 < signals.confidence <= signals.compared and 0 < signals.previous_confidence <= signals.compared

    # Rolled back: the version before, at once and with no download.
    before = downloads()
    notice(coordinator, edge.first["mlp"])
    await wait_for(lambda: models.held_version("mlp") == 1)
    assert models.previous("mlp") is None and downloads() == before

    # The same weights give or take a millionth: its canary agrees on (nearly) every row,
    # and is as sure as the version it replaces. So does a cascade's.
    rng = np.random.default_rng(3)
    for name in ("mlp", "mlp-small"):
        twin = await coordinator.models.publish(name, {k: (v + rng.normal(scale=1e-6, size=v.shape)).astype(v.dtype)
                                                       for k, v in arrays_for(name, seed=1).items()})
        notice(coordinator, twin, canary=True)
        await wait_for(lambda: models.held_version(name) == twin.version)  # noqa: B023 - awaited at once
        signals = await compared(edge, name, twin.version, rows=128)
        assert signals.previous_version == 1
        assert signals.agreed / signals.compared >= 0.98, signals
        assert abs(signals.confidence - signals.previous_confidence) / signals.compared < 1e-3, signals

    # A serving notice without the mark ends the canary: nothing is compared any more.
    notice(coordinator, twin)
    await wait_for(lambda: models.previous("mlp-small") is None)
    assert models.held_version("mlp-small") == twin.version


def test_outputs_that_are_not_class_scores_agree_within_ten_percent() -> None:
    old = np.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]], np.float32)[:, :, None]  # 3-D: not class scores
    new = np.array([[1.05, 2.1], [1.2, 2.0], [0.0, 1e-7]], np.float32)[:, :, None]
    assert compare(new, old).agreed == 2 and compare(new, old).confidence == 0.0
    scores = np.array([[0.0, 5.0], [5.0, 0.0], [np.nan, 0.0]], np.float32)
    result = compare(scores, np.array([[0.0, 4.0], [0.0, 4.0], [5.0, 0.0]], np.float32))
    assert (result.rows, result.agreed) == (3, 1)  # a NaN row agrees nowhere
    assert np.isfinite(result.confidence) and np.isfinite(result.previous_confidence)
