"""A small filesystem that fills up on purpose: a tmpfs mounted as a coordinator's state
directory, and a ballast file that takes its free space until it is deleted.

Mounting needs root (CAP_SYS_ADMIN); `unavailable()` says why not elsewhere, so that
tests skip with that reason and scenarios report it.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path
from types import TracebackType

from cloud.disk import free_bytes


def unavailable() -> str | None:
    """Why a tmpfs cannot be mounted here, or None if it can."""
    if os.geteuid() != 0:
        return "mounting a small tmpfs as the state directory needs root"
    return None


class SmallVolume:
    """A tmpfs of `size` bytes at `path`, for as long as the `with` block lasts."""

    def __init__(self, path: Path, size: int = 20 << 20) -> None:
        self.path = path
        self.size = size
        self.ballast: list[Path] = []
        self.mounted = False

    def __enter__(self) -> SmallVolume:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
                       check=True, capture_output=True, timeout=30)
        self.mounted = True
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.mounted:
            # Lazy: a process that still holds a file there (a coordinator being stopped)
            # must not keep the mount, nor make the teardown fail.
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True, timeout=30)
            self.mounted = False

    @property
    def free(self) -> int:
        return free_bytes(self.path)

    def fill(self, leave: int = 0) -> int:
        """Take the free space but `leave` bytes with a ballast file; returns its size."""
        path = self.path / f"ballast-{uuid.uuid4().hex[:8]}"
        self.ballast.append(path)
        written = 0
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            piece = 1 << 20
            while piece >= 4096:
                want = self.free - leave
                if want < piece:
                    piece //= 2
                    continue
                try:
                    os.posix_fallocate(fd, written, piece)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    piece //= 2
                    continue
                written += piece
        finally:
            os.close(fd)
        return written

    def empty(self) -> int:
        """Delete the ballast; returns the bytes that are free afterwards."""
        for path in self.ballast:
            path.unlink(missing_ok=True)
        self.ballast.clear()
        return self.free
