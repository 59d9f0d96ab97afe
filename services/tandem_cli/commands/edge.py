"""`tandem edge`: an edge agent, configured from its flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from tandem_cli.options import Subparsers, check_address, client_args, serving_args, write_ready


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("edge", help="run an edge agent")
    client_args(p)
    p.add_argument("--id", required=True, help="agent name; its certificate is CERTS/agents/ID.pem")
    p.add_argument("--data", required=True,
                   help="local data: digits:I/N (partition I of N, 0-based, of the reference workload) "
                        "or a directory of .npz/.safetensors files with arrays x and y")
    p.add_argument("--tasks", default=None, metavar="A,B,...",
                   help="comma-separated tasks this agent may train: short names (`tandem tasks` lists them) or "
                        "PACKAGE.MODULE:ATTRIBUTE (default: every registered task that loads; a task named here "
                        "that is not installed stops the agent at start)")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="a label jobs select agents by (`tandem job start --select`); repeatable")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip warming torch and the tasks up at start (by default the agent pays torch's first-use "
                        "costs before it connects, so that a job's first round is as fast as the others)")
    p.add_argument("--listen", default=None,
                   help="serve Inference (mutual TLS) to local applications at HOST:PORT")
    p.add_argument("--placement", action="append", default=[], metavar="MODEL=MODE",
                   help="where MODEL's requests run: edge, cloud, split:K (stages 1..K here, the rest in the "
                        "cloud) or cascade:T[:CLOUD_MODEL] (the cloud answers when the edge's confidence is "
                        "below T); repeatable; models not named run at the edge. The cloud's placement "
                        "controller replaces these as it decides (`tandem placement pin` fixes one)")
    p.add_argument("--fallback", action="append", default=[], metavar="HOST:PORT",
                   help="another coordinator (another region, or the cloud) tried when a connect to the current one "
                        "fails; repeatable, tried in order, then --cloud again")
    p.add_argument("--inference-cloud", default=None, metavar="HOST:PORT",
                   help="where cloud and split inference requests go, e.g. the inference replicas' Service "
                        "(default: the coordinator at --cloud)")
    p.add_argument("--cloud-timeout", type=float, default=1.0,
                   help="seconds a cloud call may take when the request sets no deadline; then the edge answers")
    p.add_argument("--probe-interval", type=float, default=2.0,
                   help="seconds between link probes while no request measures the link")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    p.add_argument("--enroll", default=None, metavar="HOST:PORT",
                   help="enrol at this `tandem ca` service when CERTS has no usable certificate for --id (none yet, or "
                        "expired): the agent makes its own key (0600, never sent) and gets a short-lived certificate "
                        "(needs --enroll-token-file and --ca-file)")
    p.add_argument("--renew", default=None, metavar="HOST:PORT",
                   help="renew the certificate at this `tandem ca` renewal port once two thirds of its life have "
                        "passed, without a restart (default with --enroll: its host, the next port)")
    p.add_argument("--enroll-token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the one-time token of `tandem certs token ID`")
    p.add_argument("--ca-file", type=Path, default=None, metavar="CA.pem",
                   help="the deployment's root CA bundle, which authenticates the enrollment service; copied to "
                        "CERTS/ca.pem when that is missing")
    serving_args(p, device="cpu")
    p.set_defaults(func=lambda args: asyncio.run(run_edge(args)))


async def run_edge(args: argparse.Namespace) -> int:
    from edge.agent import AgentConfig
    from edge.app import EdgeApp
    from tandem import config as task_config
    from tandem import lifecycle, tasks

    labels = task_config.parse_labels(args.label)  # one line and exit 2 when malformed, before anything starts
    for fallback in args.fallback:
        check_address("--fallback", fallback)
    names = None
    if args.tasks is not None:
        names = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
        bad = [name for name in names if not tasks.valid_name(name)]
        if not names or bad:
            raise ValueError(f"--tasks {args.tasks!r}: expected comma-separated task names "
                             "(short names or PACKAGE.MODULE:ATTRIBUTE)")
    renew = args.renew
    if args.enroll is not None:
        from edge import enroll

        renew = renew or enroll.default_renew_target(args.enroll)  # a malformed --enroll says so before anything
        await _enroll_if_needed(args)
    else:
        _check_not_expired(args)
    # TLS handshake failures, its port's and its own towards the cloud (a certificate the
    # cloud does not accept fails every reconnect): a count per interval, not a line each.
    lifecycle.CoreLog().install()
    # --threads (training, 1 by default, which keeps local training reproducible) unless
    # --torch-threads says otherwise.
    if not args.inline_below_ms >= 0:
        raise ValueError(f"--inline-below-ms must be >= 0 (0: never inline), got {args.inline_below_ms:g}")
    lifecycle.tune_for_serving(args.torch_threads or max(1, args.threads))
    config = AgentConfig(
        cloud=args.cloud, certs=args.certs, agent_id=args.id, data=args.data, metrics=args.metrics, health=args.health,
        listen=args.listen, inference_cloud=args.inference_cloud, placements=tuple(args.placement),
        cloud_timeout=args.cloud_timeout, tasks=names, labels=tuple(sorted(labels.items())),
        probe_interval=args.probe_interval, device=args.device, max_batch=args.max_batch,
        max_delay=args.max_delay_ms / 1000, max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
        inline_below=args.inline_below_ms / 1000, warmup=args.warmup, renew=renew, fallbacks=tuple(args.fallback),
    )
    app = EdgeApp(config)
    stop = lifecycle.stop_event()
    await app.start()
    if args.ready_file:
        write_ready(args.ready_file, {"inference_port": app.inference_port, "metrics_port": app.metrics_port,
                                      "health_port": app.health_port})
    await app.run(stop)
    return 0


async def _enroll_if_needed(args: argparse.Namespace) -> None:
    from edge import enroll

    if args.enroll_token_file is None or args.ca_file is None:
        raise ValueError("--enroll needs --enroll-token-file and --ca-file")
    why = enroll.needed(args.certs, args.id)
    if why is not None:
        logging.getLogger(__name__).info("agent %r enrols at %s: %s", args.id, args.enroll, why)
        await enroll.enroll(args.certs, args.id, enroll.EnrollConfig(args.enroll, args.enroll_token_file, args.ca_file))


def _check_not_expired(args: argparse.Namespace) -> None:
    """An agent started without --enroll on an expired certificate stops with one line
    (the coordinator would refuse every reconnect)."""
    from edge import enroll
    from tandem import certs

    why = enroll.needed(args.certs, args.id)
    if why is not None and why.startswith(enroll.EXPIRED):
        path = certs.agent_paths(args.certs, args.id)[0]
        raise ValueError(f"the certificate of agent {args.id!r} ({path}) {why.removeprefix('its certificate ')}: "
                         "enrol it again with a new token (--enroll, --enroll-token-file) or issue a new one "
                         "(`tandem certs add-agent`)")
