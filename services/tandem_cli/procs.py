"""Starting and stopping Tandem processes on this machine (the demo and the tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def tandem_process(args: list[str], log: Path, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Start `tandem ARGS` as a child process with its output in `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "tandem_cli", *args], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def start_cloud(
    certs: Path, state: Path, log: Path, listen: str = "127.0.0.1:0", extra: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a coordinator (on a free loopback port by default); returns it and its bound ports."""
    ready = state.with_name(state.name + ".ready.json")
    ready.unlink(missing_ok=True)
    proc = tandem_process(
        ["cloud", "--listen", listen, "--certs", str(certs), "--state", str(state),
         "--metrics", "127.0.0.1:0", "--ready-file", str(ready), "--grace", "3", *(extra or [])],
        log,
    )
    return proc, wait_ready(proc, ready, log, "coordinator")


def start_region(
    parent: str, certs: Path, name: str, state: Path, log: Path, listen: str = "127.0.0.1:0",
    extra: list[str] | None = None,
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a regional aggregator under `parent` (HOST:PORT); returns it and its bound ports."""
    ready = state.with_name(state.name + ".ready.json")
    ready.unlink(missing_ok=True)
    proc = tandem_process(
        ["region", "--parent", parent, "--id", name, "--listen", listen, "--certs", str(certs), "--state", str(state),
         "--metrics", "127.0.0.1:0", "--ready-file", str(ready), *(extra or [])],
        log,
    )
    return proc, wait_ready(proc, ready, log, f"region {name}")


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, what: str, timeout: float = 60) -> dict[str, Any]:
    """The JSON a child writes to its --ready-file once serving; raises if it exits first."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{what} did not start in {timeout:.0f} s; see {log}")
        time.sleep(0.05)
    result: dict[str, Any] = json.loads(ready.read_text())
    return result


def start_agent(
    cloud: str, certs: Path, name: str, data: str, log: Path, metrics: str | None = None,
    extra: list[str] | None = None, prefix: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    """An agent process; `prefix` runs it inside something (`ip netns exec NS`, say)."""
    flags = ["--metrics", metrics] if metrics else []
    return tandem_process(
        ["edge", "--cloud", cloud, "--certs", str(certs), "--id", name, "--data", data, *flags, *(extra or [])], log,
        prefix=prefix,
    )


def start_serving_agent(
    cloud: str, certs: Path, name: str, data: str, log: Path, placements: list[str], extra: list[str] | None = None,
    prefix: list[str] | None = None, metrics_host: str = "127.0.0.1",
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """An agent that serves Inference on a free loopback port with `placements`
    (MODEL=MODE each); returns it and its ready-file JSON (inference_port, metrics_port)."""
    ready = log.with_suffix(".ready.json")
    ready.unlink(missing_ok=True)
    flags = ["--listen", "127.0.0.1:0", "--metrics", f"{metrics_host}:0", "--ready-file", str(ready)]
    for placement in placements:
        flags += ["--placement", placement]
    proc = start_agent(cloud, certs, name, data, log, extra=[*flags, *(extra or [])], prefix=prefix)
    return proc, wait_ready(proc, ready, log, f"agent {name}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    """A loopback port that was free a moment ago (for children that cannot report theirs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
