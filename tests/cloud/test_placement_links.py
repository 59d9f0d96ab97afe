"""Placement behind real links: a strong edge on a slow, distant link runs the camera
model deep at the edge; a weak edge (a CPU quota) on a fast link offloads early.

The slow link is a network namespace whose veth pair is shaped with tc tbf to
2 Mbit/s, with 80 ms of round trip added by a relay in the path; the weak edge is a
cgroup CPU quota of a tenth of a core. Needs root; skipped where `ip netns` is refused.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tandem import certs, grpcserver, tls
from tandem.v1 import admin_pb2, inference_pb2_grpc
from tandem_cli import procs
from tandem_lab.netem import CpuLimit, DelayRelay, ShapedLink, unavailable_reason
from tests.support.inference import arrays_for, publish, request

REASON = unavailable_reason()
# a coordinator and two agent processes behind shaped links (tandem_cli.procs): ~40 s
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"shaped links: {REASON}"), pytest.mark.slow, pytest.mark.process,
]


@pytest.fixture
def link() -> Iterator[ShapedLink]:
    shaped = ShapedLink(41).up("2mbit")
    try:
        yield shaped
    finally:
        shaped.down()


async def placements(target: str, certs_dir: Path) -> dict[str, str]:
    async with grpcserver.secure_channel(target, tls.admin_credentials(certs_dir)) as channel:
        from tandem.v1 import admin_pb2_grpc

        listed = await admin_pb2_grpc.AdminStub(channel).ListPlacements(admin_pb2.ListPlacementsRequest(model="cnn"))
        return {p.agent: p.placement for p in listed.placements}


async def test_strong_slow_edge_runs_deep_and_weak_fast_edge_offloads(tmp_path: Path, link: ShapedLink) -> None:
    certs_dir = tmp_path / "certs"
    certs.init_deployment(certs_dir, ["strong", "weak"], hosts=[link.host_ip])
    certs.add_client(certs_dir, "camera")
    started: list[subprocess.Popen[bytes]] = []
    relay = None
    try:
        cloud, ports = procs.start_cloud(
            certs_dir, tmp_path / "state", tmp_path / "cloud.log", listen="0.0.0.0:0",
            extra=["--placement-interval", "0.5", "--min-dwell", "3", "--heartbeat", "0.5"],
        )
        started.append(cloud)
        target = f"localhost:{ports['port']}"
        await publish(target, certs_dir, "cnn", arrays_for("cnn", seed=1))
        relay = DelayRelay(("127.0.0.1", ports["port"]), rtt=0.08)
        await relay.start(link.host_ip)
        flags = ["--probe-interval", "0.5"]
        strong, _ = procs.start_serving_agent(
            f"{link.host_ip}:{relay.port}", certs_dir, "strong", "digits:0/2", tmp_path / "strong.log",
            ["cnn=cloud"], extra=flags, prefix=link.prefix(),
        )
        started.append(strong)
        weak, weak_ports = procs.start_serving_agent(
            target, certs_dir, "weak", "digits:1/2", tmp_path / "weak.log", ["cnn=edge"], extra=flags,
        )
        started.append(weak)
        with CpuLimit("weak-edge", 0.1) as quota:
            quota.add(weak.pid)
            # A camera application sends a few frames a second; they measure the weak device's stages.
            async with grpcserver.secure_channel(
                f"localhost:{weak_ports['inference_port']}", tls.app_credentials(certs_dir, "camera")
            ) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                frame = np.zeros((1, 3, 96, 96), np.float32)
                decided: dict[str, str] = {}
                async with asyncio.timeout(90):
                    while not (decided.get("strong") == "edge" and decided.get("weak") in ("cloud", "split:1")):
                        try:
                            await stub.Infer(request("cnn", frame), timeout=5)
                        except grpc.aio.AioRpcError:
                            pass  # the model may not be fetched yet
                        decided = await placements(target, certs_dir)
                        await asyncio.sleep(0.25)
        assert decided["strong"] == "edge", decided
        assert decided["weak"] in ("cloud", "split:1"), decided
    except BaseException:
        for name in ("cloud", "strong", "weak"):
            log = tmp_path / f"{name}.log"
            if log.exists():
                print(f"==== {name}\n" + log.read_text()[-4000:])
        raise
    finally:
        for proc in started:
            procs.stop(proc)
        if relay is not None:
            await relay.close()
