"""`tandem models`: the installed tasks, each model's serving version and its versions;
`promote`, `rollback`, `history` and `publish` (docs/lifecycle.md); `verify`: the
files of a state directory, checked offline against the recorded hashes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli.admin import admin_command, model_rows, publish_messages, rollout_dict, rollout_line
from tandem_cli.options import Subparsers, client_args, rollout_args, rollout_policy


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="installed tasks, serving versions and every version; promote, roll back, publish",
        description="Without an action: every task installed on the coordinator and every model with a version, "
                    "its serving version (what inference answers with when a request names none), then each "
                    "version with its stage (serving, retired, candidate), origin and metrics.",
    )
    client_args(p)
    p.add_argument("--model", default="", help="only this model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=admin_command(_models))
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    a = actions.add_parser("promote", help="make a version the model's serving one",
                           description="Serve VERSION by default: the cloud, replicas and edge agents that serve "
                                       "the model switch to it. Recorded with your certificate's identity. With "
                                       "--canary, a share of the edge agents serves it first (a staged rollout); "
                                       "promoting the version in canary without --canary completes its rollout now.")
    client_args(a)
    a.add_argument("model")
    a.add_argument("version", type=int)
    a.add_argument("--reason", default="", help="why, for the history")
    rollout_args(a)
    a.set_defaults(func=admin_command(_promote))
    a = actions.add_parser("rollback", help="serve again the version that served before the current one",
                           description="Serve again the version that served before the current one; during a "
                                       "staged rollout, abort it instead (its canary agents serve the serving "
                                       "version again).")
    client_args(a)
    a.add_argument("model")
    a.add_argument("--reason", default="", help="why, for the history")
    a.set_defaults(func=admin_command(_rollback))
    a = actions.add_parser("history", help="a model's versions (origin, metrics, stage) and promotion events")
    client_args(a)
    a.add_argument("model")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=admin_command(_history))
    a = actions.add_parser("publish", help="publish a safetensors file as a new candidate version",
                           description="Upload FILE (the task's federated tensors, float32, as `tandem tasks` "
                                       "counts them) through Admin.PublishModel; the coordinator checks it against "
                                       "the task. It becomes a candidate; --promote serves it at once.")
    client_args(a)
    a.add_argument("model")
    a.add_argument("file", type=Path, metavar="FILE.safetensors")
    a.add_argument("--promote", action="store_true", help="make it the serving version once published")
    a.set_defaults(func=_publish_command)
    v = actions.add_parser(
        "verify", help="check every version's file in a state directory against its recorded hash, offline",
        description="Hash every model version's file (and every recorded delta) in a coordinator's state "
                    "directory against its record, changing nothing. Exit 0 when all match, 1 with one line "
                    "per bad file.",
    )
    v.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
    v.set_defaults(func=_verify)


def _metrics(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _version_line(row: dict[str, Any]) -> str:
    origin = row["origin"] or "?"
    if origin in ("round", "initial"):
        origin = f"{origin} (job {row['job_id']}{' round ' + str(row['round']) if origin == 'round' else ''})"
    return (f"{row['model']:<10} v{row['version']:<5} {row['stage']:<9} {row['sha256'][:16]}  {origin}"
            f"{'  ' + _metrics(row['metrics']) if row['metrics'] else ''}")


async def _models(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    response = await stub.ListModelVersions(admin_pb2.ListModelVersionsRequest(model=args.model))
    summaries = [{"model": m.model, "installed": m.installed, "serving_version": m.serving_version,
                  "versions": m.versions, "newest_version": m.newest_version,
                  "rollout": rollout_dict(m.rollout) if m.HasField("rollout") else None} for m in response.models]
    rows = await model_rows(stub, args.model)
    if args.json:
        print(json.dumps({"models": summaries, "versions": rows}, indent=2))
        return 0
    print(f"{'MODEL':<24} {'INSTALLED':<9} {'SERVING':<8} VERSIONS")
    for m in summaries:
        serving = f"v{m['serving_version']}" if m["serving_version"] else "none"
        print(f"{m['model']:<24} {'yes' if m['installed'] else 'no':<9} {serving:<8} {m['versions']}")
    for m in summaries:
        if m["rollout"] is not None:
            print(rollout_line(m["rollout"]))
    if rows:
        print()
    for row in rows:
        print(_version_line(row))
    return 0


async def _promote(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    v = await stub.PromoteModel(admin_pb2.PromoteModelRequest(model=args.model, version=args.version,
                                                              reason=args.reason, rollout=rollout_policy(args)))
    if v.stage == "canary":
        [summary] = (await stub.ListModelVersions(admin_pb2.ListModelVersionsRequest(model=v.model))).models
        print(f"{v.model} v{v.version} is rolling out: on {', '.join(summary.rollout.canary_agents)} first, the rest "
              f"serve v{summary.serving_version} (`tandem models` shows how it stands)")
    else:
        print(f"{v.model} v{v.version} is serving")
    return 0


async def _rollback(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    v = await stub.RollbackModel(admin_pb2.RollbackModelRequest(model=args.model, reason=args.reason))
    print(f"{v.model} v{v.version} is serving again")
    return 0


async def _history(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    history = await stub.GetModelHistory(admin_pb2.GetModelHistoryRequest(model=args.model))
    from tandem_cli.admin import version_dict

    versions = [version_dict(v) for v in history.versions]
    events = [{"event": e.event, "version": e.version, "previous": e.previous, "actor": e.actor,
               "reason": e.reason, "at": e.at.ToDatetime().isoformat(timespec="seconds") + "Z"}
              for e in history.events]
    rollouts = [rollout_dict(r) for r in history.rollouts]
    if args.json:
        print(json.dumps({"model": history.model, "serving_version": history.serving_version,
                          "versions": versions, "events": events, "rollouts": rollouts}, indent=2))
        return 0
    serving = f"v{history.serving_version}" if history.serving_version else "none"
    print(f"{history.model}: serving {serving}")
    for row in versions:
        print("  " + _version_line(row))
    for e in events:
        was = f"v{e['previous']}" if e["previous"] else "none"
        print(f"  {e['at']}  {e['event']:<18} v{e['version']:<5} (was {was}) by {e['actor']}: {e['reason']}")
    for r in rollouts:
        print(f"  {r['started']}  {rollout_line(r)}")
    return 0


def _publish_command(args: argparse.Namespace) -> int:
    """Read the file first: one that is not a safetensors file is one line and exit 2, nothing sent."""
    from cloud.tensorfile import read_tensors

    try:
        args.arrays = read_tensors(args.file)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one line
        raise ValueError(f"{args.file}: not a readable safetensors file ({exc})") from None
    return admin_command(_publish)(args)


async def _publish(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    v = await stub.PublishModel(iter(publish_messages(args.model, args.arrays)))
    print(f"published {v.model} v{v.version} (a candidate; sha256 {v.sha256[:16]})")
    if args.promote:
        promoted = await stub.PromoteModel(admin_pb2.PromoteModelRequest(
            model=v.model, version=v.version, reason=f"published from {args.file.name} with --promote"))
        print(f"{promoted.model} v{promoted.version} is serving")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cloud.integrity import verify_state  # the store and SQLite: loaded for this command alone

    checked, bad = verify_state(args.state)
    for line in bad:
        print(line)
    print(f"{checked} files checked: {'all match their recorded hashes' if not bad else f'{len(bad)} corrupt'}")
    return 1 if bad else 0
