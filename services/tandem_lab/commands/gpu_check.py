"""`python -m tandem_lab gpu-check`: cloud inference batching and split paths on cuda, checked against CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from tandem_cli.options import Subparsers


def register(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("gpu-check", help="cloud inference batching and split paths on cuda, checked against CPU")
    p.add_argument("--device", default="cuda", help="device to check (skips when it is cuda and there is none)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    p.set_defaults(func=_gpu_check)


def _gpu_check(args: argparse.Namespace) -> int:
    from tandem_lab.gpu_check import run_gpu_check  # torch, only when it runs

    return run_gpu_check(args)
