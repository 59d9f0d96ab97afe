"""One job's rounds: select agents, send tasks, wait for updates or the deadline,
then aggregate, publish and evaluate (or retry when quorum was missed).

All state that matters is in the store, so a runner started on a restarted
coordinator continues the same round with every acknowledged update.
"""

from __future__ import annotations

import asyncio
import os
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from cloud import aggregation, evaluation
from cloud.models import ModelRepository
from cloud.registry import Registry, Session
from cloud.spec import JobSpec
from cloud.store import Store, VersionRow, read_tensors
from tandem import metrics
from tandem.errors import FailedPrecondition, InvalidArgument
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class OpenRound:
    number: int
    base: VersionRow
    attempt: int
    deadline: float
    selected: list[str]
    submitted: set[str] = field(default_factory=set)
    accepting: bool = True


class JobRunner:
    """Drives one running job until its last round closes or it is stopped."""

    def __init__(self, job_id: str, spec: JobSpec, store: Store, registry: Registry, models: ModelRepository) -> None:
        self.job_id = job_id
        self.spec = spec
        self._store = store
        self._registry = registry
        self._models = models
        self._updated = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.round: OpenRound | None = None

    def start(self) -> None:
        self._registry.add_listener(self._on_connect)
        self._task = asyncio.create_task(self._run(), name=f"job-{self.job_id}")

    async def stop(self) -> None:
        self._registry.remove_listener(self._on_connect)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def _run(self) -> None:
        try:
            while True:
                job = self._store.get_job(self.job_id)
                assert job is not None
                if job["current_round"] > self.spec.rounds or job["state"] != "running":
                    return
                await self._run_round(job["current_round"], job["version"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("job %s failed", self.job_id)
            self._store.set_job_state(self.job_id, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._registry.remove_listener(self._on_connect)
            self.round = None

    async def _run_round(self, number: int, base_version: int) -> None:
        base = self._models.version(self.spec.model, base_version)
        row = self._store.get_round(self.job_id, number)
        attempt = row["attempt"] if row else 0
        while True:
            attempt += 1
            submitted = {u.agent for u in self._store.list_updates(self.job_id, number)}
            await self._wait_for_agents(submitted)
            selected = self._select(number, attempt, submitted)
            deadline = time.time() + self.spec.deadline
            self._store.open_round(self.job_id, number, attempt, base.version, selected, deadline)
            self.round = OpenRound(number, base, attempt, deadline, selected, submitted)
            log.info("job %s round %d attempt %d: selected %s", self.job_id, number, attempt, selected)
            for agent in selected:
                if agent not in submitted:
                    self._registry.send(agent, self._task_message(self.round))
            await self._wait_for_updates(self.round)
            if len(self.round.submitted) >= self.spec.min_clients:
                await self._close(self.round)
                return
            metrics.ROUNDS.labels("retried").inc()
            log.warning(
                "job %s round %d: %d of %d updates needed at the deadline; retrying",
                self.job_id, number, len(self.round.submitted), self.spec.min_clients,
            )

    async def _wait_for_agents(self, submitted: set[str]) -> None:
        while len(set(self._registry.connected()) | submitted) < self.spec.min_clients:
            await self._registry.wait_changed(timeout=1.0)

    def _select(self, number: int, attempt: int, submitted: set[str]) -> list[str]:
        """Agents that already answered stay in; the rest are drawn from those connected."""
        candidates = [a for a in self._registry.connected() if a not in submitted]
        room = len(candidates)
        if self.spec.clients_per_round:
            room = max(0, self.spec.clients_per_round - len(submitted))
        rng = random.Random(f"{self.spec.seed}/{self.job_id}/{number}/{attempt}")
        chosen = candidates if room >= len(candidates) else rng.sample(candidates, room)
        return sorted(submitted | set(chosen))

    async def _wait_for_updates(self, rnd: OpenRound) -> None:
        while True:
            self._updated.clear()
            if set(rnd.selected) <= rnd.submitted:
                return
            remaining = rnd.deadline - time.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._updated.wait(), remaining)
            except TimeoutError:
                return

    def _on_connect(self, session: Session) -> None:
        """A (re)connecting agent joins the open round if it has not answered yet."""
        rnd = self.round
        if rnd is None or not rnd.accepting or session.agent_id in rnd.submitted:
            return
        if session.agent_id not in rnd.selected:
            if self.spec.clients_per_round and len(rnd.selected) >= self.spec.clients_per_round:
                return
            rnd.selected = sorted([*rnd.selected, session.agent_id])
            self._store.set_selected(self.job_id, rnd.number, rnd.selected)
        session.send(self._task_message(rnd))

    def _task_message(self, rnd: OpenRound) -> pb.CoordinatorMessage:
        deadline = Timestamp()
        deadline.FromNanoseconds(int(rnd.deadline * 1e9))
        return pb.CoordinatorMessage(
            task=pb.TrainTask(
                job_id=self.job_id, round=rnd.number, model=self.spec.model, base_version=rnd.base.version,
                base_sha256=rnd.base.sha256, codec=self.spec.codec, deadline=deadline,
                max_update_bytes=self.spec.max_update_bytes,
                training=pb.TrainingConfig(
                    epochs=self.spec.epochs, batch_size=self.spec.batch_size, learning_rate=self.spec.learning_rate
                ),
            )
        )

    # ---- called by the update intake ---------------------------------------

    def check_update(self, agent: str, header: pb.UpdateHeader) -> OpenRound:
        """The open round an update from `agent` may join, or the precise reason why not."""
        rnd = self.round
        if rnd is None or header.round != rnd.number:
            current = self._store.get_job(self.job_id)
            at = current["current_round"] if current else "?"
            raise FailedPrecondition(f"round {header.round} of job {self.job_id} is not open (current round: {at})")
        if not rnd.accepting:
            raise FailedPrecondition(f"round {rnd.number} of job {self.job_id} is closing")
        if agent not in rnd.selected:
            raise FailedPrecondition(f"agent {agent!r} is not selected for round {rnd.number} of job {self.job_id}")
        if header.base_version != rnd.base.version:
            raise FailedPrecondition(
                f"update is based on version {header.base_version}; round {rnd.number} trains from version "
                f"{rnd.base.version}"
            )
        if header.codec != self.spec.codec:
            raise InvalidArgument(f"codec {header.codec!r} where the job expects {self.spec.codec!r}")
        if not 0 < header.num_examples <= 1 << 40:
            raise InvalidArgument(f"num_examples must be positive, got {header.num_examples}")
        if not math.isfinite(header.local_loss):
            raise InvalidArgument("local_loss is not finite")
        return rnd

    def accepted(self, rnd: OpenRound, agent: str) -> None:
        rnd.submitted.add(agent)
        self._updated.set()

    # ---- closing -------------------------------------------------------------

    async def _close(self, rnd: OpenRound) -> None:
        rnd.accepting = False
        updates = self._store.list_updates(self.job_id, rnd.number)
        _, base_arrays = await self._models.load(self.spec.model, rnd.base.version)
        loaders = [(u.num_examples, _loader(u.path)) for u in updates]
        new_arrays = await asyncio.to_thread(aggregation.fedavg, base_arrays, loaders)
        accuracy = loss = None
        if self.spec.eval:
            accuracy, loss = await asyncio.to_thread(evaluation.evaluate, self.spec.model, new_arrays, self.spec.eval)
        version = await self._models.write(self.spec.model, new_arrays, self.job_id, rnd.number)
        examples = sum(u.num_examples for u in updates)
        local_loss = sum(u.num_examples * u.local_loss for u in updates) / examples
        final = rnd.number >= self.spec.rounds
        self._store.close_round(self.job_id, rnd.number, version, accuracy, loss, local_loss, final)
        self._models.published(version)
        self.round = None
        await asyncio.to_thread(_remove_files, [u.path for u in updates])
        self._store.forget_update_files(self.job_id, rnd.number)
        closed = self._store.get_round(self.job_id, rnd.number)
        metrics.ROUNDS.labels("closed").inc()
        metrics.ROUND_SECONDS.observe(closed["seconds"] if closed else 0.0)
        if accuracy is not None:
            metrics.ROUND_ACCURACY.labels(self.job_id).set(accuracy)
        log.info(
            "job %s round %d closed: %d updates, version %d, accuracy %s",
            self.job_id, rnd.number, len(updates), version.version, accuracy,
        )
        self._registry.broadcast(
            pb.CoordinatorMessage(
                model=pb.ModelNotice(
                    model=version.model, version=version.version, sha256=version.sha256, job_id=self.job_id
                )
            )
        )


def _loader(path: str | None) -> aggregation.Loader:
    if path is None:
        raise RuntimeError("an accepted update's file is gone")
    file = Path(path)
    return lambda: read_tensors(file)


def _remove_files(paths: list[str | None]) -> None:
    for path in paths:
        if path:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
