"""A model that is not a Sequential, split at its traced points across a real edge
agent and a real cloud (mutual TLS, loopback): every split reproduces the whole
model, and a model that cannot be traced is served whole and says why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest_asyncio
import torch

from cloud.app import CloudConfig, Coordinator
from cloud.serving import ServingConfig
from edge.app import EdgeApp
from tandem import tasks, wire
from tandem.placement import parse
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc
from tests.support.inference import app_stub, request, serve, start_edge
from tests.support.tasks import RESIDUAL, UNTRACEABLE
from tests.support.waiting import wait_for

Served = tuple[EdgeApp, inference_pb2_grpc.InferenceStub, dict[str, dict[str, np.ndarray]]]


def arrays_of(name: str, seed: int) -> dict[str, np.ndarray]:
    return tasks.get(name).state_arrays(tasks.get(name).build(seed))


def whole(name: str, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    loaded = tasks.get(name)
    net = loaded.build(0)
    loaded.load_arrays(net, arrays)
    with torch.inference_mode():
        out: np.ndarray = net.eval()(torch.from_numpy(x)).numpy()
    return out


@pytest_asyncio.fixture
async def served(tmp_path: Path, certs_dir: Path) -> AsyncIterator[Served]:
    """A cloud serving both tasks (v1 published) and an agent serving both locally."""
    config = CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", health="127.0.0.1:0",
                         heartbeat_interval=0.5, grace=1.0, serving=ServingConfig(models=(RESIDUAL, UNTRACEABLE)))
    cloud = Coordinator(config)
    await cloud.start()
    arrays = {name: arrays_of(name, seed=1) for name in (RESIDUAL, UNTRACEABLE)}
    for name, state in arrays.items():
        await serve(cloud.models, name, state)
    app = await start_edge(cloud.port, certs_dir, (f"{RESIDUAL}=edge", f"{UNTRACEABLE}=edge"))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    await wait_for(lambda: all(app.agent.models.held_version(name) == 1 for name in arrays), timeout=60)
    channel, stub = app_stub(app, certs_dir)
    try:
        yield app, stub, arrays
    finally:
        await channel.close()
        stop.set()
        await runner
        await cloud.stop()


async def test_every_split_of_a_residual_cnn_reproduces_the_whole_model(served: Served) -> None:
    app, stub, arrays = served
    router = app.agent.router
    assert router is not None
    info = await stub.GetModelInfo(pb.ModelInfoRequest(model=RESIDUAL))
    assert [s.name for s in info.stages] == ["Conv2d", "PreActBlock", "PreActBlock", "PreActBlock", "Conv2d"]
    assert info.split_note == ""
    stages = len(info.stages)
    x = np.random.default_rng(3).normal(size=(4, 3, 16, 16)).astype(np.float32)
    expected = whole(RESIDUAL, arrays[RESIDUAL], x)
    for k in range(stages + 1):
        router.set_placement(RESIDUAL, parse(RESIDUAL, f"split:{k}"), stages)
        response = await stub.Infer(request(RESIDUAL, x, request_id=f"split:{k}"))
        where = pb.PLACEMENT_CLOUD if k == 0 else pb.PLACEMENT_EDGE if k == stages else pb.PLACEMENT_SPLIT
        assert (response.request_id, response.version, response.placement) == (f"split:{k}", 1, where)
        np.testing.assert_allclose(wire.from_proto(response.output), expected, rtol=1e-5, atol=1e-6)


async def test_an_untraceable_model_is_served_whole_at_both_ends(served: Served) -> None:
    app, stub, arrays = served
    router = app.agent.router
    assert router is not None
    info = await stub.GetModelInfo(pb.ModelInfoRequest(model=UNTRACEABLE))
    assert len(info.stages) == 1 and "cannot trace" in info.split_note, info
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    for text, where in [("edge", pb.PLACEMENT_EDGE), ("cloud", pb.PLACEMENT_CLOUD)]:
        router.set_placement(UNTRACEABLE, parse(UNTRACEABLE, text), 1)
        response = await stub.Infer(request(UNTRACEABLE, x))
        assert response.placement == where
        np.testing.assert_allclose(wire.from_proto(response.output), whole(UNTRACEABLE, arrays[UNTRACEABLE], x),
                                   rtol=1e-5, atol=1e-6)
