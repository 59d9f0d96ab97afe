"""The placement controller's two sources agree: a real Prometheus (Debian's package,
with deploy/prometheus/prometheus.yml as it is) scraping the cloud and two agents,
against the cloud's own /metrics plus the agents' heartbeats, under the same load.
One agent is weak (a tenth of a core, where cgroups allow), so the decisions differ
between agents and agreement means something."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.observations import DirectSource, PrometheusSource
from cloud.placement_policy import Observations, PolicyConfig, decide
from tandem import certs, grpcserver, tls
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from tandem_cli import procs
from tandem_lab.netem import CpuLimit
from tests.support.inference import arrays_for, publish, request

ROOT = Path(__file__).resolve().parents[2]
# Prometheus, a coordinator and two agents as processes, and 8 s of settling under load
pytestmark = [
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
    pytest.mark.slow, pytest.mark.process,
]


def start_prometheus(work: Path, cloud_metrics: int, agents: dict[str, int]) -> tuple[subprocess.Popen[bytes], str]:
    config = work / "prometheus"
    (config / "targets").mkdir(parents=True)
    shutil.copy(ROOT / "deploy/prometheus/prometheus.yml", config / "prometheus.yml")
    (config / "targets/cloud.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{cloud_metrics}"]}]))
    (config / "targets/edge.json").write_text(json.dumps(
        [{"targets": [f"127.0.0.1:{port}"], "labels": {"agent": name}} for name, port in agents.items()]
    ))
    port = procs.free_port()
    with open(work / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={config / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    return proc, f"http://127.0.0.1:{port}"


async def heartbeat_measurements(target: str, certs_dir: Path) -> dict[str, dict[str, float]]:
    async with grpcserver.secure_channel(target, tls.admin_credentials(certs_dir)) as channel:
        agents = (await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest())).agents
    return {a.agent_id: dict(a.measurements) for a in agents if a.connected}


def splits(obs: Observations) -> dict[tuple[str, str], int]:
    return {key: d.split for key, d in decide(obs, {}, PolicyConfig()).items()}


async def test_prometheus_and_direct_sources_agree(tmp_path: Path) -> None:
    certs_dir = tmp_path / "certs"
    certs.init_deployment(certs_dir, ["strong", "weak"])
    certs.add_client(certs_dir, "camera")
    started: list[subprocess.Popen[bytes]] = []
    limit = CpuLimit("prom-weak", 0.1) if os.geteuid() == 0 else None
    try:
        cloud, ports = procs.start_cloud(certs_dir, tmp_path / "state", tmp_path / "cloud.log",
                                         extra=["--placement-interval", "0", "--heartbeat", "0.5"])
        started.append(cloud)
        target = f"localhost:{ports['port']}"
        await publish(target, certs_dir, "cnn", arrays_for("cnn", seed=1))
        agents = {}
        # The weak agent starts with everything in the cloud, so its requests measure its link.
        for name, where in (("strong", "edge"), ("weak", "cloud")):
            proc, agent_ports = procs.start_serving_agent(
                target, certs_dir, name, "digits:0/2", tmp_path / f"{name}.log", [f"cnn={where}"],
                extra=["--probe-interval", "0.5"],
            )
            started.append(proc)
            agents[name] = agent_ports
        if limit is not None:
            limit.__enter__()
            limit.add(started[-1].pid)
        prometheus, url = start_prometheus(tmp_path, ports["metrics_port"], {n: p["metrics_port"] for n, p in agents.items()})
        started.append(prometheus)

        frame = np.zeros((1, 3, 96, 96), np.float32)

        async def camera(name: str) -> None:
            port = agents[name]["inference_port"]
            async with grpcserver.secure_channel(f"localhost:{port}", tls.app_credentials(certs_dir, "camera")) as ch:
                stub = inference_pb2_grpc.InferenceStub(ch)
                while True:
                    try:
                        await stub.Infer(request("cnn", frame), timeout=5)
                    except grpc.aio.AioRpcError:
                        pass  # not serving cnn yet
                    await asyncio.sleep(0.25)

        cameras = [asyncio.create_task(camera(name)) for name in agents]
        direct = DirectSource(
            agents=lambda: measured,
            exposition=lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{ports['metrics_port']}/metrics", timeout=5).read().decode(),
        )
        prom = PrometheusSource(url, window="10s")
        measured: dict[str, dict[str, float]] = {}
        try:
            async with asyncio.timeout(120):
                while True:  # until both sources see both agents and the model
                    await asyncio.sleep(1.0)
                    measured = await heartbeat_measurements(target, certs_dir)
                    a, b = await direct.observe(), await prom.observe()
                    if all(len(o.agents) == 2 and "cnn" in o.models and
                           all("cnn" in v.edge_seconds and v.up_bytes_per_second > 0 for v in o.agents.values())
                           for o in (a, b)):
                        break
            await asyncio.sleep(8.0)  # let rates and averages settle under the steady load
            # Five reads of each, a second apart: a stage of the agent under a 10% CPU quota takes
            # 2.5 ms on one request and 8 ms on the next (when the quota throttles it mid-stage), so
            # two single reads a moment apart can differ 3x; their medians may not.
            reads: list[tuple[Observations, Observations]] = []
            for _ in range(5):
                measured = await heartbeat_measurements(target, certs_dir)
                reads.append((await direct.observe(), await prom.observe()))
                await asyncio.sleep(1.0)
            from_direct, from_prometheus = reads[-1]
        finally:
            for task in cameras:
                task.cancel()
        assert splits(from_direct) == splits(from_prometheus), (from_direct, from_prometheus)
        if limit is not None:
            weak, strong = splits(from_direct)[("weak", "cnn")], splits(from_direct)[("strong", "cnn")]
            assert weak < strong, (weak, strong)
        # The same quantities, read two ways.
        for name in agents:
            d, p = from_direct.agents[name], from_prometheus.agents[name]
            direct_stages = np.median([r[0].agents[name].edge_seconds["cnn"] for r in reads], axis=0)
            prometheus_stages = np.median([r[1].agents[name].edge_seconds["cnn"] for r in reads], axis=0)
            for x, y in zip(direct_stages, prometheus_stages):
                assert 0.25 < x / y < 4, (name, direct_stages, prometheus_stages)
            assert 0.3 < d.request_rate["cnn"] / p.request_rate["cnn"] < 3, (d.request_rate, p.request_rate)
        for x, y in zip(from_direct.models["cnn"].cloud_seconds, from_prometheus.models["cnn"].cloud_seconds):
            assert 0.3 < x / y < 3
    except BaseException:
        for name in ("cloud", "strong", "weak", "prometheus"):
            log = tmp_path / f"{name}.log"
            if log.exists():
                print(f"==== {name}\n" + log.read_text()[-3000:])
        raise
    finally:
        for proc in started:
            procs.stop(proc)
        if limit is not None:
            limit.__exit__(None, None, None)
