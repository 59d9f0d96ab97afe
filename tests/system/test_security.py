"""Mutual TLS and identities against a real coordinator on a loopback port."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud.app import Coordinator
from tandem import grpcserver
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tests.support.clients import admin_channel, agent_channel, download, target


async def _list_agents_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await admin_pb2_grpc.AdminStub(channel).ListAgents(admin_pb2.ListAgentsRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_admin_certificate_is_accepted(coordinator: Coordinator, certs_dir: Path) -> None:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        assert await _list_agents_code(channel) == grpc.StatusCode.OK


async def test_plaintext_client_is_refused(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(target(coordinator.port)) as channel:
        assert await _list_agents_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_client_without_certificate_is_refused(coordinator: Coordinator, certs_dir: Path) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=(certs_dir / "ca.pem").read_bytes())
    async with grpcserver.secure_channel(target(coordinator.port), credentials) as channel:
        assert await _list_agents_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(
    coordinator: Coordinator, certs_dir: Path, foreign_certs_dir: Path
) -> None:
    # Trusts our server, but presents an admin certificate of another deployment.
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs_dir / "ca.pem").read_bytes(),
        private_key=(foreign_certs_dir / "admin.key").read_bytes(),
        certificate_chain=(foreign_certs_dir / "admin.pem").read_bytes(),
    )
    async with grpcserver.secure_channel(target(coordinator.port), credentials) as channel:
        assert await _list_agents_code(channel) == grpc.StatusCode.UNAVAILABLE


async def test_agent_cannot_call_admin(coordinator: Coordinator, certs_dir: Path) -> None:
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        assert await _list_agents_code(channel) == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_cannot_open_an_agent_stream(coordinator: Coordinator, certs_dir: Path) -> None:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(
            iter([pb.AgentMessage(hello=pb.Hello())])
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_connect_must_start_with_hello(coordinator: Coordinator, certs_dir: Path) -> None:
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(
            iter([pb.AgentMessage(heartbeat=pb.Heartbeat(seq=1))])
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in call:
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reflection_lists_every_service(coordinator: Coordinator, certs_dir: Path) -> None:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"tandem.v1.Coordinator", "tandem.v1.Admin", "grpc.health.v1.Health"} <= names


async def test_health_on_tls_and_on_the_plaintext_probe_port(coordinator: Coordinator, certs_dir: Path) -> None:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # Watch writes with context.write rather than yielding: every interceptor passes it through.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert (await anext(aiter(watch))).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    async with grpc.aio.insecure_channel(target(coordinator.health_port)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="tandem.v1.Coordinator")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The probe port serves health only: nothing else is reachable without a certificate.
        assert await _list_agents_code(channel) == grpc.StatusCode.UNIMPLEMENTED


async def test_admin_errors_carry_precise_codes(coordinator: Coordinator, certs_dir: Path) -> None:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        cases = [
            (stub.GetJob(admin_pb2.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND),
            (stub.StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(model="resnet9000", rounds=1,
                                                                              min_clients=1))),
             grpc.StatusCode.NOT_FOUND),
            (stub.StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(model="mlp", rounds=0, min_clients=1))),
             grpc.StatusCode.INVALID_ARGUMENT),
            (stub.StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(model="mlp", rounds=1, min_clients=1,
                                                                              codec="zip"))),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == code, error.value.details()
        job = await stub.StartJob(admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(model="mlp", rounds=1,
                                                                                      min_clients=1)))
        await stub.StopJob(admin_pb2.StopJobRequest(job_id=job.job_id))
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.StopJob(admin_pb2.StopJobRequest(job_id=job.job_id))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_download_unknown_model_or_version(coordinator: Coordinator, certs_dir: Path) -> None:
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        for model, version, code in [("mlp", 0, grpc.StatusCode.NOT_FOUND), ("", 0, grpc.StatusCode.INVALID_ARGUMENT),
                                     ("mlp", -1, grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await download(stub, model, version)
            assert error.value.code() == code
