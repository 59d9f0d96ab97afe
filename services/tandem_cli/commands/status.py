"""`tandem status`: agents, jobs, the newest and the serving version of each model and the
placements, on one screen."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli.admin import (
    admin_command,
    agent_line,
    agent_rows,
    job_dict,
    model_rows,
    placement_rows,
    rollout_line,
    rollout_rows,
    round_progress,
)
from tandem_cli.options import Subparsers, client_args


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("status", help="agents, jobs, models and placements on one screen")
    client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=admin_command(_status))


async def _status(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    agents, models, placements, listed, rollouts = await asyncio.gather(  # independent calls: one round trip's wait
        agent_rows(stub), model_rows(stub), placement_rows(stub), stub.ListJobs(admin_pb2.ListJobsRequest()),
        rollout_rows(stub))
    jobs = [job_dict(j) for j in listed.jobs]
    newest: dict[str, dict[str, Any]] = {}
    serving = {row["model"]: row["version"] for row in models if row["stage"] == "serving"}
    for row in models:
        if row["version"] > newest.get(row["model"], {"version": 0})["version"]:
            newest[row["model"]] = {**row, "serving_version": serving.get(row["model"], 0)}
    if args.json:
        print(json.dumps({"cloud": args.cloud, "agents": agents, "jobs": jobs,
                          "models": sorted(newest.values(), key=lambda r: r["model"]),
                          "placements": placements, "rollouts": rollouts}, indent=2))
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
        print(f"  {j['job_id']}  {j['state']:<10} {j['model']:<10} {round_progress(j)}"
              f"{accuracy}")
    print(f"models: {len(newest)} published")
    for row in sorted(newest.values(), key=lambda r: r["model"]):
        served = f"serving v{row['serving_version']}" if row["serving_version"] else "none serving"
        print(f"  {row['model']:<10} newest v{row['version']:<5} {served:<16} {row['sha256'][:16]}")
    for r in rollouts:
        print("  " + rollout_line(r))
    print(f"placements: {len(placements)}")
    for p in placements:
        print(f"  {p['agent']:<20} {p['model']:<10} {p['placement']}{'  (pinned)' if p['pinned'] else ''}")
    return 0
