"""`tandem status|job|agents|models|placement`: admin calls over mutual TLS with the admin certificate."""

from __future__ import annotations

import argparse
import json
from typing import Any

from tandem.v1 import admin_pb2
from tandem_cli.admin import admin_channel, admin_stub, job_dict, round_line, wait_job


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(f"job {job['job_id']}: {job['state']}, model {job['model']}, round {job['current_round']}"
          f"/{job['spec']['rounds']}, version {job['version']}")
    for r in job["rounds"]:
        print("  " + round_line(r))
    if job.get("message"):
        print(f"  {job['message']}")


async def run_client(args: argparse.Namespace) -> int:
    async with admin_channel(args.cloud, args.certs) as channel:
        stub = admin_stub(channel)
        if args.command == "status":
            return await _status(args, stub)
        if args.command == "agents":
            rows = await agent_rows(stub)
            for row in rows if not args.json else []:
                print(agent_line(row))
            if args.json:
                print(json.dumps(rows, indent=2))
            return 0
        if args.command == "models":
            rows = await model_rows(stub, args.model)
            for row in rows if not args.json else []:
                print(f"{row['model']:<10} v{row['version']:<5} {row['sha256'][:16]}  job {row['job_id']} "
                      f"round {row['round']}")
            if args.json:
                print(json.dumps(rows, indent=2))
            return 0
        if args.command == "placement":
            return await _placement(args, stub)
        return await _job(args, stub)


async def agent_rows(stub: Any) -> list[dict[str, Any]]:
    agents = (await stub.ListAgents(admin_pb2.ListAgentsRequest())).agents
    return [{"agent_id": a.agent_id, "connected": a.connected, "num_examples": a.num_examples,
             "connects": a.connects, "measurements": dict(a.measurements)} for a in agents]


def agent_line(row: dict[str, Any]) -> str:
    return (f"{row['agent_id']:<20} {'connected' if row['connected'] else 'offline':<10} "
            f"{row['num_examples']:>7} examples  {row['connects']} connects")


async def model_rows(stub: Any, model: str = "") -> list[dict[str, Any]]:
    versions = (await stub.ListModelVersions(admin_pb2.ListModelVersionsRequest(model=model))).versions
    return [{"model": v.model, "version": v.version, "sha256": v.sha256, "job_id": v.job_id,
             "round": v.round, "bytes": v.bytes} for v in versions]


async def placement_rows(stub: Any, agent: str = "", model: str = "") -> list[dict[str, Any]]:
    infos = (await stub.ListPlacements(admin_pb2.ListPlacementsRequest(agent=agent, model=model))).placements
    return [_placement_row(p) for p in infos]


def _placement_row(p: admin_pb2.PlacementInfo) -> dict[str, Any]:
    return {"agent": p.agent, "model": p.model, "placement": p.placement, "pinned": p.pinned,
            "predicted_seconds": list(p.predicted_seconds)}


async def _status(args: argparse.Namespace, stub: Any) -> int:
    """Agents, jobs, the newest version of each model and the placements: one screen."""
    agents, models, placements = await agent_rows(stub), await model_rows(stub), await placement_rows(stub)
    jobs = [job_dict(j) for j in (await stub.ListJobs(admin_pb2.ListJobsRequest())).jobs]
    newest: dict[str, dict[str, Any]] = {}
    for row in models:
        if row["version"] > newest.get(row["model"], {"version": 0})["version"]:
            newest[row["model"]] = row
    if args.json:
        print(json.dumps({"cloud": args.cloud, "agents": agents, "jobs": jobs,
                          "models": sorted(newest.values(), key=lambda r: r["model"]),
                          "placements": placements}, indent=2))
        return 0
    connected = sum(a["connected"] for a in agents)
    print(f"Tandem at {args.cloud}")
    print(f"agents: {connected} connected of {len(agents)}")
    for row in agents:
        print("  " + agent_line(row))
    running = [j for j in jobs if j["state"] == "running"]
    print(f"jobs: {len(running)} running of {len(jobs)}")
    for j in jobs[-10:]:
        accuracy = f"  accuracy {j['rounds'][-1]['accuracy']:.4f}" if j["rounds"] else ""
        print(f"  {j['job_id']}  {j['state']:<10} {j['model']:<10} round {j['current_round']}/{j['spec']['rounds']}"
              f"{accuracy}")
    print(f"models: {len(newest)} published")
    for row in sorted(newest.values(), key=lambda r: r["model"]):
        print(f"  {row['model']:<10} v{row['version']:<5} {row['sha256'][:16]}")
    print(f"placements: {len(placements)}")
    for p in placements:
        print(f"  {p['agent']:<20} {p['model']:<10} {p['placement']}{'  (pinned)' if p['pinned'] else ''}")
    return 0


async def _placement(args: argparse.Namespace, stub: Any) -> int:
    action = args.placement_command
    if action == "pin":
        infos = [await stub.PinPlacement(admin_pb2.PinPlacementRequest(
            agent=args.agent, model=args.model, placement=args.placement))]
    elif action == "unpin":
        infos = [await stub.UnpinPlacement(admin_pb2.UnpinPlacementRequest(agent=args.agent, model=args.model))]
    else:
        infos = list((await stub.ListPlacements(
            admin_pb2.ListPlacementsRequest(agent=args.agent, model=args.model))).placements)
    rows = [_placement_row(p) for p in infos]
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        costs = " ".join(f"k{k}={1000 * c:.1f}ms" for k, c in enumerate(row["predicted_seconds"]))
        print(f"{row['agent']:<16} {row['model']:<10} {row['placement']:<18} {'pinned' if row['pinned'] else '':<7} "
              f"{costs}")
    return 0


async def _job(args: argparse.Namespace, stub: Any) -> int:
    action = args.job_command
    if action == "start":
        spec = admin_pb2.JobSpec(
            model=args.model, rounds=args.rounds, min_clients=args.min_clients,
            clients_per_round=args.clients_per_round, round_deadline_seconds=args.deadline, eval=args.eval,
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, codec=args.codec, seed=args.seed,
            max_update_bytes=args.max_update_bytes, downlink_codec=args.downlink_codec,
            target_upload_seconds=args.target_upload_seconds, strategy=args.strategy, mu=args.mu,
            server_lr=args.server_lr, aggregator=args.aggregator, trim_fraction=args.trim_fraction,
            hostile_agents=args.hostile, krum_selected=args.krum_selected, clip_norm=args.clip_norm,
            clip_to_median=args.clip_to_median, dp_noise_multiplier=args.dp_noise_multiplier, dp_delta=args.dp_delta,
        )
        job = await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))
        print(job.job_id, flush=True)
        if not args.wait:
            return 0
        done = await wait_job(stub, job.job_id, 0, echo=False, progress=True)
        print(f"job {done['job_id']}: {done['state']}, version {done['version']}")
        return 0 if done["state"] == "completed" else 1
    if action == "list":
        jobs = [job_dict(j) for j in (await stub.ListJobs(admin_pb2.ListJobsRequest())).jobs]
        if args.json:
            print(json.dumps(jobs, indent=2))
        for j in jobs if not args.json else []:
            print(f"{j['job_id']}  {j['state']:<10} {j['model']:<8} round {j['current_round']}/{j['spec']['rounds']}")
        return 0
    if action == "stop":
        job = job_dict(await stub.StopJob(admin_pb2.StopJobRequest(job_id=args.job_id)))
    elif action == "status":
        job = job_dict(await stub.GetJob(admin_pb2.GetJobRequest(job_id=args.job_id)))
    else:
        job = await wait_job(stub, args.job_id, args.timeout, echo=not args.json, progress=not args.json)
        if not args.json:  # the rounds were printed as they closed
            print(f"job {job['job_id']}: {job['state']}, version {job['version']}")
            return 0 if job["state"] == "completed" else 1
    _print_job(job, args.json)
    return 0 if job["state"] in ("running", "completed") or action == "stop" else 1
