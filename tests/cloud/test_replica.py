"""Cloud inference replicas (`tandem serve`) following a real coordinator, and the health ports probes use."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud.app import CloudConfig, Coordinator
from cloud.serving import ServingConfig
from tandem import grpcserver, tls
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from tandem.v1 import inference_pb2 as pb
from tandem_cli import procs
from tests.support.deployment import APP
from tests.support.inference import app_stub, arrays_for, close, forward, inputs, publish, request, start_edge
from tests.support.waiting import wait_for

SERVING: int = health_pb2.HealthCheckResponse.SERVING


def start_replica(cloud: str, certs_dir: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ready, log = tmp / "replica.ready.json", tmp / "replica.log"
    proc = procs.tandem_process(
        ["serve", "--cloud", cloud, "--certs", str(certs_dir), "--models", "mlp", "--cache", str(tmp / "cache"),
         "--listen", "127.0.0.1:0", "--health", "127.0.0.1:0", "--poll-interval", "0.3",
         "--ready-file", str(ready)], log,
    )
    return proc, procs.wait_ready(proc, ready, log, "replica")


@pytest.fixture
def replica_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        procs.stop(proc)


async def health(port: int) -> int:
    """The replica's overall health, from the plaintext port a kubelet probes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)


def serving(port: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await health(port) == SERVING

    return check


async def serving_replica(cloud: str, certs_dir: Path, tmp: Path, started: list[subprocess.Popen[bytes]],
                          v1: dict[str, np.ndarray]) -> dict[str, int]:
    """Publish `v1` of mlp, start a replica following `cloud`, and wait until it serves."""
    await publish(cloud, certs_dir, "mlp", v1)
    proc, ports = start_replica(cloud, certs_dir, tmp)
    started.append(proc)
    await wait_for(serving(ports["health_port"]), timeout=60, interval=0.2, message="the replica to serve")
    return ports


@pytest.mark.process
async def test_replica_serves_the_newest_version_and_swaps(
    coordinator: Coordinator, certs_dir: Path, tmp_path: Path, replica_proc: list[subprocess.Popen[bytes]]
) -> None:
    cloud = f"localhost:{coordinator.port}"
    v1 = arrays_for("mlp", seed=1)
    ports = await serving_replica(cloud, certs_dir, tmp_path, replica_proc, v1)

    x = inputs(5)
    async with grpcserver.secure_channel(f"localhost:{ports['port']}", tls.app_credentials(certs_dir, APP)) as ch:
        stub = inference_pb2_grpc.InferenceStub(ch)
        first = await stub.Infer(request("mlp", x), timeout=10)
        assert first.version == 1
        close(first, forward("mlp", v1, x))
        split = await stub.Infer(request("mlp", forward("mlp", v1, x, 0, 1), start_layer=1), timeout=10)
        close(split, forward("mlp", v1, x))

        v2 = arrays_for("mlp", seed=2)
        await publish(cloud, certs_dir, "mlp", v2)

        async def swapped() -> bool:
            return bool((await stub.Infer(request("mlp", x), timeout=10)).version == 2)

        await wait_for(swapped, timeout=30, interval=0.2, message="the replica to answer with version 2")
        close(await stub.Infer(request("mlp", x), timeout=10), forward("mlp", v2, x))
        pinned = await stub.Infer(request("mlp", x, version=1), timeout=10)  # kept while it was the newest
        close(pinned, forward("mlp", v1, x))

        # Issue 16: a candidate is not mirrored for default answers; a rollback is followed.
        await publish(cloud, certs_dir, "mlp", arrays_for("mlp", seed=3), promote=False)
        await asyncio.sleep(1.0)  # several mirror passes
        assert (await stub.Infer(request("mlp", x), timeout=10)).version == 2
        coordinator.models.rollback("mlp", "test")

        async def rolled_back() -> bool:
            return bool((await stub.Infer(request("mlp", x), timeout=10)).version == 1)

        await wait_for(rolled_back, timeout=30, interval=0.2, message="the replica to answer with version 1 again")
        close(await stub.Infer(request("mlp", x), timeout=10), forward("mlp", v1, x))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Infer(request("cnn", np.zeros((1, 3, 96, 96), np.float32)), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "does not serve 'cnn'" in (err.value.details() or "")


@pytest.mark.process
async def test_replica_is_not_serving_until_the_coordinator_answers(
    certs_dir: Path, tmp_path: Path, replica_proc: list[subprocess.Popen[bytes]]
) -> None:
    port = procs.free_port()
    proc, ports = start_replica(f"localhost:{port}", certs_dir, tmp_path)
    replica_proc.append(proc)
    await asyncio.sleep(1.5)  # several mirror passes, all failing
    assert await health(ports["health_port"]) == health_pb2.HealthCheckResponse.NOT_SERVING

    coordinator = Coordinator(CloudConfig(listen=f"127.0.0.1:{port}", certs=certs_dir, state=tmp_path / "state"))
    await coordinator.start()
    try:
        await publish(f"localhost:{port}", certs_dir, "mlp", arrays_for("mlp", seed=3))
        await wait_for(serving(ports["health_port"]), timeout=60, interval=0.2, message="the replica to serve")
    finally:
        await coordinator.stop()


async def test_replica_certificate_reads_models_and_nothing_else(coordinator: Coordinator, certs_dir: Path) -> None:
    async with grpcserver.secure_channel(f"localhost:{coordinator.port}", tls.replica_credentials(certs_dir)) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        await admin.ListModelVersions(admin_pb2.ListModelVersionsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.ListAgents(admin_pb2.ListAgentsRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_agent_health_port_serves_while_it_runs(coordinator: Coordinator, certs_dir: Path) -> None:
    """The edge agent's plaintext health port (its DaemonSet's probes): SERVING, then NOT_SERVING on stop."""
    app = await start_edge(coordinator.port, certs_dir, (), health="127.0.0.1:0")
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    try:
        assert await health(app.health_port) == SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.health_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="tandem.v1.Inference"), timeout=5)
            assert reply.status == SERVING
            # Watching from before the stop: the stream sees NOT_SERVING before the port closes.
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert (await anext(aiter(watch))).status == SERVING
            stop.set()
            assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        stop.set()
        await runner


@pytest.mark.process
async def test_agents_send_cloud_inference_to_the_replicas_when_told(
    certs_dir: Path, tmp_path: Path, replica_proc: list[subprocess.Popen[bytes]]
) -> None:
    """`--inference-cloud`: cloud requests go to the replicas' address, not the coordinator's.
    This coordinator serves no `mlp`, so only a replica can answer one in the cloud."""
    coordinator = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state",
                                          serving=ServingConfig(models=("cnn",))))
    await coordinator.start()
    stop = asyncio.Event()
    runners: list[asyncio.Task[None]] = []
    try:
        v1 = arrays_for("mlp", seed=1)
        ports = await serving_replica(f"localhost:{coordinator.port}", certs_dir, tmp_path, replica_proc, v1)
        x = inputs(3)
        for inference_cloud, expected in ((f"localhost:{ports['port']}", True), (None, False)):
            # One after the other: the same agent id connected twice is refused (issue 16).
            stop.set()
            await asyncio.gather(*runners)
            stop = asyncio.Event()
            app = await start_edge(coordinator.port, certs_dir, ("mlp=cloud",), inference_cloud=inference_cloud)
            runners.append(asyncio.create_task(app.run(stop)))
            channel, stub = app_stub(app, certs_dir)
            async with channel:
                async with asyncio.timeout(30):
                    await app.agent.welcomed.wait()
                try:
                    response = await stub.Infer(request("mlp", x), timeout=10)
                    in_cloud = response.placement == pb.PLACEMENT_CLOUD
                except grpc.aio.AioRpcError:  # the coordinator's NOT_FOUND, passed on
                    in_cloud = False
                assert in_cloud == expected, inference_cloud
                if expected:
                    assert response.version == 1
                    close(response, forward("mlp", v1, x))
    finally:
        stop.set()
        await asyncio.gather(*runners)
        await coordinator.stop()
