"""An edge agent's Inference server: every placement agrees with a direct forward
pass, cascades send up only what they should, new versions are picked up, and the
edge answers locally whenever the cloud cannot in time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from cloud.app import Coordinator
from cloud.spec import JobSpec
from edge.app import EdgeApp
from tandem import grpcserver, tls
from tandem.placement import parse
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.inference import (
    app_stub,
    arrays_for,
    close,
    fallbacks,
    forward,
    inputs,
    request,
    serve,
    start_edge,
)
from tests.support.waiting import wait_for


@pytest_asyncio.fixture
async def edge(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[tuple[EdgeApp, inference_pb2_grpc.InferenceStub]]:
    """mlp v1 and mlp-heavy v1 published; an agent serving mlp (edge) and mlp-small (cascade)."""
    await serve(coordinator.models, "mlp", arrays_for("mlp", seed=1))
    await serve(coordinator.models, "mlp-small", arrays_for("mlp-small", seed=1))
    await serve(coordinator.models, "mlp-heavy", arrays_for("mlp-heavy", seed=1))
    app = await start_edge(coordinator.port, certs_dir, ("mlp=edge", "mlp-small=cascade:0.5:mlp-heavy"))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    await wait_for(lambda: app.agent.models.held_version("mlp") == 1 and app.agent.models.held_version("mlp-small") == 1)
    channel, stub = app_stub(app, certs_dir)
    yield app, stub
    await channel.close()
    stop.set()
    await runner


async def test_every_placement_matches_a_direct_forward_pass(edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]) -> None:
    app, stub = edge
    x = inputs(4)
    expected = forward("mlp", arrays_for("mlp", seed=1), x)
    for text, where in [("edge", pb.PLACEMENT_EDGE), ("cloud", pb.PLACEMENT_CLOUD), ("split:1", pb.PLACEMENT_SPLIT),
                        ("split:2", pb.PLACEMENT_SPLIT)]:
        app.agent.router.set_placement("mlp", parse("mlp", text), 3)  # type: ignore[union-attr]
        response = await stub.Infer(request("mlp", x, request_id=text))
        assert (response.request_id, response.version, response.placement) == (text, 1, where), text
        close(response, expected)
    # An application may also send an activation itself.
    app.agent.router.set_placement("mlp", parse("mlp", "edge"), 3)  # type: ignore[union-attr]
    close(await stub.Infer(request("mlp", forward("mlp", arrays_for("mlp", 1), x, 0, 2), start_layer=2)), expected)


async def test_cascade_sends_up_only_the_unsure_rows(edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]) -> None:
    app, stub = edge
    router = app.agent.router
    assert router is not None
    x = inputs(64) * 3
    small = forward("mlp-small", arrays_for("mlp-small", 1), x)
    heavy = forward("mlp-heavy", arrays_for("mlp-heavy", 1), x)
    e = np.exp(small - small.max(axis=1, keepdims=True))
    confidence = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
    threshold = float(np.median(confidence))
    for t, where in [(0.0, pb.PLACEMENT_EDGE), (1.01, pb.PLACEMENT_CASCADE), (threshold, pb.PLACEMENT_CASCADE)]:
        router.set_placement("mlp-small", parse("mlp-small", f"cascade:{t}:mlp-heavy"), 2)
        response = await stub.Infer(request("mlp-small", x))
        assert response.placement == where, t
        expected = np.where((confidence < t)[:, None], heavy, small)
        close(response, expected)
    # What a cascade would send up, measured on the answers the edge computed, for the controller.
    measured = router.measurements()
    assert measured["confidence_below:mlp-small:1"] == 1.0
    assert 0.0 < measured["confidence_below:mlp-small:0.9"] <= 1.0


async def test_new_versions_are_fetched_and_served(
    coordinator: Coordinator, edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]
) -> None:
    app, stub = edge
    x = inputs(2)
    await serve(coordinator.models, "mlp", arrays_for("mlp", seed=2))
    await wait_for(lambda: app.agent.models.held_version("mlp") == 2)
    response = await stub.Infer(request("mlp", x))
    assert response.version == 2
    close(response, forward("mlp", arrays_for("mlp", 2), x))
    info = await stub.GetModelInfo(pb.ModelInfoRequest(model="mlp"))
    assert (info.version, len(info.stages)) == (2, 3)
    assert all(s.seconds_per_example > 0 for s in info.stages)


async def test_a_deadline_the_cloud_cannot_meet_is_answered_locally(
    edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]
) -> None:
    app, stub = edge
    app.agent.router.set_placement("mlp", parse("mlp", "cloud"), 3)  # type: ignore[union-attr]
    x = inputs(1)
    before = fallbacks("mlp", "deadline")
    response = await stub.Infer(request("mlp", x, deadline_ms=1))
    assert response.placement == pb.PLACEMENT_EDGE
    close(response, forward("mlp", arrays_for("mlp", 1), x))
    assert fallbacks("mlp", "deadline") == before + 1


async def test_bad_inputs_get_precise_codes_at_the_edge(edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]) -> None:
    _, stub = edge
    for bad, code in [
        (request("nope", inputs(1)), grpc.StatusCode.NOT_FOUND),
        (request("mlp", inputs(1), version=5), grpc.StatusCode.NOT_FOUND),
        (request("mlp", inputs(1, width=3)), grpc.StatusCode.INVALID_ARGUMENT),
        (request("mlp", np.full((1, 64), np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
        (request("mlp", inputs(2000)), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Infer(bad)
        assert err.value.code() == code, err.value.details()
    responses = [r async for r in stub.InferStream(iter([request("nope", inputs(1)), request("mlp", inputs(1))]))]
    assert [r.error_code for r in responses] == [grpc.StatusCode.NOT_FOUND.value[0], 0]


async def test_an_agent_certificate_serves_and_a_foreign_client_is_refused(
    edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub], foreign_certs_dir: Path
) -> None:
    app, _ = edge
    async with grpcserver.secure_channel(
        f"localhost:{app.inference_port}", tls.agent_credentials(foreign_certs_dir, "agent-0")
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inference_pb2_grpc.InferenceStub(channel).Infer(request("mlp", inputs(1)), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


async def test_an_agent_follows_the_serving_version_not_the_newest(
    coordinator: Coordinator, edge: tuple[EdgeApp, inference_pb2_grpc.InferenceStub]
) -> None:
    """Issue 16: a candidate (a job's initial model, a publish) never reaches the edge's
    default answers, but answers a request that names it (through the cloud); a
    promotion does, and so does a rollback to a lower version."""
    app, stub = edge
    app.agent.router.set_placement("mlp", parse("mlp", "edge"), 3)  # type: ignore[union-attr]
    x = inputs(2)
    candidate = await coordinator.models.publish("mlp", arrays_for("mlp", seed=7))
    await coordinator.jobs.start_job(JobSpec(model="mlp", rounds=1, min_clients=5))  # its initial model: a candidate
    await asyncio.sleep(1.0)  # the notices have arrived (the heartbeat interval is 0.5 s)
    assert app.agent.models.held_version("mlp") == 1
    close(await stub.Infer(request("mlp", x)), forward("mlp", arrays_for("mlp", 1), x))
    # A candidate stays addressable by its number at the edge too: the cloud answers it.
    named = await stub.Infer(request("mlp", x, version=candidate.version))
    assert (named.version, named.placement) == (candidate.version, pb.PLACEMENT_CLOUD)
    close(named, forward("mlp", arrays_for("mlp", 7), x))
    coordinator.models.promote("mlp", candidate.version, "test")
    await wait_for(lambda: app.agent.models.held_version("mlp") == candidate.version)
    close(await stub.Infer(request("mlp", x)), forward("mlp", arrays_for("mlp", 7), x))
    coordinator.models.rollback("mlp", "test")
    await wait_for(lambda: app.agent.models.held_version("mlp") == 1)
    response = await stub.Infer(request("mlp", x))
    assert response.version == 1
    close(response, forward("mlp", arrays_for("mlp", 1), x))


async def test_a_model_whose_task_is_not_installed_here_is_not_found_not_try_again() -> None:
    """The coordinator announces a model whose task this agent lacks: its requests are
    NOT_FOUND saying so (UNAVAILABLE "try again" would have clients retry forever)."""
    from edge.models import EdgeModels
    from tandem.errors import NotFound

    async def fetch(*_: object) -> dict[str, np.ndarray]:
        raise AssertionError("nothing to fetch: the task is not installed")

    models = EdgeModels(fetch)
    models.announce("no_such_package_xyz.tasks:Model", 1, "0" * 64)
    with pytest.raises(NotFound, match="not installed here"):
        await models.get("no_such_package_xyz.tasks:Model", 0)
