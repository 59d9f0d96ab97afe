"""A byte-counting TCP relay: put it between agents and the coordinator to measure
what really crosses the wire (TLS records, HTTP/2 framing and all), and to cut the
link: `cut()` closes every connection through it and refuses new ones until `restore()`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable


class Relay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self.up = 0  # client -> server bytes
        self.down = 0  # server -> client bytes
        self._server: asyncio.Server | None = None
        self.port = 0
        self.is_cut = False
        self._open: set[asyncio.StreamWriter] = set()  # both ends of every relayed connection

    async def start(self, host: str = "127.0.0.1") -> None:
        self._server = await asyncio.start_server(self._handle, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def reset(self) -> None:
        self.up = self.down = 0

    def cut(self) -> None:
        """The link goes down: every connection ends, and new ones are closed at once."""
        self.is_cut = True
        for writer in list(self._open):
            writer.close()

    def restore(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._open.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer, up=True), self._pipe(upstream_reader, writer, up=False)
            )
        except asyncio.CancelledError:  # the relay is closing
            for w in (writer, upstream_writer):
                w.close()
        finally:
            self._open.difference_update((writer, upstream_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        async def count(data: bytes) -> None:
            if up:
                self.up += len(data)
            else:
                self.down += len(data)

        await pipe(reader, writer, count)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               each: Callable[[bytes], Awaitable[object]] | None = None) -> None:
    """Copy `reader` to `writer` until either side ends, then close `writer`; `each(data)`
    is awaited before each piece is passed on."""
    try:
        while data := await reader.read(1 << 16):
            if each is not None:
                await each(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
