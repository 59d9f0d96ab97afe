"""Issue 18, part 3: where a round's wall time goes, by phase, in the job's status."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cloud import phases
from cloud.app import Coordinator
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc
from tandem_cli.admin import job_dict, phase_lines
from tests.support.clients import (
    agent_channel,
    delta,
    header_for,
    start_job,
    streams,
    update_messages,
    upload,
    wait_rounds,
)


def test_an_agents_report_keeps_known_finite_durations_only() -> None:
    reported = phases.agent_reported({"train": 0.5, "download": -1.0, "encode": math.nan, "fold": 3.0, "x": 1.0})
    assert reported == {"train": 0.5}


def test_the_breakdown_sums_to_the_rounds_seconds_and_caps_an_agents_claims() -> None:
    clock = phases.RoundClock(dispatch=0.01, dispatched=100.0)
    clock.arrivals["a"] = phases.Arrival(100.5, {"download": 0.1, "train": 0.2, "upload": 0.05, "fold": 0.01})
    clock.arrivals["b"] = phases.Arrival(101.0, {"train": 10.0, "encode": 5.0, "upload": 0.1, "validate": 0.02,
                                                 "fold": 0.03})  # b arrived last: the critical path
    clock.closing.update({"close": 0.1, "evaluate": 0.2, "publish": 0.05})
    out = clock.breakdown(1.5)
    assert list(out) == ["dispatch", "train", "encode", "upload", "validate", "fold", "wait", "close", "evaluate",
                         "publish"]
    # b claims 15 s of work in the 1 s from dispatch to its arrival: cut to the 0.85 s it could have been.
    assert out["train"] == pytest.approx(0.85) and out["encode"] == 0.0
    assert sum(out.values()) == pytest.approx(1.5, abs=1e-3) and out["wait"] >= 0.0


def test_the_cli_shows_round_one_and_the_median_of_the_rest() -> None:
    rounds = [{"round": 1, "seconds": 0.5, "phases": {"train": 0.3, "wait": 0.2}},
              {"round": 2, "seconds": 0.4, "phases": {"train": 0.2, "wait": 0.2}},
              {"round": 3, "seconds": 0.3, "phases": {"train": 0.1, "wait": 0.2}}]
    lines = phase_lines(rounds)
    assert lines[0] == "time by phase, round 1 (0.50 s): train 0.300  wait 0.200"
    assert lines[1] == "time by phase, median of rounds 2-3 (0.35 s): train 0.150  wait 0.200"
    assert phase_lines([{"round": 1, "seconds": 1.0, "phases": {}}]) == []


async def test_job_status_breaks_each_round_down_by_phase(coordinator: Coordinator, certs_dir: Path) -> None:
    a, b = await streams(coordinator.port, certs_dir, ["agent-0", "agent-1"])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=2,
                              round_deadline_seconds=60, eval="digits")
        for name, stream, value in (("agent-0", a, 0.01), ("agent-1", b, 0.02)):
            task = (await stream.next("task")).task
            header = header_for(task, phase_seconds={"download": 0.0, "train": 0.002, "encode": 0.001, "bogus": 9.0})
            async with agent_channel(coordinator.port, certs_dir, name) as channel:
                await upload(coordinator_pb2_grpc.CoordinatorStub(channel), update_messages(header, delta(value)))
        status = await wait_rounds(coordinator.port, certs_dir, job.job_id, 1)
        result = status.rounds[0]
    finally:
        for s in (a, b):
            await s.close()
    found = dict(result.phases)
    assert set(found) == {"dispatch", "download", "train", "encode", "upload", "validate", "fold", "wait", "close",
                          "evaluate", "publish"}
    assert found["train"] <= 0.002 and found["evaluate"] > 0.0 and min(found.values()) >= 0.0
    assert sum(found.values()) == pytest.approx(result.seconds, abs=0.05)
    assert job_dict(status)["rounds"][0]["phases"] == found  # `tandem job status --json`



async def test_download_bytes_are_recorded_with_the_close_not_per_download(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    """A commit per download held the event loop at each round's start: the bytes are
    counted in memory and written with the round's close."""
    a, b = await streams(coordinator.port, certs_dir, ["agent-0", "agent-1"])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=2,
                              round_deadline_seconds=60)
        tasks = [(await s.next("task")).task for s in (a, b)]
        sent = 0
        async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            async for message in stub.DownloadModel(pb.ModelRequest(model="mlp", version=tasks[0].base_version)):
                sent += message.ByteSize()
        opened = coordinator.store.get_round(job.job_id, 1)
        assert opened is not None and opened.bytes_down == 0  # nothing written while the round is open
        for name, task, value in (("agent-0", tasks[0], 0.01), ("agent-1", tasks[1], 0.02)):
            async with agent_channel(coordinator.port, certs_dir, name) as channel:
                await upload(coordinator_pb2_grpc.CoordinatorStub(channel), update_messages(header_for(task),
                                                                                              delta(value)))
        result = (await wait_rounds(coordinator.port, certs_dir, job.job_id, 1)).rounds[0]
    finally:
        for s in (a, b):
            await s.close()
    assert result.bytes_down == sent > 1_000_000


def test_the_cli_and_the_coordinator_order_phases_alike() -> None:
    from tandem_cli.admin import PHASES

    assert PHASES == phases.ORDER
