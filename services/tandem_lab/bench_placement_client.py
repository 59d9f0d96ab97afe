"""The camera of `bench_placement`: run inside an agent's network namespace, it sends
one cnn frame at a steady rate (open loop: a slow answer never delays the next
send) to the agent's Inference port on 127.0.0.1, each request with a deadline, and
once a second reads the agent's own /metrics (placement in force, link view, local
fallbacks), so nothing it does crosses the shaped link.

Writes one JSON object to `--out` when `--seconds` are over or on SIGTERM/SIGINT:
`requests`: [send wall time, seconds, where it ran ("edge"/"split"/"cloud"/...) or "",
status ("OK" or the gRPC code)]; `samples`: [wall time, {metric: value}].
Imports no torch, so it starts fast and leaves the cores to the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tandem import grpcserver, tls, wire
from tandem.v1 import inference_pb2 as pb
from tandem.v1 import inference_pb2_grpc

# Agent metrics sampled each second (suffix-matched sample names).
SAMPLED = {
    "tandem_edge_placement_split_layer": "split",
    "tandem_edge_link_up": "link_up",
    "tandem_edge_link_rtt_seconds": "rtt",
    "tandem_edge_inference_fallbacks_total": "fallbacks",
    "tandem_edge_inference_examples_total": "examples",
}
RPC_TIMEOUT = 10.0  # a request still unanswered after this counts as failed


def where(placement: int) -> str:
    return pb.Placement.Name(placement).removeprefix("PLACEMENT_").lower()


def scrape(port: int) -> dict[str, float]:
    """The sampled metrics of the agent on 127.0.0.1:port (summed over labels, except up bytes/s)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in SAMPLED:
                key = SAMPLED[sample.name]
                values[key] = values.get(key, 0.0) + sample.value
            elif sample.name == "tandem_edge_link_bytes_per_second" and sample.labels.get("direction") == "up":
                values["up_bytes_per_second"] = sample.value
    return values


async def run(args: argparse.Namespace) -> dict[str, Any]:
    frame = np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)
    request = pb.InferRequest(model="cnn", input=wire.to_proto(frame), deadline_ms=args.deadline_ms)
    requests: list[list[Any]] = []
    samples: list[list[Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    credentials = tls.app_credentials(args.certs, "camera")
    async with grpcserver.secure_channel(f"localhost:{args.port}", credentials) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            sent, begin = time.time(), time.perf_counter()
            try:
                answer: pb.InferResponse = await stub.Infer(request, timeout=RPC_TIMEOUT)
                requests.append([sent, time.perf_counter() - begin, where(answer.placement), "OK"])
            except grpc.aio.AioRpcError as exc:
                requests.append([sent, time.perf_counter() - begin, "", exc.code().name])

        async def sampler() -> None:
            while True:
                try:
                    values = await asyncio.to_thread(scrape, args.metrics_port)
                    samples.append([time.time(), values])
                except OSError:
                    pass
                await asyncio.sleep(1.0)

        sampling = asyncio.create_task(sampler())
        start = time.monotonic()
        end = start + args.seconds
        index = 0
        while not stop.is_set():
            at = start + index / args.rate
            if at >= end:
                break
            try:
                await asyncio.wait_for(stop.wait(), max(at - time.monotonic(), 0.0))
                break
            except TimeoutError:
                pass
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
        sampling.cancel()
        if pending:
            await asyncio.wait(pending, timeout=RPC_TIMEOUT + 1)
    return {"requests": requests, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True, help="the agent's Inference port on 127.0.0.1")
    p.add_argument("--metrics-port", type=int, required=True, help="the agent's /metrics port on 127.0.0.1")
    p.add_argument("--certs", type=Path, required=True)
    p.add_argument("--rate", type=float, default=5.0, help="frames per second")
    p.add_argument("--deadline-ms", type=int, default=500)
    p.add_argument("--seconds", type=float, default=3600.0, help="stop after this long (or on SIGTERM)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
