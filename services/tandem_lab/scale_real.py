"""The checks of `make bench-scale` that need real processes on both sides.

Equality: `--real-agents` real `tandem edge` processes (`--data digits:I/N`, the reference
workload) train the same job flat under one `tandem cloud`, then half under each of two
`tandem region` processes; the final models are compared coordinate by coordinate and
their test accuracies side by side. Codec none and FedAvg: a region's partial aggregate
is its agents' weighted mean, which a lossy codec would encode once more.

Region kill: two regions under a cloud; the light agents of one (in this process) answer
at once, except half of them, which answer the kill round's task late. Once the early
half's updates are acknowledged (OK to the agent, and listed by the region's Admin
GetJob) the region is sent SIGKILL mid-round, then started again on the same state
directory and port. The job must complete, and every update the region acknowledged
before the kill must be among the agents of the partial it sent up.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np

from cloud.store import Store
from tandem import certs, training, transfer
from tandem.v1 import admin_pb2, coordinator_pb2_grpc
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, job_dict
from tandem_lab.scale_agents import LightAgent, Tally, make_update, model_specs
from tandem_lab.scale_tree import Server, launch_region, start_cloud, start_regions, stop_all, wait_members

REGIONS = ("north", "south")
KILL_ROUND = 2  # of 3: the first round closes normally, the kill is in the second
KILL_ROUNDS = 3
LATE_SECONDS = 6.0  # the late half's answer in the kill round: the region is down for part of it


async def wait_done(server: Server, certs_dir: Path, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    async with admin_channel(server.target, certs_dir) as channel:
        stub = admin_stub(channel)
        while True:
            job = await stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id))
            if job.state != admin_pb2.JOB_STATE_RUNNING or time.monotonic() > deadline:
                return job_dict(job)
            await asyncio.sleep(0.25)


async def start_job(server: Server, certs_dir: Path, **spec: Any) -> str:
    async with admin_channel(server.target, certs_dir) as channel:
        reply = await admin_stub(channel).StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(**spec)))
    return str(reply.job_id)


async def round_models(server: Server, certs_dir: Path, job: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """The version each round of the job published, downloaded as an agent would (through
    the admin's certificate)."""
    specs = await asyncio.to_thread(training.state_specs, job["spec"]["model"])
    models = []
    async with admin_channel(server.target, certs_dir) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for r in job["rounds"]:
            models.append(await transfer.Download(job["spec"]["model"], r["version"], r["sha256"], specs).run(
                stub, timeout=120))
    return models


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# ---- the same model, flat and under two regions ---------------------------------


async def _train(work: Path, certs_dir: Path, n: int, rounds: int, tiered: bool) -> dict[str, Any]:
    work.mkdir(parents=True)
    cloud: Server | None = None
    regions: list[Server] = []
    agents = []
    try:
        cloud = start_cloud(certs_dir, work, 5.0)
        targets = [cloud.target] * n
        if tiered:
            regions = await asyncio.to_thread(start_regions, certs_dir, work, list(REGIONS), cloud.ports["port"],
                                              [n // 2, n // 2], 5.0)
            targets = [regions[0].target] * (n // 2) + [regions[1].target] * (n // 2)
        agents = [procs.start_agent(target, certs_dir, f"edge-{i}", f"digits:{i}/{n}", work / f"edge-{i}.log")
                  for i, target in enumerate(targets)]
        if tiered:
            await wait_members(cloud, certs_dir, len(REGIONS), n, timeout=180)
        else:
            await wait_members(cloud, certs_dir, n, 0, timeout=180)
        started = time.monotonic()
        job_id = await start_job(cloud, certs_dir, model="mlp", rounds=rounds, min_clients=n,
                                 round_deadline_seconds=120, eval="digits", seed=7, weight_cap=100.0, codec="none",
                                 strategy="fedavg", promote="never")
        job = await wait_done(cloud, certs_dir, job_id, timeout=120 * rounds)
        seconds = time.monotonic() - started
        if job["state"] != "completed":
            raise RuntimeError(f"{'two-tier' if tiered else 'flat'} job ended {job['state']}: {job['message']}; "
                               f"see {work}")
        models = await round_models(cloud, certs_dir, job)
    finally:
        for proc in agents:
            procs.stop(proc)
        stop_all([*regions, cloud])
    last = job["rounds"][-1]
    return {"models": models, "sha256": last["sha256"], "accuracy": last["accuracy"], "loss": last["loss"],
            "seconds": seconds, "members": sorted(last["agents"]), "version": last["version"],
            "accuracies": [r["accuracy"] for r in job["rounds"]]}


async def equality(work: Path, certs_dir: Path, n: int, rounds: int, control: bool) -> dict[str, Any]:
    """Flat, then two tiers; with `control`, flat once more: updates are folded in the
    order they arrive, so flat is not bit for bit the same from run to run either."""
    print(f"  equality: {n} real agents flat ...", flush=True)
    flat = await _train(work / "flat", certs_dir, n, rounds, tiered=False)
    print(f"  equality: {n} real agents under {len(REGIONS)} regions ...", flush=True)
    tiered = await _train(work / "tiered", certs_dir, n, rounds, tiered=True)
    a, b = flat.pop("models"), tiered.pop("models")
    by_round = [max_abs_diff(x, y) for x, y in zip(a, b, strict=True)]
    largest = max(float(np.max(np.abs(a[-1][k]))) for k in a[-1])
    eps = float(np.finfo(np.float32).eps)
    out = {"agents": n, "rounds": rounds, "max_abs_diff": by_round[-1], "max_abs_diff_by_round": by_round,
           "largest_coordinate": largest, "float32_epsilons_of_largest": by_round[-1] / (largest * eps),
           "accuracy_by_round": {"flat": flat.pop("accuracies"), "hierarchical": tiered.pop("accuracies")},
           "sha256_equal": flat["sha256"] == tiered["sha256"], "flat": flat, "hierarchical": tiered}
    if control:
        print(f"  equality: {n} real agents flat again (run-to-run control) ...", flush=True)
        again = await _train(work / "flat-again", certs_dir, n, rounds, tiered=False)
        c = again.pop("models")
        out["flat_again_max_abs_diff_by_round"] = [max_abs_diff(x, y) for x, y in zip(a, c, strict=True)]
        out["flat_again_sha256_equal"] = again["sha256"] == flat["sha256"]
        out["flat_again_accuracy"] = again["accuracy"]
    return out


# ---- a region killed mid-round ------------------------------------------------------


async def region_kill(work: Path, certs_dir: Path, names: list[str]) -> dict[str, Any]:
    """`names`: the killed region's light agents, then the other region's two."""
    work.mkdir(parents=True)
    killed, other = names[:-2], names[-2:]
    late = set(killed[len(killed) // 2:])
    tally = Tally()
    stop = asyncio.Event()
    update = make_update(model_specs("mlp"), "none")
    cloud: Server | None = None
    regions: list[Server] = []
    running: list[asyncio.Task[None]] = []
    restarted: Server | None = None
    try:
        cloud = start_cloud(certs_dir, work, 5.0)
        regions = await asyncio.to_thread(start_regions, certs_dir, work, list(REGIONS), cloud.ports["port"],
                                          [len(killed), len(other)], 1.0)
        north = regions[0]
        agents = [LightAgent(north.target, certs_dir, name, tally, update, delay=LATE_SECONDS if name in late else 0,
                             delay_rounds=frozenset({KILL_ROUND})) for name in killed]
        agents += [LightAgent(regions[1].target, certs_dir, name, tally, update) for name in other]
        running = [asyncio.create_task(a.run(stop)) for a in agents]
        await wait_members(cloud, certs_dir, len(REGIONS), len(names), timeout=120)
        job_id = await start_job(cloud, certs_dir, model="mlp", rounds=KILL_ROUNDS, min_clients=len(names),
                                 round_deadline_seconds=120, codec="none", seed=3, promote="never")

        def early_acks() -> list[Any]:
            return [u for u in tally.uploads if u.round == KILL_ROUND and u.code == "OK" and u.agent in killed]

        async with asyncio.timeout(180):
            while len(early_acks()) < len(killed) - len(late):
                await asyncio.sleep(0.05)
        acked = early_acks()
        local_job = acked[0].job_id
        async with admin_channel(north.target, certs_dir) as channel:
            seen = await admin_stub(channel).GetJob(admin_pb2.GetJobRequest(job_id=local_job))
        region_accepted = sorted(seen.open_round.accepted_agents)
        north.proc.kill()  # SIGKILL, mid-round: the late half has not answered
        north.proc.wait()
        killed_at = time.time()
        acked = [u for u in tally.uploads if u.round == KILL_ROUND and u.code == "OK" and u.agent in killed
                 and u.at <= killed_at]
        print(f"  region kill: {north.name} killed with {len(acked)} updates acknowledged in round {KILL_ROUND}, "
              f"{len(late)} to come; restarting it", flush=True)
        proc, ready = launch_region(certs_dir, work, north.name, cloud.ports["port"], len(killed), len(killed), 1.0,
                                    listen=f"127.0.0.1:{north.ports['port']}")
        ports = await asyncio.to_thread(procs.wait_ready, proc, ready, work / f"{north.name}.log", "region",
                                        180.0)
        restarted = Server(north.name, proc, ports, north.state, north.log)
        back = time.time() - killed_at
        job = await wait_done(cloud, certs_dir, job_id, timeout=300)
        async with admin_channel(restarted.target, certs_dir) as channel:
            local = job_dict(await admin_stub(channel).GetJob(admin_pb2.GetJobRequest(job_id=local_job)))
        parent_rows = Store(cloud.state, readonly=True).list_updates(job_id, KILL_ROUND)
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        stop_all([restarted, *regions[1:], cloud])
        for region in regions[:1]:
            if region.proc.poll() is None:
                procs.stop(region.proc)
    local_round = next((r for r in local["rounds"] if r["round"] == KILL_ROUND), None)
    kept = set(local_round["agents"]) if local_round else set()
    lost = sorted(u.agent for u in acked if u.agent not in kept)
    partial = next((u for u in parent_rows if u.agent == f"region:{REGIONS[0]}"), None)
    return {
        "agents": len(names), "killed_region_agents": len(killed), "late_agents": len(late),
        "kill_round": KILL_ROUND, "rounds": KILL_ROUNDS, "job_state": job["state"], "job_message": job["message"],
        "acked_before_kill": len(acked), "acked_agents": sorted(u.agent for u in acked),
        "region_accepted_before_kill": region_accepted, "acked_lost": len(lost), "lost_agents": lost,
        "local_job": local_job, "local_job_state": local["state"],
        "local_round_agents": sorted(kept), "parent_partial_contributors": partial.contributors if partial else None,
        "restart_seconds": back, "tasks_resent_after_ack": sum(a.resent for a in agents),
        "uploads": {code: sum(1 for u in tally.uploads if u.code == code) for code in {u.code for u in tally.uploads}},
        "drops": tally.drops,
    }


async def run_real(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    certs_dir = work / "certs"
    edges = [f"edge-{i}" for i in range(args.real_agents)]
    light = [f"kill-{i:02d}" for i in range(args.kill_agents + 2)] if args.kill_agents else []
    certs.init_deployment(certs_dir, [*edges, *light])
    for name in REGIONS:
        certs.add_region(certs_dir, name)
    out: dict[str, Any] = {}
    if args.real_agents:
        out["equality"] = await equality(work / "equality", certs_dir, args.real_agents, args.real_rounds,
                                         args.real_control)
    if args.kill_agents:
        print(f"  region kill: {args.kill_agents} light agents in {REGIONS[0]}, 2 in {REGIONS[1]} ...", flush=True)
        out["region_kill"] = await region_kill(work / "kill", certs_dir, light)
    return out

