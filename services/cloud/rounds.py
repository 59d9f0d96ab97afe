"""One job's rounds: select agents, send tasks, wait for updates or the deadline,
then aggregate, publish and evaluate (or retry when quorum was missed).

All state that matters is in the store, so a runner started on a restarted
coordinator continues the same round with every acknowledged update.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cloud import autocodec, disk, downlink, evaluation, privacy, robust, strategies
from cloud.accumulator import Accumulator
from cloud.aggregation import Weighting, weighting
from cloud.aggregation.weights import cap_of
from cloud.eligibility import Eligibility
from cloud.models import ModelRepository
from cloud.open_round import OpenRound
from cloud.phases import Stopwatch
from cloud.registry import Registry, Session
from cloud.spec import AUTO, JobSpec
from cloud.store import JobState, Store, UpdateRow, VersionRow
from cloud.tensorfile import TensorFile, read_tensors, write_tensors
from tandem import compression, measurements, metrics
from tandem import config as task_config
from tandem.certs import REGION_PREFIX
from tandem.errors import FailedPrecondition, InvalidArgument, Unavailable, out_of_space
from tandem.timestamps import timestamp
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)
# An agent that fails a job's task this many times in a row with the same reason and
# detail is excluded from the job (docs/tasks.md, "When training fails").
FAILURES_TO_EXCLUDE = 2
FAILURE_NAMES = {value: name.removeprefix("TASK_FAILURE_") for name, value in pb.TaskFailure.items()
                 if value != pb.TASK_FAILURE_UNSPECIFIED}


@dataclass(frozen=True)
class RoundMean:
    """A closing round's weighted mean update and what stands behind it, before the
    server steps: what a region sends its parent as one partial aggregate."""

    job_id: str
    round: int
    mean: Mapping[str, np.ndarray]  # read lazily: valid only while the listener runs
    weight: float  # the (capped) example counts the mean is weighted by, summed
    contributors: int  # agents behind it (a region's partial counts its own)
    local_loss: float
    metrics: dict[str, float]


MeanListener = Callable[[RoundMean], Awaitable[None]]


class NoQuorum(Exception):
    """Too few agents can train the job any more: it fails with this message."""


class JobRunner:
    """Drives one running job until its last round closes or it is stopped."""

    def __init__(
        self, job_id: str, spec: JobSpec, store: Store, registry: Registry, models: ModelRepository,
        round_ended: Callable[[str, int], None] | None = None, aggregated: MeanListener | None = None,
    ) -> None:
        self.job_id = job_id
        self._round_ended = round_ended  # told when a round is released: closed, or the job ended
        self._aggregated = aggregated  # given each round's mean before the server steps (a region's relay)
        self.spec = spec
        self._store = store
        self._registry = registry
        self._models = models
        self._task: asyncio.Task[None] | None = None
        self._round: OpenRound | None = None
        self._unrecorded: VersionRow | None = None  # a version the close wrote but has not recorded yet
        self._optimizer = strategies.get(spec.strategy.name)(spec.strategy.effective_server_lr(spec.transport.codec))
        self._downlink = compression.parse_codec(spec.transport.effective_downlink)
        self._eligibility = Eligibility(job_id, spec, store)
        # agent -> (reason, detail) of its last failure and how many times in a row it came
        self._streaks: dict[str, tuple[tuple[str, str], int]] = {}

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

    async def finished(self) -> None:
        """Until the runner's task has ended, however it ended (never raises)."""
        if self._task is not None:
            await asyncio.wait({self._task})

    def open_round(self, number: int | None = None) -> OpenRound | None:
        """The round this runner has open (accepting updates or closing), if it is round
        `number` (any round when None): the one answer to "is round N open"."""
        rnd = self._round
        return rnd if rnd is not None and (number is None or rnd.number == number) else None

    async def _run(self) -> None:
        try:
            await self._restore_state()
            deferred = 0  # no-space failures of the current round in a row
            while True:
                job = self._store.get_job(self.job_id)
                assert job is not None
                if job.current_round > self.spec.rounds or job.state != JobState.RUNNING:
                    return
                try:
                    await self._run_round(job.current_round, job.version, close_at_quorum=deferred > 0)
                except Exception as exc:
                    if not out_of_space(exc):
                        raise
                    deferred += 1
                    await self._defer(job.current_round, exc, deferred)
                    continue
                if deferred:
                    deferred = 0
                    self._say("")
        except asyncio.CancelledError:
            raise
        except NoQuorum as exc:
            log.error("job %s failed: %s", self.job_id, exc)
            self._store.set_job_state(self.job_id, JobState.FAILED, str(exc))
        except Exception as exc:
            log.exception("job %s failed", self.job_id)
            self._store.set_job_state(self.job_id, JobState.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            self._registry.remove_listener(self._on_connect)
            if self._round is not None:
                await self._round.release()
            self._round = None

    async def _defer(self, number: int, exc: Exception, times: int) -> None:
        """A round that could not open or close for want of space stays open in the store,
        with every acknowledged update; it is built again from them once space returns.

        The in-memory round is dropped (its sum is rebuilt from the updates' files, as
        after a restart), and the server optimiser goes back to the last closed round:
        a close that failed half-way may have stepped it. Waits until the volume has
        room for a close, or a backoff of up to a minute has passed (a quota can be full
        while the volume is not)."""
        metrics.ROUNDS_DEFERRED.inc()
        log.warning("job %s round %d: the state volume is full (%s); the round stays open with its acknowledged "
                    "updates and is retried once space returns", self.job_id, number, exc)
        if self._round is not None:
            await self._round.release()
            self._round = None
        if self._unrecorded is not None:  # written, never recorded: a retry writes it afresh under its number
            await asyncio.to_thread(self._models.discard, self._unrecorded)
            self._store.job_state_path(self.job_id, number).unlink(missing_ok=True)
            self._unrecorded = None
        self._say(f"round {number} waits for space on the state volume: {exc}")
        await self._restore_state()
        needed = 3 * sum(spec.nbytes for spec in self._models.specs(self.spec.model).values()) + (1 << 20)
        loop = asyncio.get_running_loop()
        until = loop.time() + min(60.0, float(2 ** min(times, 6)))
        await asyncio.sleep(0.5)
        while loop.time() < until and disk.free_bytes(self._store.directory) < needed:
            await asyncio.sleep(0.5)

    def _say(self, message: str) -> None:
        """Set the running job's message (what `tandem job status` shows), if the disk lets us."""
        job = self._store.get_job(self.job_id)
        if job is None or job.state != JobState.RUNNING or job.message == message:
            return
        try:
            self._store.set_job_state(self.job_id, JobState.RUNNING, message)
        except Exception as exc:  # noqa: BLE001 - only a message; the disk may be full
            if not out_of_space(exc):
                raise

    async def _restore_state(self) -> None:
        """Server optimiser moments as of the last closed round."""
        job = self._store.get_job(self.job_id)
        if job is not None and self._optimizer.stateful:
            state = await asyncio.to_thread(self._job_state, job.current_round - 1, "opt/")
            self._optimizer.load_state(state)

    def _job_state(self, round_: int, prefix: str) -> dict[str, np.ndarray]:
        """Part of the state saved when `round_` closed (empty before the first round)."""
        path = self._store.job_state_path(self.job_id, round_)
        if not path.exists():
            return {}
        return {k[len(prefix):]: v for k, v in read_tensors(path).items() if k.startswith(prefix)}

    async def _run_round(self, number: int, base_version: int, close_at_quorum: bool = False) -> None:
        """Run round `number` until it closes. With `close_at_quorum` (a retry after a close
        failed for space) a round rebuilt with enough updates closes at once."""
        base = self._models.version(self.spec.model, base_version)
        row = self._store.get_round(self.job_id, number)
        updates = self._store.list_updates(self.job_id, number)
        accumulator = Accumulator(self._models.specs(self.spec.model), self._store.sum_path(self.job_id, number))
        previous = set(row.selected) if row else set()
        rnd = OpenRound(
            self.job_id, number, base, row.attempt if row else 0, sorted(previous | {u.agent for u in updates}),
            time.time() + self.spec.deadline, accumulator, self._store,
            None if self.spec.transport.codec == AUTO else self.spec.transport.codec,
            released=lambda: self._round_ended(self.job_id, number) if self._round_ended else None,
        )
        rnd.bound_weights(self._predicted_cap(rnd.selected))
        try:
            await rnd.restore(updates)
        except BaseException:
            await rnd.release()
            raise
        # Open for uploads at once: after a restart, agents selected before it may
        # deliver while this round still waits for enough agents to reconnect.
        self._round = rnd
        if close_at_quorum and rnd.contributed >= self.spec.min_clients:
            await self._close(rnd)
            return
        while True:
            attempt = rnd.next_attempt()
            await self._wait_for_agents(rnd)
            selecting = time.time()
            rnd.select(self._select(number, attempt, rnd.submitted), time.time() + self.spec.deadline)
            rnd.bound_weights(self._predicted_cap(rnd.selected))
            log.info("job %s round %d attempt %d: selected %s", self.job_id, number, attempt, rnd.selected)
            for agent in rnd.selected:
                if agent not in rnd.submitted:
                    self._registry.send(agent, self._task_message(rnd, agent))
            rnd.clock.dispatching(selecting)
            await rnd.wait()
            if rnd.contributed >= self.spec.min_clients:
                await self._close(rnd)
                return
            metrics.ROUNDS.labels("retried").inc()
            log.warning(
                "job %s round %d: updates of %d of %d agents needed %s; retrying", self.job_id, number, rnd.contributed,
                self.spec.min_clients,
                "at the deadline" if time.time() >= rnd.deadline else "and no selected agent left to wait for",
            )

    async def _wait_for_agents(self, rnd: OpenRound) -> None:
        """Until enough eligible agents are connected or have delivered (uploads arrive
        meanwhile), saying so in the job's message; NoQuorum once exclusions leave too
        few agents that could ever train the job."""
        waiting = False
        while (have := self._agents_behind(rnd)) < self.spec.min_clients:
            self._check_quorum(rnd)
            waiting = True
            self._say(f"waiting for agents: {have} of {self.spec.min_clients} needed are connected and eligible")
            await self._registry.wait_changed(timeout=1.0)
        if waiting:
            self._say("")

    def _check_quorum(self, rnd: OpenRound) -> None:
        """NoQuorum when, with some agents excluded, the job's min_clients exceeds every
        agent that could still train it: the eligible connected ones, those that delivered
        this round, and known agents now disconnected (their labels unknown: counted) that
        its agent names do not rule out."""
        excluded = self._store.exclusions(self.job_id)
        if not excluded:
            return  # nobody ruled out: more agents may connect, the job waits
        out = {e.agent for e in excluded}
        connected = set(self._registry.connected())
        names = self.spec.selection.agents
        absent = {a.agent for a in self._store.list_agents()
                  if a.agent not in connected and a.agent not in out and (not names or a.agent in names)}
        possible = self._agents_behind(rnd) + len(absent - rnd.submitted - set(self._eligible()))
        if possible >= self.spec.min_clients:
            return
        reasons = "; ".join(f"{e.agent} excluded: {e.code}: {e.reason}" for e in excluded)
        raise NoQuorum(f"no quorum possible: {possible} of {self.spec.min_clients} needed agents can train "
                       f"job {self.job_id} ({reasons})")

    def _agents_behind(self, rnd: OpenRound) -> int:
        """Agents a quorum can count on now: those behind the updates delivered, and each
        eligible connected member that has not delivered (a region: the agents its Hello
        says it holds). min_clients counts agents, not regions: a job asks for that many
        agents' data whatever the tree."""
        waiting = sum(s.agents for s in self._registry.sessions()
                      if s.agent_id not in rnd.submitted and self._eligibility.eligible(s.agent_id, s.hello))
        return rnd.contributed + waiting

    def _eligible(self) -> list[str]:
        """Connected agents the job may select (cloud.eligibility; the others are excluded once)."""
        return [s.agent_id for s in self._registry.sessions() if self._eligibility.eligible(s.agent_id, s.hello)]

    def _select(self, number: int, attempt: int, submitted: frozenset[str]) -> list[str]:
        """Agents that already answered stay in; the rest are drawn from the eligible connected ones."""
        candidates = [a for a in self._eligible() if a not in submitted]
        room = len(candidates)
        if self.spec.clients_per_round:
            room = max(0, self.spec.clients_per_round - len(submitted))
        rng = random.Random(f"{self.spec.seed}/{self.job_id}/{number}/{attempt}")
        chosen = candidates if room >= len(candidates) else rng.sample(candidates, room)
        return sorted(submitted | set(chosen))

    def _predicted_cap(self, agents: list[str]) -> float | None:
        """The cap on claimed example counts the selected agents' Hellos predict (an
        update never claims more than its agent's Hello): the streaming sum's provisional
        bound (`OpenRound.bound_weights`). None when no agent declared any example."""
        # Regions' declared counts are their agents' sums: their partial aggregates are not capped.
        declared = [n for n in (self._store.agent_examples(a) for a in agents if not a.startswith(REGION_PREFIX))
                    if n > 0]
        return cap_of(declared, self.spec.defence.weight_cap) if declared else None

    def _on_connect(self, session: Session) -> None:
        """A (re)connecting agent joins the open round if it has not answered yet."""
        rnd = self._round
        if (rnd is not None and self._eligibility.eligible(session.agent_id, session.hello)
                and rnd.join(session.agent_id, self.spec.clients_per_round)):
            session.send(self._task_message(rnd, session.agent_id))

    def declined(self, agent: str, message: pb.TaskDeclined) -> None:
        """The agent will not train the job's task (it found it does not offer it, or
        another version): excluded from the job, and out of the open round."""
        code = message.code if message.code in ("NOT_FOUND", "FAILED_PRECONDITION") else "FAILED_PRECONDITION"
        self._eligibility.exclude(agent, code, f"agent {agent} declined the task: {message.reason[:500]}")
        rnd = self.open_round(message.round)
        if rnd is not None:
            rnd.drop(agent)

    def failed(self, agent: str, message: pb.TaskFailed) -> None:
        """The agent tried the open round's task and failed: recorded in the round and logged,
        the agent out of this attempt (the round does not wait for it), and excluded from the
        job after FAILURES_TO_EXCLUDE identical failures in a row. A report for a round or
        an agent not in this attempt is ignored (one record per agent and attempt)."""
        rnd = self.open_round(message.round)
        if rnd is None or not rnd.accepting or agent not in rnd.selected or agent in rnd.submitted:
            return
        reason = FAILURE_NAMES.get(message.reason, "EXCEPTION")
        detail = " ".join(message.detail[:1000].split())[:300]  # a peer's text: bounded before any work
        self._store.add_failure(self.job_id, rnd.number, agent, reason, detail)
        metrics.TASK_FAILURES.labels(reason).inc()
        key = (reason, detail)
        last, count = self._streaks.get(agent, (key, 0))
        count = count + 1 if last == key else 1
        self._streaks[agent] = (key, count)
        log.warning("job %s round %d: agent %s failed the task: %s: %s", self.job_id, rnd.number, agent, reason,
                    detail)
        rnd.drop(agent)
        if count >= FAILURES_TO_EXCLUDE:
            self._eligibility.exclude(agent, reason, f"agent {agent} failed the task {count} times in a row: "
                                                     f"{reason}: {detail}")

    def _codec_for(self, agent: str) -> str:
        """The job's codec, or with `auto` one chosen from the agent's measured link."""
        if self.spec.transport.codec != AUTO:
            return self.spec.transport.codec
        measured = self._registry.measurements(agent)
        throughput = (measured.get(measurements.UPLINK_BYTES_PER_SECOND)
                      or measured.get(measurements.DOWNLINK_BYTES_PER_SECOND))
        params = sum(spec.nbytes // 4 for spec in self._models.specs(self.spec.model).values())
        choice = autocodec.choose(params, throughput, self.spec.transport.target_upload_seconds)
        metrics.AUTO_CODEC_BYTES_PER_PARAM.labels(agent).set(_bytes_per_param(choice))
        return choice

    def _task_message(self, rnd: OpenRound, agent: str) -> pb.CoordinatorMessage:
        training = self.spec.training
        message = pb.CoordinatorMessage(
            task=pb.TrainTask(
                job_id=self.job_id, round=rnd.number, model=self.spec.model, base_version=rnd.base.version,
                base_sha256=rnd.base.sha256, codec=rnd.task_codec(agent, self._codec_for),
                deadline=timestamp(rnd.deadline),
                max_update_bytes=self.spec.transport.max_update_bytes,
                training=pb.TrainingConfig(
                    epochs=training.epochs, batch_size=training.batch_size, learning_rate=training.learning_rate,
                    mu=self.spec.strategy.mu,
                ),
                task_fingerprint=self._eligibility.fingerprint, weight_cap=self.spec.defence.weight_cap,
            )
        )
        task_config.to_proto(self.spec.task_config(), message.task.config)
        if rnd.base.round == 0 and rnd.base.job_id == self.job_id:  # the job's seeded initial model
            message.task.base_seed = self.spec.seed
        return message

    # ---- called by the update intake ---------------------------------------

    def check_update(self, agent: str, header: pb.UpdateHeader) -> OpenRound:
        """The open round an update from `agent` may join, or the precise reason why not."""
        rnd = self.open_round(header.round)
        if rnd is None:
            current = self._store.get_job(self.job_id)
            at = current.current_round if current else -1
            if self.open_round() is None and header.round == at:
                raise Unavailable(f"round {at} of job {self.job_id} is opening; try again")
            raise FailedPrecondition(f"round {header.round} of job {self.job_id} is not open (current round: {at})")
        rnd.admit(agent, header.base_version, header.codec)
        if header.task_fingerprint and header.task_fingerprint != self._eligibility.fingerprint:
            raise FailedPrecondition(
                f"the update was trained with task {self.spec.model} fingerprint {header.task_fingerprint}; "
                f"the coordinator's is {self._eligibility.fingerprint}", reason="fingerprint")
        if not 0 < header.num_examples <= self.spec.defence.max_examples:
            raise InvalidArgument(f"num_examples must be in 1..{self.spec.defence.max_examples} (the job's "
                                  f"max_examples), got {header.num_examples}")
        if not math.isfinite(header.local_loss):
            raise InvalidArgument("local_loss is not finite")
        evaluation.check_update_metrics(header.metrics)
        return rnd

    # ---- closing -------------------------------------------------------------

    async def _close(self, rnd: OpenRound) -> None:
        watch = Stopwatch()  # close, evaluate, publish: where the round's time goes (cloud.phases)
        await rnd.close()
        updates = self._store.list_updates(self.job_id, rnd.number)
        _, base = self._models.file(self.spec.model, rnd.base.version)
        previous_state = self._store.job_state_path(self.job_id, rnd.number - 1)
        previous = TensorFile(previous_state) if previous_state.exists() else None
        residual: dict[str, np.ndarray] = {}
        mean: Mapping[str, np.ndarray]
        # No claimed example count weighs more than weight_cap x the round's median one.
        weights: Weighting
        if self.spec.defence.streams:
            weights = await rnd.reweigh(updates, self.spec.defence.weight_cap)
            mean = rnd.mean()
        else:
            weights = weighting({u.agent: u.num_examples for u in updates}, self.spec.defence.weight_cap)
            mean = await asyncio.to_thread(self._defended_mean, rnd.number, updates, weights)
        if weights.capped:
            metrics.WEIGHTS_CAPPED.inc(len(weights.capped))
            log.warning("job %s round %d: example counts of %s capped at %g", self.job_id, rnd.number,
                        list(weights.capped), weights.cap)
        examples = sum(weights.weights.get(u.agent, 0.0) for u in updates)
        local_loss = sum(weights.weights.get(u.agent, 0.0) * u.local_loss for u in updates) / examples
        trained = evaluation.weighted({u.agent: (weights.weights.get(u.agent, 0.0), u.metrics) for u in updates})
        if self._aggregated is not None:  # before the close commits: a restart closes the round again
            await self._aggregated(RoundMean(self.job_id, rnd.number, mean, examples, sum(u.contributors for u in updates),
                                             trained.get("loss", local_loss), trained))
        change_of, delta, delta_bytes = await asyncio.to_thread(downlink.next_change, self._optimizer, self._downlink,
                                                                    mean, previous, residual)
        version = await self._models.write_changed(self.spec.model, base, change_of, self.job_id, rnd.number)
        self._unrecorded = version  # until close_round commits: what `_defer` removes if the close fails
        del change_of, mean
        await rnd.release()
        watch.lap("close")
        evaluated: dict[str, float] = {}
        if self.spec.eval:
            new = await asyncio.to_thread(read_tensors, Path(version.path))
            try:
                evaluated = await asyncio.to_thread(evaluation.evaluate, self.spec.model, new, self.spec.eval,
                                                    self.spec.task_config())
            except Exception as exc:  # noqa: BLE001 - the task's own evaluate: the round stands without metrics
                log.warning("job %s round %d: the task's evaluate failed (%s: %s); the round has no eval metrics",
                            self.job_id, rnd.number, type(exc).__name__, str(exc)[:300])
                self._say(f"round {rnd.number}: evaluate failed: {type(exc).__name__}: {str(exc)[:200]}")
            del new
            watch.lap("evaluate")
        if delta is not None:
            path = self._store.delta_path(self.spec.model, version.version)
            _, delta_sha256 = await asyncio.to_thread(write_tensors, path, delta)  # hashed as written
            version = replace(version, delta_path=str(path), delta_from=rnd.base.version,
                              delta_codec=str(self._downlink), delta_bytes=delta_bytes, delta_sha256=delta_sha256)
        state = {**{f"opt/{k}": v for k, v in self._optimizer.state().items()},
                 **{f"res/{k}": v for k, v in residual.items()}}
        if state:
            await asyncio.to_thread(write_tensors, self._store.job_state_path(self.job_id, rnd.number), state)
        del state, residual, base
        accuracy, loss = evaluated.get("accuracy"), evaluated.get("loss")
        final = rnd.number >= self.spec.rounds
        watch.lap("publish")
        rnd.clock.closing.update(watch.phases)
        opened = self._store.get_round(self.job_id, rnd.number)
        phases = rnd.clock.breakdown(time.time() - opened.opened) if opened is not None else {}
        self._store.close_round(self.job_id, rnd.number, version, accuracy, loss, trained.get("loss", local_loss),
                                final, weights.cap, weights.capped, trained, evaluated, phases, rnd.bytes_down)
        for update in updates:  # an agent that delivered is no longer failing "in a row"
            self._streaks.pop(update.agent, None)
        self._unrecorded = None
        # Only the newest job state is ever read again (a restart resumes from it).
        self._store.job_state_path(self.job_id, rnd.number - 1).unlink(missing_ok=True)
        self._models.published(version)
        self._round = None
        await asyncio.to_thread(_remove_files, [u.path for u in updates])
        self._store.forget_update_files(self.job_id, rnd.number)
        closed = self._store.get_round(self.job_id, rnd.number)
        metrics.ROUNDS.labels("closed").inc()
        metrics.ROUND_SECONDS.observe((closed.seconds or 0.0) if closed else 0.0)
        if accuracy is not None:
            metrics.ROUND_ACCURACY.labels(self.job_id).set(accuracy)
        evaluation.export(self.spec.model, "train", trained)
        evaluation.export(self.spec.model, "eval", evaluated)
        log.info(
            "job %s round %d closed: %d updates, version %d, accuracy %s",
            self.job_id, rnd.number, len(updates), version.version, accuracy,
        )

    def _defended_mean(self, number: int, updates: list[UpdateRow], weights: Weighting) -> dict[str, np.ndarray]:
        """The job's robust or private aggregate, from the updates' durable files, with
        the claimed example counts capped (`weights`)."""
        specs = self._models.specs(self.spec.model)
        with robust.UpdateFiles(updates, specs) as files:
            mean, report = robust.aggregate(files.dense, len(updates), list(specs), self.spec.defence,
                                            [weights.weights[u.agent] for u in updates])
        if report.clipped:
            metrics.UPDATES_CLIPPED.inc(report.clipped)
        if self.spec.defence.private:
            metrics.DP_EPSILON.labels(self.job_id).set(
                privacy.epsilon(self.spec.defence.dp_noise_multiplier, number, self.spec.defence.dp_delta))
        log.info("job %s round %d: %s of %d updates%s%s", self.job_id, number, self.spec.defence.aggregator, len(updates),
                 f", {report.clipped} clipped to {report.clip_bound:.4g}" if self.spec.defence.clips else "",
                 f", averaged {[updates[i].agent for i in report.selected]}" if report.selected is not None else "")
        return mean


def _bytes_per_param(codec: str) -> float:
    parsed = compression.parse_codec(codec)
    if parsed.kind == "topk":
        return parsed.fraction * autocodec.topk_bytes_per_kept(parsed.fraction)
    return {"none": 4.0, "fp16": 2.0, "int8": 1.0}[parsed.kind]


def _remove_files(paths: list[str | None]) -> None:
    for path in paths:
        if path:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
