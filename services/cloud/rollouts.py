"""Staged rollouts to the edge (docs/lifecycle.md, "Staged rollout"): the one owner of
which agents serve a version ahead of the rest, of what they report while they do, and
of the decision to promote the version everywhere or take it back.

A rollout starts by an operator's promotion or a job's policy with a canary
(`cloud.canary.RolloutPolicy`). The model's serving version does not change: the
canary agents are told to serve the new version (`ModelNotice.canary`), everyone else
keeps the previous one, and the coordinator's own inference too. Each heartbeat's
`ServingSignals` are summed, the canary's against the rest's; `judge` decides each
second. A regression rolls the canary agents back at once (they hold the previous
version: no download), recorded as a `canary-rolled-back` event, counted, logged and
alerted on; a healthy canary becomes the serving version by an ordinary promotion.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from cloud.canary import RolloutPolicy, Totals, Verdict, judge
from cloud.models import ModelRepository
from cloud.registry import Registry
from cloud.store import RolloutRow, RolloutState, Store
from tandem import metrics
from tandem.errors import FailedPrecondition, InvalidArgument, TandemError
from tandem.timestamps import timestamp
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

ROLLOUT_ACTOR = "rollout"
SERVES_FOR = 60.0  # an agent that reported a model within this many seconds serves it


class NothingToCanary(FailedPrecondition):
    """A staged rollout cannot start: no serving version to keep meanwhile, or no agent
    serving the model to be the canary. (A job's policy then promotes at once.)"""


@dataclass
class _Active:
    row: RolloutRow
    policy: RolloutPolicy
    canary: Totals = field(default_factory=Totals)  # the canary agents, on the new version
    baseline: Totals = field(default_factory=Totals)  # the other agents, on the previous version

    def verdict(self) -> tuple[Verdict, str]:
        return judge(self.policy, self.canary, self.baseline, time.time() - self.row.started)


class Rollouts:
    def __init__(self, store: Store, registry: Registry, models: ModelRepository) -> None:
        self._store = store
        self._registry = registry
        self._models = models
        self._active: dict[str, _Active] = {}  # model -> its rollout in progress
        self._serves: dict[str, dict[str, float]] = {}  # model -> agent -> when it last reported serving it
        for row in store.rollouts(state=RolloutState.CANARY):  # a restart resumes them; signals start again
            self._active[row.model] = _Active(row, RolloutPolicy(**row.policy))
            metrics.CANARY_VERSION.labels(row.model).set(row.version)
            log.info("resumed the rollout of %s v%d to %s", row.model, row.version, ", ".join(row.agents))

    # ---- starting and ending -------------------------------------------------

    def promote(self, model: str, version: int, policy: RolloutPolicy, actor: str, reason: str) -> RolloutRow | None:
        """A promotion, by an operator or a job's policy: staged when the policy has a
        canary (the rollout returned), else at once (None). Promoting without a canary
        the version a rollout is testing completes that rollout; anything else while one
        is in progress is FAILED_PRECONDITION."""
        active = self._active.get(model)
        if active is not None and not policy.staged and version == active.row.version:
            self.complete(model, actor, reason or "completed by an operator")
            return None
        if policy.staged or active is not None:
            return self.start(model, version, policy, actor, reason)
        self._models.promote(model, version, actor, reason)
        return None

    def start(self, model: str, version: int, policy: RolloutPolicy, actor: str, reason: str) -> RolloutRow:
        """Serve `version` on a canary share of the agents serving `model`, the rest
        keeping the serving version (FAILED_PRECONDITION if the model has none, if one
        is in progress, or if there is no agent to be the canary)."""
        if version <= 0:
            raise InvalidArgument(f"promote a version >= 1, got {version}")
        row = self._models.version(model, version)  # NOT_FOUND, DATA_LOSS
        if model in self._active:
            active = self._active[model].row
            raise FailedPrecondition(
                f"a rollout of {model} v{active.version} is in progress: wait for it, complete it "
                f"(`tandem models promote {model} {active.version}`) or abort it (`tandem models rollback {model}`)")
        serving = self._models.serving(model)
        if serving is None:
            raise NothingToCanary(f"{model} has no serving version to keep while a canary tests v{version}: "
                                     f"promote the first version without --canary")
        if serving.version == version:
            raise FailedPrecondition(f"{model} v{version} is already the serving version")
        agents = self._canary_agents(model, version, policy)
        recorded = self._store.add_rollout(model, version, serving.version, agents, asdict(policy), actor, reason)
        self._active[model] = _Active(recorded, policy)
        self._models.note(model, "canary", version, actor,
                          f"staged rollout to {', '.join(agents)} for at least {policy.window:g} s"
                          + (f": {reason}" if reason else ""))
        metrics.CANARY_VERSION.labels(model).set(version)
        for state in (RolloutState.PROMOTED, RolloutState.ROLLED_BACK, RolloutState.ABORTED):
            metrics.ROLLOUTS.labels(model, state.value)  # at 0 from now: an alert's increase() sees the first
        log.info("rollout of %s v%d (serving v%d) to a canary: %s, by %s", model, version, serving.version,
                 ", ".join(agents), actor)
        self._tell(agents, row.model, row.version, row.sha256, canary=True)
        return recorded

    def _canary_agents(self, model: str, version: int, policy: RolloutPolicy) -> list[str]:
        connected = set(self._registry.connected())
        if policy.agents:
            missing = [name for name in policy.agents if name not in connected]
            if missing:
                raise FailedPrecondition(f"canary agents not connected: {', '.join(missing)}")
            return list(policy.agents)
        now = time.monotonic()
        serving = sorted(agent for agent, seen in self._serves.get(model, {}).items()
                         if agent in connected and now - seen <= SERVES_FOR)
        if not serving:
            raise NothingToCanary(f"no connected agent serves {model} (agents report what they serve in "
                                     "heartbeats): there is nothing to canary; promote without --canary")
        count = max(1, math.floor((policy.share or 0) * len(serving)))
        # A different, stable sample for each version: not always the same agents first.
        return sorted(serving, key=lambda a: hashlib.sha256(f"{model}/{version}/{a}".encode()).digest())[:count]

    def complete(self, model: str, actor: str, reason: str) -> RolloutRow:
        """Promote the version in canary everywhere now (an operator's decision)."""
        return self._end(self._require(model), RolloutState.PROMOTED, actor, reason)

    def abort(self, model: str, actor: str, reason: str) -> RolloutRow:
        """Take the version in canary back: the canary agents serve the previous one again."""
        return self._end(self._require(model), RolloutState.ABORTED, actor, reason)

    def _require(self, model: str) -> _Active:
        active = self._active.get(model)
        if active is None:
            raise FailedPrecondition(f"no rollout of {model} is in progress")
        return active

    def _end(self, active: _Active, state: RolloutState, actor: str, reason: str) -> RolloutRow:
        row = active.row
        del self._active[row.model]
        ended = self._store.end_rollout(row.id, state, reason)
        metrics.CANARY_VERSION.labels(row.model).set(0)
        metrics.ROLLOUTS.labels(row.model, state.value).inc()
        if state is RolloutState.PROMOTED:
            self._models.promote(row.model, row.version, actor, f"rollout: {reason}")  # tells every agent
            return ended
        event = "canary-rolled-back" if state is RolloutState.ROLLED_BACK else "canary-aborted"
        self._models.note(row.model, event, row.version, actor, reason)
        log.warning("rollout of %s v%d %s by %s: %s; its canary (%s) serves v%d again", row.model, row.version,
                    state.value, actor, reason, ", ".join(row.agents), row.previous)
        previous = self._models.serving(row.model)
        if previous is not None:
            self._tell(list(row.agents), previous.model, previous.version, previous.sha256, canary=False)
        return ended

    def _tell(self, agents: Sequence[str], model: str, version: int, sha256: str, canary: bool) -> None:
        notice = pb.ModelNotice(model=model, version=version, sha256=sha256, serving=True, canary=canary)
        for agent in agents:
            self._registry.send(agent, pb.CoordinatorMessage(model=notice))

    # ---- signals and verdicts --------------------------------------------------

    def observe(self, agent_id: str, signals: Sequence[pb.ServingSignals]) -> None:
        """A heartbeat's serving signals: who serves what, and the evidence of a rollout."""
        now = time.monotonic()
        for s in signals:
            self._serves.setdefault(s.model, {})[agent_id] = now
            active = self._active.get(s.model)
            if active is None:
                continue
            if agent_id in active.row.agents:
                if s.version == active.row.version:
                    active.canary.add(s)
            elif s.version == active.row.previous:
                active.baseline.add(s)

    def check(self) -> None:
        """Judge every rollout in progress; end those that are decided."""
        for active in list(self._active.values()):
            verdict, reason = active.verdict()
            if verdict is Verdict.ROLL_BACK:
                self._end(active, RolloutState.ROLLED_BACK, ROLLOUT_ACTOR, f"the canary regressed: {reason}")
            elif verdict is Verdict.PROCEED:
                self._end(active, RolloutState.PROMOTED, active.row.actor, reason)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.check()
            except Exception:  # noqa: BLE001 - one bad verdict must not stop the rest for good
                log.exception("judging the rollouts failed; trying again")

    # ---- what agents and operators see -------------------------------------------

    def notices(self, agent_id: str) -> list[pb.ModelNotice]:
        """The serving version of every model for this agent's Welcome: the version in
        canary where the agent is one of the canary."""
        notices = self._models.serving_notices()
        for notice in notices:
            active = self._active.get(notice.model)
            if active is not None and agent_id in active.row.agents:
                try:
                    row = self._models.version(notice.model, active.row.version)
                except TandemError:  # quarantined meanwhile: the agent serves what everyone does
                    continue
                notice.version, notice.sha256, notice.job_id, notice.canary = row.version, row.sha256, row.job_id or "", True
        return notices

    def in_progress(self, model: str) -> RolloutRow | None:
        active = self._active.get(model)
        return active.row if active is not None else None

    def status(self, model: str) -> admin_pb2.RolloutStatus | None:
        active = self._active.get(model)
        return self._status(active.row, active) if active is not None else None

    def history(self, model: str) -> list[admin_pb2.RolloutStatus]:
        return [self._status(row, self._active.get(model) if row.state is RolloutState.CANARY else None)
                for row in self._store.rollouts(model)]

    @staticmethod
    def _status(row: RolloutRow, active: _Active | None) -> admin_pb2.RolloutStatus:
        status = admin_pb2.RolloutStatus(
            model=row.model, version=row.version, previous=row.previous, canary_agents=row.agents,
            state=row.state.value, policy=RolloutPolicy(**row.policy).to_proto(), started=timestamp(row.started),
            actor=row.actor, reason=active.verdict()[1] if active is not None else row.reason)
        if row.ended is not None:
            status.ended.CopyFrom(timestamp(row.ended))
        if active is not None:
            status.canary.CopyFrom(active.canary.to_proto(row.model, row.version, row.previous))
            status.baseline.CopyFrom(active.baseline.to_proto(row.model, row.previous))
        return status
