"""Faults the design expects, with real processes: a coordinator killed with SIGKILL
mid-round, and agents that die mid-round.

Agents are paused with SIGSTOP to hold them at a known point of the round; that
freezes a real process, it changes nothing in the code under test.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import pytest

from tandem.v1 import admin_pb2
from tests.support.cluster import Cluster  # the `cluster` fixture is in conftest.py

# real coordinator and agent processes, killed and restarted: 15-20 s a test
pytestmark = [pytest.mark.slow, pytest.mark.process]


def spec(rounds: int, min_clients: int, deadline: float) -> admin_pb2.StartJobRequest:
    return admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(
        model="mlp", rounds=rounds, min_clients=min_clients, round_deadline_seconds=deadline, eval="digits",
    ))


async def test_coordinator_killed_mid_round_loses_nothing(cluster: Cluster) -> None:
    cluster.start_cloud()
    cluster.start_agents(3)
    await cluster.wait_connected(3)
    cluster.signal_agent("agent-2", signal.SIGSTOP)  # agent-2 will answer only after the crash
    job_id = (await cluster.admin("StartJob", spec(rounds=3, min_clients=3, deadline=120))).job_id
    await cluster.wait_job(
        job_id, lambda j: list(j.open_round.accepted_agents) == ["agent-0", "agent-1"], timeout=60, interval=0.1
    )

    assert cluster.cloud is not None
    cluster.cloud.kill()
    cluster.cloud.wait()
    killed_at = time.time()
    cluster.start_cloud()
    cluster.signal_agent("agent-2", signal.SIGCONT)

    job = await cluster.wait_job(job_id, timeout=120)
    assert job.state == admin_pb2.JOB_STATE_COMPLETED, job.message
    first = job.rounds[0]
    assert (first.round, first.accepted, list(first.agents)) == (1, 3, ["agent-0", "agent-1", "agent-2"])
    assert [r.accepted for r in job.rounds] == [3, 3, 3]
    assert job.rounds[-1].accuracy > 0.8

    # The two updates acknowledged before the crash were kept, not trained again.
    cluster.stop_all()
    with sqlite3.connect(cluster.state / "tandem.db") as db:
        received = dict(db.execute("SELECT agent, received FROM updates WHERE job_id = ? AND round = 1", (job_id,)))
    assert sorted(received) == ["agent-0", "agent-1", "agent-2"]
    assert received["agent-0"] < killed_at and received["agent-1"] < killed_at < received["agent-2"]


async def test_round_closes_on_quorum_at_its_deadline_when_agents_die(cluster: Cluster) -> None:
    cluster.start_cloud()
    cluster.start_agents(5)
    await cluster.wait_connected(5)
    for name in ("agent-3", "agent-4"):
        cluster.signal_agent(name, signal.SIGSTOP)
    deadline = 10.0  # long enough for three agents' first training on a loaded machine
    job_id = (await cluster.admin("StartJob", spec(rounds=2, min_clients=3, deadline=deadline))).job_id
    await cluster.wait_job(job_id, lambda j: len(j.open_round.selected) == 5, timeout=60, interval=0.1)
    for name in ("agent-3", "agent-4"):
        cluster.signal_agent(name, signal.SIGKILL)

    job = await cluster.wait_job(job_id, timeout=90)
    assert job.state == admin_pb2.JOB_STATE_COMPLETED, job.message
    first, second = job.rounds
    assert (first.accepted, list(first.agents), first.attempts) == (3, ["agent-0", "agent-1", "agent-2"], 1)
    assert first.seconds >= deadline  # it waited for the dead agents until the deadline, then closed on quorum
    assert (second.accepted, list(second.agents)) == (3, ["agent-0", "agent-1", "agent-2"])
    assert second.seconds < deadline  # the dead agents are no longer selected
