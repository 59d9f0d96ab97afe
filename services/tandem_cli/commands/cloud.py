"""`tandem cloud`: the coordinator, configured from its flags."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tandem_cli.options import Subparsers, certs_default, serving_args, serving_config, write_ready


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("cloud", help="run the coordinator")
    p.add_argument("--listen", default="0.0.0.0:7443", help="gRPC address (mutual TLS), HOST:PORT")
    p.add_argument("--certs", type=Path, default=certs_default(),
                   help="deployment certificate directory (env TANDEM_CERTS)")
    p.add_argument("--state", type=Path, required=True, help="state directory (SQLite and tensor files)")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between agent heartbeats")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    p.add_argument("--models", default="",
                   help="comma-separated tasks its Inference service serves (default: every registered task "
                        "that loads, as `tandem tasks` lists them; a PACKAGE.MODULE:ATTRIBUTE task must be named)")
    serving_args(p)
    p.add_argument("--upload-idle-seconds", type=float, default=120.0,
                   help="an upload that sends nothing for this long is ended (DEADLINE_EXCEEDED); what it "
                        "delivered is kept for a resume")
    group = p.add_argument_group("placement controller")
    group.add_argument("--placement-interval", type=float, default=1.0,
                       help="seconds between placement decisions (0: no controller; agents keep their flags)")
    group.add_argument("--prometheus-url", default=None,
                       help="read the controller's inputs from this Prometheus server (default: straight from "
                            "the cloud's /metrics and the agents' heartbeats)")
    group.add_argument("--alpha", type=float, default=0.0,
                       help="price of a byte sent between edge and cloud, in seconds (per deployment)")
    group.add_argument("--alpha-model", action="append", default=[], metavar="MODEL=ALPHA",
                       help="the price for one model; repeatable")
    group.add_argument("--cascade", action="append", default=[], metavar="MODEL=T[:CLOUD_MODEL]",
                       help="offer a cascade for MODEL as an option besides the split points; repeatable")
    group.add_argument("--min-dwell", type=float, default=5.0,
                       help="seconds a placement is kept at least, unless the agent's link changes at a point")
    group.add_argument("--confirm-ticks", type=int, default=2,
                       help="consecutive controller ticks on which a switch must save --min-gain")
    group.add_argument("--min-gain", type=float, default=0.10,
                       help="fraction of predicted latency a switch must save")
    group = p.add_argument_group("limits per agent (beyond them calls get RESOURCE_EXHAUSTED; others are not slowed)")
    group.add_argument("--agent-max-streams", type=int, default=32, help="streaming calls an agent has open at once")
    group.add_argument("--agent-requests-per-second", type=float, default=5000.0,
                       help="calls per second, sustained (bursts of twice as many)")
    group.add_argument("--agent-bytes-per-second", type=float, default=float(256 << 20),
                       help="request bytes per second, sustained (bursts of 1 GiB)")
    group.add_argument("--agent-heartbeats-per-second", type=float, default=5.0,
                       help="heartbeats per second on the control stream, sustained (bursts of five times as "
                            "many); above it the stream ends")
    group.add_argument("--agent-connects-per-second", type=float, default=1.0,
                       help="control streams opened per second, sustained (bursts of ten times as many, at "
                            "least 10); a new one replaces the agent's open one")
    group = p.add_argument_group("state volume")
    group.add_argument("--disk-reserve", type=parse_bytes, default="256M", metavar="BYTES",
                       help="free space on the state volume below which new uploads are refused with "
                            "RESOURCE_EXHAUSTED, kept for closing rounds (suffixes K, M, G, T: powers of 1024); "
                            "a few times the largest model")
    p.set_defaults(func=lambda args: asyncio.run(run_cloud(args)))


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """`256M` and the like as bytes (an argparse type)."""
    number, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if number[-1:] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 2G") from None
    if not 0 <= value < 1 << 62:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512M or 2G")
    return int(value)


async def run_cloud(args: argparse.Namespace) -> int:
    from cloud.app import CloudConfig, Coordinator
    from cloud.limits import LimitsConfig
    from cloud.placement import ControllerConfig
    from cloud.placement_policy import CascadeOption, PolicyConfig
    from tandem import lifecycle
    from tandem import placement as placement_mod

    alphas = {}
    for item in args.alpha_model:
        model, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--alpha-model {item!r} is not MODEL=ALPHA")
        alphas[model] = float(value)
    cascades = {}
    for item in args.cascade:
        model, sep, text = item.partition("=")
        chosen = placement_mod.parse(model, f"cascade:{text}") if sep else None
        if chosen is None or chosen.mode != "cascade":
            raise ValueError(f"--cascade {item!r} is not MODEL=T[:CLOUD_MODEL]")
        cascades[model] = CascadeOption(chosen.threshold, chosen.cloud_model)
    policy = PolicyConfig(alpha=args.alpha, alpha_per_model=alphas, min_dwell=args.min_dwell, min_gain=args.min_gain,
                          confirm_ticks=args.confirm_ticks, cascades=cascades)
    placement = ControllerConfig(interval=args.placement_interval, policy=policy) if args.placement_interval > 0 else None

    if not args.upload_idle_seconds > 0:
        raise ValueError(f"--upload-idle-seconds must be positive, got {args.upload_idle_seconds}")
    config = CloudConfig(
        listen=args.listen, certs=args.certs, state=args.state, metrics=args.metrics, health=args.health,
        heartbeat_interval=args.heartbeat, grace=args.grace, upload_idle_seconds=args.upload_idle_seconds,
        serving=serving_config(args),
        placement=placement, prometheus_url=args.prometheus_url,
        limits=LimitsConfig(max_streams=args.agent_max_streams, requests_per_second=args.agent_requests_per_second,
                            request_burst=max(1, int(2 * args.agent_requests_per_second)),
                            bytes_per_second=args.agent_bytes_per_second,
                            heartbeats_per_second=args.agent_heartbeats_per_second,
                            heartbeat_burst=max(1, int(5 * args.agent_heartbeats_per_second)),
                            connects_per_second=args.agent_connects_per_second,
                            connect_burst=max(10, int(10 * args.agent_connects_per_second))),
        disk_reserve=args.disk_reserve,
    )
    if args.agent_heartbeats_per_second * args.heartbeat < 2:
        raise ValueError(f"--agent-heartbeats-per-second {args.agent_heartbeats_per_second:g} would refuse agents "
                         f"that heartbeat every {args.heartbeat:g} s (--heartbeat); allow at least "
                         f"{2 / args.heartbeat:g}")
    lifecycle.CoreLog().install()  # TLS handshake failures: a count per interval, not a line each
    lifecycle.tune_for_serving(args.torch_threads)
    coordinator = Coordinator(config)
    stop = lifecycle.stop_event()
    await coordinator.start()
    if args.ready_file:
        write_ready(args.ready_file, {"port": coordinator.port, "metrics_port": coordinator.metrics_port,
                                      "health_port": coordinator.health_port})
    await stop.wait()
    await coordinator.stop()
    return 0
