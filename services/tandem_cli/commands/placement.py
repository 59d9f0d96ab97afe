"""`tandem placement show|pin|unpin`: where agents run each model, over the Admin API."""

from __future__ import annotations

import argparse
import json

from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli.admin import admin_command, placement_row
from tandem_cli.options import Subparsers, client_args


def register(subparsers: Subparsers) -> None:
    p_place = subparsers.add_parser("placement", help="read, pin and unpin where agents run each model")
    place_sub = p_place.add_subparsers(dest="placement_command", required=True, metavar="ACTION")
    p = place_sub.add_parser("show", help="placements with the predicted cost of each split point")
    client_args(p)
    p.add_argument("--agent", default="", help="only this agent (default: all)")
    p.add_argument("--model", default="", help="only this model (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=admin_command(_show))
    p = place_sub.add_parser("pin", help="fix an agent's placement for a model until unpinned")
    client_args(p)
    p.add_argument("agent")
    p.add_argument("model")
    p.add_argument("placement", help="edge, cloud, split:K or cascade:T[:CLOUD_MODEL]")
    p.set_defaults(func=admin_command(_pin))
    p = place_sub.add_parser("unpin", help="hand a placement back to the controller")
    client_args(p)
    p.add_argument("agent")
    p.add_argument("model")
    p.set_defaults(func=admin_command(_unpin))


async def _show(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    listed = await stub.ListPlacements(admin_pb2.ListPlacementsRequest(agent=args.agent, model=args.model))
    return _print(args, list(listed.placements))


async def _pin(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    request = admin_pb2.PinPlacementRequest(agent=args.agent, model=args.model, placement=args.placement)
    return _print(args, [await stub.PinPlacement(request)])


async def _unpin(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    return _print(args, [await stub.UnpinPlacement(admin_pb2.UnpinPlacementRequest(agent=args.agent, model=args.model))])


def _print(args: argparse.Namespace, infos: list[admin_pb2.PlacementInfo]) -> int:
    rows = [placement_row(p) for p in infos]
    if getattr(args, "json", False):  # pin and unpin have no --json
        print(json.dumps(rows, indent=2))
        return 0
    if rows:
        # Each k is a split point: stages 1..k at the agent, the rest in the cloud (k0: all
        # in the cloud, the last k: all at the edge), with the controller's cost J(k) of it
        # (README, "Adaptive placement"); PLACEMENT is the k chosen, or a pin.
        print(f"{'AGENT':<16} {'MODEL':<10} {'PLACEMENT':<18} {'PINNED':<7} "
              "COST J(k) OF EACH SPLIT POINT k (stages 1..k at the edge)")
    for row in rows:
        costs = " ".join(f"k{k}={1000 * c:.1f}ms" for k, c in enumerate(row["predicted_seconds"]))
        print(f"{row['agent']:<16} {row['model']:<10} {row['placement']:<18} {'pinned' if row['pinned'] else '':<7} "
              f"{costs}")
    return 0
