"""Admin client helpers: a channel with the admin certificate, and JSON views of jobs,
agents, models and placements."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tqdm import tqdm

from tandem import config as task_config
from tandem import grpcserver, measurements, tls, wire
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem.v1 import coordinator_pb2 as cpb

STATE_NAMES = {
    admin_pb2.JOB_STATE_RUNNING: "running",
    admin_pb2.JOB_STATE_COMPLETED: "completed",
    admin_pb2.JOB_STATE_STOPPED: "stopped",
    admin_pb2.JOB_STATE_FAILED: "failed",
}


def publish_messages(model: str, arrays: dict[str, np.ndarray], sha256: str | None = None) -> list[cpb.ModelChunk]:
    """An Admin.PublishModel upload: the header (its sha256 computed unless given), then the tensors."""
    header = cpb.ModelHeader(model=model, sha256=wire.state_sha256(arrays) if sha256 is None else sha256)
    return [cpb.ModelChunk(header=header), *(cpb.ModelChunk(tensor=c) for c in wire.iter_chunks(arrays))]


async def publish_serving(
    stub: admin_pb2_grpc.AdminStub, model: str, arrays: dict[str, np.ndarray], timeout: float | None = None
) -> admin_pb2.ModelVersion:
    """Publish a version and make it the serving one (`tandem models publish --promote`)."""
    version: admin_pb2.ModelVersion = await stub.PublishModel(iter(publish_messages(model, arrays)), timeout=timeout)
    await stub.PromoteModel(admin_pb2.PromoteModelRequest(model=model, version=version.version,
                                                          reason="published with --promote"), timeout=timeout)
    return version


def admin_channel(cloud: str, certs: Path) -> grpc.aio.Channel:
    return grpcserver.secure_channel(cloud, tls.admin_credentials(certs))


def admin_stub(channel: grpc.aio.Channel) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(channel)


def admin_command(
    call: Callable[[argparse.Namespace, admin_pb2_grpc.AdminStub], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """A command handler that runs `call` with an Admin stub, on a channel to --cloud as --certs's admin."""

    def handler(args: argparse.Namespace) -> int:
        async def with_channel() -> int:
            async with admin_channel(args.cloud, args.certs) as channel:
                return await call(args, admin_stub(channel))

        return asyncio.run(with_channel())

    return handler


TERMINAL = {"completed", "stopped", "failed"}


async def wait_connected(stub: admin_pb2_grpc.AdminStub, count: int, timeout: float) -> None:
    """Return once at least `count` agents have an open control stream."""
    async with asyncio.timeout(timeout):
        while sum(a.connected for a in (await stub.ListAgents(admin_pb2.ListAgentsRequest())).agents) < count:
            await asyncio.sleep(0.2)


async def wait_job(
    stub: admin_pb2_grpc.AdminStub, job_id: str, timeout: float, echo: bool, progress: bool = False
) -> dict[str, Any]:
    """Poll a job until it ends (or `timeout` seconds pass, 0: never). With `progress`
    and a terminal on stderr, draw a progress bar of its rounds there; with `echo`,
    print each round as it closes."""
    start = time.monotonic()
    completed: float | None = None  # when the job was first seen completed
    printed = 0
    bar: tqdm[Any] | None = None
    if progress and sys.stderr.isatty():
        bar = tqdm(total=None, unit="round", desc=f"job {job_id}", file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            job = job_dict(await stub.GetJob(admin_pb2.GetJobRequest(job_id=job_id)))
            for r in job["rounds"][printed:]:
                if bar is not None:
                    if echo:
                        bar.write(round_line(r))
                    bar.set_postfix(accuracy=f"{r['accuracy']:.4f}", refresh=False)
                elif echo:
                    print(round_line(r), flush=True)
            if bar is not None:
                bar.total = job["spec"]["rounds"]
                bar.update(len(job["rounds"]) - printed)
            printed = len(job["rounds"])
            if timeout and time.monotonic() - start > timeout:
                return job
            if job["state"] in TERMINAL:
                # A completed job's promotion decision (its message) follows within moments:
                # the serving version may be evaluated first (docs/lifecycle.md).
                completed = completed if completed is not None else time.monotonic()
                if job["state"] != "completed" or job["message"] or time.monotonic() - completed > 30:
                    return job
            await asyncio.sleep(0.25)
    finally:
        if bar is not None:
            bar.close()


def round_progress(job: dict[str, Any]) -> str:
    """"round N/M" for a job dict: the round being worked on, or the last once all are
    done (the wire's current_round is M + 1 then; a person reads "round 11/10" as a bug)."""
    rounds = job["spec"]["rounds"]
    return f"round {min(job['current_round'], rounds)}/{rounds}"


def job_dict(job: admin_pb2.Job) -> dict[str, Any]:
    """A job as plain JSON-able data (ints stay ints, unlike MessageToDict's int64 strings)."""
    spec = job.spec
    out: dict[str, Any] = {
        "job_id": job.job_id,
        "state": STATE_NAMES.get(job.state, "unknown"),
        "model": spec.model,
        "current_round": job.current_round,
        "version": job.version,
        "message": job.message,
        "spec": {
            "model": spec.model, "rounds": spec.rounds, "min_clients": spec.min_clients,
            "clients_per_round": spec.clients_per_round, "deadline": spec.round_deadline_seconds,
            "eval": spec.eval, "epochs": spec.epochs, "batch_size": spec.batch_size,
            "learning_rate": spec.learning_rate, "codec": spec.codec, "seed": spec.seed,
            "max_update_bytes": spec.max_update_bytes, "strategy": spec.strategy, "mu": spec.mu,
            "server_lr": spec.server_lr, "downlink_codec": spec.downlink_codec,
            "target_upload_seconds": spec.target_upload_seconds, "aggregator": spec.aggregator,
            "trim_fraction": spec.trim_fraction, "hostile_agents": spec.hostile_agents,
            "krum_selected": spec.krum_selected, "clip_norm": spec.clip_norm, "clip_to_median": spec.clip_to_median,
            "dp_noise_multiplier": spec.dp_noise_multiplier, "dp_delta": spec.dp_delta,
            "max_examples": spec.max_examples, "weight_cap": spec.weight_cap,
            "config": task_config.from_proto(spec.config), "select": list(spec.select), "agents": list(spec.agents),
        },
        # What the task's train and evaluate see: the training fields overlaid with the user's config.
        "config": task_config.merged(
            {"epochs": spec.epochs, "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
             "mu": spec.mu}, task_config.from_proto(spec.config)),
        "excluded": [{"agent": e.agent, "code": e.code, "reason": e.reason} for e in job.excluded],
        "failures": [{"round": f.round, "agent": f.agent, "reason": f.reason, "detail": f.detail, "count": f.count}
                     for f in job.failures],
        "rounds": [
            {
                "round": r.round, "accuracy": r.accuracy, "loss": r.loss, "local_loss": r.local_loss,
                "seconds": round(r.seconds, 3), "bytes_up": r.bytes_up, "bytes_down": r.bytes_down,
                "accepted": r.accepted, "rejected": r.rejected, "version": r.version, "sha256": r.sha256,
                "attempts": r.attempts, "agents": list(r.agents), "codecs": dict(r.codecs),
                "delta_bytes": r.delta_bytes, "epsilon": r.epsilon,
                "example_cap": r.example_cap, "capped_agents": list(r.capped_agents),
                "train_metrics": dict(r.train_metrics), "eval_metrics": dict(r.eval_metrics),
                "phases": dict(r.phases),
            }
            for r in job.rounds
        ],
    }
    if job.HasField("open_round"):
        o = job.open_round
        out["open_round"] = {
            "round": o.round, "attempt": o.attempt, "base_version": o.base_version, "selected": list(o.selected),
            "accepted_agents": list(o.accepted_agents), "rejected": o.rejected,
            "deadline": o.deadline.ToNanoseconds() / 1e9,
        }
    return out


def round_line(r: dict[str, Any]) -> str:
    """One closed round. A job whose task reports metrics besides loss and accuracy (or
    none of them) gets its train and eval metrics by name instead."""
    train, evaluated = r.get("train_metrics", {}), r.get("eval_metrics", {})
    if set(train) - {"loss"} or set(evaluated) - {"loss", "accuracy"}:
        shown = "  ".join([*(f"train {k} {v:.4f}" for k, v in sorted(train.items())),
                           *(f"eval {k} {v:.4f}" for k, v in sorted(evaluated.items()))])
        return (f"round {r['round']:>3}  {shown}  {r['seconds']:6.2f} s  up {r['bytes_up'] / 1e6:7.2f} MB  "
                f"down {r['bytes_down'] / 1e6:7.2f} MB  ({r['accepted']} updates)")
    return (
        f"round {r['round']:>3}  local loss {r['local_loss']:.4f}  test loss {r['loss']:.4f}  "
        f"accuracy {r['accuracy']:.4f}  {r['seconds']:6.2f} s  up {r['bytes_up'] / 1e6:7.2f} MB  "
        f"down {r['bytes_down'] / 1e6:7.2f} MB  ({r['accepted']} updates)"
        + (f"  epsilon {r['epsilon']:.3f}" if r.get("epsilon") else "")
    )


# The order of a round's phases (admin.proto RoundResult.phases; cloud.phases.ORDER).
PHASES = ("dispatch", "download", "train", "encode", "upload", "validate", "fold", "wait", "close", "evaluate",
          "publish")


def _ordered(phases: dict[str, float]) -> dict[str, float]:
    rank = {name: index for index, name in enumerate(PHASES)}
    return dict(sorted(phases.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def phase_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """Where the rounds' time went (RoundResult.phases): round 1's, and the median of
    each phase over the later rounds; none for rounds closed before phases were measured."""
    timed = [r for r in rounds if r.get("phases")]
    if not timed:
        return []

    def line(title: str, phases: dict[str, float], seconds: float) -> str:
        parts = "  ".join(f"{name} {value:.3f}" for name, value in _ordered(phases).items())
        return f"time by phase, {title} ({seconds:.2f} s): {parts}"

    lines = [line(f"round {timed[0]['round']}", timed[0]["phases"], timed[0]["seconds"])]
    later = timed[1:]
    if later:
        names = list(dict.fromkeys(name for r in later for name in r["phases"]))
        median = {name: statistics.median(r["phases"].get(name, 0.0) for r in later) for name in names}
        lines.append(line(f"median of rounds {later[0]['round']}-{later[-1]['round']}", median,
                          statistics.median(r["seconds"] for r in later)))
    return lines


async def agent_rows(stub: admin_pb2_grpc.AdminStub) -> list[dict[str, Any]]:
    agents = (await stub.ListAgents(admin_pb2.ListAgentsRequest())).agents
    return [{"agent_id": a.agent_id, "connected": a.connected, "num_examples": a.num_examples,
             "connects": a.connects, "measurements": dict(a.measurements), "labels": dict(sorted(a.labels.items())),
             "tasks": [{"name": t.name, "fingerprint": t.fingerprint, "ready": t.ready, "reason": t.reason}
                       for t in a.tasks], **({"agents": a.agents} if a.agents else {})} for a in agents]


def agent_line(row: dict[str, Any]) -> str:
    """One agent (or region): state, examples, connects, a region's agents, then its labels
    (k=v) and task offers (a task it cannot train is marked `!`, its reason shown by --json)."""
    labels = ",".join(f"{k}={v}" for k, v in row.get("labels", {}).items())
    offers = ",".join(t["name"] + ("" if t["ready"] else "!") for t in row.get("tasks", []))
    region = f"  region of {row['agents']} agents" if row.get("agents") else ""
    seconds = row.get("measurements", {}).get(measurements.REGION_ROUND_SECONDS)
    if region and seconds is not None:
        region += f", last round {seconds:.2f} s"
    return (f"{row['agent_id']:<20} {'connected' if row['connected'] else 'offline':<10} "
            f"{row['num_examples']:>7} examples  {row['connects']} connects" + region
            + (f"  labels {labels}" if labels else "") + (f"  tasks {offers}" if offers else ""))


async def model_rows(stub: admin_pb2_grpc.AdminStub, model: str = "") -> list[dict[str, Any]]:
    versions = (await stub.ListModelVersions(admin_pb2.ListModelVersionsRequest(model=model))).versions
    return [version_dict(v) for v in versions]


def version_dict(v: admin_pb2.ModelVersion) -> dict[str, Any]:
    return {"model": v.model, "version": v.version, "sha256": v.sha256, "job_id": v.job_id,
            "round": v.round, "bytes": v.bytes, "origin": v.origin, "stage": v.stage,
            "metrics": dict(v.metrics), "eval": v.eval}


def rollout_dict(r: admin_pb2.RolloutStatus) -> dict[str, Any]:
    canary, baseline = r.canary, r.baseline
    return {"model": r.model, "version": r.version, "previous": r.previous, "state": r.state,
            "canary_agents": list(r.canary_agents), "actor": r.actor, "reason": r.reason,
            "started": r.started.ToDatetime().isoformat(timespec="seconds") + "Z",
            "ended": r.ended.ToDatetime().isoformat(timespec="seconds") + "Z" if r.HasField("ended") else None,
            "canary": {"requests": canary.requests, "errors": canary.errors, "compared": canary.compared,
                       "agreed": canary.agreed},
            "baseline": {"requests": baseline.requests, "errors": baseline.errors}}


def rollout_line(r: dict[str, Any]) -> str:
    """One line: what is rolling out where, and how it stands (or how it ended)."""
    return (f"rollout of {r['model']} v{r['version']} (serving v{r['previous']}) on {', '.join(r['canary_agents'])}: "
            f"{r['state']}: {r['reason']}")


async def rollout_rows(stub: admin_pb2_grpc.AdminStub, model: str = "") -> list[dict[str, Any]]:
    """The staged rollouts in progress."""
    found = await stub.ListModelVersions(admin_pb2.ListModelVersionsRequest(model=model))
    return [rollout_dict(m.rollout) for m in found.models if m.HasField("rollout")]


async def placement_rows(stub: admin_pb2_grpc.AdminStub, agent: str = "", model: str = "") -> list[dict[str, Any]]:
    infos = (await stub.ListPlacements(admin_pb2.ListPlacementsRequest(agent=agent, model=model))).placements
    return [placement_row(p) for p in infos]


def placement_row(p: admin_pb2.PlacementInfo) -> dict[str, Any]:
    return {"agent": p.agent, "model": p.model, "placement": p.placement, "pinned": p.pinned,
            "predicted_seconds": list(p.predicted_seconds)}
