"""One agent's claimed example count must not decide FedAvg (issue 14, item 1), against a
real coordinator over mutual TLS: a claim of 2^40 moves a round no more than an honest
agent with the round's median count would, streaming or at the close, and the cap is
recorded in the round."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc
import numpy as np
import pytest

from cloud.app import Coordinator
from cloud.service import MAX_HELLO_EXAMPLES
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tests.support.clients import (
    ControlStream,
    agent_channel,
    delta,
    download,
    header_for,
    start_job,
    update_messages,
    upload,
    upload_code,
    wait_rounds,
)

HONEST = {"agent-0": (100, 0.01), "agent-1": (120, 0.02)}  # agent: (examples, every weight moves by)
ATTACKER, ATTACK = "agent-2", -0.5
CLAIM = MAX_HELLO_EXAMPLES  # the most a Hello may declare, and so an update claim


def _distance(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.square(a[k].astype(np.float64) - b[k]).sum() for k in a)))


async def _round(server: Coordinator, certs_dir: Path, streams: list[ControlStream], claim: int
                 ) -> dict[str, np.ndarray]:
    """Answer the open round: the honest agents as in HONEST, the attacker claiming
    `claim`; returns the round's aggregate (new version - base)."""
    tasks = {s.name: (await s.next("task")).task for s in streams}
    for name, task in tasks.items():
        examples, value = HONEST.get(name, (claim, ATTACK))
        async with agent_channel(server.port, certs_dir, name) as channel:
            await upload(coordinator_pb2_grpc.CoordinatorStub(channel),
                         update_messages(header_for(task, num_examples=examples), delta(value)))
    task = tasks[ATTACKER]
    job = await wait_rounds(server.port, certs_dir, task.job_id, task.round)
    async with agent_channel(server.port, certs_dir, ATTACKER) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        _, base = await download(stub, "mlp", task.base_version)
        _, new = await download(stub, "mlp", job.rounds[task.round - 1].version)
    return {name: new[name].astype(np.float64) - base[name] for name in base}


@pytest.mark.parametrize("settings", [{}, {"clip_norm": 1e6}], ids=["streaming mean", "mean at the close"])
async def test_a_huge_claim_moves_fedavg_no_more_than_the_median_agent(
    coordinator: Coordinator, certs_dir: Path, settings: dict[str, object]
) -> None:
    streams = [ControlStream(coordinator.port, certs_dir, name) for name in [*HONEST, ATTACKER]]
    for stream in streams:
        # The attacker's Hello declares what it will claim (the Hello bounds an update's claim).
        await stream.open(num_examples=CLAIM if stream.name == ATTACKER else 1000)
    job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=2, min_clients=3,
                          round_deadline_seconds=60, max_examples=CLAIM, **settings)
    attacked = await _round(coordinator, certs_dir, streams, CLAIM)  # round 1: claims the most it may
    median = int(np.median([*(n for n, _ in HONEST.values()), CLAIM]))
    as_median = await _round(coordinator, certs_dir, streams, median)  # round 2: claims the median count

    honest_total = sum(n for n, _ in HONEST.values())
    honest = {k: sum(n * delta(v)[k].astype(np.float64) for n, v in HONEST.values()) / honest_total
              for k in attacked}
    moved, moved_by_median = _distance(attacked, honest), _distance(as_median, honest)
    assert moved <= moved_by_median * (1 + 1e-4) + 1e-6, (moved, moved_by_median)
    # And the aggregate is exactly FedAvg with the attacker's weight capped at the median count.
    expected = (sum(n * v for n, v in HONEST.values()) + median * ATTACK) / (honest_total + median)
    for value in attacked.values():
        np.testing.assert_allclose(value, expected, atol=2e-6)

    # The cap is recorded in the round: `tandem job status --json` shows it.
    done = await wait_rounds(coordinator.port, certs_dir, job.job_id, 2)
    first, second = done.rounds
    assert (first.example_cap, list(first.capped_agents)) == (median, [ATTACKER])
    assert (second.example_cap, list(second.capped_agents)) == (median, [])
    for stream in streams:
        await stream.close()


async def test_a_claim_over_the_jobs_limit_is_refused(coordinator: Coordinator, certs_dir: Path) -> None:
    stream = ControlStream(coordinator.port, certs_dir, ATTACKER)
    await stream.open(num_examples=CLAIM)
    await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1, round_deadline_seconds=60,
                    max_examples=1000)
    task: pb.TrainTask = (await stream.next("task")).task
    async with agent_channel(coordinator.port, certs_dir, ATTACKER) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert await upload_code(stub, update_messages(header_for(task, num_examples=1001), delta(0.01))) == \
            grpc.StatusCode.INVALID_ARGUMENT
        assert await upload_code(stub, update_messages(header_for(task, num_examples=1000), delta(0.01))) == \
            grpc.StatusCode.OK
    await stream.close()
