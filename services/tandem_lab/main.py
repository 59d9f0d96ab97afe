"""`python -m tandem_lab`: the benchmarks and the GPU check, as subcommands built like the
`tandem` command's. The scenarios and fuzzers keep their own module entry points
(`python -m tandem_lab.reliability`, `.fuzz`, `.bench_placement`)."""

from __future__ import annotations

import argparse
import sys

from tandem_cli.main import command_parser, run
from tandem_cli.options import Command
from tandem_lab.commands import bench, gpu_check

COMMANDS: tuple[Command, ...] = (bench, gpu_check)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("python -m tandem_lab", "Tandem's lab: benchmarks and checks that write JSON results.",
                          COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
