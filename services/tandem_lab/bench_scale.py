"""`make bench-scale` (issue 20): regional aggregators against one flat coordinator.

1. Tiers: `--agents` light agents (tandem_lab.scale_agents: each its own TLS connection
   and control stream, heartbeating, answering tasks with a ready-made update) over
   `--regions` real `tandem region` processes under a real `tandem cloud`, while a job
   runs `--rounds` rounds of `--selected` agents (an equal share of them in each region).
   Heartbeat round trips per tier (agents to their region, timed by the agents; regions
   to the cloud, timed by probes: light members beside the regions, one per region),
   control streams dropped, resident memory per agent of the regions and the cloud, and
   the cloud's update bytes and CPU seconds per round.
2. Flat: the same number of selected agents, the same update and codec, each connected
   to one cloud (with the same probes): the same figures for the cloud.
3. With real processes (tandem_lab.scale_real): the reference workload's agents
   (`tandem edge --data digits:I/N`) flat and under two regions, the final models and
   accuracies compared; and a region killed mid-round and restarted on its state.

Writes JSON with `targets` named for what they compare (see `targets`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tandem import certs
from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, job_dict
from tandem_lab.bench import machine
from tandem_lab.scale_agents import agent_name, model_specs
from tandem_lab.scale_report import by_window, plot, print_table, targets, timeline
from tandem_lab.scale_tree import (
    Fleet,
    Probes,
    Server,
    cpu_seconds,
    rss,
    start_cloud,
    start_regions,
    stop_all,
    wait_members,
)

AGENT_PREFIX = "light-"
MODEL = "mlp"


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each group of processes."""
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


async def run_job(server: Server, certs_dir: Path, spec: admin_pb2.JobSpec, timeout: float,
                  watch: list[Server], groups: dict[str, list[int]]) -> dict[str, Any]:
    """Start `spec` on `server`; its rounds, the CPU seconds per round of each group of
    processes, the update bytes `server` received, and the peak resident memory of `watch`."""
    peaks = {s.name: rss(s.proc.pid) for s in watch}
    spans: list[list[float]] = []
    async with admin_channel(server.target, certs_dir) as channel:
        stub = admin_stub(channel)
        cpu0, bytes0, started, wall0 = cpu_of(groups), server.received_bytes(), time.monotonic(), time.time()
        job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
        current = 0
        while True:
            job = await stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id))
            if job.current_round != current:  # rounds as seen from here, to within the poll
                if spans:
                    spans[-1][1] = time.time()
                spans.append([time.time(), math.nan])
                current = job.current_round
            if job.state != admin_pb2.JOB_STATE_RUNNING:
                break
            if time.monotonic() - started > timeout:
                await stub.StopJob(admin_pb2.StopJobRequest(job_id=job_id))
                raise RuntimeError(f"job {job_id} on {server.name} still running after {timeout:.0f} s "
                                   f"(round {job.current_round}: {job.message}); see {server.log}")
            for s in watch:
                peaks[s.name] = max(peaks[s.name], rss(s.proc.pid))
            await asyncio.sleep(0.25)
        wall1 = time.time()
        cpu1, bytes1 = cpu_of(groups), server.received_bytes()
    out = job_dict(job)
    if out["state"] != "completed":
        raise RuntimeError(f"job {job_id} on {server.name} ended {out['state']}: {out['message']}")
    rounds = out["rounds"]
    return {
        "job_id": job_id, "rounds": len(rounds), "seconds": wall1 - wall0, "window": [wall0, wall1],
        "round_spans": spans[:-1] if spans and math.isnan(spans[-1][1]) else spans,
        "cpu_seconds_per_round": {k: (cpu1[k] - cpu0[k]) / len(rounds) for k in groups},
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds),
        "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rounds),
        "metric_bytes_per_round": (bytes1 - bytes0) / len(rounds),
        "round_seconds": [r["seconds"] for r in rounds], "round_members": [len(r["agents"]) for r in rounds],
        "rss_peak_bytes": peaks,
    }


def job_spec(args: argparse.Namespace, min_clients: int, per_round: int) -> admin_pb2.JobSpec:
    return admin_pb2.JobSpec(model=MODEL, rounds=args.rounds, min_clients=min_clients, clients_per_round=per_round,
                             round_deadline_seconds=args.round_deadline, codec=args.codec, seed=1, promote="never")


async def idle_window(groups: dict[str, list[int]], seconds: float) -> tuple[dict[str, float], list[float]]:
    """Cores each group used over `seconds` of steady heartbeats, no job running; the window."""
    start, before = time.time(), cpu_of(groups)
    await asyncio.sleep(seconds)
    after = cpu_of(groups)
    return {k: (after[k] - before[k]) / seconds for k in groups}, [start, time.time()]


def light_results(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleets' counts, summed."""
    codes: dict[str, int] = {}
    for m in measured:
        for upload in m["uploads"]:
            codes[upload["code"]] = codes.get(upload["code"], 0) + 1
    return {"uploads": codes, "failed_connects": sum(m["failed_connects"] for m in measured),
            "notices": sum(m["notices"] for m in measured), "downloads": sum(m["downloads"] for m in measured),
            "download_bytes": sum(m["download_bytes"] for m in measured),
            "drop_reasons": [m["drop_reasons"] for m in measured if m["drop_reasons"]],
            "fleet_cpu_seconds": [m["cpu_seconds"] for m in measured]}


def tiers(named: dict[str, list[Any]], windows: dict[str, list[float]]) -> dict[str, Any]:
    return {name: by_window([tuple(r) for r in rtts], {k: (w[0], w[1]) for k, w in windows.items()})
            for name, rtts in named.items()}


async def hierarchical(args: argparse.Namespace, work: Path, certs_dir: Path, shapes: Path) -> dict[str, Any]:
    regions = [f"r{i:02d}" for i in range(args.regions)]
    per_region = shares(args.agents, args.regions)
    selected = shares(args.selected, args.regions)
    cloud: Server | None = None
    servers: list[Server] = []
    fleets: list[Fleet] = []
    probes: Probes | None = None
    try:
        cloud = start_cloud(certs_dir, work, args.cloud_heartbeat)
        cloud.rss_idle = rss(cloud.proc.pid)
        servers = await asyncio.to_thread(start_regions, certs_dir, work, regions, cloud.ports["port"], selected,
                                          args.heartbeat)
        probes = Probes(cloud.target, certs_dir, [f"probe-{i:02d}" for i in range(args.regions)],
                        args.probe_interval)
        await probes.wait_connected(60)
        await wait_members(cloud, certs_dir, 2 * args.regions, 0, timeout=60)
        await asyncio.sleep(2.0)
        for server in servers:
            server.rss_idle = rss(server.proc.pid)
        cloud_rss_regions = rss(cloud.proc.pid)
        started = time.monotonic()
        first = [sum(per_region[:i]) for i in range(args.regions)]
        for f in range(args.fleets):  # whole regions to each fleet process
            mine = list(range(f, args.regions, args.fleets))
            groups = [f"{servers[i].target}={AGENT_PREFIX}:{first[i]}:{per_region[i]}" for i in mine]
            fleets.append(await Fleet.start(certs_dir, groups, sum(per_region[i] for i in mine), shapes, args.codec,
                                            0.0, work / f"fleet-{f}.json", work / f"fleet-{f}.log"))
        for fleet in fleets:
            await fleet.wait_connected(args.connect_timeout)
        connect_seconds = time.monotonic() - started
        await wait_members(cloud, certs_dir, 2 * args.regions, args.agents, timeout=60)
        print(f"  {args.agents} agents connected to {args.regions} regions in {connect_seconds:.0f} s", flush=True)
        await asyncio.sleep(args.settle_seconds)
        pids = {"cloud": [cloud.proc.pid], "regions": [s.proc.pid for s in servers],
                "light agents": [f.proc.pid for f in fleets]}
        for fleet in fleets:
            await fleet.command("measure")
        probes.measure()
        idle, idle_span = await idle_window(pids, args.idle_seconds)
        rss_connected = {s.name: rss(s.proc.pid) for s in [cloud, *servers]}
        fleet_rss = [rss(f.proc.pid) for f in fleets]
        print(f"  job: {args.rounds} rounds of {args.selected} agents ({selected[0]} in each region)", flush=True)
        job = await run_job(cloud, certs_dir, job_spec(args, args.selected, 0), args.job_timeout, [cloud, *servers],
                            pids)
        probe = await probes.stop()
        probes = None
        measured = [await fleet.stop() for fleet in fleets]
        fleets = []
    finally:
        if probes is not None:
            await probes.stop()
        for fleet in fleets:
            fleet.kill()
        stop_all([*servers, cloud])
    assert cloud is not None
    rtts = {"agents_to_region": [r for m in measured for r in m["rtts"]], "region_to_cloud_probes": probe["rtts"]}
    per_agent = [(rss_connected[s.name] - s.rss_idle) / n for s, n in zip(servers, per_region, strict=True)]
    agents_drops, probe_drops = sum(m["drops"] for m in measured), probe["drops"]
    return {
        "agents": args.agents, "regions": args.regions, "agents_per_region": per_region, "selected": args.selected,
        "selected_per_region": selected, "codec": args.codec, "heartbeat": args.heartbeat,
        "cloud_heartbeat": args.cloud_heartbeat, "probe_interval": args.probe_interval, "fleets": args.fleets,
        "connect_seconds": connect_seconds,
        "tiers": tiers(rtts, {"idle": idle_span, "job": job["window"]}),
        "timelines": {name: timeline(r, idle_span[0]) for name, r in rtts.items()},
        "job_offset_seconds": job["window"][0] - idle_span[0],
        "dropped_streams": agents_drops + probe_drops,
        "dropped_streams_by_tier": {"agents_to_region": agents_drops, "region_to_cloud_probes": probe_drops},
        **light_results(measured),
        "memory": {
            "region_rss_idle_bytes": {s.name: s.rss_idle for s in servers},
            "region_rss_connected_bytes": {s.name: rss_connected[s.name] for s in servers},
            "region_rss_per_agent_bytes": statistics.median(per_agent),
            "region_rss_per_agent_bytes_range": [min(per_agent), max(per_agent)],
            "cloud_rss_idle_bytes": cloud.rss_idle, "cloud_rss_with_regions_bytes": cloud_rss_regions,
            "cloud_rss_per_member_bytes": (cloud_rss_regions - cloud.rss_idle) / (2 * args.regions),
            "cloud_rss_connected_bytes": rss_connected["cloud"],
            "cloud_rss_per_agent_bytes": (rss_connected["cloud"] - cloud.rss_idle) / args.agents,
            "fleet_rss_per_light_agent_bytes": sum(fleet_rss) / args.agents,
        },
        "idle_cores": idle,
        "region_cpu_seconds_per_heartbeat": idle["regions"] / (args.agents / args.heartbeat),
        "job": job,
    }


async def flat(args: argparse.Namespace, work: Path, certs_dir: Path, shapes: Path) -> dict[str, Any]:
    """--flat-agents light agents (by default: only the selected ones, all selected every
    round) connected to one cloud, which selects --selected of them each round."""
    n = args.flat_agents
    cloud: Server | None = None
    fleets: list[Fleet] = []
    probes: Probes | None = None
    try:
        cloud = start_cloud(certs_dir, work, args.heartbeat)  # its agents heartbeat as the regions' do
        cloud.rss_idle = rss(cloud.proc.pid)
        probes = Probes(cloud.target, certs_dir, [f"probe-{i:02d}" for i in range(args.regions)],
                        args.probe_interval)
        started = time.monotonic()
        first = 0
        for f, count in enumerate(shares(n, min(args.fleets, max(1, n // 500)))):  # a process per 500 or more
            fleets.append(await Fleet.start(certs_dir, [f"{cloud.target}={AGENT_PREFIX}:{first}:{count}"], count, shapes,
                                            args.codec, 0.0, work / f"fleet-flat-{f}.json", work / f"fleet-flat-{f}.log"))
            first += count
        for fleet in fleets:
            await fleet.wait_connected(args.connect_timeout)
        connect_seconds = time.monotonic() - started
        await probes.wait_connected(60)
        await wait_members(cloud, certs_dir, n + args.regions, 0, timeout=60)
        await asyncio.sleep(args.settle_seconds)
        pids = {"cloud": [cloud.proc.pid], "light agents": [f.proc.pid for f in fleets]}
        for fleet in fleets:
            await fleet.command("measure")
        probes.measure()
        idle, idle_span = await idle_window(pids, args.idle_seconds)
        rss_connected = rss(cloud.proc.pid)
        print(f"  flat job: {args.rounds} rounds of {args.selected} of {n} agents", flush=True)
        job = await run_job(cloud, certs_dir, job_spec(args, args.selected, args.selected), args.job_timeout,
                            [cloud], pids)
        probe = await probes.stop()
        probes = None
        measured = [await fleet.stop() for fleet in fleets]
        fleets = []
    finally:
        if probes is not None:
            await probes.stop()
        for fleet in fleets:
            fleet.kill()
        stop_all([cloud])
    assert cloud is not None
    rtts = {"agents_to_cloud": [r for m in measured for r in m["rtts"]], "probes_to_cloud": probe["rtts"]}
    return {
        "agents": n, "selected": args.selected, "codec": args.codec, "heartbeat": args.heartbeat,
        "connect_seconds": connect_seconds, "tiers": tiers(rtts, {"idle": idle_span, "job": job["window"]}),
        "dropped_streams": sum(m["drops"] for m in measured) + probe["drops"], **light_results(measured),
        "update_bytes": measured[0]["update_bytes"],
        "memory": {"cloud_rss_idle_bytes": cloud.rss_idle, "cloud_rss_connected_bytes": rss_connected,
                   "cloud_rss_per_agent_bytes": (rss_connected - cloud.rss_idle) / n},
        "idle_cores": idle, "job": job,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tandem-scale-"))
    result: dict[str, Any] = {
        "name": "scale", "command": " ".join(["python -m tandem_lab.bench_scale", *sys.argv[1:]]),
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    try:
        certs_dir = work / "certs"
        names = [agent_name(AGENT_PREFIX, i) for i in range(max(args.agents, args.flat_agents))]
        started = time.monotonic()
        certs.init_deployment(certs_dir, [*names, *(f"probe-{i:02d}" for i in range(args.regions))])
        for i in range(args.regions):
            certs.add_region(certs_dir, f"r{i:02d}")
        print(f"certificates for {len(names)} agents and {args.regions} regions in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        shapes = work / "shapes.json"
        shapes.write_text(json.dumps(model_specs(MODEL)))
        if "flat" in args.phases:
            (work / "flat").mkdir()
            print(f"flat: {args.flat_agents} light agents on one cloud ...", flush=True)
            result["flat"] = await flat(args, work / "flat", certs_dir, shapes)
        if "tree" in args.phases:
            (work / "tree").mkdir()
            print(f"hierarchical: {args.agents} light agents over {args.regions} regions ...", flush=True)
            result["hierarchical"] = await hierarchical(args, work / "tree", certs_dir, shapes)
        if args.real_agents or args.kill_agents:
            from tandem_lab.scale_real import run_real

            result["real"] = await run_real(args, work / "real")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["targets"] = targets(result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tandem_lab.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=10_000, help="light agents in all, over the regions")
    p.add_argument("--regions", type=int, default=20)
    p.add_argument("--selected", type=int, default=300, help="agents a round selects (shared out over the regions)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--codec", default="topk:0.01+int8", help="the update codec of both jobs")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between the agents' heartbeats to a region")
    p.add_argument("--cloud-heartbeat", type=float, default=5.0,
                   help="seconds between the regions' heartbeats to the cloud (flat: the agents heartbeat every "
                        "--heartbeat seconds, as under a region)")
    p.add_argument("--probe-interval", type=float, default=1.0,
                   help="seconds between a probe's heartbeats to the cloud (it allows 5 a second)")
    p.add_argument("--fleets", type=int, default=4, help="processes the light agents are spread over")
    p.add_argument("--settle-seconds", type=float, default=10.0, help="wait once every agent is connected")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="steady heartbeats measured before the job")
    p.add_argument("--round-deadline", type=float, default=120.0)
    p.add_argument("--connect-timeout", type=float, default=600.0)
    p.add_argument("--job-timeout", type=float, default=900.0)
    p.add_argument("--real-agents", type=int, default=8,
                   help="real `tandem edge` processes for the equality check, half under each of 2 regions (0: skip)")
    p.add_argument("--real-rounds", type=int, default=5)
    p.add_argument("--no-real-control", dest="real_control", action="store_false",
                   help="skip the second flat run (how far flat is from itself, run to run)")
    p.add_argument("--kill-agents", type=int, default=6,
                   help="light agents of the region killed mid-round (0: skip the region kill)")
    p.add_argument("--flat-agents", type=int, default=0,
                   help="light agents connected to the flat cloud (default: --selected, all selected every round)")
    p.add_argument("--skip-light", action="store_true", help="only the real-process checks")
    p.add_argument("--phases", default="flat,tree", help="light-agent phases to run: flat, tree (hierarchical)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.regions < 1 or args.selected < args.regions or args.agents < args.selected:
        p.error("need 1 <= --regions <= --selected <= --agents")
    if args.real_agents and (args.real_agents < 2 or args.real_agents % 2):
        p.error("--real-agents: an even number, at least 2 (or 0)")
    args.fleets = max(1, min(args.fleets, args.regions))
    args.flat_agents = args.flat_agents or args.selected
    if args.flat_agents < args.selected:
        p.error("--flat-agents must be at least --selected")
    args.phases = [] if args.skip_light else sorted({x.strip() for x in args.phases.split(",") if x.strip()})
    if not set(args.phases) <= {"flat", "tree"}:
        p.error(f"--phases: flat and tree only, got {sorted(args.phases)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    plot(result, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
