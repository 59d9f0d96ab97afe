"""What several commands share: the type of a command module, the client and serving
flags, and the ready file that tells a parent process a server is up."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    from cloud.serving import ServingConfig
    from tandem.v1 import admin_pb2

# A string, so the private generic is only subscripted by the type checker.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Handler: TypeAlias = Callable[[argparse.Namespace], int]


class Command(Protocol):
    """A command module: `register` adds its parser(s), each with `set_defaults(func=HANDLER)`."""

    def register(self, subparsers: Subparsers) -> None: ...


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def certs_default() -> Path:
    """--certs when not given: env TANDEM_CERTS, else .certs."""
    return Path(env("TANDEM_CERTS", ".certs") or ".certs")


def client_args(parser: argparse.ArgumentParser) -> None:
    """--cloud and --certs: where the coordinator is and who we are to it."""
    parser.add_argument("--cloud", default=env("TANDEM_CLOUD", "localhost:7443"),
                        help="coordinator address HOST:PORT (env TANDEM_CLOUD; default %(default)s)")
    parser.add_argument("--certs", type=Path, default=certs_default(),
                        help="deployment certificate directory (env TANDEM_CERTS; default %(default)s)")


def rollout_args(parser: argparse.ArgumentParser) -> None:
    """--canary and its thresholds: how a promotion reaches the edge (read by `rollout_policy`)."""
    from cloud.canary import RolloutPolicy  # plain values: no torch, no SQLite

    d = RolloutPolicy()
    group = parser.add_argument_group("staged rollout to the edge (docs/lifecycle.md)")
    group.add_argument("--canary", default="", metavar="N%|A,B",
                       help="serve the promoted version on N%% of the agents serving the model (at least one), or "
                            "on these agents, first; it reaches everyone only if it does not regress within the "
                            "window, and is rolled back automatically otherwise (default: everyone at once)")
    group.add_argument("--canary-window", type=float, default=d.window, metavar="SECONDS",
                       help="the canary serves at least this long before the rollout proceeds")
    group.add_argument("--canary-min-requests", type=int, default=d.min_requests, metavar="N",
                       help="... and answers at least this many requests; no verdict before")
    group.add_argument("--canary-max-error-rate", type=float, default=d.max_error_rate, metavar="RATE",
                       help="roll back if the canary's error rate exceeds the other agents' by more than this")
    group.add_argument("--canary-max-latency-ratio", type=float, default=d.max_latency_ratio, metavar="X",
                       help="roll back if the canary's mean latency exceeds X times the other agents'")
    group.add_argument("--canary-min-agreement", type=float, default=d.min_agreement, metavar="FRACTION",
                       help="roll back if the canary agrees with the previous version on fewer of the same inputs")
    group.add_argument("--canary-max-confidence-drop", type=float, default=d.max_confidence_drop, metavar="DROP",
                       help="roll back if the canary's mean top-class confidence falls more than this below the "
                            "previous version's on the same inputs")


def rollout_policy(args: argparse.Namespace) -> admin_pb2.RolloutPolicy:
    from tandem.v1 import admin_pb2

    return admin_pb2.RolloutPolicy(
        canary=args.canary, window_seconds=args.canary_window, min_requests=args.canary_min_requests,
        max_error_rate=args.canary_max_error_rate, max_latency_ratio=args.canary_max_latency_ratio,
        min_agreement=args.canary_min_agreement, max_confidence_drop=args.canary_max_confidence_drop)


def serving_args(parser: argparse.ArgumentParser, device: str = "auto") -> None:
    """The inference flags of every process that serves Inference (read by `serving_config`)."""
    group = parser.add_argument_group("inference")
    group.add_argument("--device", default=device, help="where models run: auto (cuda if present), cpu, cuda[:N]")
    group.add_argument("--max-batch", type=int, default=64, help="rows gathered into one forward pass")
    group.add_argument("--max-delay-ms", type=float, default=2.0,
                       help="longest a request waits for its batch to fill, in milliseconds")
    group.add_argument("--max-queue-rows", type=int, default=8192,
                       help="rows waiting at most; beyond it requests get RESOURCE_EXHAUSTED")
    group.add_argument("--max-request-rows", type=int, default=1024, help="rows one request may carry")
    group.add_argument("--inline-below-ms", type=float, default=1.0,
                       help="a batch predicted to take less runs on the event loop, not the worker thread "
                            "(CPU only; 0: never)")
    group.add_argument("--torch-threads", type=int, default=0,
                       help="torch intra-op threads (0: one fewer than the cores, leaving one to gRPC)")


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The inference flags that `tandem cloud` and `tandem serve` share."""
    from cloud.serving import ServingConfig

    return ServingConfig(
        device=args.device, max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000,
        max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
        inline_below=args.inline_below_ms / 1000, models=tuple(m for m in args.models.split(",") if m),
    )


def check_address(flag: str, value: str) -> None:
    """ValueError (one line, exit 2) unless `value` is HOST:PORT with a port in 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {value!r} is not HOST:PORT")


def write_ready(path: Path, ports: dict[str, int]) -> None:
    """Bound ports as JSON, written atomically, for whoever started this process."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    tmp.replace(path)
