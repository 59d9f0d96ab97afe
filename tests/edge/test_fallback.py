"""Killing the coordinator under edge inference load fails no request: the agent
answers locally, then goes back to the cloud once the coordinator is back."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest

from edge.app import EdgeApp
from tandem.v1 import inference_pb2 as pb
from tests.support.cluster import Cluster
from tests.support.inference import (
    app_stub,
    arrays_for,
    close,
    fallbacks,
    forward,
    inputs,
    publish,
    request,
    start_edge,
)
from tests.support.waiting import wait_for

# a coordinator process killed and restarted under load: ~10 s
pytestmark = [pytest.mark.slow, pytest.mark.process]

MODELS = {"mlp": "split:1", "mlp-small": "edge", "mlp-heavy": "cloud"}


async def test_coordinator_killed_under_load_fails_nothing(cluster: Cluster, certs_dir: Path) -> None:
    cluster.start_cloud()
    weights = {name: arrays_for(name, seed=4) for name in MODELS}
    for name, arrays in weights.items():
        await publish(cluster.target, certs_dir, name, arrays)
    app: EdgeApp = await start_edge(cluster.port, certs_dir, tuple(f"{m}={p}" for m, p in MODELS.items()),
                                    cloud_timeout=0.5)
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    channel, stub = app_stub(app, certs_dir)
    try:
        await wait_for(lambda: all(app.agent.models.held_version(m) == 1 for m in MODELS))
        x = inputs(1)
        expected = {name: forward(name, arrays, x) for name, arrays in weights.items()}
        answered: dict[str, collections.Counter[int]] = {name: collections.Counter() for name in MODELS}
        phase = ["before"]
        where: dict[tuple[str, str], collections.Counter[int]] = collections.defaultdict(collections.Counter)
        done = asyncio.Event()

        async def client(name: str) -> None:
            while not done.is_set():
                started = phase[0]  # the phase each request began in
                response = await stub.Infer(request(name, x), timeout=10)  # a failure fails the test
                close(response, expected[name])
                answered[name][response.placement] += 1
                # A request begun while the cloud was down may be answered by it once it is
                # back (it waited on a reconnect): only one that began and ended in a phase
                # speaks for it.
                where[(name, started if phase[0] == started else "across")][response.placement] += 1

        clients = [asyncio.create_task(client(name)) for name in MODELS for _ in range(2)]
        await asyncio.sleep(1.0)
        split_fallbacks = fallbacks("mlp", "unavailable") + fallbacks("mlp", "link_down")
        assert cluster.cloud is not None
        cluster.cloud.kill()
        cluster.cloud.wait()
        phase[0] = "down"
        await asyncio.sleep(2.0)
        phase[0] = "restarting"
        cluster.start_cloud()  # same port: the agent finds it again
        phase[0] = "back"
        await wait_for(lambda: where[("mlp", "back")][pb.PLACEMENT_SPLIT] > 0, timeout=30)
        await wait_for(lambda: where[("mlp-heavy", "back")][pb.PLACEMENT_CLOUD] > 0, timeout=30)
        done.set()
        await asyncio.gather(*clients)

        assert where[("mlp", "before")][pb.PLACEMENT_SPLIT] > 0
        assert where[("mlp-heavy", "before")][pb.PLACEMENT_CLOUD] > 0
        # While the cloud was gone, everything was answered here, and counted as fallbacks.
        for name in ("mlp", "mlp-heavy"):
            assert set(where[(name, "down")]) == {pb.PLACEMENT_EDGE}, where[(name, "down")]
        assert set(answered["mlp-small"]) == {pb.PLACEMENT_EDGE}
        assert fallbacks("mlp", "unavailable") + fallbacks("mlp", "link_down") > split_fallbacks
    finally:
        await channel.close()
        stop.set()
        await runner
