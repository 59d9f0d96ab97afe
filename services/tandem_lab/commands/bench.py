"""`python -m tandem_lab bench fl|auto|infer`: benchmarks of the running system that write JSON results."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from tandem_cli.options import Subparsers


def register(subparsers: Subparsers) -> None:
    p_bench = subparsers.add_parser("bench", help="benchmarks that write JSON results")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bench_sub.add_parser("fl", help="federated training of the reference workload, per codec")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--codec", default="none,topk:0.01+int8", help="comma-separated codecs to run")
    p.add_argument("--server-lr", type=float, default=0.0, help="override the strategy's server step")
    p.add_argument("--rss-agents", type=int, default=0, help="also measure coordinator memory with this many agents")
    p.add_argument("--flower", default=None, metavar="PYTHON",
                   help="also run the workload on Flower with this interpreter (one with flwr==1.42.0 and "
                        "torch==2.13.0 installed): seconds per round against Flower's")
    p.add_argument("--rate", default=None, metavar="RATE",
                   help="put every agent and every Flower client in a network namespace of its own behind a link "
                        "shaped to RATE both ways (tc syntax, e.g. 20mbit; needs root)")
    p.add_argument("--rtt", default=None, metavar="RTT",
                   help="with --rate: round-trip time added on each link (e.g. 40ms), by a delay relay")
    p.add_argument("--out", type=Path, default=Path("bench/results/fl.json"))
    p.set_defaults(func=_fl)

    p = bench_sub.add_parser("auto", help="codec auto vs fixed codecs, two agents behind a shaped link (root)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rate", default="1mbit", help="bandwidth of the shaped link, both directions (tc syntax)")
    p.add_argument("--target", type=float, default=1.0, help="target upload seconds for codec auto")
    p.add_argument("--codec", default="none,auto")
    p.add_argument("--out", type=Path, default=Path("bench/results/auto.json"))
    p.set_defaults(func=_auto)

    p = bench_sub.add_parser("infer", help="inference serving under load: throughput, latency, hot swaps, edge")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds of each load run")
    p.add_argument("--swap-seconds", type=float, default=30.0, help="seconds of the hot-swap run")
    p.add_argument("--swap-interval", type=float, default=3.0, help="seconds between publications in it")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients of single-row runs")
    p.add_argument("--clients-per-channel", type=int, default=16, help="clients sharing one gRPC channel")
    p.add_argument("--big-rows", type=int, default=256, help="rows per request of the large-request run")
    p.add_argument("--big-clients", type=int, default=8, help="concurrent clients of the large-request run")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the cloud's batching delay")
    p.add_argument("--inline-below-ms", type=float, default=None,
                   help="the cloud's --inline-below-ms (default: the cloud's own default)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads of the cloud and of the compute ceiling (0: one fewer than the cores)")
    p.add_argument("--edge-clients", type=int, default=16, help="concurrent clients of runs through the edge")
    p.add_argument("--thresholds", type=lambda s: [float(t) for t in s.split(",") if t],
                   default=[0.0, 0.5, 0.7, 0.9, 0.99, 1.01], help="cascade thresholds, comma-separated")
    p.add_argument("--small-epochs", type=int, default=8, help="central training of mlp-small (the edge model)")
    p.add_argument("--small-lr", type=float, default=0.1)
    p.add_argument("--heavy-epochs", type=int, default=30, help="central training of mlp-heavy (the cloud model)")
    p.add_argument("--heavy-lr", type=float, default=0.02, help="plain SGD on mlp-heavy diverges at 0.05 and 0.1")
    p.add_argument("--no-edge", action="store_true", help="skip the placements and cascade through an edge agent")
    p.add_argument("--work", type=Path, default=None, help="keep certificates, logs and raw runs here")
    p.add_argument("--out", type=Path, default=Path("bench/results/infer.json"))
    p.set_defaults(func=_infer)


# The benchmarks import torch and the servers: only when one runs, not for --help.
def _fl(args: argparse.Namespace) -> int:
    if args.rate or args.rtt:
        from tandem_lab.bench_shaped import refusal

        reason = refusal(args.rate, args.rtt, args.clients)
        if reason:
            print(f"bench fl: cannot shape the links: {reason}", file=sys.stderr)
            return 2
    from tandem_lab.bench import run_bench_fl

    return asyncio.run(run_bench_fl(args))


def _auto(args: argparse.Namespace) -> int:
    from tandem_lab.bench_auto import run_bench_auto

    return asyncio.run(run_bench_auto(args))


def _infer(args: argparse.Namespace) -> int:
    from tandem_lab.bench_infer import run_bench_infer

    return asyncio.run(run_bench_infer(args))
