"""Test-side helpers for inference: weights, a direct forward pass, requests, publishing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tandem import codec, grpcserver, tls, training, zoo
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem.v1 import inference_pb2 as pb
from tandem_cli.admin import publish_messages

RNG = np.random.default_rng(0)


def arrays_for(model: str, seed: int) -> dict[str, np.ndarray]:
    return training.state_arrays(zoo.build_model(model, seed=seed))


def forward(
    model: str, arrays: dict[str, np.ndarray], x: np.ndarray, start: int = 0, end: int | None = None
) -> np.ndarray:
    """Stages start+1..end of `model` with these weights, in this process: the reference."""
    net = zoo.build_model(model)
    training.load_state_arrays(net, arrays)
    with torch.inference_mode():
        h = torch.from_numpy(x.copy())
        for stage in list(net)[start:end]:
            h = stage(h)
    return h.numpy()


def close(actual: pb.InferResponse, expected: np.ndarray) -> None:
    np.testing.assert_allclose(codec.from_proto(actual.output), expected, rtol=1e-5, atol=1e-6)


def request(model: str, x: np.ndarray, **fields: object) -> pb.InferRequest:
    return pb.InferRequest(model=model, input=codec.to_proto(x), **fields)  # type: ignore[arg-type]


def inputs(rows: int, width: int = 64) -> np.ndarray:
    return RNG.normal(size=(rows, width)).astype(np.float32)


async def publish(target: str, certs_dir: Path, model: str, arrays: dict[str, np.ndarray]) -> admin_pb2.ModelVersion:
    """Publish a version through the Admin API, as an operator would."""
    async with grpcserver.secure_channel(target, tls.admin_credentials(certs_dir)) as channel:
        version: admin_pb2.ModelVersion = await admin_pb2_grpc.AdminStub(channel).PublishModel(
            iter(publish_messages(model, arrays))
        )
        return version
