"""Jobs: start, stop, describe, and resume after a restart. One JobRunner per running job."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from cloud import evaluation, privacy
from cloud.models import ModelRepository
from cloud.open_round import OpenRound
from cloud.registry import Registry
from cloud.rollouts import NothingToCanary, Rollouts
from cloud.rounds import JobRunner, MeanListener, RoundMean
from cloud.spec import SERVING, JobSpec, promote_metric_parts
from cloud.store import JobRow, JobState, RoundState, Store, VersionRow
from cloud.tensorfile import read_tensors
from tandem.errors import FailedPrecondition, InvalidArgument, NotFound
from tandem.timestamps import timestamp
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

_STATES = {
    JobState.RUNNING: admin_pb2.JOB_STATE_RUNNING,
    JobState.COMPLETED: admin_pb2.JOB_STATE_COMPLETED,
    JobState.STOPPED: admin_pb2.JOB_STATE_STOPPED,
    JobState.FAILED: admin_pb2.JOB_STATE_FAILED,
}


class JobManager:
    def __init__(self, store: Store, registry: Registry, models: ModelRepository, rollouts: Rollouts) -> None:
        self._store = store
        self._rollouts = rollouts
        self._registry = registry
        self._models = models
        self._runners: dict[str, JobRunner] = {}
        self._watchers: set[asyncio.Task[None]] = set()  # each running job's promotion at completion
        # Called with (job id, round) when a round ends: closed, or its job stopped,
        # completed or failed (the update intake frees what it kept for that round).
        self._round_end_listeners: list[Callable[[str, int], None]] = []
        self._mean_listeners: list[MeanListener] = []  # given each round's mean before it steps

    def add_round_end_listener(self, listener: Callable[[str, int], None]) -> None:
        self._round_end_listeners.append(listener)

    def add_mean_listener(self, listener: MeanListener) -> None:
        """`listener` is awaited with every closing round's mean (rounds.RoundMean) before
        the server steps and the close commits: a region's relay keeps it there."""
        self._mean_listeners.append(listener)

    async def _aggregated(self, mean: RoundMean) -> None:
        for listener in self._mean_listeners:
            await listener(mean)

    def _round_ended(self, job_id: str, round_: int) -> None:
        for listener in self._round_end_listeners:
            listener(job_id, round_)

    def resume(self) -> list[str]:
        """Start a runner for every job the store says is running; returns their ids."""
        for row in self._store.list_jobs(JobState.RUNNING):
            self._launch(row.job_id, row.spec)
        for row in self._store.list_jobs(JobState.COMPLETED):
            if row.promotion is None:  # completed just before a restart: its decision is taken now
                self._watch(row.job_id, None)
        return sorted(self._runners)

    async def start_job(self, spec: JobSpec) -> str:
        if spec.eval:  # loaded now (and kept): a spec the task cannot load is refused at start
            try:
                await asyncio.to_thread(evaluation.eval_data, spec.model, spec.eval)
            except evaluation.EvalDataError as exc:
                raise InvalidArgument(str(exc)) from None
        job_id = uuid.uuid4().hex[:12]
        if spec.from_version:  # warm start: the first round trains from an existing version
            if spec.from_version == SERVING:
                version = self._models.serving(spec.model)
                if version is None:
                    raise FailedPrecondition(f"model {spec.model!r} has no serving version to start from; "
                                             f"name a version (--from-version N) or promote one first")
            else:
                version = self._models.version(spec.model, spec.from_version_number or 0)
        else:
            # A candidate (origin "initial"): never served by default. Not held here: the
            # initial model is freed once written, before the first task goes out.
            initial = await asyncio.to_thread(self._models.initial_arrays, spec.model, spec.seed)  # builds it
            version = await self._models.publish(spec.model, initial, job_id, 0)
        self._store.create_job(job_id, spec.to_dict(), version.version, spec.first_round)
        self._launch(job_id, spec)
        return job_id

    def _launch(self, job_id: str, spec: JobSpec) -> None:
        runner = JobRunner(job_id, spec, self._store, self._registry, self._models, self._round_ended, self._aggregated)
        self._runners[job_id] = runner
        runner.start()
        self._watch(job_id, runner)

    def _watch(self, job_id: str, runner: JobRunner | None) -> None:
        """Once the job's runner ends: if the job completed, its promotion decision."""
        async def watch() -> None:
            if runner is not None:
                await runner.finished()
            row = self._store.get_job(job_id)
            if row is not None and row.state == JobState.COMPLETED and row.promotion is None:
                try:
                    await self._decide(row)
                except Exception as exc:  # noqa: BLE001 - the job has completed; the decision is reported
                    log.exception("job %s: the promotion decision failed", job_id)
                    self._store.set_promotion(job_id, "failed", f"promotion decision failed: {exc}")

        task = asyncio.create_task(watch(), name=f"promotion-{job_id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _decide(self, row: JobRow) -> None:
        """The job's --promote policy applied to its final version, recorded in the job
        (its message) and in the model's history (docs/lifecycle.md)."""
        spec = row.spec
        actor = f"job {row.job_id}"
        final = self._models.version(spec.model, row.version)
        promote, reason = await self._policy(spec, final)
        serving = self._models.serving(spec.model)
        if promote and serving is not None and serving.version == final.version:
            promote, reason = False, f"v{final.version} already serves"
        if promote:
            promote, message = self._promote(spec, final.version, actor, reason)
        else:
            self._models.keep(spec.model, final.version, actor, reason)
            message = f"not promoted ({spec.model} v{final.version} stays a candidate): {reason}"
        self._store.set_promotion(row.job_id, "promoted" if promote else "kept", message)
        log.info("job %s: %s", row.job_id, message)

    def _promote(self, spec: JobSpec, version: int, actor: str, reason: str) -> tuple[bool, str]:
        """Promote the final version as the job's rollout policy says: everywhere at once,
        or to a canary first (cloud.rollouts). (promoted or staged, the job's message)"""
        try:
            rollout = self._rollouts.promote(spec.model, version, spec.rollout, actor, reason)
        except NothingToCanary as exc:  # the first serving version, or no agent serving the model
            self._models.promote(spec.model, version, actor, f"{reason} (at once: {exc})")
            return True, f"promoted {spec.model} v{version} at once ({exc}): {reason}"
        except FailedPrecondition as exc:  # a rollout of another version is in progress
            self._models.keep(spec.model, version, actor, f"{reason}, but {exc}")
            return False, f"not promoted ({spec.model} v{version} stays a candidate): {exc}"
        if rollout is None:
            return True, f"promoted {spec.model} v{version}: {reason}"
        return True, (f"rolling out {spec.model} v{version} to a canary ({', '.join(rollout.agents)}) for at least "
                      f"{spec.rollout.window:g} s, then everyone if it does not regress: {reason}")

    async def _policy(self, spec: JobSpec, final: VersionRow) -> tuple[bool, str]:
        if spec.promote == "never":
            return False, "the job's policy is --promote never"
        if spec.promote == "on-complete":
            return True, "the job's policy is --promote on-complete"
        serving = self._models.serving(spec.model)
        if serving is None:
            return True, "if-better: the model had no serving version"
        if not spec.eval:
            return False, (f"if-better: the job has no --eval data to compare with the serving v{serving.version}; "
                           f"promote by hand (tandem models promote {spec.model} {final.version})")
        mine = await self._evaluated(spec, final)
        theirs = await self._evaluated(spec, serving)
        if spec.promote_metric:
            parts = promote_metric_parts(spec.promote_metric)
            assert parts is not None  # checked at start
            metric, higher = parts
        else:
            metric, higher = ("accuracy", True) if "accuracy" in mine else ("loss", False)
        if metric not in mine or metric not in theirs:
            return False, f"if-better: metric {metric!r} is not in the task's evaluation ({sorted(mine)})"
        better = mine[metric] > theirs[metric] if higher else mine[metric] < theirs[metric]
        compared = (f"{metric} {mine[metric]:.4g} {'>' if higher else '<'}"
                    f"{'' if better else ' not'} serving v{serving.version}'s {theirs[metric]:.4g} on {spec.eval}")
        return better, f"if-better: {compared}"

    async def _evaluated(self, spec: JobSpec, row: VersionRow) -> dict[str, float]:
        """`row`'s evaluation on the job's eval data: recorded with it, or computed now."""
        if row.eval == spec.eval and row.metrics:
            return dict(row.metrics)
        arrays = await asyncio.to_thread(read_tensors, Path(row.path))
        return await asyncio.to_thread(evaluation.evaluate, spec.model, arrays, spec.eval, spec.task_config())

    async def stop_job(self, job_id: str) -> None:
        row = self._job_row(job_id)
        if row.state != JobState.RUNNING:
            raise FailedPrecondition(f"job {job_id} is {row.state}, not running")
        runner = self._runners.pop(job_id, None)
        if runner is not None:
            await runner.stop()
        if self._job_row(job_id).state == JobState.RUNNING:  # it may have completed meanwhile
            self._store.set_job_state(job_id, JobState.STOPPED, "stopped by an admin")

    async def shutdown(self) -> None:
        """Stop every runner; their jobs stay `running` in the store and resume on restart."""
        for runner in list(self._runners.values()):
            await runner.stop()
        self._runners.clear()
        for watcher in list(self._watchers):
            watcher.cancel()

    def declined(self, agent: str, message: pb.TaskDeclined) -> None:
        """An agent will not train a job's task: the job's runner excludes it."""
        runner = self.running(message.job_id)
        if runner is not None:
            runner.declined(agent, message)

    def failed(self, agent: str, message: pb.TaskFailed) -> None:
        """An agent failed to train a job's task: the job's runner records it."""
        runner = self.running(message.job_id)
        if runner is not None:
            runner.failed(agent, message)

    def runner(self, job_id: str) -> JobRunner:
        """The runner of a running job, for the update intake."""
        if not job_id:
            raise InvalidArgument("job_id is required")
        row = self._job_row(job_id)
        runner = self._runners.get(job_id)
        if row.state != JobState.RUNNING or runner is None or runner.done:
            raise FailedPrecondition(f"job {job_id} is {row.state}; it accepts no updates")
        return runner

    def running(self, job_id: str) -> JobRunner | None:
        """The runner of a job if it is running here, else None."""
        runner = self._runners.get(job_id)
        return runner if runner is not None and not runner.done else None

    def open_round(self, job_id: str, number: int) -> OpenRound | None:
        """Round `number` of the job if it is open here (accepting updates or closing)."""
        runner = self.running(job_id)
        return runner.open_round(number) if runner is not None else None

    def _job_row(self, job_id: str) -> JobRow:
        row = self._store.get_job(job_id)
        if row is None:
            raise NotFound(f"no job {job_id!r}")
        return row

    # ---- accounting ----------------------------------------------------------

    def count_download(self, model: str, version: int, nbytes: int) -> None:
        """Attribute a model download to the open round that trains from that version."""
        for runner in self._runners.values():
            rnd = runner.open_round()
            if rnd is not None and runner.spec.model == model and rnd.base.version == version:
                rnd.bytes_down += nbytes  # recorded with the round's close

    def count_rejection(self, job_id: str, round_: int, nbytes: int) -> None:
        """Attribute a rejected upload's bytes to its round, if that round is open."""
        if self.open_round(job_id, round_) is not None:
            self._store.add_round_bytes(job_id, round_, up=nbytes, rejected=1)

    # ---- views -------------------------------------------------------------

    def describe(self, job_id: str) -> admin_pb2.Job:
        row = self._job_row(job_id)
        spec = row.spec
        job = admin_pb2.Job(
            job_id=job_id, spec=spec.to_proto(), state=_STATES[row.state], current_round=row.current_round,
            version=row.version, message=row.message, created=timestamp(row.created),
        )
        # One query for every round's updates: a query per round held the event loop
        # 2.5 ms a round on every poll of a job's status (`tandem job wait` polls 4 times a second).
        by_round = self._store.updates_by_round(job_id)
        for r in self._store.closed_rounds(job_id):
            updates = by_round.get(r.round, [])
            published = self._store.get_version(spec.model, r.version) if r.version is not None else None
            job.rounds.append(
                admin_pb2.RoundResult(
                    round=r.round, accuracy=r.accuracy or 0.0, loss=r.loss or 0.0,
                    local_loss=r.local_loss or 0.0, seconds=r.seconds or 0.0, bytes_up=r.bytes_up,
                    bytes_down=r.bytes_down, accepted=len(updates), rejected=r.rejected,
                    version=r.version, sha256=r.sha256, attempts=r.attempt,
                    agents=[u.agent for u in updates], codecs={u.agent: u.codec for u in updates},
                    delta_bytes=(published.delta_bytes or 0) if published else 0,
                    epsilon=privacy.epsilon(spec.defence.dp_noise_multiplier, r.round, spec.defence.dp_delta),
                    example_cap=r.example_cap or 0.0, capped_agents=list(r.capped),
                    train_metrics=r.train_metrics, eval_metrics=r.eval_metrics, phases=r.phases,
                )
            )
        job.excluded.extend(admin_pb2.Exclusion(agent=e.agent, code=e.code, reason=e.reason)
                            for e in self._store.exclusions(job_id))
        job.failures.extend(admin_pb2.TaskFailureRecord(round=f.round, agent=f.agent, reason=f.reason, detail=f.detail,
                                                        count=f.count) for f in self._store.failures(job_id))
        if row.state == JobState.RUNNING:
            current = self._store.get_round(job_id, row.current_round)
            if current is not None and current.state == RoundState.OPEN:
                accepted = self._store.list_updates(job_id, current.round)
                job.open_round.CopyFrom(
                    admin_pb2.OpenRound(
                        round=current.round, attempt=current.attempt, base_version=current.base_version,
                        selected=current.selected, accepted_agents=[u.agent for u in accepted],
                        rejected=current.rejected, deadline=timestamp(current.deadline),
                    )
                )
        return job

    def list_jobs(self) -> list[admin_pb2.Job]:
        return [self.describe(row.job_id) for row in self._store.list_jobs()]

