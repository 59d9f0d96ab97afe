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
    group.add_argument("--torch-threads", type=int, default=0,
                       help="torch intra-op threads (0: one fewer than the cores, leaving one to gRPC)")


def serving_config(args: argparse.Namespace) -> ServingConfig:
    """The inference flags that `tandem cloud` and `tandem serve` share."""
    from cloud.serving import ServingConfig

    return ServingConfig(
        device=args.device, max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000,
        max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
        models=tuple(m for m in args.models.split(",") if m),
    )


def write_ready(path: Path, ports: dict[str, int]) -> None:
    """Bound ports as JSON, written atomically, for whoever started this process."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    tmp.replace(path)
