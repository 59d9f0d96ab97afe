"""One coordinator per state directory: an OS lock held for the process's life.

`flock` on `STATE/LOCK`, taken before the store is opened (migrations, resumed jobs)
and released by the kernel when the process ends however it ends, so a SIGKILL never
leaves a lock to clean up by hand. The file holds the holder's pid, which the refusal
names. Readers that do not change the state (`tandem models verify`, tests reading the
store) do not take it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "LOCK"


class StateInUse(ValueError):
    """Another process holds the state directory."""


class StateLock:
    """The lock on `directory`, held from construction until `release`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateInUse(f"state directory {directory} is in use by another coordinator (pid {holder}); "
                             "stop it first, or give this one another --state") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
