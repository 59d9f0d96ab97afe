"""`python -m tandem_lab bench infer`: inference serving under load, every target a ratio to a limit
measured in the same run.

Servers run as processes on loopback with the deployment's mutual TLS; the load comes
from a separate process (`tandem_lab.loadgen`). The limits: the gRPC ceiling is an
echo server (`tandem_lab.echo`) under the same load; the compute ceiling is the
model's forward pass in a process of its own with the server's torch threads, no
gRPC, at the batch size the server formed, asked between the server runs
(`tandem_lab.ceiling`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem import certs, data, grpcserver, tls, training, zoo
from tandem.v1 import admin_pb2_grpc, inference_pb2_grpc
from tandem.v1 import inference_pb2 as pb
from tandem_cli import procs
from tandem_cli.admin import publish_serving
from tandem_lab import loadgen
from tandem_lab.bench import _target, machine
from tandem_lab.ceiling import Ceiling

AGENT, APP = "bench-edge", "bench-app"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int = 0

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"


def ceiling_of(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    """One ceiling from its measurements (each a median of many repetitions, taken at
    different moments of the bench): the median, with every measurement kept."""
    middle = sorted(measurements, key=lambda m: m["forward_ms"])[len(measurements) // 2]
    return {**middle, "forward_ms": statistics.median(m["forward_ms"] for m in measurements),
            "samples_per_second": middle["batch"] / (statistics.median(m["forward_ms"] for m in measurements) / 1000),
            "measurements": [m["forward_ms"] for m in measurements]}


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.certs = work / "certs"
        self.runs: dict[str, Any] = {}
        self.servers: list[Server] = []
        self.snapshots: tuple[loadgen.Samples, loadgen.Samples] = ([], [])

    def log(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def start(self, name: str, argv: list[str], cloud: bool) -> Server:
        ready = self.work / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        if cloud:
            proc = procs.tandem_process(argv, self.log(name))
        else:
            with open(self.log(name), "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        ports = procs.wait_ready(proc, ready, self.log(name), name)
        server = Server(name, proc, int(ports["port"]), int(ports.get("metrics_port", 0)))
        self.servers.append(server)
        return server

    def start_cloud(self, name: str, flags: list[str]) -> Server:
        return self.start(name, [
            "cloud", "--listen", "127.0.0.1:0", "--certs", str(self.certs), "--state", str(self.work / name),
            "--metrics", "127.0.0.1:0", "--ready-file", str(self.work / f"{name}.ready.json"), "--grace", "3",
            "--max-delay-ms", str(self.args.max_delay_ms), "--torch-threads", str(self.args.torch_threads),
            *([] if self.args.inline_below_ms is None else ["--inline-below-ms", str(self.args.inline_below_ms)]),
            *flags,
        ], cloud=True)

    def start_echo(self) -> Server:
        return self.start("echo", ["tandem_lab.echo", "--certs", str(self.certs),
                                   "--ready-file", str(self.work / "echo.ready.json")], cloud=False)

    def start_agent(self, name: str, cloud: Server, placement: str) -> Server:
        proc, ports = procs.start_serving_agent(cloud.target, self.certs, AGENT, "digits:0/1", self.log(name),
                                                placements=[placement])
        server = Server(name, proc, int(ports["inference_port"]), int(ports["metrics_port"]))
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        procs.stop(server.proc)
        self.servers.remove(server)

    async def publish(self, server: Server, model: str, arrays: dict[str, np.ndarray]) -> int:
        """Publish a version through Admin and wait until the server answers with it."""
        async with grpcserver.secure_channel(server.target, tls.admin_credentials(self.certs)) as channel:
            version = int((await publish_serving(admin_pb2_grpc.AdminStub(channel), model, arrays)).version)
            stub = inference_pb2_grpc.InferenceStub(channel)
            deadline = time.monotonic() + 60
            while (await stub.GetModelInfo(pb.ModelInfoRequest(model=model))).version < version:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{server.name} did not swap in {model} v{version} within 60 s")
                await asyncio.sleep(0.05)
        return version

    async def load(
        self, name: str, server: Server, model: str, *, rows: int = 1, clients: int | None = None,
        seconds: float | None = None, who: str = "admin", extra: list[str] | None = None, also: Server | None = None,
    ) -> dict[str, Any]:
        """One load run against `server`, with its CPU use (and that of `also`, the cloud behind
        an agent) and, from its metrics, batch sizes and counters."""
        clients = clients or self.args.clients
        seconds = seconds or self.args.seconds
        print(f"  {name}: {model}, {clients} clients x {rows} row(s), {seconds:g} s ...", flush=True)
        before = loadgen.scrape(server.metrics_port) if server.metrics_port else []
        argv = ["--target", server.target, "--certs", str(self.certs), "--who", who, "--model", model,
                "--rows", str(rows), "--clients", str(clients), "--seconds", str(seconds),
                "--clients-per-channel", str(self.args.clients_per_channel), "--watch", f"server={server.proc.pid}",
                *(["--watch", f"cloud={also.proc.pid}"] if also else []), *(extra or [])]
        result = await loadgen.spawn(argv, self.work / f"{name}.json", self.log(f"loadgen-{name}"))
        if server.metrics_port:
            after = loadgen.scrape(server.metrics_port)

            def delta(metric_name: str) -> float:
                was = loadgen.metric(before, metric_name, model=model)
                return loadgen.metric(after, metric_name, model=model) - was

            batches = delta("tandem_inference_batch_rows_count")
            result["batches"] = batches
            result["mean_batch_rows"] = delta("tandem_inference_batch_rows_sum") / batches if batches else 0.0
            # Inside the server: compute per batch (its stages timed as they run) and time queued per request.
            stage_seconds = delta("tandem_inference_stage_duration_seconds_sum")
            result["server_forward_ms_per_batch"] = 1000 * stage_seconds / batches if batches else 0.0
            waits = delta("tandem_inference_queue_wait_seconds_count")
            wait_seconds = delta("tandem_inference_queue_wait_seconds_sum")
            result["server_queue_wait_ms"] = 1000 * wait_seconds / waits if waits else 0.0
            result["counters"] = {
                f"{n}{json.dumps(ls, sort_keys=True) if ls else ''}": v - loadgen.metric(before, n, **ls)
                for n, ls, v in after
                if n.startswith("tandem_") and n.endswith("_total") and v != loadgen.metric(before, n, **ls)
            }
            self.snapshots = (before, after)
        self.runs[name] = result
        return result

    async def hot_swaps(self, server: Server, done: asyncio.Event) -> list[dict[str, Any]]:
        """Publish a new `mlp` (next seed) every swap interval until `done`."""
        published = []
        seed = 100
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), self.args.swap_interval)
            except TimeoutError:
                seed += 1
                begin = time.perf_counter()
                version = await self.publish(server, "mlp", training.state_arrays(zoo.build_model("mlp", seed=seed)))
                published.append({"version": version, "seed": seed, "at": begin,
                                  "publish_seconds": time.perf_counter() - begin})
        return published


def train(args: argparse.Namespace) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """mlp-small and mlp-heavy trained centrally on the digits training split; test accuracies."""
    train_set, test_set = data.digits_split()
    arrays, accuracy = {}, {}
    for name, epochs, lr in (("mlp-small", args.small_epochs, args.small_lr),
                             ("mlp-heavy", args.heavy_epochs, args.heavy_lr)):
        print(f"training {name}: {epochs} epochs, lr {lr} ...", flush=True)
        net = zoo.build_model(name, seed=0)
        training.train_local(net, train_set, epochs, 32, lr, seed=0)
        accuracy[name] = training.evaluate(net, test_set)[0]
        arrays[name] = training.state_arrays(net)
    return arrays, accuracy


async def run_edge(bench: Bench, cloud: Server) -> dict[str, Any]:
    """Single-row load through an agent per placement of `mlp`; then the digits test set
    through a cascade of mlp-small (edge) and mlp-heavy (cloud) at several thresholds."""
    args, who = bench.args, f"app:{APP}"
    creds = tls.app_credentials(bench.certs, APP)
    placements = {}
    for placement in ("edge", "cloud", "split:1", "split:2"):
        name = "edge_" + placement.replace(":", "")
        agent = bench.start_agent(name, cloud, f"mlp={placement}")
        try:
            await loadgen.wait_answering(agent.target, agent.name, creds, "mlp")
            placements[placement] = await bench.load(name, agent, "mlp", clients=args.edge_clients, who=who,
                                                     also=cloud)
            before, after = bench.snapshots
            placements[placement]["fallbacks"] = loadgen.metric(
                after, "tandem_edge_inference_fallbacks_total") - loadgen.metric(
                before, "tandem_edge_inference_fallbacks_total")
        finally:
            bench.stop(agent)
    _, test_set = data.digits_split()
    x_path, y_path = bench.work / "x_test.npy", bench.work / "y_test.npy"
    np.save(x_path, test_set.x)
    np.save(y_path, test_set.y)
    dataset = ["--inputs", str(x_path), "--labels", str(y_path)]
    cloud_only = await bench.load("testset_cloud_heavy", cloud, "mlp-heavy", clients=args.edge_clients, extra=dataset)
    cascade = []
    for threshold in args.thresholds:
        name = f"cascade_{threshold:g}"
        agent = bench.start_agent(name, cloud, f"mlp-small=cascade:{threshold:g}:mlp-heavy")
        try:
            await loadgen.wait_answering(agent.target, agent.name, creds, "mlp-small")
            result = await bench.load(name, agent, "mlp-small", clients=args.edge_clients, who=who, extra=dataset,
                                      also=cloud)
        finally:
            bench.stop(agent)
        before, after = bench.snapshots
        by = {who_: loadgen.metric(after, "tandem_edge_cascade_rows_total", model="mlp-small", answered_by=who_)
              - loadgen.metric(before, "tandem_edge_cascade_rows_total", model="mlp-small", answered_by=who_)
              for who_ in ("edge", "cloud")}
        rows = by["edge"] + by["cloud"]
        cascade.append({
            "threshold": threshold, "accuracy": result["accuracy"], "examples": result["examples"],
            "fraction_to_cloud": by["cloud"] / rows if rows else None, "rows_answered_by": by,
            "placements": result["placements"], "failures": result["failures"],
            "fallbacks": loadgen.metric(after, "tandem_edge_inference_fallbacks_total")
            - loadgen.metric(before, "tandem_edge_inference_fallbacks_total"),
            "requests_per_second": result["requests_per_second"], "latency_ms": result["latency_ms"],
        })
    return {"placements": {p: summary(r) for p, r in placements.items()}, "cascade": cascade,
            "cloud_only_accuracy_through_cloud": cloud_only["accuracy"]}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "rows", "clients", "requests_per_second", "samples_per_second", "latency_ms", "failures",
            "mean_batch_rows", "cores", "fallbacks", "placements")
    return {k: run.get(k) for k in keys}


async def measure(bench: Bench, trained: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    ceiling = Ceiling(bench.args.torch_threads)
    await ceiling.start()
    try:
        return await _measure(bench, trained, ceiling)
    finally:
        await ceiling.close()


async def _measure(bench: Bench, trained: dict[str, dict[str, np.ndarray]], ceiling: Ceiling) -> dict[str, Any]:
    args, runs = bench.args, bench.runs
    compared = {"mlp_1row": "mlp", "mlp_256rows": "mlp", "heavy_1row": "mlp-heavy"}
    measured: dict[str, list[dict[str, Any]]] = {run: [] for run in compared}

    async def interleaved(run: str) -> None:
        """The ceiling for `run`, measured right after it (the server idle, the load stopped)."""
        measured[run].append(await ceiling.measure(compared[run], runs[run]["mean_batch_rows"]))
    print("gRPC ceiling (echo server):", flush=True)
    echo = bench.start_echo()
    await bench.load("echo_1row", echo, "mlp")
    await bench.load("echo_256rows", echo, "mlp", rows=args.big_rows, clients=args.big_clients)
    bench.stop(echo)

    print("cloud, default batching:", flush=True)
    cloud = bench.start_cloud("cloud", [])
    await bench.publish(cloud, "mlp", training.state_arrays(zoo.build_model("mlp", seed=1)))
    await bench.publish(cloud, "mlp-heavy", trained["mlp-heavy"])
    await bench.load("mlp_1row", cloud, "mlp")
    await interleaved("mlp_1row")
    await bench.load("mlp_256rows", cloud, "mlp", rows=args.big_rows, clients=args.big_clients)
    await interleaved("mlp_256rows")
    await bench.load("heavy_1row", cloud, "mlp-heavy")
    await interleaved("heavy_1row")
    done = asyncio.Event()
    swaps = asyncio.create_task(bench.hot_swaps(cloud, done))
    try:
        await bench.load("hot_swap", cloud, "mlp", seconds=args.swap_seconds)
    finally:
        done.set()
        published = await swaps
    runs["hot_swap"]["published"] = published
    bench.stop(cloud)

    print("cloud, --max-batch 1:", flush=True)
    unbatched = bench.start_cloud("cloud_unbatched", ["--max-batch", "1"])
    await bench.publish(unbatched, "mlp-heavy", trained["mlp-heavy"])
    await bench.load("heavy_1row_max_batch_1", unbatched, "mlp-heavy")
    bench.stop(unbatched)

    edge: dict[str, Any] = {}
    if not args.no_edge:
        print("an edge agent per placement, its cloud's placement controller off (--placement-interval 0):")
        cloud = bench.start_cloud("cloud_for_edge", ["--placement-interval", "0"])
        await bench.publish(cloud, "mlp", training.state_arrays(zoo.build_model("mlp", seed=1)))
        for name, arrays in trained.items():
            await bench.publish(cloud, name, arrays)
        edge = await run_edge(bench, cloud)
        bench.stop(cloud)

    print("compute ceilings (a process of their own, the server's torch threads) ...", flush=True)
    for _ in range(2):  # and twice more at the end, each run's ceiling the median of its three
        for run in compared:
            await interleaved(run)
    ceilings = {run: ceiling_of(found) for run, found in measured.items()}
    return {"ceilings": ceilings, "edge": edge}


def targets(runs: dict[str, Any], ceilings: dict[str, Any], max_delay_ms: float) -> dict[str, Any]:
    echo, mlp, swap = runs["echo_1row"], runs["mlp_1row"], runs["hot_swap"]
    big, heavy, unbatched = runs["mlp_256rows"], runs["heavy_1row"], runs["heavy_1row_max_batch_1"]
    bound = max_delay_ms + 3 * ceilings["mlp_1row"]["forward_ms"] + echo["latency_ms"]["p99"]
    return {
        "grpc_efficiency": _target(
            mlp["requests_per_second"] / echo["requests_per_second"], 0.8, ">=",
            f"mlp requests/s / echo server's, single-row requests, {mlp['clients']} clients, same TLS and load "
            "generator"),
        "batching_speedup": _target(
            heavy["requests_per_second"] / unbatched["requests_per_second"], 3.0, ">=",
            "mlp-heavy single-row requests/s, default server / the same with --max-batch 1"),
        "compute_efficiency": _target(
            big["samples_per_second"] / ceilings["mlp_256rows"]["samples_per_second"], 0.6, ">=",
            f"mlp samples/s with {big['rows']}-row requests ({big['clients']} clients) / forward samples/s at the "
            f"mean batch observed ({ceilings['mlp_256rows']['batch']}), in a process of its own with the server's "
            f"{ceilings['mlp_256rows']['torch_threads']} torch thread(s), median of 3 measurements between runs"),
        "p99_latency_ms": _target(
            mlp["latency_ms"]["p99"], bound, "<=",
            f"p99 of the mlp single-row run / (max delay {max_delay_ms:g} ms + 3 x the ceiling's forward at the mean "
            f"batch observed ({ceilings['mlp_1row']['batch']} rows: {ceilings['mlp_1row']['forward_ms']:.3g} ms) + "
            f"echo p99 {echo['latency_ms']['p99']:.3g} ms)"),
        "hot_swap_failures": _target(
            swap["failures"], 0, "<=",
            f"failed requests during a {swap['seconds']:.0f} s run of {swap['clients']} clients while a new mlp "
            f"version was published every ~{len(swap['published']) and swap['seconds'] / len(swap['published']):.0f}"
            f" s ({len(swap['published'])} published, {len(swap['versions'])} distinct versions answered)"),
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'run':<24} {'model':<10} {'rows':>4} {'cli':>4} {'req/s':>8} {'samples/s':>10} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'batch':>6} {'fwd ms':>6} {'fail':>5} {'server':>6} {'cloud':>5} {'loadgen':>7}  (cores)")
    for name, r in result["runs"].items():
        if "accuracy" in r:
            continue
        lat = r["latency_ms"]
        print(f"{name:<24} {r['model']:<10} {r['rows']:>4} {r['clients']:>4} {r['requests_per_second']:>8.0f} "
              f"{r['samples_per_second']:>10.0f} {lat['p50']:>7.2f} {lat['p99']:>7.2f} "
              f"{r.get('mean_batch_rows', 0):>6.1f} {r.get('server_forward_ms_per_batch', 0):>6.2f} {r['failures']:>5} "
              f"{r['cores']['server']:>6.2f} {r['cores'].get('cloud', 0):>5.2f} {r['cores']['loadgen']:>7.2f}")
    print()
    for name, c in result["ceilings"].items():
        print(f"compute ceiling for {name:<12} {c['model']:<10} batch {c['batch']:>4}: "
              f"{c['forward_ms']:.3f} ms/forward, {c['samples_per_second']:,.0f} samples/s "
              f"({c['torch_threads']} torch thread(s); measured {', '.join(f'{m:.3f}' for m in c['measurements'])})")
    edge = result.get("edge") or {}
    if edge.get("cascade"):
        print(f"\naccuracy in process: {result['accuracy']}; mlp-heavy through the cloud: "
              f"{edge['cloud_only_accuracy_through_cloud']:.4f}")
        print(f"{'threshold':>9} {'accuracy':>8} {'to cloud':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'fail':>5}")
        for c in edge["cascade"]:
            frac = c["fraction_to_cloud"]
            print(f"{c['threshold']:>9g} {c['accuracy']:>8.4f} {'n/a' if frac is None else f'{frac:.3f}':>8} "
                  f"{c['requests_per_second']:>7.0f} {c['latency_ms']['p50']:>7.2f} {c['latency_ms']['p99']:>7.2f} "
                  f"{c['failures']:>5}")
    print()
    for name, t in result["targets"].items():
        print(f"{'met ' if t['met'] else 'MISS'} {name:<20} {t['measured']:.4g} {t['op']} {t['goal']:.4g}")


async def run_bench_infer(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="tandem-bench-infer-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "certs" / "ca.pem").exists():  # a --work directory may be reused
            certs.init_deployment(work / "certs", [AGENT])
            certs.add_client(work / "certs", APP)
        load_before = os.getloadavg()
        if load_before[0] > 0.5:
            print(f"warning: load average {load_before[0]:.2f} before the bench: other work shares these cores",
                  flush=True)
        if args.no_edge:  # weights do not matter to speed: skip training
            trained = {m: training.state_arrays(zoo.build_model(m, seed=0)) for m in ("mlp-small", "mlp-heavy")}
            accuracy: dict[str, float] = {}
        else:
            trained, accuracy = train(args)
        bench = Bench(args, work)
        try:
            measured = await measure(bench, trained)
        except Exception:
            if not args.work:
                print("the bench failed; run it again with --work DIR to keep the servers' logs", file=sys.stderr)
            raise
        finally:
            for server in list(bench.servers):
                bench.stop(server)
    result: dict[str, Any] = {
        "name": "infer", "command": " ".join(["python -m tandem_lab", *sys.argv[1:]]), "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"},
        "accuracy": accuracy, "ceilings": measured["ceilings"], "edge": measured["edge"],
        "targets": targets(bench.runs, measured["ceilings"], args.max_delay_ms), "runs": bench.runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"\nwrote {args.out}")
    return 0

