"""Staged rollouts, the coordinator's side (issue 16): the verdict on its own, then a real
coordinator over mutual TLS with raw agent control streams that send the serving signals
an edge agent sends (tests/edge/test_rollout.py runs real edge agents).

Before the fix a promotion reached every agent at once and nothing watched it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from cloud.app import Coordinator
from cloud.canary import RolloutPolicy, Totals, Verdict, judge
from cloud.rollouts import Rollouts
from cloud.store import VersionRow
from tandem.errors import InvalidArgument
from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tests.cloud.test_lifecycle import history, sample, tandem
from tests.support.clients import ControlStream, admin_channel, streams
from tests.support.inference import arrays_for, serve
from tests.support.waiting import wait_for

POLICY = RolloutPolicy(canary="50%", window=1.0, min_requests=20)


def totals(requests: int, errors: int = 0, latency: float = 0.01, compared: int = 0, agreed: int = 0,
           confidence: float = 0.9, previous_confidence: float = 0.9) -> Totals:
    t = Totals()
    t.add(pb.ServingSignals(requests=requests, errors=errors, latency_seconds=latency * requests, compared=compared,
                            agreed=agreed, confidence=confidence * compared,
                            previous_confidence=previous_confidence * compared))
    return t


def test_the_verdict() -> None:
    fleet = totals(100)
    assert judge(POLICY, totals(19), fleet, 5.0)[0] is Verdict.WAIT  # too little traffic to tell
    assert judge(POLICY, totals(40, compared=40, agreed=39), fleet, 0.5)[0] is Verdict.WAIT  # window still open
    verdict, reason = judge(POLICY, totals(40, compared=40, agreed=39), fleet, 1.5)
    assert verdict is Verdict.PROCEED and "40 requests" in reason
    for canary, why in [(totals(40, errors=4), "error rate 0.100"),
                        (totals(40, latency=0.05), "mean latency 50.0 ms > 3 x the fleet's 10.0 ms"),
                        (totals(40, compared=40, agreed=4), "agreement with the previous version 0.10 < 0.5"),
                        (totals(40, compared=40, agreed=40, confidence=0.3), "mean confidence fell by 0.60")]:
        verdict, reason = judge(POLICY, canary, fleet, 0.1)  # a regression does not wait for the window
        assert verdict is Verdict.ROLL_BACK and why in reason, reason
    # Errors the whole fleet has are not the canary's; nine rows compared tell nothing yet.
    assert judge(POLICY, totals(40, errors=4), totals(100, errors=10), 2.0)[0] is Verdict.PROCEED
    assert judge(POLICY, totals(40, compared=9, agreed=0), fleet, 2.0)[0] is Verdict.PROCEED


@pytest.mark.parametrize(("canary", "why"), [("abc%", "canary must be 'N%' or agent names"),
                                              ("0%", "canary share must be in (0%, 100%]"),
                                              ("150%", "canary share must be in (0%, 100%]"),
                                              ("a,,b", "canary must be 'N%' or agent names")])
def test_a_malformed_canary_is_refused(canary: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why.replace("(", r"\(").replace(")", r"\)")):
        RolloutPolicy.from_proto(admin_pb2.RolloutPolicy(canary=canary))


def signals(version: int, requests: int, agreed: int | None = None, errors: int = 0) -> pb.ServingSignals:
    compared = requests if agreed is not None else 0
    return pb.ServingSignals(model="mlp", version=version, requests=requests, errors=errors,
                             latency_seconds=0.002 * requests, previous_version=1 if compared else 0,
                             compared=compared, agreed=agreed or 0, confidence=0.9 * compared,
                             previous_confidence=0.9 * compared)


async def serving_notice(agent: ControlStream, timeout: float = 15) -> pb.ModelNotice:
    """The next notice of a serving version (candidates' notices skipped)."""
    while not (notice := (await agent.next("model", timeout=timeout)).model).serving:
        pass
    return notice


class Fleet:
    """Two raw agents serving mlp v1, and v2 published as a candidate."""

    def __init__(self, coordinator: Coordinator, certs_dir: Path, agents: list[ControlStream], v2: VersionRow) -> None:
        self.coordinator, self.certs_dir, self.agents, self.v2 = coordinator, certs_dir, agents, v2
        self.seq = 0

    def report(self, agent: ControlStream, *serving: pb.ServingSignals) -> None:
        self.seq += 1
        agent.heartbeat(self.seq, serving)

    async def promote(self, version: int, **policy: object) -> admin_pb2.ModelVersion:
        async with admin_channel(self.coordinator.port, self.certs_dir) as channel:
            done: admin_pb2.ModelVersion = await admin_pb2_grpc.AdminStub(channel).PromoteModel(
                admin_pb2.PromoteModelRequest(model="mlp", version=version, rollout=admin_pb2.RolloutPolicy(**policy)))
            return done

    async def summary(self) -> admin_pb2.ModelSummary:
        async with admin_channel(self.coordinator.port, self.certs_dir) as channel:
            found = await admin_pb2_grpc.AdminStub(channel).ListModelVersions(admin_pb2.ListModelVersionsRequest(model="mlp"))
        [summary] = found.models
        return summary

    async def split(self, rollout: admin_pb2.RolloutStatus) -> tuple[ControlStream, ControlStream]:
        [canary] = [a for a in self.agents if a.name in rollout.canary_agents]
        [other] = [a for a in self.agents if a.name not in rollout.canary_agents]
        return canary, other


@pytest_asyncio.fixture
async def fleet(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[Fleet]:
    await serve(coordinator.models, "mlp", arrays_for("mlp", 1))
    v2 = await coordinator.models.publish("mlp", arrays_for("mlp", 2))
    agents = await streams(coordinator.port, certs_dir, ["agent-0", "agent-1"])
    found = Fleet(coordinator, certs_dir, agents, v2)
    for agent in agents:  # each says it serves mlp v1
        found.report(agent, signals(1, 0))
    await wait_for(lambda: len(coordinator.rollouts._serves.get("mlp", {})) == 2, message="both agents' signals")
    yield found
    for agent in agents:
        await agent.close()


async def test_a_regressing_canary_is_rolled_back(fleet: Fleet) -> None:
    before = sample("tandem_rollouts_total", model="mlp", outcome="rolled-back")
    answered = await fleet.promote(2, canary="50%", window_seconds=30, min_requests=20)
    assert (answered.version, answered.stage) == (2, "canary")
    summary = await fleet.summary()
    assert (summary.serving_version, summary.rollout.version, summary.rollout.state) == (1, 2, "canary")
    canary, other = await fleet.split(summary.rollout)
    notice = await serving_notice(canary)
    assert (notice.version, notice.serving, notice.canary) == (2, True, True)
    assert all(m.WhichOneof("kind") != "model" for m in other.messages._queue)  # type: ignore[attr-defined]  # the rest keep v1

    fleet.report(other, signals(1, 50))
    fleet.report(canary, signals(2, 30, agreed=3))  # it answers garbage: 3 of 30 rows agree with v1
    back = await serving_notice(canary)
    assert (back.version, back.serving, back.canary) == (1, True, False)
    found = await history(fleet.coordinator, fleet.certs_dir)
    assert found.serving_version == 1
    assert [(e.event, e.version, e.actor) for e in found.events][-2:] == [("canary", 2, "admin"),
                                                                          ("canary-rolled-back", 2, "rollout")]
    [rollout] = found.rollouts
    assert rollout.state == "rolled-back" and "agreement with the previous version 0.10 < 0.5" in rollout.reason
    assert rollout.ended.seconds > 0
    assert sample("tandem_rollouts_total", model="mlp", outcome="rolled-back") == before + 1
    assert sample("tandem_rollout_canary_version", model="mlp") == 0
    assert [v.stage for v in found.versions] == ["serving", "candidate"]
    assert not (await fleet.summary()).HasField("rollout")


async def test_a_healthy_canary_proceeds_to_everyone(fleet: Fleet) -> None:
    await fleet.promote(2, canary="50%", window_seconds=1, min_requests=20)
    canary, other = await fleet.split((await fleet.summary()).rollout)
    await serving_notice(canary)
    fleet.report(other, signals(1, 50))
    fleet.report(canary, signals(2, 30, agreed=29))
    for agent in (canary, other):  # the promotion reaches everyone, the canary included (its flag cleared)
        notice = await serving_notice(agent)
        assert (notice.version, notice.serving, notice.canary) == (2, True, False)
    found = await history(fleet.coordinator, fleet.certs_dir)
    assert found.serving_version == 2
    assert [(e.event, e.version, e.actor) for e in found.events][-2:] == [("canary", 2, "admin"), ("promote", 2, "admin")]
    assert found.events[-1].reason.startswith("rollout: canary healthy over")
    assert found.rollouts[0].state == "promoted"


async def test_rollout_refusals_and_operator_decisions(fleet: Fleet) -> None:
    async def code(version: int, **policy: object) -> grpc.StatusCode:
        try:
            await fleet.promote(version, **policy)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    assert await code(2, canary="nobody-here") == grpc.StatusCode.FAILED_PRECONDITION  # not connected
    assert await code(2, canary="5%", min_agreement=2) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code(1, canary="50%") == grpc.StatusCode.FAILED_PRECONDITION  # v1 already serves
    assert await code(9, canary="50%") == grpc.StatusCode.NOT_FOUND
    assert await code(2, canary="agent-1", window_seconds=60) == grpc.StatusCode.OK
    v3 = await fleet.coordinator.models.publish("mlp", arrays_for("mlp", 3))
    assert await code(v3.version) == grpc.StatusCode.FAILED_PRECONDITION  # one rollout at a time
    # An operator aborts it with a rollback: agent-1 serves v1 again.
    async with admin_channel(fleet.coordinator.port, fleet.certs_dir) as channel:
        rolled = await admin_pb2_grpc.AdminStub(channel).RollbackModel(admin_pb2.RollbackModelRequest(model="mlp"))
    assert (rolled.version, rolled.stage) == (1, "serving")
    assert (await serving_notice(fleet.agents[1])).canary  # the canary notice, then ...
    assert (await serving_notice(fleet.agents[1])).version == 1  # ... back to v1
    # Promoting the version in canary without a canary completes the rollout now.
    assert await code(2, canary="agent-0", window_seconds=600) == grpc.StatusCode.OK
    assert await code(2) == grpc.StatusCode.OK
    found = await history(fleet.coordinator, fleet.certs_dir)
    assert found.serving_version == 2
    assert [r.state for r in found.rollouts] == ["aborted", "promoted"]


async def test_a_rollout_survives_a_coordinator_restart(fleet: Fleet, coordinator: Coordinator) -> None:
    """What a restarted coordinator reads back from its state directory: the rollout, and
    the canary version for the canary agent's next Welcome (and only its)."""
    await fleet.promote(2, canary="agent-0", window_seconds=600)
    reread = Rollouts(coordinator.store, coordinator.registry, coordinator.models)
    assert reread.in_progress("mlp") is not None and reread.in_progress("mlp").agents == ("agent-0",)  # type: ignore[union-attr]
    [welcome] = [n for n in reread.notices("agent-0") if n.model == "mlp"]
    assert (welcome.version, welcome.canary) == (2, True)
    [welcome] = [n for n in reread.notices("agent-1") if n.model == "mlp"]
    assert (welcome.version, welcome.canary) == (1, False)


@pytest.mark.process
async def test_the_rollout_commands(fleet: Fleet) -> None:
    common = ["--cloud", f"localhost:{fleet.coordinator.port}", "--certs", str(fleet.certs_dir)]
    started = await tandem("models", "promote", "mlp", "2", "--canary", "agent-1", "--canary-window", "600", *common)
    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == ("mlp v2 is rolling out: on agent-1 first, the rest serve v1 "
                                      "(`tandem models` shows how it stands)")
    for command in (["models"], ["status"]):
        shown = await tandem(*command, *common)
        assert shown.returncode == 0, shown.stderr
        assert "rollout of mlp v2 (serving v1) on agent-1: canary: waiting for traffic: the canary answered 0 of 20" \
            in shown.stdout, shown.stdout
    status = json.loads((await tandem("status", "--json", *common)).stdout)
    assert [(r["model"], r["version"], r["state"]) for r in status["rollouts"]] == [("mlp", 2, "canary")]
    for wrong, why in [(["--canary", "ten%"], "canary must be 'N%' or agent names"),
                       (["--canary", "50%", "--canary-window", "0"], "canary window must be in (0, 604800]")]:
        refused = await tandem("models", "promote", "mlp", "2", *wrong, *common)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    busy = await tandem("models", "promote", "mlp", "1", "--canary", "50%", *common)
    assert busy.returncode == 1 and "a rollout of mlp v2 is in progress" in busy.stderr, busy.stderr
    aborted = await tandem("models", "rollback", "mlp", *common)
    assert aborted.returncode == 0 and "mlp v1 is serving again" in aborted.stdout, aborted.stderr
    shown = await tandem("models", "history", "mlp", *common)
    assert "canary-aborted" in shown.stdout and "on agent-1: aborted: rolled back by an operator" in shown.stdout
