"""Stored tensor files checked against their recorded hashes before they are served
(issue 14, item 4: one corrupt file must not stop the service).

A file is hashed once, the first time it is served, and the verdict kept for as long
as the file stays the same: keyed by device, inode, size, mtime and ctime, so any
write, truncation or replacement (and ctime cannot be set back by a user) makes the
next serve hash it again. Files this process just wrote and hashed on the way are
trusted as they stand. Why not hash while streaming instead: a mismatch is known only
at the last byte, when every chunk but the last has already reached the client; a
resumed download (`skip_chunks`) would have to read what it skips; and every agent
fetching a new version would hash it again, where this hashes it once. What it does
not see is the disk changing a file's bytes under an unchanged inode and times (bit
rot): the coordinator's start, a restart, or `tandem models verify` catches that.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from cloud.store import FileKind, Store
from cloud.tensorfile import content_problem
from tandem import metrics

_Key = tuple[int, int, int, int, int]


class CorruptFile(Exception):
    """A stored file that does not match its recorded hash; `reason` says how (no path)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def corrupt_message(model: str, version: int, reason: str, kind: FileKind = FileKind.MODEL) -> str:
    """What a client is told (DATA_LOSS) about a version whose file is corrupt."""
    what = "the delta to" if kind is FileKind.DELTA else ""
    return f"{what} {model} v{version} is corrupt on the server ({reason}); it is quarantined, no longer served".strip()


def _key(path: Path) -> _Key | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Verifier:
    """Verdicts on files, each hashed once per change, off the event loop; concurrent
    requests for one file share one hashing."""

    def __init__(self) -> None:
        self._verdicts: dict[Path, tuple[_Key, str | None]] = {}
        self._checking: dict[Path, asyncio.Task[str | None]] = {}

    async def problem(self, path: Path, sha256: str, size: int | None) -> str | None:
        """Why the file at `path` is not the one recorded, or None when it is."""
        key = _key(path)
        cached = self._verdicts.get(path)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        task = self._checking.get(path)
        if task is None:
            task = self._checking[path] = asyncio.create_task(asyncio.to_thread(self._check, path, sha256, size, key))
            task.add_done_callback(lambda _: self._checking.pop(path, None))
        return await asyncio.shield(task)

    def _check(self, path: Path, sha256: str, size: int | None, key: _Key | None) -> str | None:
        started = time.perf_counter()
        problem = content_problem(path, sha256, size)
        metrics.FILE_VERIFY_SECONDS.observe(time.perf_counter() - started)
        if key is not None and _key(path) == key:  # kept only if the file did not change while hashed
            self._verdicts[path] = (key, problem)
        return problem

    def trust(self, path: Path) -> None:
        """A file this process has just written, hashing it on the way: good as it stands."""
        key = _key(path)
        if key is not None:
            self._verdicts[path] = (key, None)


def verify_state(directory: Path) -> tuple[int, list[str]]:
    """Every version's file and every recorded delta in a state directory, hashed against
    its record without changing anything: (files checked, one line per bad file)."""
    store = Store(directory, readonly=True)
    try:
        rows = store.list_versions(quarantined=True)
    finally:
        store.close()
    checked, bad = 0, []
    for row in rows:
        files: list[tuple[FileKind, Path, str, int | None]] = [(FileKind.MODEL, Path(row.path), row.sha256, row.bytes)]
        if row.delta_path and row.delta_sha256:  # deltas written before migration 3 have no hash: never served
            files.append((FileKind.DELTA, Path(row.delta_path), row.delta_sha256, None))
        for kind, path, sha256, size in files:
            checked += 1
            problem = content_problem(path, sha256, size)
            if problem is not None:
                bad.append(f"{row.model} v{row.version} {kind}: {problem} ({path})")
    return checked, bad

