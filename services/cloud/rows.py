"""The coordinator's records as values: jobs, rounds, updates, agents, versions and
quarantined files, and how SQLite rows become them (`cloud.store` reads and writes them)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from cloud.spec import JobSpec

R = TypeVar("R", bound="DataclassInstance")


class JobState(StrEnum):
    """A job's state; the values are what the store holds and what logs and messages say."""

    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"


class RoundState(StrEnum):
    """A round's state: open while it takes updates, closed once its version is published."""

    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class JobRow:
    """One job; `spec` gives its settings."""

    job_id: str
    spec_json: str  # the `spec` column: JobSpec.to_dict() as JSON
    state: JobState
    current_round: int  # the round running now; rounds + 1 once completed
    version: int  # the model version the current round trains from
    message: str
    created: float
    # The promotion decision taken at completion (migration 6); None: not taken yet.
    promotion: str | None = None

    @property
    def spec(self) -> JobSpec:
        """The job's settings, parsed from the stored JSON."""
        # Imported here: cloud.spec imports cloud.robust, which imports UpdateRow from this module.
        from cloud.spec import JobSpec

        return JobSpec.from_dict(json.loads(self.spec_json))


@dataclass(frozen=True)
class RoundRow:
    """One round of a job, open or closed, with its counters and (once closed) its results."""

    job_id: str
    round: int
    state: RoundState
    attempt: int
    base_version: int
    selected: tuple[str, ...]
    opened: float
    deadline: float
    rejected: int
    bytes_up: int
    bytes_down: int
    # Set when the round closes.
    accuracy: float | None
    loss: float | None
    local_loss: float | None
    seconds: float | None
    version: int | None
    sha256: str | None
    closed: float | None
    # The cap on claimed example counts the close applied (None before migration 3's
    # rounds), and the agents whose claims it cut down.
    example_cap: float | None = None
    capped: tuple[str, ...] = ()
    # The agents' training metrics weighted by examples, and the cloud's evaluation (migration 5).
    train_metrics: Mapping[str, float] = field(default_factory=dict)
    eval_metrics: Mapping[str, float] = field(default_factory=dict)
    # Where the round's wall time went, seconds by phase (cloud.phases; migration 9).
    phases: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentRow:
    """An agent as of its last hello; `last_seen` is written when its control stream ends."""

    agent: str
    first_seen: float
    last_seen: float
    connects: int
    num_examples: int
    device: str


@dataclass(frozen=True)
class VersionRow:
    model: str
    version: int
    sha256: str
    path: str
    job_id: str | None
    round: int | None
    created: float
    bytes: int
    # How agents holding `delta_from` reach this version: encoded differences.
    delta_path: str | None = None
    delta_from: int | None = None
    delta_codec: str | None = None
    delta_bytes: int | None = None
    delta_sha256: str | None = None  # the delta file's content hash; None: never served
    # Migration 6: where it came from ("round", "initial", "publish"), the evaluation it
    # was published with and the eval spec of that evaluation.
    origin: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    eval: str = ""


class Stage(StrEnum):
    """A version's stage, derived from the model's promotion events (`Store.stages`)."""

    CANDIDATE = "candidate"  # never served by default; addressable by its number
    SERVING = "serving"  # what inference answers with when a request names no version
    RETIRED = "retired"  # served by default before


@dataclass(frozen=True)
class ModelEvent:
    """A change of what a model serves (promote, rollback), or a job's decision to keep it."""

    model: str
    event: str
    version: int
    previous: int  # the version serving before (0: none)
    actor: str  # an admin's identity, or "job JOB_ID"
    reason: str
    at: float


class RolloutState(StrEnum):
    CANARY = "canary"  # in progress: the canary agents serve the new version
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled-back"  # the canary regressed
    ABORTED = "aborted"  # an operator stopped it


@dataclass(frozen=True)
class RolloutRow:
    """A staged rollout of `version` (docs/lifecycle.md): `agents` serve it first while
    the rest keep `previous`."""

    id: int
    model: str
    version: int
    previous: int
    agents: tuple[str, ...]
    policy: dict[str, Any]  # cloud.canary.RolloutPolicy's fields
    state: RolloutState
    actor: str
    reason: str
    started: float
    ended: float | None


class FileKind(StrEnum):
    """Which file of a version a quarantine record is about."""

    MODEL = "model"  # the version's own tensors
    DELTA = "delta"  # the encoded difference from `delta_from`


@dataclass(frozen=True)
class QuarantineRow:
    """A stored file found not to match its recorded hash: it is never served again."""

    model: str
    version: int
    kind: FileKind
    reason: str
    found: float


@dataclass(frozen=True)
class UpdateRow:
    agent: str
    digest: str
    num_examples: int
    local_loss: float
    path: str | None
    bytes: int
    codec: str
    metrics: Mapping[str, float] = field(default_factory=dict)  # the agent's training metrics
    contributors: int = 1  # more than 1: a region's partial aggregate of that many agents' updates

    @property
    def partial(self) -> bool:
        return self.contributors > 1


@dataclass(frozen=True)
class Exclusion:
    """A connected agent a job does not select, and why (a gRPC status code name)."""

    agent: str
    code: str
    reason: str


@dataclass(frozen=True)
class FailureRow:
    """An agent's failures to train one round of a job (TaskFailed; migration 7)."""

    round: int
    agent: str
    reason: str  # "DATA_MISMATCH", "TASK_UNKNOWN", "OUT_OF_MEMORY" or "EXCEPTION"
    detail: str
    count: int


def _record(cls: type[R], row: sqlite3.Row, **parsed: object) -> R:
    """A `cls` from the columns named like its fields, `parsed` replacing some. Only
    those columns: one that a later migration adds is read by the code that knows it."""
    return cls(**{f.name: parsed[f.name] if f.name in parsed else row[f.name] for f in fields(cls)})


def _rollout(row: sqlite3.Row) -> RolloutRow:
    return _record(RolloutRow, row, agents=tuple(json.loads(row["agents"])), policy=json.loads(row["policy"]),
                   state=RolloutState(row["state"]))


def _job(row: sqlite3.Row) -> JobRow:
    return _record(JobRow, row, spec_json=row["spec"], state=JobState(row["state"]),
                   promotion=row["promotion"] if "promotion" in row.keys() else None)


def _round(row: sqlite3.Row) -> RoundRow:
    keys = row.keys()  # a read-only store may hold an older schema
    return _record(RoundRow, row, state=RoundState(row["state"]), selected=tuple(json.loads(row["selected"])),
                   capped=tuple(json.loads(row["capped"])) if "capped" in keys else (),
                   train_metrics=json.loads(row["train_metrics"]) if "train_metrics" in keys else {},
                   eval_metrics=json.loads(row["eval_metrics"]) if "eval_metrics" in keys else {},
                   phases=json.loads(row["phases"]) if "phases" in keys else {})


def _update(row: sqlite3.Row) -> UpdateRow:
    return _record(UpdateRow, row, metrics=json.loads(row["metrics"]))


_VERSION_COLUMNS = tuple(f.name for f in fields(VersionRow))
# Named columns: a migration may add one to the table (and the record) without
# shifting positional values.
_INSERT_VERSION = (f"INSERT OR REPLACE INTO versions ({', '.join(_VERSION_COLUMNS)})"
                   f" VALUES ({', '.join('?' for _ in _VERSION_COLUMNS)})")
# A version whose own file is quarantined is not served: `newest` and listings skip it.
_SERVED = ("NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.model = versions.model"
           " AND q.version = versions.version AND q.kind = 'model')")


def _version(row: sqlite3.Row) -> VersionRow:
    # A read-only store over older records lacks the columns later migrations added.
    keys = row.keys()
    return _record(VersionRow, row, **({} if "delta_sha256" in keys else {"delta_sha256": None}),
                   origin=row["origin"] if "origin" in keys else "",
                   metrics=json.loads(row["metrics"]) if "metrics" in keys else {},
                   eval=row["eval"] if "eval" in keys else "")


def _version_values(row: VersionRow) -> tuple[object, ...]:
    return tuple(json.dumps(dict(row.metrics)) if name == "metrics" else getattr(row, name)
                 for name in _VERSION_COLUMNS)


