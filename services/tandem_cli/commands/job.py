"""`tandem job start|status|wait|stop|list`: federated training jobs, over the Admin API."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cloud import aggregation, strategies  # the registered names are the choices
from tandem import config as task_config
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli.admin import admin_command, job_dict, phase_lines, round_line, round_progress, wait_job
from tandem_cli.options import Subparsers, client_args, rollout_args, rollout_policy


def register(subparsers: Subparsers) -> None:
    p_job = subparsers.add_parser("job", help="start, watch and stop federated training jobs")
    job_sub = p_job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    p = job_sub.add_parser("start", help="start a job and print its id")
    client_args(p)
    p.add_argument("--model", required=True,
                   help="the task to train: a registered name (`tandem tasks`: mlp, cnn, ...) or "
                        "PACKAGE.MODULE:ATTRIBUTE, installed on the coordinator and the agents")
    p.add_argument("--rounds", type=int, required=True, help="rounds to train (each publishes a version)")
    p.add_argument("--min-clients", type=int, required=True, help="updates needed to close a round")
    p.add_argument("--clients-per-round", type=int, default=0, help="agents selected per round (0: all)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds a round waits for updates")
    p.add_argument("--eval", default="", metavar="SPEC",
                   help="held-out data in the cloud, a data spec for the task's load_data (digits for the zoo); "
                        "each new version is evaluated on it with the task's evaluate")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for the task's train and evaluate (an int, a float, true/false, else a "
                        "string); repeatable; overrides --config-file, and both override --epochs, --batch-size, "
                        "--lr and --mu (config keys epochs, batch_size, learning_rate, mu)")
    p.add_argument("--config-file", type=Path, default=None, metavar="FILE.json",
                   help="the task's config as a flat JSON object of plain values")
    p.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                   help="train only on agents with this label (`tandem edge --label`); repeatable, all must match")
    p.add_argument("--agents", default="", metavar="A,B,...", help="train only on these agents (default: any)")
    p.add_argument("--epochs", type=int, default=5, help="local epochs per round (config key epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="local batch size (config key batch_size)")
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate (config key learning_rate)")
    p.add_argument("--codec", default="none",
                   help="update codec: none (dense float32), fp16, int8, topk:F, topk:F+int8, or auto (chosen per "
                        "agent and round from its measured link)")
    p.add_argument("--downlink-codec", default="", help="codec of new versions sent as deltas (default: from --codec)")
    p.add_argument("--target-upload-seconds", type=float, default=2.0, help="with --codec auto: upload time to meet")
    p.add_argument("--strategy", default="fedavg", choices=strategies.names(), help="how the server applies a round's update")
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight")
    p.add_argument("--server-lr", type=float, default=0.0, help="server step size (0: the strategy's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and agent selection")
    p.add_argument("--max-update-bytes", type=int, default=0, help="largest update accepted (0: 256 MiB)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, with a progress bar on a terminal")
    life = p.add_argument_group("model lifecycle (docs/lifecycle.md)")
    life.add_argument("--promote", default="if-better", choices=("if-better", "on-complete", "never"),
                      help="at completion: if-better promotes the final version to serving if the model has none, "
                           "or if it beats the serving version on the --eval data; on-complete always; never leaves "
                           "it a candidate (default: if-better)")
    life.add_argument("--promote-metric", default="", metavar="NAME[:max|:min]",
                      help="the metric if-better compares (default: accuracy, higher is better, when the task's "
                           "evaluation has it, else loss, lower is better)")
    life.add_argument("--from-version", default="", metavar="N|serving",
                      help="warm start: train from this version instead of a seeded build")
    rollout_args(p)
    group = p.add_argument_group("defences against hostile agents, and privacy")
    group.add_argument("--aggregator", default="mean",
                       choices=aggregation.names(),
                       help="how updates are combined (mean: FedAvg weighted by examples; the others weigh agents "
                            "alike and run at the round's close)")
    group.add_argument("--trim-fraction", type=float, default=0.0, help="trimmed_mean: fraction cut from each end")
    group.add_argument("--hostile", type=int, default=0,
                       help="hostile agents per round to withstand; refused if the aggregator cannot with "
                            "--min-clients updates")
    group.add_argument("--krum-selected", type=int, default=0, help="multi_krum: updates averaged (0: n - f)")
    group.add_argument("--clip-norm", type=float, default=0.0, help="bound on each update's L2 norm (0: none)")
    group.add_argument("--clip-to-median", action="store_true", help="bound each round at its median update norm")
    group.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                       help="DP-FedAvg: Gaussian noise of std this x --clip-norm on the sum of updates (0: off)")
    group.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported")
    group.add_argument("--max-examples", type=int, default=0,
                       help="most examples one update may claim (0: 10^8); never more than its agent's Hello")
    group.add_argument("--weight-cap", type=float, default=0.0,
                       help="each update weighs at most this multiple of the round's median example count, "
                            "whatever the aggregator (0: 1.0, no agent outweighs the median one)")
    p.set_defaults(func=_start_command)
    for action, text, call in (("status", "print a job", _status), ("wait", "wait for a job to end, then print it", _wait),
                               ("stop", "stop a running job", _stop)):
        p = job_sub.add_parser(action, help=text)
        client_args(p)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true", help="print JSON")
        if action == "wait":
            p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
        p.set_defaults(func=admin_command(call))
    p = job_sub.add_parser("list", help="list jobs")
    client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=admin_command(_list))


def _start_command(args: argparse.Namespace) -> int:
    """Check the config and selection first: a mistake is one line and exit 2, nothing sent."""
    base = task_config.load_file(args.config_file) if args.config_file is not None else {}
    args.task_config = task_config.parse_pairs(args.config, base)
    task_config.parse_labels(args.select, "--select")
    args.agent_names = [name.strip() for name in args.agents.split(",") if name.strip()]
    return admin_command(_start)(args)


async def _start(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    spec = admin_pb2.JobSpec(
        model=args.model, rounds=args.rounds, min_clients=args.min_clients,
        clients_per_round=args.clients_per_round, round_deadline_seconds=args.deadline, eval=args.eval,
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, codec=args.codec, seed=args.seed,
        max_update_bytes=args.max_update_bytes, downlink_codec=args.downlink_codec,
        target_upload_seconds=args.target_upload_seconds, strategy=args.strategy, mu=args.mu,
        server_lr=args.server_lr, aggregator=args.aggregator, trim_fraction=args.trim_fraction,
        hostile_agents=args.hostile, krum_selected=args.krum_selected, clip_norm=args.clip_norm,
        clip_to_median=args.clip_to_median, dp_noise_multiplier=args.dp_noise_multiplier, dp_delta=args.dp_delta,
        max_examples=args.max_examples, weight_cap=args.weight_cap, select=args.select, agents=args.agent_names,
        promote=args.promote, promote_metric=args.promote_metric, from_version=args.from_version,
        rollout=rollout_policy(args),
    )
    task_config.to_proto(args.task_config, spec.config)
    job = await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))
    print(job.job_id, flush=True)
    if not args.wait:
        return 0
    done = await wait_job(stub, job.job_id, 0, echo=False, progress=True)
    print(f"job {done['job_id']}: {done['state']}, version {done['version']}")
    if done.get("message"):  # the promotion decision, or why it failed
        print(f"  {done['message']}")
    return 0 if done["state"] == "completed" else 1


async def _list(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    jobs = [job_dict(j) for j in (await stub.ListJobs(admin_pb2.ListJobsRequest())).jobs]
    if args.json:
        print(json.dumps(jobs, indent=2))
    for j in jobs if not args.json else []:
        print(f"{j['job_id']}  {j['state']:<10} {j['model']:<8} {round_progress(j)}")
    return 0


async def _status(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    job = job_dict(await stub.GetJob(admin_pb2.GetJobRequest(job_id=args.job_id)))
    _print_job(job, args.json)
    return _exit_code(job)


async def _wait(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    job = await wait_job(stub, args.job_id, args.timeout, echo=not args.json, progress=not args.json)
    if not args.json:  # the rounds were printed as they closed
        print(f"job {job['job_id']}: {job['state']}, version {job['version']}")
        if job.get("message"):
            print(f"  {job['message']}")
        return 0 if job["state"] == "completed" else 1
    _print_job(job, args.json)
    return _exit_code(job)


async def _stop(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    job = job_dict(await stub.StopJob(admin_pb2.StopJobRequest(job_id=args.job_id)))
    _print_job(job, args.json)
    return 0  # stopped as asked, whatever state the job ended in


def _exit_code(job: dict[str, Any]) -> int:
    return 0 if job["state"] in ("running", "completed") else 1


def _print_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2))
        return
    print(f"job {job['job_id']}: {job['state']}, model {job['model']}, {round_progress(job)}, version {job['version']}")
    print("  config: " + " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(job["config"].items())))
    for r in job["rounds"]:
        print("  " + round_line(r))
    for line in phase_lines(job["rounds"]):
        print("  " + line)
    for f in job["failures"]:
        times = f" ({f['count']} times)" if f["count"] > 1 else ""
        print(f"  round {f['round']}: {f['agent']} failed{times}: {f['reason']}: {f['detail']}")
    for e in job["excluded"]:
        print(f"  excluded {e['agent']}: {e['code']}: {e['reason']}")
    if job.get("message"):
        print(f"  {job['message']}")
