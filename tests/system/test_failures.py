"""Failures an operator must hear about (issue 16, guards), with real agent daemons in this
process over real mTLS sockets: an agent that cannot train says why on its control
stream, the coordinator records it in the round, excludes the agent after repeated
identical failures and fails the job once no quorum is possible; a job waiting for
agents says how many it has and needs; an agent whose link broke silently gets back in
although the coordinator still holds its old stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from cloud.app import Coordinator
from edge.agent import Agent, AgentConfig
from tandem import tasks, transfer
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli.admin import job_dict
from tandem_cli.commands.job import _print_job
from tests.support.clients import agent_channel, get_job, start_job, streams
from tests.support.waiting import wait_for

MISMATCH = "mat1 and mat2 shapes cannot be multiplied (32x10 and 64x32)"


class MismatchedAgent(Agent):
    """An agent whose local data does not fit the model: its task's train raises as torch does."""

    async def _train(
        self, task: pb.TrainTask, base: transfer.HeldVersion
    ) -> tuple[dict[str, np.ndarray], float, float]:
        raise RuntimeError(MISMATCH)


@contextlib.asynccontextmanager
async def running(*daemons: Agent) -> AsyncIterator[None]:
    stop = asyncio.Event()
    runs = [asyncio.create_task(d.run(stop)) for d in daemons]
    try:
        async with asyncio.timeout(20):
            for daemon in daemons:
                await daemon.welcomed.wait()
        yield
    finally:
        stop.set()
        await asyncio.gather(*runs)


def _config(port: int, certs_dir: Path, name: str, index: int) -> AgentConfig:
    return AgentConfig(cloud=f"localhost:{port}", certs=certs_dir, agent_id=name, data=f"digits:{index}/2",
                       backoff_initial=0.1, backoff_max=1.0)


async def _ended(port: int, certs_dir: Path, job_id: str, timeout: float = 60) -> admin_pb2.Job:
    async def done() -> admin_pb2.Job | None:
        job = await get_job(port, certs_dir, job_id)
        return job if job.state != admin_pb2.JOB_STATE_RUNNING else None

    return await wait_for(done, timeout=timeout, interval=0.1, message=f"job {job_id} to end")


async def test_a_task_failure_reaches_job_status_and_fails_the_job_without_quorum(
    coordinator: Coordinator, certs_dir: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    bad = MismatchedAgent(_config(coordinator.port, certs_dir, "agent-0", 0))
    good = Agent(_config(coordinator.port, certs_dir, "agent-1", 1))
    async with running(bad, good):
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=2, min_clients=2,
                              round_deadline_seconds=30, epochs=1)
        job = await _ended(coordinator.port, certs_dir, job.job_id)
    assert job.state == admin_pb2.JOB_STATE_FAILED, job.message
    detail = f"RuntimeError: {MISMATCH}"
    # The round records what the agent said, each time it said it.
    assert [(f.round, f.agent, f.reason, f.detail, f.count) for f in job.failures] == [
        (1, "agent-0", "DATA_MISMATCH", detail, 2)]
    # Two identical failures in a row: agent-0 is excluded with the reason ...
    assert [(e.agent, e.code) for e in job.excluded] == [("agent-0", "DATA_MISMATCH")]
    assert detail in job.excluded[0].reason and "2 times in a row" in job.excluded[0].reason
    # ... and with one agent left for a min_clients of 2, the job fails saying why.
    assert job.message.startswith("no quorum possible: 1 of 2 needed agents can train"), job.message
    assert "agent-0 excluded: DATA_MISMATCH" in job.message and MISMATCH in job.message
    # The agent logged one line per failure, never a traceback above debug level.
    failed = [r for r in caplog.records if r.name == "edge.trainer" and "training failed" in r.getMessage()]
    assert len(failed) == 2 and all(r.exc_info is None for r in failed), [r.getMessage() for r in failed]
    assert f"DATA_MISMATCH: {detail}" in failed[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info], "a traceback was logged"
    # The coordinator's log says it too, once per report.
    said = [r.getMessage() for r in caplog.records if r.name == "cloud.rounds" and "failed the task:" in r.getMessage()]
    assert len(said) == 2 and "agent agent-0 failed the task: DATA_MISMATCH" in said[0]
    # `tandem job status` shows the failure, the exclusion and the job's message; --json has them.
    capsys.readouterr()
    _print_job(job_dict(job), as_json=False)
    out = capsys.readouterr().out
    assert f"round 1: agent-0 failed (2 times): DATA_MISMATCH: {detail}" in out, out
    assert "excluded agent-0: DATA_MISMATCH:" in out and "no quorum possible" in out, out
    assert job_dict(job)["failures"] == [{"round": 1, "agent": "agent-0", "reason": "DATA_MISMATCH", "detail": detail,
                                          "count": 2}]


async def test_a_job_waiting_for_agents_says_how_many_it_has_and_needs(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    opened = await streams(coordinator.port, certs_dir, ["agent-0"])
    try:
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=2,
                              round_deadline_seconds=30)
        waiting = "waiting for agents: 1 of 2 needed are connected and eligible"

        async def says() -> admin_pb2.Job | None:
            found = await get_job(coordinator.port, certs_dir, job.job_id)
            return found if found.message == waiting else None

        await wait_for(says, timeout=10, interval=0.1, message="the job's waiting message")
        more = await streams(coordinator.port, certs_dir, ["agent-1"])
        opened += more

        async def cleared() -> admin_pb2.Job | None:
            found = await get_job(coordinator.port, certs_dir, job.job_id)
            return found if found.message == "" and found.open_round.selected == ["agent-0", "agent-1"] else None

        found = await wait_for(cleared, timeout=10, interval=0.1, message="the message cleared once both connected")
        assert found.state == admin_pb2.JOB_STATE_RUNNING  # no exclusion: it waited, it does not fail
    finally:
        for stream in opened:
            await stream.close()


async def test_a_job_fails_once_agents_whose_data_does_not_fit_leave_no_quorum(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    """Data that fits no model: the agents offer the task not ready (check_data), so they are
    excluded; with none left the job fails with their reasons instead of waiting forever."""
    fingerprint = tasks.get("mlp").fingerprint
    calls = []
    async with agent_channel(coordinator.port, certs_dir, "agent-2") as channel:
        from tandem.v1 import coordinator_pb2_grpc

        outgoing: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while (message := await outgoing.get()) is not None:
                yield message

        outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(num_examples=10, device="cpu", tasks=[pb.TaskOffer(
            name="mlp", fingerprint=fingerprint, ready=False, reason="expected images of 8x8, got shape [3]")])))
        call = coordinator_pb2_grpc.CoordinatorStub(channel).Connect(requests())
        calls.append(call)
        welcome = await anext(aiter(call))
        assert welcome.HasField("welcome")
        job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1,
                              round_deadline_seconds=30)
        job = await _ended(coordinator.port, certs_dir, job.job_id, timeout=15)
        outgoing.put_nowait(None)
        call.cancel()
    assert job.state == admin_pb2.JOB_STATE_FAILED
    assert "no quorum possible: 0 of 1 needed agents can train" in job.message
    assert "agent-2 excluded: FAILED_PRECONDITION" in job.message and "got shape [3]" in job.message


class CuttingRelay:
    """A TCP relay whose `cut` breaks the agent's side of every connection at once while
    holding the coordinator's side open and silent: to the coordinator the old control
    stream looks alive (no FIN, no RST), as when a device's link drops."""

    def __init__(self, port: int) -> None:
        self._target = port
        self._server: asyncio.Server | None = None
        self._live: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[asyncio.Task[None]]]] = []
        self._held: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()

        pipes = [asyncio.create_task(copy(reader, up_writer)), asyncio.create_task(copy(up_reader, writer))]
        self._live.append((writer, up_writer, pipes))

    def cut(self) -> None:
        for agent_side, coordinator_side, pipes in self._live:
            for task in pipes:
                task.cancel()
            agent_side.transport.abort()
            self._held.append(coordinator_side)
        self._live.clear()

    async def close(self) -> None:
        self.cut()
        for writer in self._held:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


async def test_an_agent_whose_link_broke_silently_is_back_in_bounded_time(
    coordinator: Coordinator, certs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    relay = CuttingRelay(coordinator.port)
    await relay.start()
    agent = Agent(AgentConfig(cloud=f"localhost:{relay.port}", certs=certs_dir, agent_id="agent-3", data="digits:0/2",
                              backoff_initial=0.1, backoff_max=1.0))
    try:
        async with running(agent):
            old = coordinator.registry.get("agent-3")
            assert old is not None
            await asyncio.sleep(0.6)  # a heartbeat or so: the old stream was heard just now
            loop = asyncio.get_running_loop()
            started = loop.time()
            relay.cut()

            def back() -> bool:
                session = coordinator.registry.get("agent-3")
                return session is not None and session is not old and agent.welcomed.is_set()

            bound = coordinator.registry.stale_after + 3.0  # silent for stale_after, then a retry or two
            await wait_for(back, timeout=bound + 5, interval=0.05, message="agent-3 back in")
            took = loop.time() - started
            assert took < bound, took
            assert old.ended_by is not None and "silent for" in str(old.ended_by)
            assert coordinator.registry.connected() == ["agent-3"]
    finally:
        await relay.close()
    refused = [r.getMessage() for r in caplog.records if "another control stream of this agent" in r.getMessage()]
    assert refused, "the first reconnect, while the old stream was fresh, was refused"
