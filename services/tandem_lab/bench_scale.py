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

import numpy as np

from tandem import certs
from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, job_dict
from tandem_lab.bench import machine
from tandem_lab.scale_agents import agent_name, model_specs
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
PROBE_INTERVAL = 1.0  # seconds between a probe's heartbeats (the cloud allows 5 a second)
MODEL = "mlp"


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal integers, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def quantiles(rtts: list[float]) -> dict[str, float | int | None]:
    if not rtts:
        return {"heartbeats": 0, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(rtts, [50, 99])
    return {"heartbeats": len(rtts), "p50": float(p50), "p99": float(p99), "max": float(max(rtts))}


async def run_job(server: Server, certs_dir: Path, spec: admin_pb2.JobSpec, timeout: float,
                  watch: list[Server]) -> dict[str, Any]:
    """Start `spec` on `server`; its rounds, and the server's CPU seconds and update bytes
    received over the job, and the peak resident memory of the watched processes."""
    peaks = {s.name: rss(s.proc.pid) for s in watch}
    async with admin_channel(server.target, certs_dir) as channel:
        stub = admin_stub(channel)
        cpu0, bytes0, started = cpu_seconds(server.proc.pid), server.received_bytes(), time.monotonic()
        job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
        while True:
            job = await stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id))
            if job.state != admin_pb2.JOB_STATE_RUNNING:
                break
            if time.monotonic() - started > timeout:
                await stub.StopJob(admin_pb2.StopJobRequest(job_id=job_id))
                raise RuntimeError(f"job {job_id} on {server.name} still running after {timeout:.0f} s "
                                   f"(round {job.current_round}: {job.message}); see {server.log}")
            for s in watch:
                peaks[s.name] = max(peaks[s.name], rss(s.proc.pid))
            await asyncio.sleep(0.25)
        seconds = time.monotonic() - started
        cpu1, bytes1 = cpu_seconds(server.proc.pid), server.received_bytes()
    out = job_dict(job)
    if out["state"] != "completed":
        raise RuntimeError(f"job {job_id} on {server.name} ended {out['state']}: {out['message']}")
    rounds = out["rounds"]
    return {
        "job_id": job_id, "rounds": len(rounds), "seconds": seconds, "cpu_seconds": cpu1 - cpu0,
        "cpu_seconds_per_round": (cpu1 - cpu0) / len(rounds),
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rounds),
        "metric_bytes_per_round": (bytes1 - bytes0) / len(rounds),
        "round_seconds": [r["seconds"] for r in rounds], "round_members": [len(r["agents"]) for r in rounds],
        "rss_peak_bytes": peaks,
    }


def job_spec(args: argparse.Namespace, min_clients: int, per_round: int) -> admin_pb2.JobSpec:
    return admin_pb2.JobSpec(model=MODEL, rounds=args.rounds, min_clients=min_clients, clients_per_round=per_round,
                             round_deadline_seconds=args.round_deadline, codec=args.codec, seed=1, promote="never")


async def idle_cpu(servers: list[Server], seconds: float) -> dict[str, float]:
    """Cores each server used over `seconds` of steady heartbeats, no job running."""
    before = {s.name: cpu_seconds(s.proc.pid) for s in servers}
    await asyncio.sleep(seconds)
    return {s.name: (cpu_seconds(s.proc.pid) - before[s.name]) / seconds for s in servers}


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
        probes = Probes(cloud.target, certs_dir, [f"probe-{i:02d}" for i in range(args.regions)], PROBE_INTERVAL)
        await probes.wait_connected(60)
        await wait_members(cloud, certs_dir, 2 * args.regions, 0, timeout=60)
        await asyncio.sleep(2.0)
        for server in servers:
            server.rss_idle = rss(server.proc.pid)
        cloud_rss_regions = rss(cloud.proc.pid)
        # Regions spread over the fleet processes, whole.
        started = time.monotonic()
        first = [sum(per_region[:i]) for i in range(args.regions)]
        for f in range(args.fleets):
            mine = list(range(f, args.regions, args.fleets))
            groups = [f"{servers[i].target}={AGENT_PREFIX}:{first[i]}:{per_region[i]}" for i in mine]
            fleets.append(await Fleet.start(certs_dir, groups, sum(per_region[i] for i in mine), shapes, args.codec,
                                            0.0, work / f"fleet-{f}.json", work / f"fleet-{f}.log"))
        for fleet in fleets:
            await fleet.wait_connected(args.connect_timeout)
        connect_seconds = time.monotonic() - started
        await wait_members(cloud, certs_dir, 2 * args.regions, args.agents, timeout=60)
        print(f"  {args.agents} agents connected to {args.regions} regions in {connect_seconds:.0f} s", flush=True)
        idle = await idle_cpu([cloud, *servers], args.idle_seconds)
        rss_connected = {s.name: rss(s.proc.pid) for s in [cloud, *servers]}
        fleet_rss = [rss(f.proc.pid) for f in fleets]
        for fleet in fleets:
            await fleet.command("measure")
        probes.measure()
        print(f"  job: {args.rounds} rounds of {args.selected} agents ({selected[0]} in each region)", flush=True)
        job = await run_job(cloud, certs_dir, job_spec(args, args.selected, 0), args.job_timeout, [cloud, *servers])
        probe = await probes.stop()
        probes = None
        measured = [await fleet.stop() for fleet in fleets]
        fleets = []
        region_cpu = {s.name: cpu_seconds(s.proc.pid) for s in servers}
    finally:
        if probes is not None:
            await probes.stop()
        for fleet in fleets:
            fleet.kill()
        stop_all([*servers, cloud])
    assert cloud is not None
    rtts = [r for m in measured for r in m["rtts"]]
    per_agent = [(rss_connected[s.name] - s.rss_idle) / n for s, n in zip(servers, per_region, strict=True)]
    heartbeats_per_second = [n / args.heartbeat for n in per_region]
    return {
        "agents": args.agents, "regions": args.regions, "agents_per_region": per_region,
        "selected_per_region": selected, "fleets": args.fleets, "connect_seconds": connect_seconds,
        "tiers": {"agents_to_region": quantiles(rtts), "region_to_cloud_probes": quantiles(probe["rtts"])},
        "dropped_streams": sum(m["drops"] for m in measured) + probe["drops"],
        "dropped_streams_by_tier": {"agents_to_region": sum(m["drops"] for m in measured),
                                    "region_to_cloud_probes": probe["drops"]},
        "drop_reasons": [m["drop_reasons"] for m in measured] + [probe["drop_reasons"]],
        "failed_connects": sum(m["failed_connects"] for m in measured),
        "uploads": _codes(measured),
        "memory": {
            "region_rss_idle_bytes": {s.name: s.rss_idle for s in servers},
            "region_rss_connected_bytes": {s.name: rss_connected[s.name] for s in servers},
            "region_rss_per_agent_bytes": statistics.median(per_agent),
            "region_rss_per_agent_bytes_range": [min(per_agent), max(per_agent)],
            "cloud_rss_idle_bytes": cloud.rss_idle, "cloud_rss_with_regions_bytes": cloud_rss_regions,
            "cloud_rss_connected_bytes": rss_connected["cloud"],
            "cloud_rss_per_agent_bytes": (rss_connected["cloud"] - cloud.rss_idle) / args.agents,
            "fleet_rss_per_light_agent_bytes": sum(fleet_rss) / args.agents,
        },
        "idle_cores": idle,
        "region_cpu_seconds_per_heartbeat": statistics.median(
            idle[s.name] / hb for s, hb in zip(servers, heartbeats_per_second, strict=True)),
        "region_cpu_seconds_total": region_cpu,
        "job": job,
    }


def _codes(measured: list[dict[str, Any]]) -> dict[str, int]:
    codes: dict[str, int] = {}
    for m in measured:
        for upload in m["uploads"]:
            codes[upload["code"]] = codes.get(upload["code"], 0) + 1
    return codes


async def flat(args: argparse.Namespace, work: Path, certs_dir: Path, shapes: Path) -> dict[str, Any]:
    cloud: Server | None = None
    fleet: Fleet | None = None
    probes: Probes | None = None
    try:
        cloud = start_cloud(certs_dir, work, args.cloud_heartbeat)
        cloud.rss_idle = rss(cloud.proc.pid)
        probes = Probes(cloud.target, certs_dir, [f"probe-{i:02d}" for i in range(args.regions)], PROBE_INTERVAL)
        fleet = await Fleet.start(certs_dir, [f"{cloud.target}={AGENT_PREFIX}:0:{args.selected}"], args.selected,
                                  shapes, args.codec, 0.0, work / "fleet-flat.json", work / "fleet-flat.log")
        await fleet.wait_connected(args.connect_timeout)
        await probes.wait_connected(60)
        await wait_members(cloud, certs_dir, args.selected + args.regions, 0, timeout=60)
        idle = await idle_cpu([cloud], args.idle_seconds)
        rss_connected = rss(cloud.proc.pid)
        await fleet.command("measure")
        probes.measure()
        print(f"  flat job: {args.rounds} rounds of {args.selected} agents", flush=True)
        job = await run_job(cloud, certs_dir, job_spec(args, args.selected, args.selected), args.job_timeout,
                            [cloud])
        probe = await probes.stop()
        probes = None
        measured = await fleet.stop()
        fleet = None
    finally:
        if probes is not None:
            await probes.stop()
        if fleet is not None:
            fleet.kill()
        stop_all([cloud])
    assert cloud is not None
    return {
        "agents": args.selected, "tiers": {"agents_to_cloud": quantiles(measured["rtts"]),
                                           "probes_to_cloud": quantiles(probe["rtts"])},
        "dropped_streams": measured["drops"] + probe["drops"], "uploads": _codes([measured]),
        "update_bytes": measured["update_bytes"],
        "memory": {"cloud_rss_idle_bytes": cloud.rss_idle, "cloud_rss_connected_bytes": rss_connected,
                   "cloud_rss_per_agent_bytes": (rss_connected - cloud.rss_idle) / args.selected},
        "idle_cores": idle, "job": job,
    }


def _target(measured: float | None, goal: float, op: str, how: str) -> dict[str, Any]:
    if measured is None or not math.isfinite(measured):
        return {"measured": measured, "goal": goal, "op": op, "met": False, "how": how}
    met = measured <= goal if op == "<=" else measured >= goal
    return {"measured": measured, "goal": goal, "op": op, "met": met, "how": how}


def targets(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tree, one = result.get("hierarchical"), result.get("flat")
    if tree:
        tiers = {name: t["p99"] for name, t in tree["tiers"].items()}
        worst = max(tiers.values(), key=lambda v: math.inf if v is None else v)
        shown = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} none" for k, v in tiers.items())
        out["heartbeat_p99_seconds"] = _target(worst, 1.0, "<=", (
            f"99th percentile heartbeat-to-acknowledgement seconds, the worse tier ({shown}), "
            f"{tree['agents']} agents over {tree['regions']} regions while the job ran"))
        out["dropped_streams"] = _target(tree["dropped_streams"], 0, "<=",
                                         "control streams (agents' and probes') that broke after they opened")
    if tree and one:
        out["cloud_bytes_per_round_vs_flat"] = _target(
            tree["job"]["bytes_up_per_round"] / one["job"]["bytes_up_per_round"], 0.1, "<=",
            f"update bytes into the cloud per round (RoundResult.bytes_up), {tree['regions']} regions / flat, "
            f"{result['config']['selected']} selected agents, codec {result['config']['codec']}")
        out["cloud_cpu_per_round_vs_flat"] = _target(
            tree["job"]["cpu_seconds_per_round"] / one["job"]["cpu_seconds_per_round"], 0.1, "<=",
            "the cloud process's CPU seconds over the job / rounds, hierarchical / flat (idle work included)")
    real = result.get("real") or {}
    equality = real.get("equality")
    if equality:
        out["model_max_abs_diff_vs_flat"] = _target(
            equality["max_abs_diff"], 1e-5, "<=",
            f"largest |flat - two-tier| coordinate of the final models, {equality['agents']} real agents, "
            f"{equality['rounds']} rounds, FedAvg, codec none (sha256 equal: {equality['sha256_equal']})")
        out["accuracy_diff_vs_flat"] = _target(
            abs(equality["flat"]["accuracy"] - equality["hierarchical"]["accuracy"]), 0.01, "<=",
            "|final test accuracy flat - two-tier|")
    kill = real.get("region_kill")
    if kill:
        out["acked_updates_lost_region_kill"] = _target(
            kill["acked_lost"], 0, "<=",
            f"updates a region acknowledged before SIGKILL ({kill['acked_before_kill']}) missing from the partial "
            f"it sent up after its restart; job {kill['job_state']}")
        out["region_kill_job_completed"] = _target(
            1.0 if kill["job_state"] == "completed" else 0.0, 1.0, ">=", "the job completed after the kill")
    return out


def print_table(result: dict[str, Any]) -> None:
    tree, one = result.get("hierarchical"), result.get("flat")
    if tree:
        print(f"\n{tree['agents']} agents, {tree['regions']} regions, connected in {tree['connect_seconds']:.0f} s")
        for name, t in tree["tiers"].items():
            if t["p99"] is not None:
                print(f"  {name:<24} {t['heartbeats']:>8} heartbeats  p50 {1e3 * t['p50']:7.1f} ms  "
                      f"p99 {1e3 * t['p99']:7.1f} ms  max {1e3 * t['max']:7.1f} ms")
        mem = tree["memory"]
        print(f"  region RSS per agent {mem['region_rss_per_agent_bytes'] / 1024:.0f} KiB, cloud RSS per agent "
              f"{mem['cloud_rss_per_agent_bytes'] / 1024:.1f} KiB, light agent (client) "
              f"{mem['fleet_rss_per_light_agent_bytes'] / 1024:.0f} KiB; dropped streams {tree['dropped_streams']}")
    for name, run in (("hierarchical", tree), ("flat", one)):
        if run:
            job = run["job"]
            print(f"  {name:<13} cloud bytes/round {job['bytes_up_per_round']:>12,.0f}  CPU s/round "
                  f"{job['cpu_seconds_per_round']:6.3f}  median round {statistics.median(job['round_seconds']):.2f} s")
    print()
    for name, t in result["targets"].items():
        shown = "none" if t["measured"] is None else f"{t['measured']:.4g}"
        print(f"{'met ' if t['met'] else 'MISS'} {name:<34} {shown} {t['op']} {t['goal']:.4g}")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tandem-scale-"))
    result: dict[str, Any] = {
        "name": "scale", "command": " ".join(["python -m tandem_lab.bench_scale", *sys.argv[1:]]),
        "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    try:
        certs_dir = work / "certs"
        names = [agent_name(AGENT_PREFIX, i) for i in range(max(args.agents, args.selected))]
        started = time.monotonic()
        certs.init_deployment(certs_dir, [*names, *(f"probe-{i:02d}" for i in range(args.regions))])
        for i in range(args.regions):
            certs.add_region(certs_dir, f"r{i:02d}")
        print(f"certificates for {len(names)} agents and {args.regions} regions in "
              f"{time.monotonic() - started:.1f} s", flush=True)
        shapes = work / "shapes.json"
        shapes.write_text(json.dumps(model_specs(MODEL)))
        if not args.skip_light:
            for phase in ("flat", "tree"):
                (work / phase).mkdir()
            print(f"flat: {args.selected} light agents on one cloud ...", flush=True)
            result["flat"] = await flat(args, work / "flat", certs_dir, shapes)
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
                   help="seconds between the members' heartbeats to the cloud (regions; flat: the agents)")
    p.add_argument("--fleets", type=int, default=4, help="processes the light agents are spread over")
    p.add_argument("--idle-seconds", type=float, default=10.0, help="steady heartbeats measured before the job")
    p.add_argument("--round-deadline", type=float, default=120.0)
    p.add_argument("--connect-timeout", type=float, default=600.0)
    p.add_argument("--job-timeout", type=float, default=900.0)
    p.add_argument("--real-agents", type=int, default=8,
                   help="real `tandem edge` processes for the equality check, half under each of 2 regions (0: skip)")
    p.add_argument("--real-rounds", type=int, default=5)
    p.add_argument("--kill-agents", type=int, default=6,
                   help="light agents of the region killed mid-round (0: skip the region kill)")
    p.add_argument("--skip-light", action="store_true", help="only the real-process checks")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, state)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.regions < 1 or args.selected < args.regions or args.agents < args.selected:
        p.error("need 1 <= --regions <= --selected <= --agents")
    if args.real_agents and (args.real_agents < 2 or args.real_agents % 2):
        p.error("--real-agents: an even number, at least 2 (or 0)")
    args.fleets = max(1, min(args.fleets, args.regions))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    try:
        from tandem_lab.scale_plot import plot

        plot(result, args.out.with_suffix(".png"))
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
