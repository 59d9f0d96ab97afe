"""What `grpcurl list`, `describe` and a call do, through server reflection alone.

The client here knows no Tandem .proto: it learns every service, method and message
type from the server (grpc_reflection's descriptor database), builds requests with
protobuf's dynamic message factory, and calls by method path, as grpcurl does.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cloud.app import Coordinator
from tandem import certs
from tests.support.inference import arrays_for, serve

EXPECTED = {"tandem.v1.Coordinator", "tandem.v1.Admin", "tandem.v1.Inference", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"}


def credentials(certs_dir: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((certs_dir / "ca.pem").read_bytes(), key.read_bytes(), cert.read_bytes())


class ReflectionClient:
    """grpcurl's list, describe and invoke, in a few lines of Python."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def list(self) -> set[str]:
        return set(self.db.get_services())

    def describe(self, service: str) -> dict[str, tuple[str, str]]:
        found = self.pool.FindServiceByName(service)
        return {m.name: (m.input_type.full_name, m.output_type.full_name) for m in found.methods}

    def invoke(self, method: str, body: dict[str, object]) -> Message:
        """Call `method` with `body` as grpcurl's -d JSON."""
        service, name = method.rsplit(".", 1)
        desc = self.pool.FindServiceByName(service).methods_by_name[name]
        request_type = message_factory.GetMessageClass(desc.input_type)
        response_type = message_factory.GetMessageClass(desc.output_type)
        call = self.channel.unary_unary(
            f"/{service}/{name}", request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response: Message = call(json_format.ParseDict(body, request_type()), timeout=10)
        return response


def session(coordinator: Coordinator, certs_dir: Path, cert: Path, key: Path) -> ReflectionClient:
    channel = grpc.secure_channel(f"localhost:{coordinator.port}", credentials(certs_dir, cert, key))
    return ReflectionClient(channel)


async def test_list_describe_and_call_like_grpcurl(coordinator: Coordinator, certs_dir: Path) -> None:
    await serve(coordinator.models, "mlp", arrays_for("mlp", seed=1))
    zeros = base64.b64encode(bytes(256)).decode()  # the README's $(head -c 256 /dev/zero | base64 -w0)

    def run() -> None:
        client = session(coordinator, certs_dir, certs_dir / "admin.pem", certs_dir / "admin.key")
        assert client.list() == EXPECTED
        admin = client.describe("tandem.v1.Admin")
        assert admin["ListAgents"] == ("tandem.v1.ListAgentsRequest", "tandem.v1.ListAgentsResponse")
        assert {"StartJob", "GetJob", "PublishModel", "PinPlacement"} <= admin.keys()
        assert "Infer" in client.describe("tandem.v1.Inference")
        health = client.invoke("grpc.health.v1.Health.Check", {"service": "tandem.v1.Admin"})
        assert str(health).strip() == "status: SERVING"
        assert client.invoke("tandem.v1.Admin.ListJobs", {}).ListFields() == []  # no jobs yet
        with pytest.raises(grpc.RpcError) as err:
            client.invoke("tandem.v1.Admin.GetJob", {"job_id": "no-such-job"})
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        answer = json_format.MessageToDict(client.invoke("tandem.v1.Inference.Infer", {
            "model": "mlp", "input": {"dtype": "DTYPE_FLOAT32", "shape": [1, 64], "data": zeros}}))
        assert (answer["model"], answer["version"], answer["output"]["shape"]) == ("mlp", "1", ["1", "10"])
        client.channel.close()

    await asyncio.to_thread(run)


async def test_reflection_needs_a_certificate_and_admin_calls_need_the_admin(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    def run() -> None:
        no_cert = grpc.secure_channel(f"localhost:{coordinator.port}",
                                      grpc.ssl_channel_credentials((certs_dir / "ca.pem").read_bytes()))
        with pytest.raises(grpc.RpcError) as err:
            ReflectionClient(no_cert).list()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake is refused
        no_cert.close()

        client = session(coordinator, certs_dir, *certs.agent_paths(certs_dir, "agent-0"))
        assert "tandem.v1.Admin" in client.list()  # reflection answers any certificate of the deployment
        with pytest.raises(grpc.RpcError) as err:
            client.invoke("tandem.v1.Admin.ListAgents", {})
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        client.channel.close()

    await asyncio.to_thread(run)


async def test_the_plaintext_health_port_answers_grpcurl_through_reflection(coordinator: Coordinator) -> None:
    """`grpcurl -plaintext localhost:HEALTH grpc.health.v1.Health/Check` (the README's
    probe) needs reflection on that port: grpcurl knows no .proto by itself."""

    def probe() -> tuple[set[str], str]:
        with grpc.insecure_channel(f"localhost:{coordinator.health_port}") as channel:
            client = ReflectionClient(channel)
            return client.list(), str(client.invoke("grpc.health.v1.Health.Check", {})).strip()

    services, status = await asyncio.to_thread(probe)
    assert services == {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert status == "status: SERVING"
