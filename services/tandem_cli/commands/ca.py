"""`tandem ca`: the enrollment service, which issues short-lived agent certificates
from an intermediate CA against one-time tokens (docs/security.md, "Enrollment")."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tandem_cli.options import Subparsers, write_ready


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("ca", help="run the enrollment service that issues agent certificates for tokens")
    p.add_argument("--dir", type=Path, required=True,
                   help="the intermediate CA's directory (`tandem certs intermediate --out DIR`): its certificate "
                        "and key, the root's certificate, and the deny list revoked.txt (may be read-only)")
    p.add_argument("--state", type=Path, default=None,
                   help="writable directory for the token database (default: --dir)")
    p.add_argument("--listen", default="0.0.0.0:7445", help="address HOST:PORT to serve enrollment on (TLS)")
    p.add_argument("--renew-listen", default="0.0.0.0:7446",
                   help="address HOST:PORT to serve renewals on (mutual TLS with the agent's current certificate); "
                        "'none' for no renewals")
    p.add_argument("--hosts", default="",
                   help="names or IPs agents reach this service by, comma-separated (localhost and 127.0.0.1 always)")
    p.add_argument("--cert-hours", type=float, default=24.0, help="lifetime of the agent certificates it issues")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    p.set_defaults(func=lambda args: asyncio.run(run_ca(args)))


async def run_ca(args: argparse.Namespace) -> int:
    from cloud.enrollment import CaConfig, CaServer
    from tandem import lifecycle

    hosts = [h for h in args.hosts.split(",") if h]
    renew_listen = None if args.renew_listen == "none" else args.renew_listen
    server = CaServer(CaConfig(ca_dir=args.dir, listen=args.listen, renew_listen=renew_listen, hosts=hosts,
                               cert_hours=args.cert_hours, metrics=args.metrics, state_dir=args.state))
    stop = lifecycle.stop_event()
    await server.start()
    if args.ready_file:
        write_ready(args.ready_file, {"port": server.port, "renew_port": server.renew_port,
                                      "metrics_port": server.metrics_port})
    await stop.wait()
    await server.stop()
    return 0
