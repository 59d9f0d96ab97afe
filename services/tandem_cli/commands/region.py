"""`tandem region`: a regional aggregator, configured from its flags."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tandem_cli.options import Subparsers, certs_default, check_address, write_ready


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "region", help="run a regional aggregator: a coordinator to its agents, one member to its parent",
        description="A coordinator to the agents of its region (they connect with --cloud set to its --listen) "
                    "and one member to its parent, with the certificate of `tandem certs add-region NAME`. Each "
                    "training task of the parent becomes one round over the region's agents, from the parent's "
                    "version (fetched once, served here), and goes up as one partial aggregate. "
                    "See docs/scale-out.md.")
    p.add_argument("--parent", required=True, metavar="HOST:PORT",
                   help="the parent coordinator: the cloud's gRPC address, or a region above this one")
    p.add_argument("--id", required=True, help="region name; its certificate is CERTS/regions/ID.pem")
    p.add_argument("--certs", type=Path, default=certs_default(),
                   help="deployment certificate directory (env TANDEM_CERTS)")
    p.add_argument("--listen", default="0.0.0.0:7443", help="gRPC address for the region's agents (mutual TLS)")
    p.add_argument("--state", type=Path, required=True, help="state directory (SQLite and tensor files)")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--min-clients", type=int, default=1,
                   help="agents of this region a round needs before it goes up to the parent")
    p.add_argument("--clients-per-round", type=int, default=0,
                   help="agents of this region a round selects (0: every eligible connected one)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between its agents' heartbeats")
    p.add_argument("--tasks", default=None, metavar="A,B,...",
                   help="comma-separated tasks offered to the parent (default: every installed task)")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    p.set_defaults(func=lambda args: asyncio.run(run_region(args)))


async def run_region(args: argparse.Namespace) -> int:
    from region.app import Region, RegionConfig

    from tandem import certs, lifecycle, tasks

    check_address("--parent", args.parent)
    certs.validate_name(args.id)
    names = None
    if args.tasks is not None:
        names = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
        if not names or not all(tasks.valid_name(name) for name in names):
            raise ValueError(f"--tasks {args.tasks!r}: expected comma-separated task names")
    lifecycle.CoreLog().install()
    lifecycle.tune_for_serving(0)
    region = Region(RegionConfig(
        parent=args.parent, name=args.id, certs=args.certs, listen=args.listen, state=args.state,
        metrics=args.metrics, health=args.health, min_clients=args.min_clients,
        clients_per_round=args.clients_per_round, heartbeat_interval=args.heartbeat, tasks=names,
    ))
    stop = lifecycle.stop_event()
    await region.start()
    if args.ready_file:
        write_ready(args.ready_file, {"port": region.port, "metrics_port": region.coordinator.metrics_port,
                                      "health_port": region.coordinator.health_port})
    await stop.wait()
    await region.stop()
    return 0
