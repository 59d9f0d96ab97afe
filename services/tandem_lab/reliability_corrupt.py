"""Corrupt files: a coordinator's model files damaged behind its back, at rest and while it runs.

A real `tandem cloud` process publishes `versions` versions of `model`; it is stopped,
and three files are damaged: the newest truncated to half, version 1's last tensor
bytes inverted (its size unchanged), version 2's header overwritten. `tandem models
verify` checks the directory offline; the coordinator is started again on it. A
client with an agent's certificate then downloads every version and runs Infer on
each; version 3 is downloaded twice (the first serve hashes the file, the second finds
the verdict kept), then damaged while the coordinator runs and downloaded again.

A corrupt file "reaches a client" if a download of a damaged version ends OK or
hands over any tensor chunk; the coordinator "stops" if it fails to start on the
damaged directory or is not running at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cloud.integrity import verify_state
from tandem import grpcserver, tls, training, wire, zoo
from tandem.v1 import admin_pb2, coordinator_pb2_grpc, inference_pb2_grpc
from tandem.v1 import coordinator_pb2 as cpb
from tandem.v1 import inference_pb2 as ipb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, publish_serving
from tandem_lab.fleet import make_certs

CLIENT = "corrupt-client"


async def _publish(target: str, certs: Path, model: str, count: int) -> list[admin_pb2.ModelVersion]:
    async with admin_channel(target, certs) as channel:
        stub = admin_stub(channel)
        return [await publish_serving(stub, model, training.state_arrays(zoo.build_model(model, seed=seed)), timeout=300)
                for seed in range(1, count + 1)]


def invert(path: Path, at: int = -64, count: int = 16) -> None:
    """Invert `count` bytes at `at` (from the end when negative): the file's size stays as it was."""
    with open(path, "r+b") as f:
        f.seek(at, os.SEEK_END if at < 0 else os.SEEK_SET)
        where = f.tell()
        data = f.read(count)
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in data))


async def _download(stub: coordinator_pb2_grpc.CoordinatorStub, model: str, version: int, sha256: str) -> dict[str, Any]:
    """How one download ended: its code, the tensor chunks received and whether they hash as published."""
    started, chunks, assembler = time.perf_counter(), 0, None
    try:
        async for message in stub.DownloadModel(cpb.ModelRequest(model=model, version=version), timeout=300):
            if message.HasField("header"):
                assembler = wire.ChunkAssembler({t.name: wire.spec_from_proto(t, 1 << 31) for t in message.header.tensors})
            elif assembler is not None:
                chunks += 1
                assembler.add(message.tensor)
        code, details = "OK", ""
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    intact = code == "OK" and assembler is not None and wire.state_sha256(assembler.result()) == sha256
    return {"code": code, "details": details, "chunks": chunks, "intact": intact,
            "seconds": round(time.perf_counter() - started, 4)}


async def _infer(stub: inference_pb2_grpc.InferenceStub, model: str, version: int) -> str:
    x = np.zeros((1, *zoo.get_entry(model).input_shape), np.float32)
    try:
        await stub.Infer(ipb.InferRequest(model=model, version=version, input=wire.to_proto(x)), timeout=60)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "OK"


async def run(work: Path, model: str = "mlp", versions: int = 5) -> dict[str, Any]:
    assert versions >= 4, "versions 1 and 2 and the newest are damaged at rest, 3 while running"
    certs = make_certs(work / "certs", [CLIENT])
    state, log = work / "state", work / "cloud.log"
    cloud, ports = procs.start_cloud(certs, state, log)
    try:
        published = await _publish(f"localhost:{ports['port']}", certs, model, versions)
    finally:
        procs.stop(cloud)
    sha = {v.version: v.sha256 for v in published}
    path = {v: state / "models" / model / f"v{v:06d}.safetensors" for v in sha}
    os.truncate(path[versions], path[versions].stat().st_size // 2)
    invert(path[1], -64, 16)
    invert(path[2], 8, 32)
    damaged_at_rest = {1, 2, versions}
    started = time.perf_counter()
    checked, bad = verify_state(state)
    verify_seconds = time.perf_counter() - started

    started = time.perf_counter()
    cloud, ports = procs.start_cloud(certs, state, log)
    start_seconds = time.perf_counter() - started
    downloads: dict[str, dict[str, Any]] = {}
    infers: dict[str, str] = {}
    try:
        async with grpcserver.secure_channel(f"localhost:{ports['port']}", tls.agent_credentials(certs, CLIENT)) as ch:
            coordinator, inference = coordinator_pb2_grpc.CoordinatorStub(ch), inference_pb2_grpc.InferenceStub(ch)
            for v in sorted(sha):
                downloads[f"v{v}"] = await _download(coordinator, model, v, sha[v])
                infers[f"v{v}"] = await _infer(inference, model, v)
            downloads["v3_again"] = await _download(coordinator, model, 3, sha[3])  # the verdict kept
            newest = await _download(coordinator, model, 0, "")
            invert(path[3], -8, 4)  # while it runs, after it was verified
            downloads["v3_damaged_running"] = await _download(coordinator, model, 3, sha[3])
        running = cloud.poll() is None
    finally:
        procs.stop(cloud)
    text = log.read_text()
    damaged = {f"v{v}" for v in damaged_at_rest} | {"v3_damaged_running"}
    reached = sorted(k for k in damaged if downloads[k]["code"] == "OK" or downloads[k]["chunks"])
    good = [k for k in downloads if k not in damaged]
    size = sum(s.nbytes for s in training.state_specs(model).values())
    return {
        "model": model, "model_bytes": size, "versions": versions,
        "verify_offline": {"files": checked, "bad": bad, "seconds": round(verify_seconds, 3)},
        "start_seconds": round(start_seconds, 2), "running_at_end": running,
        "newest_served": newest["code"], "downloads": downloads, "infer": infers,
        "corrupt_reached_client": reached,
        "good_refused": sorted(k for k in good if not downloads[k]["intact"]),
        "first_serve_seconds": downloads["v3"]["seconds"], "cached_serve_seconds": downloads["v3_again"]["seconds"],
        "quarantine_log_lines": text.count("quarantined "), "tracebacks": text.count("Traceback"),
    }


def targets(run: dict[str, Any]) -> dict[str, Any]:
    stopped = int(not run["running_at_end"]) + run["tracebacks"]
    return {
        "corrupt_files_reaching_clients": {
            "measured": len(run["corrupt_reached_client"]), "goal": 0, "op": "<=",
            "met": not run["corrupt_reached_client"],
            "how": "downloads of a damaged version (truncated, bytes inverted, header overwritten, damaged while "
                   "running) that ended OK or handed over any tensor chunk"},
        "corrupt_coordinator_stopped": {
            "measured": stopped, "goal": 0, "op": "<=", "met": stopped == 0,
            "how": "0 if the coordinator started on the damaged directory, logged no traceback and ran to the end"},
        "corrupt_good_versions_refused": {
            "measured": len(run["good_refused"]), "goal": 0, "op": "<=", "met": not run["good_refused"],
            "how": "downloads of undamaged versions that did not arrive whole with their published sha256"},
    }
