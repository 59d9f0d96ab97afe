"""Enrollment end to end with real processes: `tandem ca`, a coordinator, and an agent
that starts with nothing but a one-time token and the CA bundle; its renewal under
load, and its return after its certificate expired while it was away."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from tandem import certs, enrollment, grpcserver, tls
from tandem.v1 import admin_pb2, inference_pb2, inference_pb2_grpc
from tandem_cli import procs
from tests.conftest import APP
from tests.support.cluster import Cluster
from tests.support.inference import arrays_for, inputs, publish, request

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
    ca = procs.tandem_process(["ca", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", "--renew-listen", "127.0.0.1:0",
                               "--metrics", "127.0.0.1:0",
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


def _metric(port: int, name: str, **labels: str) -> float:
    """The sum of a counter's series (matching `labels`) on a process's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _start_ca(tmp_path: Path, certs_dir: Path, cert_hours: float) -> tuple[subprocess.Popen[bytes], dict[str, Any], Path]:
    ca_dir = tmp_path / "ca"
    if not ca_dir.exists():
        _tandem("certs", "intermediate", "--dir", str(certs_dir), "--out", str(ca_dir))
    ready = tmp_path / "ca.ready.json"
    ready.unlink(missing_ok=True)
    log = tmp_path / "ca.log"
    ca = procs.tandem_process(["ca", "--dir", str(ca_dir), "--listen", "127.0.0.1:0", "--renew-listen", "127.0.0.1:0",
                               "--metrics", "127.0.0.1:0", "--cert-hours", str(cert_hours), "--ready-file", str(ready)],
                              log)
    return ca, procs.wait_ready(ca, ready, log, "enrollment service"), ca_dir


def _enrol_flags(tmp_path: Path, certs_dir: Path, ca_dir: Path, ports: dict[str, Any], name: str) -> list[str]:
    token_file = tmp_path / f"{name}.token"
    token_file.write_text(_tandem("certs", "token", name, "--ttl", "10m", "--ca-dir", str(ca_dir)))
    return ["--enroll", f"localhost:{ports['port']}", "--renew", f"localhost:{ports['renew_port']}",
            "--enroll-token-file", str(token_file), "--ca-file", str(certs_dir / "ca.pem")]


async def test_renewal_under_load_fails_no_request_and_no_upload(
    cluster: Cluster, tmp_path: Path, certs_dir: Path
) -> None:
    # 0.006 h: a 21.6 s certificate, renewed 14.4 s after it was issued, while the agent
    # trains round after round (an upload each) and forwards inference to the cloud.
    ca, ca_ports, ca_dir = _start_ca(tmp_path, certs_dir, cert_hours=0.006)
    try:
        cluster.cloud, cluster.ports = procs.start_cloud(
            certs_dir, cluster.state, cluster.workdir / "cloud.log", extra=["--placement-interval", "0"])
        await publish(cluster.target, certs_dir, "mlp", arrays_for("mlp", seed=1))
        agent_certs = tmp_path / "agent-certs"
        flags = _enrol_flags(tmp_path, certs_dir, ca_dir, ca_ports, "edge-renew")
        proc, agent = procs.start_serving_agent(cluster.target, agent_certs, "edge-renew", "digits:0/2",
                                                cluster.workdir / "edge-renew.log", ["mlp=cloud"], extra=flags)
        cluster.agents["edge-renew"] = proc
        await cluster.wait_connected(1, timeout=60)
        cert_path = certs.agent_paths(agent_certs, "edge-renew")[0]
        first = x509.load_pem_x509_certificate(cert_path.read_bytes())
        job = await cluster.admin("StartJob", admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(
            model="mlp", rounds=1000, min_clients=1, round_deadline_seconds=60)))

        metrics_port = agent["metrics_port"]
        answered, failed, uploaded_at_expiry = 0, [], None
        x = inputs(1)
        async with grpcserver.secure_channel(f"localhost:{agent['inference_port']}",
                                             tls.app_credentials(certs_dir, APP)) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            # Until the old certificate has expired and 3 s more: new connections need the new one.
            expiry = first.not_valid_after_utc.timestamp()
            while time.time() < expiry + 3:
                if uploaded_at_expiry is None and time.time() >= expiry:
                    uploaded_at_expiry = _metric(metrics_port, "tandem_edge_tasks_total", outcome="uploaded")
                try:
                    reply = await stub.Infer(request("mlp", x), timeout=10)
                    assert reply.placement == inference_pb2.PLACEMENT_CLOUD
                    answered += 1
                except grpc.aio.AioRpcError as exc:
                    failed.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.05)
        # Read while the job still runs (stopping it refuses the upload then in flight).
        rounds = (await cluster.job(job.job_id)).rounds
        outcomes = {o: _metric(metrics_port, "tandem_edge_tasks_total", outcome=o)
                    for o in ("uploaded", "failed", "rejected")}
        fallbacks = _metric(metrics_port, "tandem_edge_inference_fallbacks_total")
        reconnects = _metric(metrics_port, "tandem_edge_reconnects_total")
        await cluster.admin("StopJob", admin_pb2.StopJobRequest(job_id=job.job_id))

        renewed = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert renewed.serial_number != first.serial_number, "the certificate was not renewed"
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert "renewed this agent's certificate" in (cluster.workdir / "edge-renew.log").read_text()
        assert failed == [] and answered > 50
        assert fallbacks == 0  # every answer from the cloud
        assert reconnects == 0
        assert outcomes["uploaded"] >= len(rounds) > 5
        assert outcomes["failed"] == outcomes["rejected"] == 0
        assert all(r.accepted == 1 and r.attempts == 1 for r in rounds)
        # Uploads went on after the old certificate expired: on the new one.
        assert uploaded_at_expiry is not None and outcomes["uploaded"] > uploaded_at_expiry
        assert _metric(ca_ports["metrics_port"], "tandem_enrollments_total", outcome="renewed") >= 1
        print(f"renewal under load: {answered} requests answered by the cloud and {len(rounds)} rounds with an "
              "upload each, across the renewal and past the old certificate's expiry; 0 failed")
    finally:
        procs.stop(ca)


async def test_an_agent_whose_certificate_expired_offline_enrols_again_only_with_a_new_token(
    cluster: Cluster, tmp_path: Path, certs_dir: Path
) -> None:
    # 0.002 h: a 7.2 s certificate, expired by the time the agent comes back.
    ca, ca_ports, ca_dir = _start_ca(tmp_path, certs_dir, cert_hours=0.002)
    try:
        cluster.start_cloud()
        agent_certs = tmp_path / "agent-certs"
        flags = _enrol_flags(tmp_path, certs_dir, ca_dir, ca_ports, "edge-away")
        log = cluster.workdir / "edge-away.log"
        cluster.agents["edge-away"] = procs.start_agent(cluster.target, agent_certs, "edge-away", "digits:0/2", log,
                                                        extra=flags)
        await cluster.wait_connected(1, timeout=60)
        procs.stop(cluster.agents.pop("edge-away"))
        cert_path = certs.agent_paths(agent_certs, "edge-away")[0]
        expiry = x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc.timestamp()
        await asyncio.sleep(max(0.0, expiry - time.time()) + 0.5)

        def edge(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "tandem_cli", "edge", "--cloud", cluster.target, "--certs", str(agent_certs),
                 "--id", "edge-away", "--data", "digits:0/2", *extra],
                capture_output=True, text=True, timeout=60, check=False)

        # Without --enroll: one line, exit 2 (as for a missing certificate).
        plain = edge()
        assert plain.returncode == 2
        assert plain.stderr.strip().splitlines()[-1].startswith("error: the certificate of agent 'edge-away'")
        assert "expired at" in plain.stderr and "Traceback" not in plain.stderr
        # With the token it enrolled with: spent, refused.
        again = edge(*flags)
        assert again.returncode == 1
        assert "error: UNAUTHENTICATED: this enrollment token has already been used" in again.stderr
        # With a new token: enrolled again, and connected.
        fresh = _enrol_flags(tmp_path, certs_dir, ca_dir, ca_ports, "edge-away")
        cluster.agents["edge-away"] = procs.start_agent(cluster.target, agent_certs, "edge-away", "digits:0/2", log,
                                                        extra=fresh)
        await cluster.wait_connected(1, timeout=60)
        assert x509.load_pem_x509_certificate(cert_path.read_bytes()).not_valid_after_utc.timestamp() > expiry
    finally:
        procs.stop(ca)
