"""`tandem agents`: the agents the coordinator knows, connected or not."""

from __future__ import annotations

import argparse
import json

from tandem.v1 import admin_pb2_grpc
from tandem_cli.admin import admin_command, agent_line, agent_rows
from tandem_cli.options import Subparsers, client_args


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("agents", help="list agents the coordinator knows, with their labels and task offers")
    client_args(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON: every field, measurements and each offer's fingerprint and reason included")
    p.set_defaults(func=admin_command(_agents))


async def _agents(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    rows = await agent_rows(stub)
    for row in rows if not args.json else []:
        print(agent_line(row))
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0
