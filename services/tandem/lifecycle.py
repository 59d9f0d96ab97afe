"""Process lifecycle: the first SIGTERM/SIGINT asks for a graceful stop, a second exits."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from tandem import metrics

log = logging.getLogger(__name__)


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


def tune_allocator() -> bool:
    """Make glibc give large freed buffers back to the system.

    A server that handles model-sized arrays otherwise keeps its peak forever:
    glibc's mmap threshold rises to the largest block freed (up to 32 MB), after which
    such blocks come from heaps that rarely shrink, and every thread that touches
    them gets an arena of its own. Fixing the threshold at 1 MiB and capping the
    arenas at 2 keeps resident memory near what is in use. Returns whether the
    C library took the settings (False elsewhere than glibc).
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20)) and bool(libc.mallopt(m_arena_max, 2))
    except (OSError, AttributeError):
        return False


def tune_for_serving(torch_threads: int = 0) -> int:
    """Share the CPU well between the event loop (gRPC) and the forward passes on the
    batcher's thread; returns the number of torch threads set.

    - torch's intra-op threads spin for a while after every operation; on a small
      host they take the core the event loop needs. `0` picks one core fewer than
      the machine has (at least one).
    - The forward-pass thread needs the GIL between torch operations, and a busy event
      loop keeps it for up to the switch interval (5 ms by default) each time: at
      1 ms a small batch is not kept waiting several times longer than it computes.
    Measured on 2 cores (mlp, single-row requests, 64 clients): about 1.5x the
    requests per second of the defaults.
    """
    if torch_threads < 0:
        raise ValueError(f"--torch-threads must be >= 0 (0: one fewer than the cores), got {torch_threads}")
    import torch

    threads = torch_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    sys.setswitchinterval(0.001)
    return threads


# Where the hard limit is "unlimited", the kernel still refuses a soft limit above
# fs.nr_open (1,048,576 by default).
_NR_OPEN = Path("/proc/sys/fs/nr_open")


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit (RLIMIT_NOFILE) to its hard limit and return
    the limit in force. Every connection holds a descriptor, and the usual soft limit of
    1,024 is a few hundred agents; the hard limit is what an operator allows. Where the
    system refuses, the limit stays as it is (logged once) and servers cap their
    connections below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        try:
            wanted = int(_NR_OPEN.read_text())
        except (OSError, ValueError):
            wanted = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("open-files limit stays at %d (raising it to %d failed: %s)", soft, wanted, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


# ---- grpc's core log ----------------------------------------------------------------

HANDSHAKE_FAILED = b"Handshake failed"
BIND_FAILED = b"Failed to add port to server"  # grpc core, add_port.cc


class CoreLog:
    """Counts the TLS handshake failures gRPC's C core logs, and logs them once per
    `interval` instead of once per connection.

    The core writes a line to file descriptor 2 for every failed handshake (1,000 of
    them: 226 KB of log) and tells Python nothing. `install` puts a pipe on fd 2: a
    thread reads it, counts and holds back those lines (metric
    tandem_rpc_server_handshake_failures_total) and passes every other line through to
    the real stderr; another logs the count of each interval. Connections closed at the
    handshake deadline or over the connection cap leave no line: they are not counted.
    Only for a server's own process (a test runner's fd 2 is its own).
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.failures = 0  # since the last report
        self.last = b""  # the last failure's line, quoted in the report
        self._lock = threading.Lock()
        self._stderr = -1  # the real stderr, once installed
        self._pump_thread: threading.Thread | None = None

    def install(self) -> None:
        read_end, write_end = os.pipe()
        self._stderr = os.dup(2)
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._pump_thread = threading.Thread(target=self._pump, args=(read_end,), name="core-log", daemon=True)
        self._pump_thread.start()
        threading.Thread(target=self._report_every_interval, name="core-log-report", daemon=True).start()
        atexit.register(self._restore)

    def feed(self, line: bytes) -> bytes | None:
        """Count `line` if it is a handshake failure; otherwise return it to pass through
        (but a failed bind's: `grpcserver.bind` says it in one line of its own)."""
        if BIND_FAILED in line:
            return None
        if HANDSHAKE_FAILED not in line:
            return line
        metrics.HANDSHAKE_FAILURES.inc()
        with self._lock:
            self.failures += 1
            self.last = line
        return None

    def report(self) -> None:
        with self._lock:
            failures, last, self.failures = self.failures, self.last, 0
        if failures:
            reason = last.decode(errors="replace").partition(HANDSHAKE_FAILED.decode())[2].strip()
            log.warning("%d TLS handshakes failed in the last %.0f s (the last: %s)", failures, self.interval,
                        reason[:200])

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in iter(pipe.readline, b""):
                kept = self.feed(line)
                if kept is not None:
                    os.write(self._stderr, kept)

    def _report_every_interval(self) -> None:
        while True:
            time.sleep(self.interval)
            self.report()

    def _restore(self) -> None:
        """Put the real stderr back at exit, so the last lines (a traceback) are not lost."""
        sys.stderr.flush()
        os.dup2(self._stderr, 2)  # closes the pipe's write end: the pump drains it and ends
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=2.0)
