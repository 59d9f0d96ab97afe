"""End to end over mutual TLS on loopback: a coordinator and three agent processes,
driven through the `tandem` command line, matched against the in-process reference.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.simulation import simulate_fedavg
from tests.support.cluster import Cluster  # the `cluster` fixture is in conftest.py

# a coordinator and three agent processes through the command line: ~30 s
pytestmark = [pytest.mark.slow, pytest.mark.process]

ROUND_KEYS = {"round", "accuracy", "loss", "local_loss", "seconds", "bytes_up", "bytes_down", "accepted",
              "rejected", "version", "sha256"}


def tandem(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_federated_training_end_to_end(cluster: Cluster) -> None:
    cluster.start_cloud()
    cluster.start_agents(3)
    await cluster.wait_connected(3)
    common = ["--cloud", cluster.target, "--certs", str(cluster.certs)]
    job_id = tandem("job", "start", *common, "--model", "mlp", "--rounds", "3", "--min-clients", "3",
                    "--deadline", "60", "--eval", "digits").strip()
    job = json.loads(tandem("job", "wait", job_id, *common, "--json", "--timeout", "120"))

    assert job["state"] == "completed"
    rounds = job["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert ROUND_KEYS <= set(r)
        assert (r["accepted"], r["rejected"]) == (3, 0)
        assert len(r["sha256"]) == 64 and r["bytes_up"] > 3 * 1_000_000
    # Round 1 trains from the seeded initial model, which agents build themselves;
    # later rounds download each new version whole (codec none).
    assert [r["bytes_down"] > 3 * 1_000_000 for r in rounds] == [False, True, True]
    assert [r["version"] for r in rounds] == [rounds[0]["version"] + i for i in range(3)]

    # Dense float32 updates over the network land on the in-process reference figures.
    reference = simulate_fedavg(num_clients=3, rounds=3)
    for r, (accuracy, loss) in zip(rounds, reference, strict=True):
        assert r["accuracy"] == pytest.approx(accuracy, abs=0.01)
        assert r["loss"] == pytest.approx(loss, rel=0.02)

    cloud = scrape(cluster.ports["metrics_port"])
    assert cloud[("tandem_coordinator_updates_accepted_total", ())] == 9
    assert cloud[("tandem_rpc_server_handled_total",
                  (("code", "OK"), ("method", "UploadUpdate"), ("service", "tandem.v1.Coordinator")))] == 9
    assert cloud[("tandem_model_version", (("model", "mlp"),))] == rounds[-1]["version"]
    assert cloud[("tandem_coordinator_connected_agents", ())] == 3
    edge = scrape(cluster.agent_metrics["agent-0"])
    assert edge[("tandem_edge_connected", ())] == 1
    assert edge[("tandem_edge_tasks_total", (("outcome", "uploaded"),))] == 3
    assert edge[("tandem_edge_sent_bytes_total", (("kind", "update"),))] > 3 * 1_000_000

    # SIGTERM drains and exits cleanly; the agents notice and keep trying to reconnect.
    assert cluster.cloud is not None
    cluster.cloud.send_signal(signal.SIGTERM)
    assert cluster.cloud.wait(timeout=20) == 0
    async with asyncio.timeout(20):
        while True:
            edge = scrape(cluster.agent_metrics["agent-0"])
            if edge[("tandem_edge_connected", ())] == 0 and edge.get(("tandem_edge_reconnects_total", ()), 0) >= 1:
                break
            await asyncio.sleep(0.2)
    assert all(agent.poll() is None for agent in cluster.agents.values())
