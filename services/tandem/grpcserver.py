"""One place that builds gRPC servers and channels with Tandem's options."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem import lifecycle, metrics
from tandem.errors import MalformedRequests

# Chunks are 1 MiB; a little headroom above gRPC's 4 MiB default lets a whole small
# model or a large inference batch through in one message, and nothing bigger.
MAX_MESSAGE_BYTES = 8 << 20

# A TLS handshake is two or three round trips and a few KB of certificates: 5 s allows
# round trips of over a second (a congested cellular link), while a connection that
# never starts TLS holds its descriptor and its connection slot for 5 s, not grpc's
# default 120 s.
HANDSHAKE_TIMEOUT_MS = 5_000
# Descriptors kept out of the connection cap for everything else a server opens: SQLite
# and its journal, tensor files being written and read, the metrics and health ports,
# outgoing channels, the interpreter's own (torch alone opens ~40).
RESERVED_FDS = 256
MIN_CONNECTIONS = 64  # under a tiny open-files limit: still serve a few, and let files fail instead
MAX_CONNECTIONS = 50_000  # each costs memory too (buffers, HTTP/2 state): far above any fleet we run
HEALTH_CONNECTIONS = 64  # the plaintext health port: probes open one connection each


def connection_cap(open_files: int) -> int:
    """How many connections a server accepts at once under an open-files limit: what the
    limit leaves after RESERVED_FDS, within [MIN_CONNECTIONS, MAX_CONNECTIONS]."""
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, open_files - RESERVED_FDS))


def server_options(max_connections: int) -> list[tuple[str, int]]:
    """Every server's options, with a cap of `max_connections` connections at once."""
    return [
        # gRPC sets SO_REUSEPORT by default: a second server on a port in use would then
        # start and share it, answering half the calls. Off, binding a port in use fails.
        ("grpc.so_reuseport", 0),
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
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
        # gRPC bounds connections per listener, counted from accept to close, handshake
        # or not: it has no bound on unauthenticated connections alone. Over the cap a
        # new connection is accepted and closed at once, so the server never runs out
        # of descriptors (then it could accept nobody, and logged that every second)
        # and a flood of silent connections holds at most the cap for the handshake
        # deadline; clients that were refused retry with their reconnect backoff.
        ("grpc.max_allowed_incoming_connections", max_connections),
        # A connection with no call for 2 minutes is closed (GOAWAY); a client reconnects
        # at its next call. Agents never idle: their control stream is always open.
        ("grpc.max_connection_idle_ms", 120_000),
        # An hour after it opened a connection is asked to go (GOAWAY, with grpc's +-10%
        # jitter): new calls take a new connection, so rotated server certificates and a
        # rebalanced load balancer reach every client within the hour. Calls in flight
        # get 5 minutes to end; then an agent's control stream breaks and the agent
        # reconnects at once (0.5 s backoff), once an hour. An upload cut there resumes
        # from its last chunk.
        ("grpc.max_connection_age_ms", 3_600_000),
        ("grpc.max_connection_age_grace_ms", 300_000),
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


def create_server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (), max_connections: int | None = None
) -> grpc.aio.Server:
    """An unstarted asyncio server with Tandem's message limits, keepalive, handshake
    deadline and connection limits. It first raises this process's open-files limit as
    far as allowed; `max_connections` defaults to what that limit leaves (connection_cap).
    A request that does not parse is INVALID_ARGUMENT (gRPC's own answer would be UNKNOWN)."""
    cap = max_connections
    if cap is None:  # the main server: sized by the open-files limit, raised first
        cap = connection_cap(lifecycle.raise_open_files_limit())
        metrics.MAX_CONNECTIONS.set(cap)
    return grpc.aio.server(interceptors=[*interceptors, MalformedRequests()], options=server_options(cap))


class AddressInUse(ValueError):
    """A server's address could not be bound: another process listens there (or it is not ours)."""


def bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind `address` (TLS with `credentials`, else plaintext) and return its port;
    AddressInUse, in one line, where it cannot be bound. Call before `start`."""
    try:
        port = int(server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if not port:
        raise AddressInUse(f"cannot listen on {address}: the address is in use or not available here "
                           "(is another server running on it?)")
    return port


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
    server = create_server(max_connections=HEALTH_CONNECTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection too: `grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check` needs it.
    reflection.enable_server_reflection(
        [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = bind(server, address)
    await server.start()
    return server, port


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def secure_channel(target: str, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
