"""The server options every Tandem server gets, checked on real sockets: a connection
that never starts TLS is closed at the handshake deadline, connections beyond the cap
are closed at once, and the open-files limit is raised where the hard limit allows."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem import grpcserver, lifecycle, metrics, tls


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock` (reads EOF or a reset), at most `limit`."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - start


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def test_server_options_name_the_deadlines_and_limits() -> None:
    options = dict(grpcserver.server_options(max_connections=100))
    assert options["grpc.server_handshake_timeout_ms"] == grpcserver.HANDSHAKE_TIMEOUT_MS
    assert options["grpc.max_allowed_incoming_connections"] == 100
    for name in ("grpc.max_connection_idle_ms", "grpc.max_connection_age_ms", "grpc.max_connection_age_grace_ms"):
        assert options[name] > 0, name
    # An agent's control stream lives across a whole job: the age limit must leave it hours.
    assert options["grpc.max_connection_age_ms"] >= 30 * 60_000


async def test_a_connection_that_never_starts_tls_is_closed_at_the_handshake_deadline(
    certs_dir: Path, sockets: list[socket.socket]
) -> None:
    server = grpcserver.create_server()
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(certs_dir))
    await server.start()
    try:
        sockets.append(socket.create_connection(("127.0.0.1", port)))
        deadline = grpcserver.HANDSHAKE_TIMEOUT_MS / 1000
        seconds = await asyncio.to_thread(_closed_after, sockets[0], deadline + 5)
        assert deadline - 0.5 <= seconds <= deadline + 2.0, seconds
    finally:
        await server.stop(0)


async def test_connections_beyond_the_cap_are_closed_at_once(certs_dir: Path, sockets: list[socket.socket]) -> None:
    server = grpcserver.create_server(max_connections=3)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(certs_dir))
    await server.start()
    try:
        for _ in range(3):
            sockets.append(socket.create_connection(("127.0.0.1", port)))
        await asyncio.sleep(0.2)  # accepted and counted
        sockets.append(socket.create_connection(("127.0.0.1", port)))
        assert await asyncio.to_thread(_closed_after, sockets[-1], 2.0) < 1.0  # refused: closed at once
        held = await asyncio.to_thread(_closed_after, sockets[0], 0.3)
        assert held == float("inf")  # the first three are still waiting for their handshake
    finally:
        await server.stop(0)


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert lifecycle.raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_connection_cap_leaves_descriptors_for_files() -> None:
    assert grpcserver.connection_cap(1024) == 1024 - grpcserver.RESERVED_FDS
    assert grpcserver.connection_cap(100) == grpcserver.MIN_CONNECTIONS  # a tiny limit still serves someone
    assert grpcserver.connection_cap(10**7) == grpcserver.MAX_CONNECTIONS


def test_core_log_counts_handshake_failures_and_passes_other_lines(caplog: pytest.LogCaptureFixture) -> None:
    core = lifecycle.CoreLog(interval=10)
    before = metrics.HANDSHAKE_FAILURES._value.get()
    line = b"I1202 12:17:24.80 32095 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: x\n"
    assert all(core.feed(line) is None for _ in range(3))
    assert core.feed(b"E1202 something else\n") == b"E1202 something else\n"
    assert metrics.HANDSHAKE_FAILURES._value.get() == before + 3
    with caplog.at_level(logging.WARNING, logger="tandem.lifecycle"):
        core.report()
        core.report()  # nothing new: nothing said
    assert [r.getMessage() for r in caplog.records] == [
        "3 TLS handshakes failed in the last 10 s (the last: with error SSL_ERROR_SSL: x)"]


SERVER_WITH_CORE_LOG = """
import asyncio, socket, sys
from pathlib import Path
from tandem import grpcserver, lifecycle, metrics, tls
lifecycle.CoreLog(interval=1.0).install()
async def main():
    server = grpcserver.create_server()
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(Path(sys.argv[1])))
    await server.start()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET / HTTP/1.1\\r\\n\\r\\n")
            s.recv(100)
    await asyncio.sleep(1.5)
    print("counted", metrics.HANDSHAKE_FAILURES._value.get(), flush=True)
    await server.stop(0)
asyncio.run(main())
"""


@pytest.mark.process
def test_a_server_process_logs_failed_handshakes_once_per_interval(certs_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SERVER_WITH_CORE_LOG, str(certs_dir)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    assert "counted 20.0" in done.stdout
    assert "Handshake failed with" not in done.stderr  # no line per connection
    assert "20 TLS handshakes failed in the last 1 s" in done.stderr
