"""Memory: a 1 GB model down to an agent, a 1 GB update up, the round closed, and the
new 1 GB version down again, with the peak RSS of each side measured by the kernel.

The coordinator is a real `tandem cloud` process. The agent side is a process of its
own (this module's `__main__`) that does with the model what an agent does on the
wire, through the agent's own transfer code (`tandem.transfer`): it holds a control
stream, answers its task by downloading the base version, sends a dense update of
the model's size (codec `none`) and downloads the version the round published.
Training is left out: it needs the model, its gradients and the optimiser's state
in memory whatever the transport does.

Peaks are the kernel's high-water mark of resident memory (VmHWM), reset through
/proc/PID/clear_refs at the start of each phase, so nothing between samples is
missed. The coordinator serves only `mlp` for inference here: serving a model
means holding it, which is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from tandem import certs, grpcserver, tls, training, transfer
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job

AGENT = "memory-agent"


def reset_peak(pid: int) -> None:
    """Start a new high-water mark of resident memory at the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def memory(pid: int) -> dict[str, int]:
    """Current and peak resident bytes since the last reset."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak": int(fields["VmHWM"].split()[0]) * 1024}


class Phases:
    """Peak memory of this process and of the coordinator, phase by phase."""

    def __init__(self, cloud_pid: int) -> None:
        self.pids = {"agent": os.getpid(), "cloud": cloud_pid}
        self.results: dict[str, dict[str, Any]] = {}

    async def measure(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        before = {side: memory(pid)["rss"] for side, pid in self.pids.items()}
        for pid in self.pids.values():
            reset_peak(pid)
        started = time.perf_counter()
        result = await work()
        seconds = time.perf_counter() - started
        peaks = {side: memory(pid)["peak"] for side, pid in self.pids.items()}
        self.results[name] = {"seconds": round(seconds, 2), "rss_before": before, "peak": peaks}
        print(f"  memory: {name}: {seconds:.1f} s, peak RSS agent {peaks['agent'] / 2**20:.0f} MiB, "
              f"coordinator {peaks['cloud'] / 2**20:.0f} MiB", flush=True)
        return result


async def agent(target: str, certs_dir: Path, model: str, cloud_pid: int) -> dict[str, Any]:
    """The agent side: one task, answered while every transfer is measured."""
    specs = training.state_specs(model)
    outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
    outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu")))
    incoming: asyncio.Queue[pb.CoordinatorMessage] = asyncio.Queue()
    phases = Phases(cloud_pid)

    async def requests() -> AsyncIterator[pb.AgentMessage]:
        seq = 0
        while True:
            try:
                async with asyncio.timeout(1.0):
                    yield await outgoing.get()
            except TimeoutError:
                seq += 1
                yield pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq))

    async def next_message(kind: str) -> pb.CoordinatorMessage:
        while True:
            message = await incoming.get()
            if message.WhichOneof("kind") == kind:
                return message

    async with grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, AGENT)) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        call = stub.Connect(requests())

        async def read() -> None:
            async for message in call:
                incoming.put_nowait(message)

        reader = asyncio.create_task(read())
        try:
            task = (await next_message("task")).task
            base = transfer.Download(model, task.base_version, task.base_sha256, specs)
            arrays = await phases.measure("download", lambda: base.run(stub, timeout=600))
            nbytes = sum(a.nbytes for a in arrays.values())
            del arrays

            async def upload() -> pb.UpdateReceipt:
                # A dense update of the model's size, made tensor by tensor without float64 temporaries.
                rng = np.random.default_rng(0)
                components = {name: rng.standard_normal(int(np.prod(spec.shape)), dtype=np.float32) * np.float32(1e-4)
                              for name, spec in specs.items()}
                header = pb.UpdateHeader(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                         num_examples=100, local_loss=0.5, codec="none")
                receipt: pb.UpdateReceipt = await transfer.Upload(header, components).run(stub, timeout=600)
                return receipt

            receipt = await phases.measure("upload", upload)
            notice = (await phases.measure("close", lambda: next_message("model"))).model
            new = transfer.Download(model, notice.version, notice.sha256, specs)
            await phases.measure("download_new", lambda: new.run(stub, timeout=600))
        finally:
            reader.cancel()
            call.cancel()
    return {"model": model, "model_bytes": nbytes, "upload_bytes": receipt.bytes_received,
            "new_version": notice.version, "phases": phases.results}


async def run(work: Path, model: str = "mlp250m") -> dict[str, Any]:
    certs_dir = work / "certs"
    if not (certs_dir / "ca.pem").exists():
        certs.init_deployment(certs_dir, [AGENT])
    cloud, ports = procs.start_cloud(certs_dir, work / "state", work / "cloud.log",
                                     extra=["--placement-interval", "0", "--models", "mlp"])
    target = f"localhost:{ports['port']}"
    out = work / "agent.json"
    try:
        with open(work / "agent.log", "ab") as log:
            side = subprocess.Popen(
                [sys.executable, "-m", "tandem_lab.reliability_memory", "--cloud", target, "--certs", str(certs_dir),
                 "--model", model, "--cloud-pid", str(cloud.pid), "--out", str(out)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            async with admin_channel(target, certs_dir) as channel:
                stub = admin_stub(channel)
                await wait_connected(stub, 1, timeout=120)
                reset_peak(cloud.pid)
                spec = admin_pb2.JobSpec(model=model, rounds=1, min_clients=1, round_deadline_seconds=600,
                                         codec="none", max_update_bytes=2 << 30, seed=1)
                job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
                start_peak = memory(cloud.pid)["peak"]
                job = await wait_job(stub, job_id, timeout=1200, echo=False)
            if side.wait(timeout=600) != 0:
                raise RuntimeError(f"the memory agent failed; see {work / 'agent.log'}")
        finally:
            procs.stop(side)
    finally:
        procs.stop(cloud)
    result: dict[str, Any] = json.loads(out.read_text())
    result["job_state"] = job["state"]
    result["cloud_start_job_peak"] = start_peak
    for phase, measured in result["phases"].items():
        peak = measured["peak"]
        print(f"  memory: {phase}: {measured['seconds']:.1f} s, peak RSS / model size: agent "
              f"{peak['agent'] / result['model_bytes']:.2f}, coordinator {peak['cloud'] / result['model_bytes']:.2f}",
              flush=True)
    return result


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS over the model's size, each side, for the transfers (the close is reported, not a target)."""
    size = result["model_bytes"]
    phases = result["phases"]
    ratios = {f"{phase}/{side}": phases[phase]["peak"][side] / size
              for phase in ("download", "upload", "download_new") for side in ("agent", "cloud")}
    worst = max(ratios, key=lambda k: ratios[k])
    return {
        "memory_peak_rss_over_model_size": {
            "measured": round(ratios[worst], 3), "goal": 1.5, "op": "<=", "met": ratios[worst] <= 1.5,
            "how": f"largest peak RSS / model size ({size / 1e9:.2f} GB) over the downloads and the upload, "
                   f"agent and coordinator (worst: {worst}); each side's whole process, interpreter and torch included"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the agent side of the memory scenario")
    parser.add_argument("--cloud", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--cloud-pid", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(agent(args.cloud, args.certs, args.model, args.cloud_pid))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
