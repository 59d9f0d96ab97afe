"""Durable renames: what makes a file written under a temporary name survive a crash
under its real one."""

from __future__ import annotations

import os
from pathlib import Path


def sync_directory(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename the (already fsynced) file `tmp` to `path`, and make the rename durable."""
    os.replace(tmp, path)
    sync_directory(path.parent)
