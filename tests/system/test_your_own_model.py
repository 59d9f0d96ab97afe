"""The README's "Your own model" walkthrough, run as a user types it: each command of its
marked block in order, the ones ending in `&` left running, in an empty directory.

Two substitutions, and nothing else: the ports 7443 and 7450 become free ones (the
machine may use those), and the `pip install -e examples/...` line is checked rather
than run (`make install` installed the examples into this environment already; the
walkthrough's next command, `tandem tasks`, shows they are there). A user waits for
the coordinator to come up before typing the next command; so does this test.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tandem_cli.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.process, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> list[str]:
    """The commands of the README's marked block, continuation lines joined, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- your-own-model: begin -->", 1)[1].split("<!-- your-own-model: end -->", 1)[0]
    body = block.strip().removeprefix("```sh").removesuffix("```")
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout:.0f} s")


def test_the_readme_walkthrough_trains_serves_and_splits_a_model_tandem_never_saw(tmp_path: Path) -> None:
    cloud_port, edge_port = free_port(), free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    background: list[subprocess.Popen[bytes]] = []
    outputs: dict[str, str] = {}
    try:
        for index, command in enumerate(walkthrough()):
            command = command.replace(":7443", f":{cloud_port}").replace(":7450", f":{edge_port}")
            if command.startswith("pip install"):
                packages = [a for a in shlex.split(command)[2:] if a.startswith("examples/")]
                assert packages == ["examples/resnet", "examples/forecast"], command
                continue
            if command.startswith("export "):
                for pair in shlex.split(command)[1:]:
                    key, _, value = pair.partition("=")
                    env[key] = value
                continue
            if command.endswith("&"):
                log = open(tmp_path / f"background-{index}.log", "wb")  # noqa: SIM115 - closed with the process
                proc = subprocess.Popen(["bash", "-c", f"exec {command[:-1]}"], cwd=tmp_path, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                background.append(proc)
                if command.startswith("tandem cloud"):
                    _wait_for_port(cloud_port, proc)
                continue
            result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                    timeout=600, stdin=subprocess.DEVNULL)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            outputs[command] = result.stdout
            for proc in background:
                assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
        for proc in background:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def output(prefix: str) -> str:
        matches = [text for command, text in outputs.items() if command.startswith(prefix)]
        assert len(matches) == 1, (prefix, list(outputs))
        return matches[0]

    assert "resnet" in output("tandem tasks") and "forecast" in output("tandem tasks")
    assert "completed" in output("tandem job start --model resnet")
    assert "completed" in output("tandem job start --model forecast")
    agents = output("tandem agents")
    assert "kind=camera" in agents and "meter-1" in agents
    assert "stage" in output("tandem infer resnet --info").lower()
    cloud = outputs["tandem infer resnet --data digits --rows 4"].strip().splitlines()
    edge = output("tandem infer resnet --data digits --rows 4 --server").strip().splitlines()
    assert len(cloud) == len(edge) == 4

    def answers(lines: list[str]) -> list[tuple[str, ...]]:
        # "ROW  argmax K    p P  vV PLACEMENT": the answer, without where it was computed
        return [tuple(line.split()[:5]) for line in lines]

    # Split at the edge and finished in the cloud (or wherever the placement controller
    # has moved it since): the same answers as the cloud's own.
    assert answers(cloud) == answers(edge)
