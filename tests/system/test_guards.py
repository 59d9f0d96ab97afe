"""Guards against double starts, as an operator meets them: a second server on an address
in use, a second coordinator on a state directory in use. Each is refused at start with
one line and exit 2, and the first keeps serving alone."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem_cli import procs
from tests.support.cluster import Cluster
from tests.support.deployment import AGENTS

pytestmark = pytest.mark.process


def _tandem(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def running(tmp_path: Path, certs_dir: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, certs_dir)
    cluster.start_cloud()
    try:
        yield cluster
    finally:
        if cluster.cloud is not None:
            procs.stop(cluster.cloud)


def _cloud(certs_dir: Path, state: Path, listen: str = "127.0.0.1:0", *extra: str) -> subprocess.CompletedProcess[str]:
    return _tandem("cloud", "--listen", listen, "--certs", str(certs_dir), "--state", str(state), *extra)


def test_a_second_coordinator_on_a_port_in_use_is_refused(running: Cluster, tmp_path: Path, certs_dir: Path) -> None:
    line = _one_line(_cloud(certs_dir, tmp_path / "other", f"127.0.0.1:{running.port}"))
    assert f"127.0.0.1:{running.port}" in line and "in use" in line
    assert running.cloud is not None and running.cloud.poll() is None


def test_a_second_coordinator_on_a_state_directory_in_use_is_refused(running: Cluster, certs_dir: Path) -> None:
    assert running.cloud is not None
    line = _one_line(_cloud(certs_dir, running.state))
    assert str(running.state) in line and f"pid {running.cloud.pid}" in line
    assert running.cloud.poll() is None


def test_a_state_directory_is_free_again_once_its_holder_is_killed(running: Cluster) -> None:
    assert running.cloud is not None
    running.cloud.kill()  # SIGKILL: nothing cleans up but the kernel
    running.cloud.wait()
    running.start_cloud()  # the same state directory and port, no manual clean-up


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, certs_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line(_cloud(certs_dir, tmp_path / "state", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in line and "metrics" in line


def test_a_health_port_in_use_is_one_line(running: Cluster, tmp_path: Path, certs_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_line(_cloud(certs_dir, tmp_path / "other", "127.0.0.1:0", "--health", f"127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in line


def test_an_agent_listening_on_a_port_in_use_is_refused(running: Cluster, tmp_path: Path, certs_dir: Path) -> None:
    result = _tandem("edge", "--cloud", running.target, "--certs", str(certs_dir), "--id", AGENTS[0],
                     "--data", "digits:0/4", "--listen", f"127.0.0.1:{running.port}", "--placement", "mlp=edge")
    line = _one_line(result)
    assert f"127.0.0.1:{running.port}" in line and "in use" in line
