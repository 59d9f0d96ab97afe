"""`python -m tandem_lab bench fl`: the reference workload with real processes over mTLS on
loopback, per codec, with bytes counted at the gRPC message level (job status) and
on the wire (a byte-counting TCP relay between the agents and the coordinator)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from tandem import certs, training, wire, zoo
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, phase_lines, wait_connected, wait_job
from tandem_lab.relay import Relay

if TYPE_CHECKING:
    from tandem_lab.bench_shaped import ShapedFleet


def machine() -> dict[str, Any]:
    import grpc as grpc_module
    import torch

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "cores": os.cpu_count(), "cpu": cpu, "load_average": list(os.getloadavg()),
        "python": platform.python_version(), "torch": torch.__version__,
        "grpcio": grpc_module.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def model_bytes(model: str) -> int:
    return sum(spec.nbytes for spec in wire.specs_of(training.state_arrays(zoo.build_model(model))).values())


def _train_seconds(port: int, host: str = "127.0.0.1") -> float:
    """Mean local training time per task of one agent, from its own metrics."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10).read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    count = values.get("tandem_edge_train_duration_seconds_count", 0.0)
    return values.get("tandem_edge_train_duration_seconds_sum", 0.0) / count if count else 0.0


async def _download_seconds(target: str, certs_dir: Path, model: str, version: int) -> float:
    """Median time to fetch one whole model version over TLS through `target`."""
    times = []
    async with admin_channel(target, certs_dir) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for _ in range(3):
            start = time.perf_counter()
            async for _message in stub.DownloadModel(pb.ModelRequest(model=model, version=version)):
                pass
            times.append(time.perf_counter() - start)
    return statistics.median(times)


async def run_codec(
    work: Path, certs_dir: Path, clients: int, rounds: int, update_codec: str, extra: dict[str, Any],
    fleet: ShapedFleet | None = None,
) -> dict[str, Any]:
    """One job; with `fleet`, each agent runs in its own shaped namespace and dials its DelayRelay."""
    name = update_codec.replace(":", "_").replace("+", "_")
    run = work / name
    run.mkdir()
    cloud, ports = procs.start_cloud(certs_dir, run / "state", run / "cloud.log")
    relay = Relay("127.0.0.1", ports["port"])
    await relay.start()
    addresses = await fleet.open(relay.port) if fleet else [f"localhost:{relay.port}"] * clients
    metrics_hosts = [fleet.peer_ip(i) if fleet else "127.0.0.1" for i in range(clients)]
    metrics_ports = [procs.free_port() for _ in range(clients)]
    agents = [
        procs.start_agent(addresses[i], certs_dir, f"bench-{i}", f"digits:{i}/{clients}", run / f"bench-{i}.log",
                          metrics=f"{metrics_hosts[i]}:{metrics_ports[i]}", prefix=fleet.prefix(i) if fleet else None)
        for i in range(clients)
    ]
    direct = f"localhost:{ports['port']}"
    try:
        async with admin_channel(direct, certs_dir) as channel:
            stub = admin_stub(channel)
            await wait_connected(stub, clients, timeout=120)
            relay.reset()
            spec = admin_pb2.JobSpec(model="mlp", rounds=rounds, min_clients=clients, round_deadline_seconds=300,
                                     eval="digits", codec=update_codec, **extra)
            started = time.monotonic()
            job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
            job = await wait_job(stub, job_id, timeout=0, echo=False)
            wall = time.monotonic() - started
            if job["state"] != "completed":
                raise RuntimeError(f"job {job['state']}: {job['message']}; logs in {run}")
        wire_up, wire_down = relay.up, relay.down
        if fleet:
            from tandem_lab.bench_shaped import download_seconds

            transfer = await download_seconds(fleet, addresses[0], certs_dir, "mlp", job["version"])
        else:
            transfer = await _download_seconds(addresses[0], certs_dir, "mlp", job["version"])
        train = [_train_seconds(port, host) for port, host in zip(metrics_ports, metrics_hosts, strict=True)]
    finally:
        for proc in [*agents, cloud]:
            procs.stop(proc)
        if fleet:
            await fleet.close()
        await relay.close()
    totals = {
        "bytes_up": sum(r["bytes_up"] for r in job["rounds"]), "bytes_down": sum(r["bytes_down"] for r in job["rounds"]),
        "round_seconds": sum(r["seconds"] for r in job["rounds"]), "final_accuracy": job["rounds"][-1]["accuracy"],
        "final_loss": job["rounds"][-1]["loss"],
    }
    return {
        "codec": update_codec, "rounds": job["rounds"], "totals": totals, "wall_seconds": wall, "wire_bytes_up": wire_up,
        "wire_bytes_down": wire_down, "model_transfer_seconds": transfer, "train_seconds_by_agent": train,
        "spec": job["spec"],
    }


def _target(measured: float, goal: float, op: str, how: str) -> dict[str, Any]:
    met = measured <= goal if op == "<=" else measured >= goal
    return {"measured": measured, "goal": goal, "op": op, "met": met, "how": how}


def summarise(run: dict[str, Any], clients: int, full: int) -> dict[str, Any]:
    rounds = run["rounds"]
    later = rounds[1:] or rounds
    slowest_train = max(run["train_seconds_by_agent"])
    return {
        "codec": run["codec"],
        "final_accuracy": rounds[-1]["accuracy"],
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds),
        "bytes_down_per_round_after_first": statistics.mean(r["bytes_down"] for r in later),
        "wire_bytes_per_round": (run["wire_bytes_up"] + run["wire_bytes_down"]) / len(rounds),
        "median_round_seconds": statistics.median(r["seconds"] for r in later),
        "mean_round_seconds": statistics.mean(r["seconds"] for r in rounds),
        "first_round_seconds": rounds[0]["seconds"],
        "first_round_vs_median": rounds[0]["seconds"] / statistics.median(r["seconds"] for r in rounds),
        "round_budget_seconds": slowest_train + run["model_transfer_seconds"],
        "dense_exchange_bytes_per_round": 2 * clients * full,
    }


def targets(summary: dict[str, dict[str, Any]], clients: int, full: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    dense, sparse = summary.get("none"), summary.get("topk:0.01+int8")
    if dense and sparse:
        out["uplink_ratio"] = _target(
            sparse["bytes_up_per_round"] / dense["bytes_up_per_round"], 0.01, "<=",
            "topk:0.01+int8 uplink bytes per round / none's (gRPC message level, same run)")
        out["accuracy_gap"] = _target(
            dense["final_accuracy"] - sparse["final_accuracy"], 0.01, "<=",
            "none's final test accuracy - topk:0.01+int8's")
    if sparse:
        out["downlink_ratio"] = _target(
            sparse["bytes_down_per_round_after_first"] / (clients * full), 1 / 20, "<=",
            "topk:0.01+int8 downlink bytes per round after round 1 / (agents x full float32 model)")
        out["wire_ratio"] = _target(
            sparse["wire_bytes_per_round"] / sparse["dense_exchange_bytes_per_round"], 1 / 30, "<=",
            "topk:0.01+int8 bytes per round through the TCP relay (TLS included) / dense float32 model up+down "
            "for every agent")
    if summary:
        worst = max(summary.values(), key=lambda s: float(s["first_round_vs_median"]))
        out["first_round_vs_median"] = _target(
            worst["first_round_vs_median"], 1.5, "<=",
            f"round 1 wall seconds / the median round's (every round), the worse codec ({worst['codec']})")
    for name, s in summary.items():
        out[f"round_overhead[{name}]"] = _target(
            s["median_round_seconds"] / s["round_budget_seconds"], 1.2, "<=",
            "median round wall seconds (after round 1) / (slowest agent's mean local training + one whole-model "
            "download through the relay)")
    return out


def flower_targets(summary: dict[str, dict[str, Any]], flower: dict[str, Any],
                   shaped: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tandem's mean seconds per round (first round included) against Flower's, same run; with
    `shaped` (rate, rtt), both behind the same shaped links: compressed codecs' goal is 0.3x."""
    theirs = statistics.mean(flower["round_seconds"])
    out: dict[str, Any] = {}
    for name, s in summary.items():
        system = (f"Tandem {name} mean round seconds (round 1 included) / Flower {flower.get('flwr', '')}'s (dense "
                  "float32 FedAvg, start_server/start_client over TLS)")
        if shaped is None:
            out[f"seconds_per_round_vs_flower[{name}]"] = _target(
                s["mean_round_seconds"] / theirs, 1.0, "<=", f"{system}, loopback through a relay, same run")
        else:
            out[f"seconds_per_round_vs_flower_shaped[{name}]"] = _target(
                s["mean_round_seconds"] / theirs, 1.0 if name == "none" else 0.3, "<=",
                f"{system}, every agent and client behind its own {shaped['rate']} link with {shaped['rtt']} of "
                "round-trip time, same run")
    return out


async def run_bench_fl(args: argparse.Namespace) -> int:
    codecs = [c for c in args.codec.split(",") if c]
    extra: dict[str, Any] = {"server_lr": args.server_lr} if args.server_lr else {}
    full = model_bytes("mlp")
    runs: dict[str, Any] = {}
    shaped = {"rate": args.rate, "rtt": args.rtt or "0ms"} if getattr(args, "rate", None) else None
    fleet = None
    if shaped:
        from tandem_lab.bench_shaped import ShapedFleet, parse_rtt

        fleet = ShapedFleet(args.clients, shaped["rate"], parse_rtt(shaped["rtt"]))
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as tmp:
        work = Path(tmp)
        certs_dir = work / "certs"
        certs.init_deployment(certs_dir, [f"bench-{i}" for i in range(args.clients)], hosts=fleet.hosts if fleet else ())
        link = f" behind {shaped['rate']}, {shaped['rtt']} RTT links" if shaped else ""
        try:
            if fleet:
                fleet.up()
            for update_codec in codecs:
                print(f"running {update_codec}: {args.clients} agents x {args.rounds} rounds{link} ...", flush=True)
                runs[update_codec] = await run_codec(work, certs_dir, args.clients, args.rounds, update_codec, extra,
                                                     fleet)
            flower = None
            if args.flower:
                from tandem_lab.bench_flower import run_flower

                print(f"running Flower ({args.flower}): {args.clients} clients x {args.rounds} rounds{link} ...",
                      flush=True)
                flower = await run_flower(args.flower, work, certs_dir, args.clients, args.rounds, fleet=fleet)
        finally:
            if fleet:
                fleet.down()
    summary = {c: summarise(r, args.clients, full) for c, r in runs.items()}
    result: dict[str, Any] = {
        "name": "fl", "command": " ".join(["python -m tandem_lab", *sys.argv[1:]]), "machine": machine(),
        "config": {"clients": args.clients, "rounds": args.rounds, "model": "mlp", "model_bytes": full,
                   "shaped": shaped},
        "summary": summary, "runs": runs, "targets": targets(summary, args.clients, full),
    }
    if flower is not None:
        result["flower"] = flower
        result["targets"].update(flower_targets(summary, flower, shaped))
    if args.rss_agents:
        from tandem_lab.bench_rss import run_rss

        rss = await run_rss(args.rss_agents, "mlp10m")
        result["rss"] = rss
        result["targets"]["coordinator_rss"] = _target(
            rss["peak_growth_bytes"] / rss["model_bytes"], 3.0, "<=",
            f"coordinator peak RSS growth over its idle RSS during a round of {args.rss_agents} agents on mlp10m "
            "(topk:0.01+int8) / the model's float32 bytes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'codec':<16} {'accuracy':>8} {'up/round':>12} {'down/round':>12} {'wire/round':>12} {'s/round':>8}")
    for name, s in result["summary"].items():
        print(f"{name:<16} {s['final_accuracy']:>8.4f} {s['bytes_up_per_round']:>12,.0f} "
              f"{s['bytes_down_per_round_after_first']:>12,.0f} {s['wire_bytes_per_round']:>12,.0f} "
              f"{s['median_round_seconds']:>8.2f}")
    flower = result.get("flower")
    if flower:
        rounds = flower["round_seconds"]
        print(f"{'Flower ' + flower.get('flwr', ''):<16} {flower['accuracy'][-1]:>8.4f} "
              f"{flower['wire_bytes_up'] / len(rounds):>12,.0f} {flower['wire_bytes_down'] / len(rounds):>12,.0f} "
              f"{(flower['wire_bytes_up'] + flower['wire_bytes_down']) / len(rounds):>12,.0f} "
              f"{statistics.median(rounds[1:] or rounds):>8.2f}  (bytes: through the relay)")
    print()
    for name, run in result["runs"].items():
        for line in phase_lines(run["rounds"]):
            print(f"{name}: {line}")
    print()
    for name, t in result["targets"].items():
        print(f"{'met ' if t['met'] else 'MISS'} {name:<28} {t['measured']:.4g} {t['op']} {t['goal']:.4g}")
