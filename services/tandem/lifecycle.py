"""Process lifecycle: the first SIGTERM/SIGINT asks for a graceful stop, a second exits."""

from __future__ import annotations

import asyncio
import os
import signal


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; the second one exits at once."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return stop
