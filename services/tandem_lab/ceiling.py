"""The compute ceiling of `python -m tandem_lab bench infer`: a model's forward pass, no gRPC,
timed in its own process with the torch settings of a serving process.

Measured in the bench's own process it was unreliable (0.25 and 1.08 of the same
server in two runs): that process held other threads and its torch used every core,
while the server's uses the cores left by its event loop. Here the process does nothing
else, takes `lifecycle.tune_for_serving` with the server's `--torch-threads`, and
reports the median of many short repetitions. It stays up for the whole bench and is
asked between the server runs (one JSON object a line on stdin, an answer a line on
stdout), so each ceiling is measured minutes from the run it is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import numpy as np


def forward_seconds(model: str, batch: int, reps: int, rep_seconds: float) -> list[float]:
    """Seconds of one forward pass of `model` on `batch` rows, one figure per repetition
    (each the mean of as many passes as fit in ~`rep_seconds`), after a warm-up."""
    import torch

    from tandem import zoo

    net = zoo.build_model(model).eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(batch, 64)).astype(np.float32))
    with torch.inference_mode():
        begin, loops = time.perf_counter(), 0
        while time.perf_counter() - begin < 0.2 or loops < 3:
            net(x)
            loops += 1
        per_rep = max(1, round(loops * rep_seconds / (time.perf_counter() - begin)))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(per_rep):
                net(x)
            times.append((time.perf_counter() - start) / per_rep)
    return times


def answer(request: dict[str, Any], threads: int) -> dict[str, Any]:
    times = forward_seconds(request["model"], int(request["batch"]), int(request.get("reps", 31)),
                            float(request.get("rep_seconds", 0.02)))
    seconds = statistics.median(times)
    return {"model": request["model"], "batch": int(request["batch"]), "torch_threads": threads,
            "forward_ms": seconds * 1000, "samples_per_second": int(request["batch"]) / seconds,
            "repetitions": len(times), "spread_ms": [min(times) * 1000, max(times) * 1000]}


class Ceiling:
    """The ceiling process, from the bench's side: start it, ask it, close it."""

    def __init__(self, torch_threads: int = 0) -> None:
        self.torch_threads = torch_threads
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tandem_lab.ceiling", "--torch-threads", str(self.torch_threads),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )

    async def measure(self, model: str, batch: float, reps: int = 31) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"model": model, "batch": max(1, round(batch)), "reps": reps}).encode()
                               + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError("the ceiling process exited")
        result: dict[str, Any] = json.loads(line)
        return result

    async def close(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            await asyncio.wait_for(self._proc.wait(), 30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_lab.ceiling", description=__doc__)
    parser.add_argument("--torch-threads", type=int, default=0, help="as the server's (0: one fewer than the cores)")
    args = parser.parse_args(argv)
    from tandem import lifecycle

    threads = lifecycle.tune_for_serving(args.torch_threads)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(answer(json.loads(line), threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
