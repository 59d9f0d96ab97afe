"""The `tandem` command: certificates, the coordinator, edge agents, jobs, the demo.

Each subcommand is a module of `tandem_cli.commands` that registers its own parser and
handler; adding one touches that module and the list below.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from tandem_cli.commands import agents, ca, certs, cloud, demo, edge, infer, job, models, placement, region, serve, status, tasks
from tandem_cli.options import Command, Handler, env

# In the order `tandem --help` and the README's reference list them.
COMMANDS: tuple[Command, ...] = (
    certs, ca, cloud, region, edge, serve, job, placement, infer, status, agents, models, tasks, demo,
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and each option's default after its help (where it has
    one worth saying: not None, False or empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unsaid = default is None or default is False or default is argparse.SUPPRESS or (
            isinstance(default, str | list | tuple) and not default)
        if unsaid or "%(default)" in text or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every parser of the command, subcommands included (argparse makes them of the
    parent's class), says its defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)


def command_parser(prog: str, description: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    """A parser with --log-level and one subcommand (or family) per module in `commands`."""
    parser = Parser(prog=prog, description=description)
    parser.add_argument("--log-level", default=env("TANDEM_LOG_LEVEL", "INFO"), help="logging level")
    sub: Any = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # of Parser
    for command in commands:
        command.register(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    return command_parser("tandem", "Cloud-edge collaborative AI.", COMMANDS)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, set up logging and call the chosen handler. gRPC errors and user mistakes
    end in one line on stderr (exit 1 and 2), not a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.func
    try:
        return handler(args)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
