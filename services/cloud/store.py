"""Durable coordinator state: SQLite records (tensor files: `cloud.tensorfile`).

Every write that acknowledges something to a peer is committed (WAL, synchronous
FULL) before the acknowledgement goes out, so a SIGKILL loses nothing that was
acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cloud.migrations import MIGRATIONS, Migration, migrate, schema_version

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


def _record(cls: type[R], row: sqlite3.Row, **parsed: object) -> R:
    """A `cls` from the columns named like its fields, `parsed` replacing some. Only
    those columns: one that a later migration adds is read by the code that knows it."""
    return cls(**{f.name: parsed[f.name] if f.name in parsed else row[f.name] for f in fields(cls)})


def _job(row: sqlite3.Row) -> JobRow:
    return _record(JobRow, row, spec_json=row["spec"], state=JobState(row["state"]))


def _round(row: sqlite3.Row) -> RoundRow:
    return _record(RoundRow, row, state=RoundState(row["state"]), selected=tuple(json.loads(row["selected"])),
                   capped=tuple(json.loads(row["capped"])))


_VERSION_COLUMNS = tuple(f.name for f in fields(VersionRow))
# Named columns: a migration may add one to the table (and the record) without
# shifting positional values.
_INSERT_VERSION = (f"INSERT OR REPLACE INTO versions ({', '.join(_VERSION_COLUMNS)})"
                   f" VALUES ({', '.join('?' for _ in _VERSION_COLUMNS)})")
# A version whose own file is quarantined is not served: `newest` and listings skip it.
_SERVED = ("NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.model = versions.model"
           " AND q.version = versions.version AND q.kind = 'model')")


def _version(row: sqlite3.Row) -> VersionRow:
    # A read-only store over records older than migration 3 has no delta hashes.
    return _record(VersionRow, row, **({} if "delta_sha256" in row.keys() else {"delta_sha256": None}))


def _version_values(row: VersionRow) -> tuple[object, ...]:
    return tuple(getattr(row, name) for name in _VERSION_COLUMNS)


class Store:
    """The coordinator's records. Called from the event loop; every call is short."""

    def __init__(self, directory: Path, migrations: Sequence[Migration] = MIGRATIONS, readonly: bool = False) -> None:
        """Open (or create) the records in `directory`, migrated to the newest schema;
        migrations.SchemaError if a newer tandem wrote them. `readonly` opens existing
        records as they are, for offline checks (`tandem models verify`): nothing is
        created, migrated or written, and a missing database is FileNotFoundError."""
        self.directory = directory
        path = directory / "tandem.db"
        if readonly:
            if not path.is_file():
                raise FileNotFoundError(f"{directory} is not a tandem state directory (no tandem.db)")
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            if readonly:  # no migration runs (the slice holds none to run), only the check for a newer schema
                migrate(self._db, str(path), migrations[: min(schema_version(self._db), len(migrations))])
            else:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                migrate(self._db, str(path), migrations)
        except BaseException:
            self._db.close()
            raise

    @property
    def schema_version(self) -> int:
        """The records' schema version: len(migrations) once open."""
        return schema_version(self._db)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(sql, args).fetchone()
        return row

    # ---- model versions ---------------------------------------------------

    def model_path(self, model: str, version: int) -> Path:
        return self.directory / "models" / model / f"v{version:06d}.safetensors"

    def delta_path(self, model: str, version: int) -> Path:
        return self.directory / "models" / model / f"v{version:06d}.delta.safetensors"

    def sum_path(self, job_id: str, round_: int) -> Path:
        """The open round's running sum of updates (rebuilt from the updates after a restart)."""
        return self.directory / "updates" / job_id / f"r{round_:05d}.sum"

    def job_state_path(self, job_id: str, round_: int) -> Path:
        """Server optimiser moments and the downlink residual after `round_` closed."""
        return self.directory / "jobs" / job_id / f"r{round_:05d}.safetensors"

    def update_path(self, job_id: str, round_: int, agent: str) -> Path:
        return self.directory / "updates" / job_id / f"r{round_:05d}" / f"{agent}.safetensors"

    def next_version(self, model: str) -> int:
        row = self._one("SELECT MAX(version) AS v FROM versions WHERE model = ?", model)
        return int(row["v"] or 0) + 1 if row else 1

    def add_version(self, row: VersionRow) -> None:
        with self._tx() as db:
            db.execute(_INSERT_VERSION, _version_values(row))

    def version_models(self) -> list[str]:
        """Every model that has a recorded version, sorted."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT model FROM versions ORDER BY model")]

    def get_version(self, model: str, version: int) -> VersionRow | None:
        """Version `version` of `model`, quarantined or not; 0: the newest not quarantined."""
        if version == 0:
            row = self._one(
                f"SELECT * FROM versions WHERE model = ? AND {_SERVED} ORDER BY version DESC LIMIT 1", model
            )
        else:
            row = self._one("SELECT * FROM versions WHERE model = ? AND version = ?", model, version)
        return _version(row) if row else None

    def list_versions(self, model: str = "", quarantined: bool = False) -> list[VersionRow]:
        """Versions in order; those whose file is quarantined only when asked for."""
        conditions, args = [] if quarantined else [_SERVED], []
        if model:
            conditions.append("model = ?")
            args.append(model)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return [_version(r) for r in self._db.execute(f"SELECT * FROM versions{where} ORDER BY model, version", args)]

    def set_delta_sha256(self, model: str, version: int, sha256: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE versions SET delta_sha256 = ? WHERE model = ? AND version = ?", (sha256, model, version))

    def quarantine(self, model: str, version: int, kind: FileKind, reason: str) -> bool:
        """Record a file as corrupt; False if it already was (the first reason stays)."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO quarantine VALUES (?,?,?,?,?)", (model, version, kind.value, reason, time.time())
            )
        return cursor.rowcount == 1

    def quarantined(self, model: str, version: int, kind: FileKind = FileKind.MODEL) -> QuarantineRow | None:
        row = self._one(
            "SELECT * FROM quarantine WHERE model = ? AND version = ? AND kind = ?", model, version, kind.value
        )
        return _record(QuarantineRow, row, kind=FileKind(row["kind"])) if row else None

    # ---- jobs -------------------------------------------------------------

    def create_job(self, job_id: str, spec: Mapping[str, Any], version: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?)",
                (job_id, json.dumps(dict(spec)), JobState.RUNNING.value, 1, version, "", time.time()),
            )

    def get_job(self, job_id: str) -> JobRow | None:
        row = self._one("SELECT * FROM jobs WHERE job_id = ?", job_id)
        return _job(row) if row else None

    def list_jobs(self, state: JobState | None = None) -> list[JobRow]:
        if state:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY created", (state.value,))
        else:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created")
        return [_job(r) for r in rows]

    def set_job_state(self, job_id: str, state: JobState, message: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, message = ? WHERE job_id = ?", (state.value, message, job_id))

    # ---- rounds -----------------------------------------------------------

    def get_round(self, job_id: str, round_: int) -> RoundRow | None:
        row = self._one("SELECT * FROM rounds WHERE job_id = ? AND round = ?", job_id, round_)
        return _round(row) if row else None

    def closed_rounds(self, job_id: str) -> list[RoundRow]:
        rows = self._db.execute("SELECT * FROM rounds WHERE job_id = ? AND state = 'closed' ORDER BY round", (job_id,))
        return [_round(r) for r in rows]

    def open_round(
        self, job_id: str, round_: int, attempt: int, base_version: int, selected: list[str], deadline: float
    ) -> None:
        """Create the round, or record a new attempt of it (keeping its counters)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rounds (job_id, round, state, attempt, base_version, selected, opened, deadline)"
                " VALUES (?,?,'open',?,?,?,?,?) ON CONFLICT (job_id, round) DO UPDATE SET"
                " attempt = excluded.attempt, selected = excluded.selected, deadline = excluded.deadline",
                (job_id, round_, attempt, base_version, json.dumps(selected), time.time(), deadline),
            )

    def set_selected(self, job_id: str, round_: int, selected: list[str]) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET selected = ? WHERE job_id = ? AND round = ?", (json.dumps(selected), job_id, round_)
            )

    def add_round_bytes(self, job_id: str, round_: int, up: int = 0, down: int = 0, rejected: int = 0) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE rounds SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?, rejected = rejected + ?"
                " WHERE job_id = ? AND round = ?",
                (up, down, rejected, job_id, round_),
            )

    def close_round(
        self, job_id: str, round_: int, version: VersionRow, accuracy: float | None, loss: float | None,
        local_loss: float, final: bool, example_cap: float | None = None, capped: Sequence[str] = (),
    ) -> None:
        """Publish the round's version and advance the job, in one transaction, with the
        cap on claimed example counts the round applied."""
        with self._tx() as db:
            db.execute(_INSERT_VERSION, _version_values(version))
            now = time.time()
            db.execute(
                "UPDATE rounds SET state = 'closed', accuracy = ?, loss = ?, local_loss = ?, seconds = ? - opened,"
                " version = ?, sha256 = ?, closed = ?, example_cap = ?, capped = ? WHERE job_id = ? AND round = ?",
                (accuracy, loss, local_loss, now, version.version, version.sha256, now, example_cap,
                 json.dumps(sorted(capped)), job_id, round_),
            )
            db.execute(
                "UPDATE jobs SET current_round = ?, version = ?, state = ? WHERE job_id = ?",
                (round_ + 1, version.version, (JobState.COMPLETED if final else JobState.RUNNING).value, job_id),
            )

    # ---- updates ----------------------------------------------------------

    def add_update(self, job_id: str, round_: int, row: UpdateRow, wire_bytes: int) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?,?)",
                (job_id, round_, row.agent, row.digest, row.num_examples, row.local_loss, row.path, row.bytes,
                 time.time(), row.codec),
            )
            db.execute(
                "UPDATE rounds SET bytes_up = bytes_up + ? WHERE job_id = ? AND round = ?", (wire_bytes, job_id, round_)
            )

    def get_update(self, job_id: str, round_: int, agent: str) -> UpdateRow | None:
        row = self._one(
            "SELECT agent, digest, num_examples, local_loss, path, bytes, codec FROM updates"
            " WHERE job_id = ? AND round = ? AND agent = ?", job_id, round_, agent,
        )
        return _record(UpdateRow, row) if row else None

    def list_updates(self, job_id: str, round_: int) -> list[UpdateRow]:
        rows = self._db.execute(
            "SELECT agent, digest, num_examples, local_loss, path, bytes, codec FROM updates"
            " WHERE job_id = ? AND round = ? ORDER BY agent", (job_id, round_),
        )
        return [_record(UpdateRow, r) for r in rows]

    def forget_update_files(self, job_id: str, round_: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE updates SET path = NULL WHERE job_id = ? AND round = ?", (job_id, round_))

    # ---- agents -----------------------------------------------------------

    def agent_connected(self, agent: str, num_examples: int, device: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO agents VALUES (?,?,?,1,?,?) ON CONFLICT (agent) DO UPDATE SET"
                " last_seen = excluded.last_seen, connects = connects + 1,"
                " num_examples = excluded.num_examples, device = excluded.device",
                (agent, now, now, num_examples, device),
            )

    def agent_seen(self, agent: str, when: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE agents SET last_seen = MAX(last_seen, ?) WHERE agent = ?", (when, agent))

    def agent_examples(self, agent: str) -> int:
        """The examples an agent declared in its last hello (0 for an unknown agent)."""
        row = self._one("SELECT num_examples FROM agents WHERE agent = ?", agent)
        return int(row["num_examples"]) if row else 0

    def list_agents(self) -> list[AgentRow]:
        return [_record(AgentRow, r) for r in self._db.execute("SELECT * FROM agents ORDER BY agent")]

    def pins(self) -> dict[tuple[str, str], str]:
        """Placements an operator fixed: (agent, model) -> placement."""
        rows = self._db.execute("SELECT agent, model, placement FROM pins").fetchall()
        return {(r["agent"], r["model"]): r["placement"] for r in rows}

    def set_pin(self, agent: str, model: str, placement: str | None) -> None:
        with self._tx() as db:
            if placement is None:
                db.execute("DELETE FROM pins WHERE agent = ? AND model = ?", (agent, model))
            else:
                db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?)", (agent, model, placement, time.time()))
