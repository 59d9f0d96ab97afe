"""`tandem models`: the published model versions."""

from __future__ import annotations

import argparse
import json

from tandem.v1 import admin_pb2_grpc
from tandem_cli.admin import admin_command, model_rows
from tandem_cli.options import Subparsers, client_args


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("models", help="list published model versions")
    client_args(p)
    p.add_argument("--model", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=admin_command(_models))


async def _models(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    rows = await model_rows(stub, args.model)
    for row in rows if not args.json else []:
        print(f"{row['model']:<10} v{row['version']:<5} {row['sha256'][:16]}  job {row['job_id']} round {row['round']}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
