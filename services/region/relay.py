"""A region's relay of its parent's training tasks.

Each task of the parent (job J, round R, from the parent's version V) becomes one round
of a local job over the region's own agents: V is published here once (the agents
download it from the region, not from the cloud), the local job's only round takes the
number R (agents seed their data shuffles with it, as they would under the parent), and
the round's weighted mean, taken from the running sum before any server step, goes up
as one partial aggregate with its total weight and the number of agents behind it.

The mean is written to the relay's outbox before the local round's close commits, so a
region killed at any point keeps every update its agents were told was accepted: a
round still open resumes from them, a closed one is read back from the outbox.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud.aggregation import Defence
from cloud.app import Coordinator
from cloud.rounds import RoundMean
from cloud.spec import JobSpec, LocalTraining, ServerStrategy, Transport
from cloud.store import JobState
from cloud.tensorfile import read_tensors, write_tensors
from edge.trainer import NothingToUpload
from tandem import config as task_config
from tandem import files, wire
from tandem.errors import TandemError
from tandem.transfer import HeldVersion
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

# Of the time left until the parent's deadline, the share kept for the upload to it.
UPLOAD_SHARE = 0.2
MIN_UPLOAD_SECONDS = 1.0
MIN_ROUND_SECONDS = 1.0  # a local round needs at least this long (JobSpec's bound)


def _write_durably(path: Path, data: bytes) -> None:
    """`data` at `path` through a synced temporary file and a durable rename: the local
    round's close commits after this, so a power cut cannot leave the round closed and
    its partial gone."""
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    files.replace_durably(tmp, path)


@dataclass(frozen=True)
class Partial:
    """One round's partial aggregate: the weighted mean update, what it weighs, and the
    agents behind it."""

    mean: dict[str, np.ndarray]
    weight: float
    contributors: int
    loss: float
    metrics: dict[str, float]


class Relay:
    """Turns the parent's tasks into local rounds, and their means into partials."""

    def __init__(self, coordinator: Coordinator, outbox: Path, min_clients: int, clients_per_round: int = 0) -> None:
        self._coordinator = coordinator
        self._outbox = Path(outbox)
        self._outbox.mkdir(parents=True, exist_ok=True)
        self.min_clients = min_clients
        self.clients_per_round = clients_per_round
        self._bases: dict[tuple[str, str], int] = {}  # (model, sha256) -> the local version holding it
        coordinator.jobs.add_mean_listener(self._keep)

    # ---- the outbox ----------------------------------------------------------

    def _paths(self, job_id: str) -> tuple[Path, Path]:
        return self._outbox / f"{job_id}.safetensors", self._outbox / f"{job_id}.json"

    async def _keep(self, mean: RoundMean) -> None:
        """A relayed job's round is closing: its mean and weight, durably, before the close
        commits (a restart closes the round again and writes the same)."""
        job = self._coordinator.store.get_job(mean.job_id)
        if job is None or not job.spec.parent_job:
            return
        tensors, meta = self._paths(mean.job_id)
        await asyncio.to_thread(write_tensors, tensors, mean.mean)
        record = {"weight": mean.weight, "contributors": mean.contributors, "loss": mean.local_loss,
                  "metrics": mean.metrics}
        await asyncio.to_thread(_write_durably, meta, json.dumps(record).encode())  # last: a record means whole

    def _read(self, job_id: str) -> Partial | None:
        tensors, meta = self._paths(job_id)
        if not meta.exists():
            return None
        record = json.loads(meta.read_text())
        return Partial(read_tensors(tensors), float(record["weight"]), int(record["contributors"]),
                       float(record["loss"]), {k: float(v) for k, v in record["metrics"].items()})

    async def _forget_before(self, parent_job: str, round_: int) -> None:
        """The parent job's earlier rounds: the parent has moved on, so a local round of
        one still open is stopped, and their outbox entries go."""
        for row in self._coordinator.store.list_jobs():
            spec = row.spec
            if spec.parent_job == parent_job and spec.first_round < round_:
                await self._stop(row.job_id)
                for path in self._paths(row.job_id):
                    path.unlink(missing_ok=True)

    # ---- one task of the parent ----------------------------------------------

    async def base(self, model: str, held: HeldVersion) -> int:
        """The local version holding the parent's version `held` (published here once)."""
        key = (model, held.sha256)
        if key not in self._bases:
            found = [v for v in self._coordinator.store.list_versions(model) if v.sha256 == held.sha256]
            if found:
                self._bases[key] = found[0].version
            else:
                if wire.state_sha256(held.arrays) != held.sha256:
                    raise ValueError(f"the parent's {model} v{held.version} does not match its hash")
                row = await self._coordinator.models.publish(model, held.arrays)
                self._bases[key] = row.version
                log.info("parent's %s v%d published here as v%d", model, held.version, row.version)
        return self._bases[key]

    def _local_job(self, task: pb.TrainTask) -> str | None:
        """The local job already relaying this round of the parent's (sent again after a
        missed deadline, or started before a restart), if it runs or has its partial."""
        found = None
        for row in self._coordinator.store.list_jobs():  # oldest first: the newest wins
            if (row.spec.parent_job == task.job_id and row.spec.first_round == task.round
                    and row.state in (JobState.RUNNING, JobState.COMPLETED)):
                found = row.job_id
        return found

    def _spec(self, task: pb.TrainTask, version: int, seconds: float) -> JobSpec:
        training = task.training
        return JobSpec(
            model=task.model, rounds=task.round, first_round=task.round, min_clients=self.min_clients,
            clients_per_round=self.clients_per_round,
            deadline=seconds, parent_job=task.job_id, from_version=str(version), promote="never",
            training=LocalTraining(epochs=training.epochs, batch_size=training.batch_size,
                                   learning_rate=training.learning_rate),
            strategy=ServerStrategy(name="fedprox" if training.mu > 0 else "fedavg", mu=training.mu, server_lr=1.0),
            transport=Transport(codec=task.codec or "none",
                                max_update_bytes=task.max_update_bytes or Transport().max_update_bytes),
            config=task_config.from_proto(task.config),
            defence=Defence(weight_cap=task.weight_cap or Defence().weight_cap),
        ).validate()

    async def relay(self, task: pb.TrainTask, held: HeldVersion) -> Partial:
        """Run the parent's task as a local round and return its partial aggregate;
        NothingToUpload if the region's agents missed its quorum before the parent's
        deadline (the task stays undone: sent again, it is tried again)."""
        deadline = task.deadline.ToNanoseconds() / 1e9
        await self._forget_before(task.job_id, task.round)
        job_id = self._local_job(task)
        if job_id is None:
            left = deadline - time.time()
            seconds = left - max(MIN_UPLOAD_SECONDS, UPLOAD_SHARE * left)
            if seconds < MIN_ROUND_SECONDS:
                raise NothingToUpload(f"{left:.1f} s left until the parent's deadline: too little for a round")
            version = await self.base(task.model, held)
            try:
                job_id = await self._coordinator.jobs.start_job(self._spec(task, version, seconds))
            except TandemError as exc:
                raise NothingToUpload(f"the local round could not start: {exc}") from None
            log.info("parent job %s round %d: local job %s from v%d, %.1f s", task.job_id, task.round, job_id,
                     version, seconds)
        # Cancelled (the region stops, or the parent moved on), the local job runs on: its
        # acknowledged updates stay, and a task sent again (after a restart) waits on it.
        return await self._result(job_id, deadline)

    async def _result(self, job_id: str, deadline: float) -> Partial:
        runner = self._coordinator.jobs.running(job_id)
        if runner is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - MIN_UPLOAD_SECONDS - time.time())):
                    await runner.finished()
            except TimeoutError:
                raise NothingToUpload(f"local job {job_id} did not reach its quorum of {self.min_clients} agents "
                                      "before the parent's deadline; it stays open for the parent's next "
                                      "attempt") from None
        row = self._coordinator.store.get_job(job_id)
        partial = await asyncio.to_thread(self._read, job_id)
        if row is None or row.state != JobState.COMPLETED or partial is None:
            raise NothingToUpload(f"local job {job_id} ended {row.state if row else 'missing'}: "
                                  f"{row.message if row else ''}")
        return partial

    async def _stop(self, job_id: str) -> None:
        row = self._coordinator.store.get_job(job_id)
        if row is not None and row.state == JobState.RUNNING:
            await self._coordinator.jobs.stop_job(job_id)
