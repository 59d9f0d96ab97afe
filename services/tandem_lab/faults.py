"""A TCP relay that fails on purpose: it resets connections, stalls them, and refuses
new ones for a while, at random moments (the reliability benchmark's bad link)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

from tandem_lab.relay import pipe

FAULTS = ("reset", "stall", "drop")


class FaultRelay:
    def __init__(self, target: tuple[str, int], mean_interval: float = 10.0, seed: int = 0) -> None:
        self.target = target
        self.mean_interval = mean_interval
        self.events: list[dict[str, Any]] = []
        self._random = random.Random(seed)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing_until = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._injector: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        self._server = await asyncio.start_server(self._handle, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._injector = asyncio.create_task(self._inject())

    async def close(self) -> None:
        if self._injector is not None:
            self._injector.cancel()
        self._reset()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _inject(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(self._random.expovariate(1.0 / self.mean_interval))
            fault, seconds = self._random.choice(FAULTS), self._random.uniform(1.0, 5.0)
            self.events.append({"at": round(time.monotonic() - started, 2), "fault": fault,
                                "seconds": round(seconds, 2) if fault != "reset" else 0.0})
            if fault == "reset":
                self._reset()
            elif fault == "stall":  # bytes stop moving, connections stay open
                self._flowing.clear()
                await asyncio.sleep(seconds)
                self._flowing.set()
            else:  # the link goes away: everything reset, new connections refused for a while
                self._refusing_until = time.monotonic() + seconds
                self._reset()

    def _reset(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if transport is not None:
                transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # The relay is closing. Ending quietly spares Python 3.11's start_server
            # callback from logging the cancellation as an error.
            writer.transport.abort()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refusing_until:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(pipe(reader, upstream_writer, self._unstalled),
                             pipe(upstream_reader, writer, self._unstalled), return_exceptions=True)
        self._writers.difference_update((writer, upstream_writer))

    async def _unstalled(self, data: bytes) -> None:
        """While a stall lasts, no byte moves."""
        await self._flowing.wait()

