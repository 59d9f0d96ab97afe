"""`python -m tandem_lab bench auto`: codec auto against fixed codecs, with some agents behind a
bandwidth-shaped link.

Two agents run in a network namespace joined to the host by a veth pair whose
both directions are shaped in the kernel (tc tbf); two run on loopback. Needs root
(`ip netns`); it says so and exits 2 where that is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tandem import certs
from tandem.v1 import admin_pb2
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job
from tandem_lab.bench import machine
from tandem_lab.netem import ShapedLink

LINK = ShapedLink(0)


def _slow_agent(port: int, certs_dir: Path, name: str, data: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*LINK.prefix(), sys.executable, "-m", "tandem_cli", "edge", "--cloud", f"{LINK.host_ip}:{port}",
             "--certs", str(certs_dir), "--id", name, "--data", data],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )


async def run_one(work: Path, certs_dir: Path, update_codec: str, rounds: int, target_seconds: float) -> dict[str, Any]:
    run = work / update_codec.replace(":", "_").replace("+", "_")
    run.mkdir()
    cloud, ports = procs.start_cloud(certs_dir, run / "state", run / "cloud.log", listen="0.0.0.0:0")
    port = ports["port"]
    agents = [
        procs.start_agent(f"localhost:{port}", certs_dir, "fast-0", "digits:0/4", run / "fast-0.log"),
        procs.start_agent(f"localhost:{port}", certs_dir, "fast-1", "digits:1/4", run / "fast-1.log"),
        _slow_agent(port, certs_dir, "slow-0", "digits:2/4", run / "slow-0.log"),
        _slow_agent(port, certs_dir, "slow-1", "digits:3/4", run / "slow-1.log"),
    ]
    try:
        async with admin_channel(f"localhost:{port}", certs_dir) as channel:
            stub = admin_stub(channel)
            await wait_connected(stub, 4, timeout=120)
            spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=4, round_deadline_seconds=300,
                                     eval="digits", codec=update_codec, target_upload_seconds=target_seconds)
            started = time.monotonic()
            job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
            job = await wait_job(stub, job_id, timeout=0, echo=False)
            if job["state"] != "completed":
                raise RuntimeError(f"job {job['state']}: {job['message']}; logs in {run}")
            return {"codec": update_codec, "wall_seconds": time.monotonic() - started, "rounds": job["rounds"]}
    finally:
        for proc in [*agents, cloud]:
            procs.stop(proc)


async def run_bench_auto(args: argparse.Namespace) -> int:
    try:
        LINK.up(args.rate)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"skipped: cannot make a shaped network namespace here ({exc}); needs root and iproute2")
        return 2
    runs: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="tandem-auto-") as tmp:
            work = Path(tmp)
            certs.init_deployment(work / "certs", ["fast-0", "fast-1", "slow-0", "slow-1"], hosts=[LINK.host_ip])
            for update_codec in args.codec.split(","):
                print(f"running {update_codec} ...", flush=True)
                runs[update_codec] = await run_one(work, work / "certs", update_codec, args.rounds, args.target)
    finally:
        LINK.down()
    summary = {}
    for name, run in runs.items():
        later = run["rounds"][1:]
        summary[name] = {
            "final_accuracy": run["rounds"][-1]["accuracy"],
            "median_round_seconds": statistics.median(r["seconds"] for r in later),
            "codecs_last_round": run["rounds"][-1]["codecs"],
            "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in later),
        }
    result: dict[str, Any] = {"name": "auto", "command": " ".join(["python -m tandem_lab", *sys.argv[1:]]), "machine": machine(),
              "config": {"rate": args.rate, "rounds": args.rounds, "target_upload_seconds": args.target},
              "summary": summary, "runs": runs, "targets": {}}
    if "auto" in summary and "none" in summary:
        ratio = summary["auto"]["median_round_seconds"] / summary["none"]["median_round_seconds"]
        result["targets"]["auto_round_time_ratio"] = {
            "measured": ratio, "goal": 1.0, "op": "<=", "met": ratio <= 1.0,
            "how": "median round seconds with codec auto / with codec none, two of four agents behind the shaped link"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'codec':<16} {'accuracy':>8} {'s/round':>8} {'up/round':>12}  codecs chosen in the last round")
    for name, s in summary.items():
        print(f"{name:<16} {s['final_accuracy']:>8.4f} {s['median_round_seconds']:>8.2f} "
              f"{s['bytes_up_per_round']:>12,.0f}  {s['codecs_last_round']}")
    return 0
