"""One place that builds gRPC servers and channels with Tandem's options."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.errors import MalformedRequests

# Chunks are 1 MiB; a little headroom above gRPC's 4 MiB default lets a whole small
# model or a large inference batch through in one message, and nothing bigger.
MAX_MESSAGE_BYTES = 8 << 20

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Find agents that vanished without closing their connection (power loss, a cut
    # link): ping every 30 s, drop the connection if no answer within 10 s.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Agents ping every 10 s even when idle; allow it instead of answering with
    # GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Notice a dead coordinator or a cut link within ~15 s even on an idle stream.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # The channel's own reconnect backoff defaults to a 120 s ceiling; agents run
    # their own jittered backoff on top, so keep the channel's short.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 3_000),
]


def create_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    """An unstarted asyncio server with Tandem's message limits and keepalive. A request
    that does not parse is INVALID_ARGUMENT (gRPC's own answer would be UNKNOWN)."""
    return grpc.aio.server(interceptors=[*interceptors, MalformedRequests()], options=SERVER_OPTIONS)


async def new_health(service_names: Sequence[str]) -> health.aio.HealthServicer:
    """A health servicer saying NOT_SERVING for the server ("") and each service until
    the caller says otherwise (grpc's own starts with "" SERVING)."""
    health_servicer = health.aio.HealthServicer()
    await set_serving(health_servicer, service_names, False)
    return health_servicer


async def add_standard_services(server: grpc.aio.Server, service_names: Sequence[str]) -> health.aio.HealthServicer:
    """Health (NOT_SERVING until the caller says otherwise) and reflection for grpcurl."""
    health_servicer = await new_health(service_names)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    return health_servicer


async def start_health_only(
    address: str | None, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server | None, int]:
    """The same health states on a plaintext port for probes that cannot present a
    certificate (Kubernetes'); (None, 0) when no address is given."""
    if not address:
        return None, 0
    server = create_server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def secure_channel(target: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
