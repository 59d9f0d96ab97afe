"""`tandem serve`: a cloud inference replica that mirrors the coordinator's models."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tandem_cli.options import Subparsers, client_args, serving_args, serving_config, write_ready


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("serve", help="run a cloud inference replica that follows the coordinator's models")
    client_args(p)
    p.add_argument("--listen", default="0.0.0.0:7450", help="Inference address (mutual TLS), HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--cache", type=Path, required=True, help="directory for the mirrored model files")
    p.add_argument("--models", default="", help="comma-separated tasks to serve (default: every registered task that loads)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between looks for new versions")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    serving_args(p)
    p.set_defaults(func=lambda args: asyncio.run(run_serve(args)))


async def run_serve(args: argparse.Namespace) -> int:
    from cloud.replica import Replica, ReplicaConfig
    from tandem import lifecycle

    config = ReplicaConfig(
        cloud=args.cloud, certs=args.certs, listen=args.listen, cache=args.cache,
        health=args.health, metrics=args.metrics, poll_interval=args.poll_interval,
        serving=serving_config(args),
    )
    lifecycle.CoreLog().install()  # TLS handshake failures: a count per interval, not a line each
    lifecycle.tune_for_serving(args.torch_threads)
    replica = Replica(config)
    stop = lifecycle.stop_event()
    await replica.start()
    if args.ready_file:
        write_ready(args.ready_file, {"port": replica.port, "metrics_port": replica.metrics_port,
                                      "health_port": replica.health_port})
    await replica.run(stop)
    return 0
