"""The open round as the one owner of its state, and the job runner around it, tested
without gRPC: the round against an in-memory fake of what it records, the runner with
an in-process registry and a store on a temporary directory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from cloud.accumulator import Accumulator
from cloud.models import ModelRepository
from cloud.open_round import OpenRound
from cloud.registry import Registry, Session
from cloud.rounds import JobRunner
from cloud.spec import JobSpec
from cloud.store import JobState, RoundState, Store, UpdateRow, VersionRow
from cloud.tensorfile import read_tensors, write_tensors
from tandem import compression, wire
from tandem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unavailable
from tandem.v1 import coordinator_pb2 as pb
from tests.support.clients import header_for
from tests.support.waiting import wait_for

SPECS = {"w": wire.TensorSpec("w", np.dtype(np.float32), (2, 3)), "b": wire.TensorSpec("b", np.dtype(np.float32), (3,))}
NONE = compression.parse_codec("none")
BASE = VersionRow("m", 4, "sha", "/nowhere", "job", 0, 0.0, 0)


class FakeRecords:
    """The store as a round sees it, in memory: what was recorded, in order."""

    def __init__(self) -> None:
        self.updates: list[tuple[str, int, UpdateRow, int]] = []
        self.selections: list[list[str]] = []
        self.attempts: list[tuple[int, list[str]]] = []

    def open_round(
        self, job_id: str, round_: int, attempt: int, base_version: int, selected: list[str], deadline: float
    ) -> None:
        self.attempts.append((attempt, selected))

    def set_selected(self, job_id: str, round_: int, selected: list[str]) -> None:
        self.selections.append(selected)

    def add_update(self, job_id: str, round_: int, row: UpdateRow, wire_bytes: int) -> None:
        self.updates.append((job_id, round_, row, wire_bytes))


def delta(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(spec.shape, value, np.float32) for name, spec in SPECS.items()}


def components(value: float) -> dict[str, np.ndarray]:
    """An update's wire components with the `none` codec."""
    out: dict[str, np.ndarray] = {}
    for name, array in delta(value).items():
        out.update(compression.encode(name, array, NONE))
    return out


def row(agent: str, num_examples: int = 10, path: str | None = None) -> UpdateRow:
    return UpdateRow(agent, f"digest-{agent}", num_examples, 0.5, path, 0, "none")


@pytest.fixture
def records() -> FakeRecords:
    return FakeRecords()


@pytest.fixture
async def rnd(tmp_path: Path, records: FakeRecords) -> AsyncIterator[OpenRound]:
    opened = OpenRound("job", 3, BASE, 0, ["a", "b", "c"], time.time() + 60, Accumulator(SPECS, tmp_path / "sum"),
                       records, "none")
    yield opened
    await opened.release()


async def test_admit_takes_a_selected_agent_on_the_base_with_its_codec(rnd: OpenRound) -> None:
    rnd.admit("a", 4, "none")


@pytest.mark.parametrize(("agent", "base", "update_codec", "error", "text"), [
    ("z", 4, "none", FailedPrecondition, "agent 'z' is not selected for round 3 of job job"),
    ("a", 3, "none", FailedPrecondition, "update is based on version 3; round 3 trains from version 4"),
    ("a", 4, "fp16", InvalidArgument, "codec 'fp16' where the task asked for 'none'"),
])
async def test_admit_refuses(
    rnd: OpenRound, agent: str, base: int, update_codec: str, error: type[Exception], text: str
) -> None:
    with pytest.raises(error) as raised:
        rnd.admit(agent, base, update_codec)
    assert str(raised.value) == text


async def test_admit_checks_the_codec_of_the_agents_task(rnd: OpenRound) -> None:
    assert rnd.task_codec("a", lambda agent: "fp16") == "fp16"
    assert rnd.task_codec("a", lambda agent: "int8") == "fp16"  # chosen once per round
    rnd.admit("a", 4, "fp16")
    with pytest.raises(InvalidArgument):
        rnd.admit("a", 4, "none")


async def test_admit_refuses_a_closing_round(rnd: OpenRound) -> None:
    await rnd.close()
    with pytest.raises(FailedPrecondition, match="round 3 of job job is closing"):
        rnd.admit("a", 4, "none")


async def test_commit_records_once_and_folds(rnd: OpenRound, records: FakeRecords) -> None:
    await rnd.commit(row("a", 10), 123, components(0.5), NONE)
    await rnd.commit(row("b", 30), 7, components(1.0), NONE)
    assert [(u[0], u[1], u[2].agent, u[3]) for u in records.updates] == [("job", 3, "a", 123), ("job", 3, "b", 7)]
    assert rnd.submitted == {"a", "b"}
    await rnd.close()
    mean = rnd.mean()
    for name in SPECS:
        np.testing.assert_allclose(mean[name], (10 * 0.5 + 30 * 1.0) / 40)


async def test_a_duplicate_agent_is_not_folded_twice(rnd: OpenRound, records: FakeRecords) -> None:
    await rnd.commit(row("a", 10), 1, components(0.5), NONE)
    with pytest.raises(AlreadyExists):
        await rnd.commit(row("a", 10), 1, components(9.0), NONE)
    assert len(records.updates) == 1
    await rnd.close()
    np.testing.assert_allclose(rnd.mean()["w"], 0.5)


async def test_commit_after_close_is_refused_and_records_nothing(rnd: OpenRound, records: FakeRecords) -> None:
    await rnd.close()
    with pytest.raises(FailedPrecondition, match="round 3 closed while the update arrived") as raised:
        await rnd.commit(row("a"), 1, components(0.5), NONE)
    assert raised.value.reason == "stale"
    assert records.updates == [] and rnd.submitted == frozenset()
    with pytest.raises(ValueError):
        rnd.mean()  # nothing was folded in


async def test_the_mean_waits_for_the_close(rnd: OpenRound) -> None:
    await rnd.commit(row("a"), 1, components(0.5), NONE)
    with pytest.raises(RuntimeError):
        rnd.mean()


async def test_the_close_sees_every_acknowledged_update(rnd: OpenRound, records: FakeRecords) -> None:
    """Commits racing a close: each either returns (and is in the mean) or is refused
    (and recorded nowhere); none is lost in between."""
    acknowledged: list[str] = []

    async def send(agent: str, value: float) -> None:
        try:
            await rnd.commit(row(agent, 10), 1, components(value), NONE)
        except FailedPrecondition:
            return
        acknowledged.append(agent)

    values = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}
    first = [asyncio.create_task(send(agent, values[agent])) for agent in "ab"]
    await asyncio.sleep(0)  # a holds the lock, folding in a thread; b waits for it
    closing = asyncio.create_task(rnd.close())  # queued behind b
    late = [asyncio.create_task(send(agent, values[agent])) for agent in "cd"]  # queued behind the close
    await asyncio.gather(*first, closing, *late)
    assert sorted(acknowledged) == sorted(rnd.submitted) == sorted(u[2].agent for u in records.updates) == ["a", "b"]
    np.testing.assert_allclose(rnd.mean()["b"], (1.0 + 2.0) / 2, rtol=1e-6)


async def test_wait_returns_when_every_selected_agent_delivered(rnd: OpenRound) -> None:
    waiting = asyncio.create_task(rnd.wait())
    for agent in ["a", "b"]:
        await rnd.commit(row(agent), 1, components(0.1), NONE)
        await asyncio.sleep(0)
        assert not waiting.done()
    await rnd.commit(row("c"), 1, components(0.1), NONE)
    async with asyncio.timeout(5):
        await waiting


async def test_wait_returns_at_the_deadline(tmp_path: Path, records: FakeRecords) -> None:
    short = OpenRound("job", 1, BASE, 0, ["a"], time.time() + 0.05, Accumulator(SPECS, tmp_path / "s"), records, None)
    async with asyncio.timeout(5):
        await short.wait()
    assert short.submitted == frozenset()
    await short.release()


async def test_join_adds_a_reconnecting_agent_while_there_is_room(rnd: OpenRound, records: FakeRecords) -> None:
    assert rnd.join("a", limit=0)  # selected already: it gets its task again
    assert records.selections == []
    assert rnd.join("d", limit=4)
    assert rnd.selected == ["a", "b", "c", "d"] and records.selections == [["a", "b", "c", "d"]]
    assert not rnd.join("e", limit=4)  # the round is full
    await rnd.commit(row("a"), 1, components(0.1), NONE)
    assert not rnd.join("a", limit=0)  # it has answered
    await rnd.close()
    assert not rnd.join("f", limit=0)


async def test_attempts_are_counted_and_recorded(rnd: OpenRound, records: FakeRecords) -> None:
    assert rnd.next_attempt() == 1
    rnd.select(["c", "a"], time.time() + 5)
    assert rnd.next_attempt() == 2
    rnd.select(["b"], time.time() + 5)
    assert records.attempts == [(1, ["a", "c"]), (2, ["b"])] and rnd.attempt == 2


async def test_restore_takes_in_updates_recorded_before_a_restart(tmp_path: Path, records: FakeRecords) -> None:
    path = tmp_path / "a.safetensors"
    write_tensors(path, components(2.0))
    restored = OpenRound("job", 1, BASE, 0, ["a", "b"], time.time() + 60, Accumulator(SPECS, tmp_path / "sum"),
                         records, None)
    await restored.restore([row("a", 5, str(path))])
    assert restored.submitted == {"a"} and records.updates == []  # already durable
    with pytest.raises(AlreadyExists):
        await restored.commit(row("a", 5), 1, components(9.0), NONE)
    await restored.commit(row("b", 5), 1, components(4.0), NONE)
    await restored.close()
    np.testing.assert_allclose(restored.mean()["w"], 3.0)
    await restored.release()


# ---- the job runner, with an in-process registry and store ---------------------------


async def connect(registry: Registry, agent: str) -> Session:
    session = await registry.connect(agent, pb.Hello(num_examples=100))
    registry.announce(session)
    return session


async def next_task(session: Session) -> pb.TrainTask:
    async with asyncio.timeout(10):
        while True:
            message = await session.queue.get()
            assert message is not None
            if message.HasField("task"):
                return message.task


async def deliver(runner: JobRunner, store: Store, models: ModelRepository, task: pb.TrainTask, agent: str,
                  value: float) -> None:
    """What the update intake does once an upload is complete and valid."""
    rnd = runner.check_update(agent, header_for(task))
    update: dict[str, np.ndarray] = {}
    for name, spec in models.specs("mlp").items():
        update.update(compression.encode(name, np.full(spec.shape, value, np.float32), NONE))
    path = store.update_path(task.job_id, task.round, agent)
    write_tensors(path, update)
    await rnd.commit(UpdateRow(agent, f"d-{agent}", 100, 0.5, str(path), path.stat().st_size, task.codec), 10,
                     update, NONE)


async def test_a_runner_opens_a_round_collects_updates_and_publishes(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    models = ModelRepository(store)
    registry = Registry()
    spec = JobSpec(model="mlp", rounds=1, min_clients=2, deadline=30.0).validate()
    initial = await models.publish("mlp", models.initial_arrays("mlp", 0), "job-1", 0)
    store.create_job("job-1", spec.to_dict(), initial.version)
    runner = JobRunner("job-1", spec, store, registry, models)
    header = pb.UpdateHeader(job_id="job-1", round=1, base_version=initial.version, num_examples=1, codec="none")
    with pytest.raises(Unavailable):
        runner.check_update("agent-0", header)  # the job's first round is opening
    sessions = [await connect(registry, f"agent-{i}") for i in range(2)]
    runner.start()
    try:
        tasks = [await next_task(s) for s in sessions]
        assert {(t.job_id, t.round, t.base_version, t.codec) for t in tasks} == {("job-1", 1, initial.version, "none")}
        rnd = runner.open_round(1)
        assert rnd is not None and rnd.selected == ["agent-0", "agent-1"] and runner.open_round(2) is None
        with pytest.raises(FailedPrecondition, match="round 2 of job job-1 is not open"):
            runner.check_update("agent-0", pb.UpdateHeader(job_id="job-1", round=2))
        await deliver(runner, store, models, tasks[0], "agent-0", 0.25)
        await deliver(runner, store, models, tasks[1], "agent-1", 0.75)
        await wait_for(lambda: runner.done, timeout=30, interval=0.01, message="the job to finish")
    finally:
        await runner.stop()
    job = store.get_job("job-1")
    assert job is not None and (job.state, job.current_round) == (JobState.COMPLETED, 2)
    closed = store.get_round("job-1", 1)
    assert closed is not None and closed.state == RoundState.CLOSED and closed.version == job.version
    assert [u.agent for u in store.list_updates("job-1", 1)] == ["agent-0", "agent-1"]
    assert runner.open_round() is None
    before, after = read_tensors(Path(initial.path)), read_tensors(Path(models.version("mlp", job.version).path))
    for name in before:
        np.testing.assert_allclose(after[name], before[name] + 0.5, rtol=1e-5, atol=1e-6)
    assert not list((tmp_path / "state").rglob("*.sum"))  # the running sum was released
    store.close()


async def test_a_restored_partial_aggregate_keeps_its_contributors_and_exact_weight(
    tmp_path: Path, records: FakeRecords
) -> None:
    path = tmp_path / "region.safetensors"
    write_tensors(path, components(2.0))
    restored = OpenRound("job", 1, BASE, 0, ["region:eu", "a"], time.time() + 60,
                         Accumulator(SPECS, tmp_path / "sum"), records, None)
    restored.bound_weights(10.0)  # an agent's claim is folded at most at 10 until the close
    partial = UpdateRow("region:eu", "d", 300, 0.5, str(path), 1, "none", {}, contributors=3)
    await restored.restore([partial])
    assert restored.contributed == 3  # the quorum counts the region's agents after a restart too
    agent_path = tmp_path / "a.safetensors"
    write_tensors(agent_path, components(4.0))
    agent = row("a", 100, str(agent_path))
    await restored.commit(agent, 1, components(4.0), NONE)  # folded at 10 until the close
    assert restored.contributed == 4
    await restored.close()
    weights = await restored.reweigh([partial, agent], 1.0)
    assert weights.weights == {"region:eu": 300.0, "a": 100.0}  # the partial's weight is exact, never capped
    np.testing.assert_allclose(restored.mean()["w"], (300 * 2.0 + 100 * 4.0) / 400, rtol=1e-6)
    await restored.release()
