"""`python -m tandem_lab gpu-check`: the cloud inference server's batching and split paths on
`cuda`, checked against a CPU forward pass (relative error under 1e-4 in float32),
with forward-pass throughput on both. Skips, saying so, where torch sees no GPU.

It runs the real server: a coordinator in this process on a loopback port with
mutual TLS, models published through the Admin API, requests over gRPC.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tandem import certs, grpcserver, tls, training, wire, zoo
from tandem.staged import StagedModel
from tandem.v1 import admin_pb2_grpc, inference_pb2_grpc
from tandem.v1 import inference_pb2 as pb
from tandem_cli.admin import publish_serving
from tandem_lab.bench import machine

MODELS = ("mlp", "mlp-heavy")
TOLERANCE = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(float(np.linalg.norm(expected)), 1e-30))


def samples_per_second(model: StagedModel, batch: int, repeats: int = 20) -> float:
    x = np.random.default_rng(1).normal(size=(batch, *model.input_shape)).astype(np.float32)
    model.run(x)  # warm up (CUDA context, kernels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


async def check(device: str, work: Path) -> dict[str, Any]:
    from cloud.app import CloudConfig, Coordinator
    from cloud.serving import ServingConfig

    certs.init_deployment(work / "certs", [])
    config = CloudConfig(listen="127.0.0.1:0", certs=work / "certs", state=work / "state", grace=1.0,
                         serving=ServingConfig(device=device, max_batch=64, max_delay=0.005))
    server = Coordinator(config)
    await server.start()
    results: dict[str, Any] = {"device": server.serving.device, "models": {}}
    try:
        async with grpcserver.secure_channel(f"localhost:{server.port}", tls.admin_credentials(work / "certs")) as ch:
            admin, stub = admin_pb2_grpc.AdminStub(ch), inference_pb2_grpc.InferenceStub(ch)
            rng = np.random.default_rng(0)
            for name in MODELS:
                arrays = training.state_arrays(zoo.build_model(name, seed=7))
                await publish_serving(admin, name, arrays)
                reference = StagedModel(name, 1, "", arrays, "cpu")
                errors: dict[str, float] = {}
                # Batching: 64 concurrent single-row requests, gathered into batches on the device.
                xs = [rng.normal(size=(1, 64)).astype(np.float32) for _ in range(64)]
                answers = await asyncio.gather(
                    *(stub.Infer(pb.InferRequest(model=name, input=wire.to_proto(x))) for x in xs)
                )
                got = np.concatenate([wire.from_proto(a.output) for a in answers])
                errors["batched"] = relative_error(got, reference.run(np.concatenate(xs)))
                # Split: the activation after every stage boundary, the rest on the device.
                x = rng.normal(size=(32, 64)).astype(np.float32)
                expected = reference.run(x)
                for k in range(reference.num_stages):
                    h = reference.run(x, 0, k)
                    answer = await stub.Infer(pb.InferRequest(model=name, input=wire.to_proto(h), start_layer=k))
                    errors[f"start_layer_{k}"] = relative_error(wire.from_proto(answer.output), expected)
                served = await server.serving.get(name, 0)
                results["models"][name] = {
                    "relative_error": errors,
                    "max_relative_error": max(errors.values()),
                    "samples_per_second": {
                        str(b): {"served_device": samples_per_second(served, b), "cpu": samples_per_second(reference, b)}
                        for b in (1, 64, 256)
                    },
                }
    finally:
        await server.stop()
    results["max_relative_error"] = max(m["max_relative_error"] for m in results["models"].values())
    results["passed"] = results["max_relative_error"] < TOLERANCE
    return results


def run_gpu_check(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check skipped: torch sees no CUDA GPU on this machine (nothing was checked)")
        return 0
    with tempfile.TemporaryDirectory(prefix="tandem-gpu-") as tmp:
        results = asyncio.run(check(args.device, Path(tmp)))
    results.update(machine=machine(), command=" ".join(sys.argv), tolerance=TOLERANCE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"device {results['device']}: max relative error vs CPU {results['max_relative_error']:.2e} "
          f"(limit {TOLERANCE:g}) -> {'PASS' if results['passed'] else 'FAIL'}")
    print(f"{'model':<10} {'batch':>5} {'served/s':>12} {'cpu/s':>12}")
    for name, model in results["models"].items():
        for batch, rate in model["samples_per_second"].items():
            print(f"{name:<10} {batch:>5} {rate['served_device']:>12,.0f} {rate['cpu']:>12,.0f}")
    return 0 if results["passed"] else 1
