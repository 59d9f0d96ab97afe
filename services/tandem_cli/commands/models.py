"""`tandem models`: the published model versions; `tandem models verify`: their files,
checked offline against the recorded hashes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tandem.v1 import admin_pb2_grpc
from tandem_cli.admin import admin_command, model_rows
from tandem_cli.options import Subparsers, client_args


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("models", help="list published model versions")
    client_args(p)
    p.add_argument("--model", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=admin_command(_models))
    actions = p.add_subparsers(dest="models_command", metavar="ACTION")
    v = actions.add_parser(
        "verify", help="check every version's file in a state directory against its recorded hash, offline",
        description="Hash every model version's file (and every recorded delta) in a coordinator's state "
                    "directory against its record, changing nothing. Exit 0 when all match, 1 with one line "
                    "per bad file.",
    )
    v.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
    v.set_defaults(func=_verify)


async def _models(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    rows = await model_rows(stub, args.model)
    for row in rows if not args.json else []:
        print(f"{row['model']:<10} v{row['version']:<5} {row['sha256'][:16]}  job {row['job_id']} round {row['round']}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from cloud.integrity import verify_state  # the store and SQLite: loaded for this command alone

    checked, bad = verify_state(args.state)
    for line in bad:
        print(line)
    print(f"{checked} files checked: {'all match their recorded hashes' if not bad else f'{len(bad)} corrupt'}")
    return 1 if bad else 0
