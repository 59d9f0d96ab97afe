"""Enrollment end to end with real processes: `tandem ca`, a coordinator, and an agent
that starts with nothing but a one-time token and the CA bundle."""

from __future__ import annotations

import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tandem import certs, enrollment
from tandem_cli import procs
from tests.support.cluster import Cluster

pytestmark = pytest.mark.process


def _tandem(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_an_agent_with_only_a_token_and_the_ca_bundle_enrols_and_connects(
    cluster: Cluster, tmp_path: Path, certs_dir: Path
) -> None:
    ca_dir = tmp_path / "ca"
    _tandem("certs", "intermediate", "--dir", str(certs_dir), "--out", str(ca_dir))
    token = _tandem("certs", "token", "edge-new", "--ttl", "10m", "--ca-dir", str(ca_dir)).strip()
    ready = tmp_path / "ca.ready.json"
    ca_log = tmp_path / "ca.log"  # in the cluster's workdir: printed when the test fails
    ca = procs.tandem_process(["ca", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                               "--cert-hours", "1", "--ready-file", str(ready)], ca_log)
    try:
        ca_ports = procs.wait_ready(ca, ready, ca_log, "enrollment service")
        cluster.start_cloud()
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes((certs_dir / "ca.pem").read_bytes())
        agent_certs = tmp_path / "agent-certs"  # empty: no key, no certificate, no CA
        enrol = ["--enroll", f"localhost:{ca_ports['port']}", "--enroll-token-file", str(token_file),
                 "--ca-file", str(bundle)]
        cluster.agents["edge-new"] = procs.start_agent(cluster.target, agent_certs, "edge-new", "digits:0/2",
                                                       tmp_path / "edge-new.log", extra=enrol)
        await cluster.wait_connected(1, timeout=60)
        assert "edge-new" in _tandem("agents", "--cloud", cluster.target, "--certs", str(certs_dir))

        cert_path, key_path = certs.agent_paths(agent_certs, "edge-new")
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        assert certs.identity_from_pem(cert_path.read_bytes()) == certs.Identity("agent", "edge-new")
        assert token.encode() not in (ca_dir / enrollment.TOKENS_DB).read_bytes()

        # The same token again, by another process with no certificate: refused, in one line.
        replay = subprocess.run(
            [sys.executable, "-m", "tandem_cli", "edge", "--cloud", cluster.target, "--certs",
             str(tmp_path / "other-certs"), "--id", "edge-new", "--data", "digits:1/2", *enrol],
            capture_output=True, text=True, timeout=60, check=False)
        assert replay.returncode == 1
        assert "error: UNAUTHENTICATED: this enrollment token has already been used" in replay.stderr
        assert not certs.agent_paths(tmp_path / "other-certs", "edge-new")[0].exists()

        with urllib.request.urlopen(f"http://127.0.0.1:{ca_ports['metrics_port']}/metrics", timeout=10) as page:
            text = page.read().decode()
        assert 'tandem_enrollments_total{outcome="issued"} 1.0' in text
        assert 'tandem_enrollments_total{outcome="replayed"} 1.0' in text
        assert token not in ca_log.read_text()
    finally:
        procs.stop(ca)
