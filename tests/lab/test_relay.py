"""The lab's TCP relay cuts a link and restores it (the traffic benchmark cuts a
district's link to the cloud with it)."""

from __future__ import annotations

import asyncio

from tandem_lab.relay import Relay


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trip(port: int) -> bytes:
    """What comes back for a ping: b"" when the connection is closed or reset."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(1024), 5)
    except ConnectionError:
        return b""
    writer.close()
    return data


async def test_cut_ends_connections_and_refuses_new_ones_until_restored() -> None:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    relay = Relay("127.0.0.1", server.sockets[0].getsockname()[1])
    await relay.start()
    try:
        assert await _round_trip(relay.port) == b"ping"
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"a")
        assert await asyncio.wait_for(reader.read(1), 5) == b"a"
        relay.cut()
        assert await asyncio.wait_for(reader.read(1024), 5) == b""  # the open connection ends
        assert await _round_trip(relay.port) == b""  # a new one is closed at once
        relay.restore()
        assert await _round_trip(relay.port) == b"ping"
        writer.close()
    finally:
        await relay.close()
        server.close()
