"""`tandem demo`: a coordinator and N agents on loopback train the reference workload."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from tandem import certs
from tandem.v1 import admin_pb2
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_job
from tandem_cli.options import Subparsers


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("demo", help="coordinator + agents on loopback, federated training of the reference workload")
    p.add_argument("--certs", type=Path, default=Path(".certs"), help="deployment certificates (made if missing)")
    p.add_argument("--agents", type=int, default=4, help="agents to start, each with a partition of the data")
    p.add_argument("--rounds", type=int, default=10, help="rounds of federated training")
    p.add_argument("--min-accuracy", type=float, default=0.93, help="exit 1 below this final test accuracy")
    p.set_defaults(func=lambda args: asyncio.run(run_demo(args)))


def _ensure_certs(directory: Path, names: list[str]) -> None:
    if not (directory / "ca.pem").exists():
        certs.init_deployment(directory, names)
        return
    for name in names:
        if not certs.agent_paths(directory, name)[0].exists():
            certs.add_agent(directory, name)


async def run_demo(args: argparse.Namespace) -> int:
    names = [f"edge-{i + 1}" for i in range(args.agents)]
    _ensure_certs(args.certs, names)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp:
        run = Path(tmp)
        cloud, ports = procs.start_cloud(args.certs, run / "state", run / "cloud.log")
        target = f"localhost:{ports['port']}"
        agents = [
            procs.start_agent(target, args.certs, name, f"digits:{i}/{args.agents}", run / f"{name}.log")
            for i, name in enumerate(names)
        ]
        print(f"coordinator on {target} (metrics on :{ports['metrics_port']}), {args.agents} agents starting")
        try:
            async with admin_channel(target, args.certs) as channel:
                stub = admin_stub(channel)
                while True:
                    listed = await stub.ListAgents(admin_pb2.ListAgentsRequest())
                    if sum(a.connected for a in listed.agents) >= args.agents:
                        break
                    if any(p.poll() is not None for p in agents) or time.monotonic() - started > 90:
                        raise RuntimeError(f"agents did not connect; logs in {run}")
                    await asyncio.sleep(0.2)
                spec = admin_pb2.JobSpec(
                    model="mlp", rounds=args.rounds, min_clients=args.agents, round_deadline_seconds=60,
                    eval="digits",
                )
                job = await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))
                print(f"job {job.job_id}: {args.rounds} rounds of FedAvg, mlp on digits, {args.agents} agents")
                result = await wait_job(stub, job.job_id, timeout=0, echo=True)
        except BaseException:
            for name in names:
                print(f"--- {name} log tail ---\n" + (run / f"{name}.log").read_text()[-2000:])
            print("--- coordinator log tail ---\n" + (run / "cloud.log").read_text()[-4000:])
            raise
        finally:
            for proc in [*agents, cloud]:
                procs.stop(proc)
    rounds = result["rounds"]
    final = rounds[-1]["accuracy"] if rounds else 0.0
    up = sum(r["bytes_up"] for r in rounds)
    down = sum(r["bytes_down"] for r in rounds)
    print(
        f"done: job {result['state']}, {len(rounds)} rounds, final test accuracy {final:.4f}, "
        f"{up / 1e6:.1f} MB up, {down / 1e6:.1f} MB down, {time.monotonic() - started:.1f} s in all"
    )
    return 0 if result["state"] == "completed" and final >= args.min_accuracy else 1
