"""A user's task on the whole training path, across processes over mutual TLS: a
coordinator and agents with a task package installed apart from Tandem
(tests/support/tasks_v1 on their PYTHONPATH), an agent with another version of it, and
one that trains only mlp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.tensorfile import read_tensors
from tandem_cli import procs
from tests.support.cluster import Cluster

pytestmark = [pytest.mark.slow, pytest.mark.process]

SUPPORT = Path(__file__).resolve().parents[1] / "support"
TASK = "tandem_testtask:Regression"


def _with_tasks(version: str) -> dict[str, str]:
    path = [str(SUPPORT / f"tasks_{version}"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def tandem(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tandem_cli", *args], capture_output=True, text=True, timeout=120,
                          env=env, check=False)


async def test_a_users_task_trains_across_processes_and_others_are_excluded(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    monkeypatch.setenv("PYTHONPATH", _with_tasks("v1")["PYTHONPATH"])
    cluster.start_cloud()
    for name, data, extra in (("agent-0", "regression:0/2", [f"--tasks={TASK},mlp", "--label", "site=a"]),
                              ("agent-1", "regression:1/2", [f"--tasks={TASK}", "--label", "site=a"])):
        cluster.agents[name] = procs.start_agent(cluster.target, cluster.certs, name, data,
                                                 cluster.workdir / f"{name}.log", extra=extra)
    monkeypatch.setenv("PYTHONPATH", _with_tasks("v2")["PYTHONPATH"])  # another version of the package
    cluster.agents["agent-2"] = procs.start_agent(cluster.target, cluster.certs, "agent-2", "regression:0/2",
                                                  cluster.workdir / "agent-2.log", extra=[f"--tasks={TASK}",
                                                                                          "--label", "site=a"])
    monkeypatch.setenv("PYTHONPATH", _with_tasks("v1")["PYTHONPATH"])
    cluster.agents["agent-3"] = procs.start_agent(cluster.target, cluster.certs, "agent-3", "digits:0/2",
                                                  cluster.workdir / "agent-3.log", extra=["--tasks", "mlp",
                                                                                          "--label", "site=a"])
    # agent-4: not selected by the job's label selector at all (neither trained nor excluded).
    cluster.agents["agent-4"] = procs.start_agent(cluster.target, cluster.certs, "agent-4", "regression:1/2",
                                                  cluster.workdir / "agent-4.log", extra=[f"--tasks={TASK}"])
    await cluster.wait_connected(5)
    common = ["--cloud", cluster.target, "--certs", str(cluster.certs)]
    fingerprints = {version: json.loads(tandem("tasks", TASK, "--json", env=_with_tasks(version)).stdout)[0]
                    ["fingerprint"] for version in ("v1", "v2")}
    assert fingerprints["v1"] != fingerprints["v2"]

    # Malformed config: one line, exit 2, nothing started.
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"marker": {"deep": 1}}))
    for bad in (["--config", "bad key=1"], ["--config-file", str(nested)],
                ["--config-file", str(tmp_path / "missing.json")]):
        refused = tandem("job", "start", *common, "--model", TASK, "--rounds", "1", "--min-clients", "1", *bad)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and refused.stderr.startswith("error: ")
    unknown = tandem("job", "start", *common, "--model", "no-such-task", "--rounds", "1", "--min-clients", "1")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr and "mlp" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    listed = json.loads(tandem("job", "list", *common, "--json").stdout)
    assert listed == []

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"marker": 1, "note": "from the file"}))
    started = tandem("job", "start", *common, "--model", TASK, "--rounds", "3", "--min-clients", "2",
                     "--deadline", "60", "--eval", "regression:test", "--epochs", "2", "--lr", "0.01",
                     "--config-file", str(config_file), "--config", "marker=7", "--select", "site=a")
    assert started.returncode == 0, started.stderr + cluster.logs()
    job_id = started.stdout.strip()
    waited = tandem("job", "wait", job_id, *common, "--json", "--timeout", "180")
    job = json.loads(waited.stdout)
    assert job["state"] == "completed", cluster.logs()

    # The config reached train and evaluate: the user's values over the training fields.
    assert job["config"] == {"epochs": 2, "batch_size": 32, "learning_rate": 0.01, "mu": 0.0, "marker": 7,
                             "note": "from the file"}
    rounds = job["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert sorted(r["agents"]) == ["agent-0", "agent-1"] and r["rejected"] == 0
        assert r["train_metrics"]["marker_seen"] == 7 and r["eval_metrics"]["marker_seen"] == 7
        assert r["local_loss"] == pytest.approx(r["train_metrics"]["loss"])
    maes = [r["eval_metrics"]["mae"] for r in rounds]
    assert maes[-1] < maes[0], maes

    excluded = {e["agent"]: e for e in job["excluded"]}
    assert set(excluded) == {"agent-2", "agent-3"}
    assert excluded["agent-2"]["code"] == "FAILED_PRECONDITION"
    assert fingerprints["v1"] in excluded["agent-2"]["reason"] and fingerprints["v2"] in excluded["agent-2"]["reason"]
    assert excluded["agent-3"]["code"] == "NOT_FOUND" and TASK in excluded["agent-3"]["reason"]
    status = tandem("job", "status", job_id, *common)
    assert "excluded agent-2: FAILED_PRECONDITION" in status.stdout and "marker=7" in status.stdout
    assert "eval mae" in status.stdout

    # Batch norm's counter never left an agent: not in any version the job published.
    versions = sorted((cluster.state / "models" / TASK).glob("v*.safetensors"))
    assert len(versions) == 4  # the initial model and three rounds
    for path in versions:
        names = set(read_tensors(path))
        assert names and not any(name.endswith("num_batches_tracked") for name in names), names
        assert any(name.endswith("running_mean") for name in names)  # float buffers are federated

    metrics = procs_metrics(cluster.ports["metrics_port"])
    assert 'tandem_coordinator_round_metric{metric="mae",source="eval",task="tandem_testtask:Regression"}' in metrics


def procs_metrics(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
