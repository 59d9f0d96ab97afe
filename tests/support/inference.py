"""Test-side helpers for inference: weights, a direct forward pass, requests, publishing."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import torch
from prometheus_client import REGISTRY

from cloud.models import ModelRepository
from cloud.store import VersionRow
from edge.agent import AgentConfig
from edge.app import EdgeApp
from tandem import grpcserver, tls, training, wire, zoo
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from tandem.v1 import inference_pb2 as pb
from tandem_cli.admin import publish_messages
from tests.support.deployment import APP

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
    np.testing.assert_allclose(wire.from_proto(actual.output), expected, rtol=1e-5, atol=1e-6)


def request(model: str, x: np.ndarray, **fields: object) -> pb.InferRequest:
    return pb.InferRequest(model=model, input=wire.to_proto(x), **fields)  # type: ignore[arg-type]


def inputs(rows: int, width: int = 64) -> np.ndarray:
    return RNG.normal(size=(rows, width)).astype(np.float32)


async def publish(
    target: str, certs_dir: Path, model: str, arrays: dict[str, np.ndarray], promote: bool = True
) -> admin_pb2.ModelVersion:
    """Publish a version through the Admin API and (unless `promote` is False) make it the
    serving one, as an operator would with `tandem models publish --promote`."""
    async with grpcserver.secure_channel(target, tls.admin_credentials(certs_dir)) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        version: admin_pb2.ModelVersion = await stub.PublishModel(iter(publish_messages(model, arrays)))
        if promote:
            await stub.PromoteModel(admin_pb2.PromoteModelRequest(model=model, version=version.version))
        return version


async def serve(models: ModelRepository, model: str, arrays: dict[str, np.ndarray]) -> VersionRow:
    """Publish a version in this process and make it the serving one (what `tandem models
    publish --promote` does): inference without a version answers from the serving version."""
    row = await models.publish(model, arrays)
    models.promote(model, row.version, "test")
    return row


def fallbacks(model: str, reason: str) -> float:
    return REGISTRY.get_sample_value("tandem_edge_inference_fallbacks_total", {"model": model, "reason": reason}) or 0.0


async def start_edge(cloud_port: int, certs_dir: Path, placements: tuple[str, ...], **extra: object) -> EdgeApp:
    fields: dict[str, object] = dict(
        cloud=f"localhost:{cloud_port}", certs=certs_dir, agent_id="agent-5", data="digits:0/4",
        listen="127.0.0.1:0", placements=placements, backoff_initial=0.1, backoff_max=0.5, probe_interval=0.2,
    )
    config = AgentConfig(**{**fields, **extra})  # type: ignore[arg-type]
    app = EdgeApp(config)
    await app.start()
    return app


def app_stub(app: EdgeApp, certs_dir: Path) -> tuple[grpc.aio.Channel, inference_pb2_grpc.InferenceStub]:
    """A local application's channel to the agent, with its own certificate from the same CA."""
    channel = grpcserver.secure_channel(f"localhost:{app.inference_port}", tls.app_credentials(certs_dir, APP))
    return channel, inference_pb2_grpc.InferenceStub(channel)
