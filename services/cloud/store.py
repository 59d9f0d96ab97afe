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
from dataclasses import replace
from pathlib import Path
from typing import Any

from cloud.migrations import MIGRATIONS, Migration, migrate, schema_version
from cloud.rows import (
    _INSERT_VERSION,
    _SERVED,
    AgentRow,
    Exclusion,
    FailureRow,
    FileKind,
    JobRow,
    JobState,
    ModelEvent,
    QuarantineRow,
    RolloutRow,
    RolloutState,
    RoundRow,
    RoundState,
    Stage,
    UpdateRow,
    VersionRow,
    _job,
    _record,
    _rollout,
    _round,
    _update,
    _version,
    _version_values,
)

__all__ = ["AgentRow", "Exclusion", "FailureRow", "FileKind", "JobRow", "JobState", "ModelEvent", "QuarantineRow",
           "RolloutRow", "RolloutState", "RoundRow", "RoundState", "Stage", "Store", "UpdateRow", "VersionRow"]
_UPDATE_COLUMNS = "agent, digest, num_examples, local_loss, path, bytes, codec, metrics, contributors"

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

    # ---- what is served (migration 6) ---------------------------------------

    def add_event(self, model: str, event: str, version: int, previous: int, actor: str, reason: str) -> ModelEvent:
        """Record a promotion, a rollback or a job's decision to keep what is served."""
        row = ModelEvent(model, event, version, previous, actor, reason, time.time())
        with self._tx() as db:
            db.execute("INSERT INTO model_events (model, event, version, previous, actor, reason, at)"
                       " VALUES (?,?,?,?,?,?,?)", (model, event, version, previous, actor, reason, row.at))
        return row

    def events(self, model: str) -> list[ModelEvent]:
        rows = self._db.execute("SELECT model, event, version, previous, actor, reason, at FROM model_events"
                                " WHERE model = ? ORDER BY id", (model,))
        return [_record(ModelEvent, r) for r in rows]

    def _has_events(self) -> bool:
        """A read-only store older than migration 6 has no promotion events."""
        return self._one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'model_events'") is not None

    def serving_stack(self, model: str) -> list[int]:
        """The versions made serving, in order, a rollback going back down to its target:
        the last is the one serving."""
        stack: list[int] = []
        for event in self.events(model) if self._has_events() else []:
            if event.event == "promote":
                stack.append(event.version)
            elif event.event == "rollback":
                if event.version in stack:
                    while stack[-1] != event.version:
                        stack.pop()
                else:
                    stack.append(event.version)
        return stack

    def serving_version(self, model: str) -> int:
        """The version inference serves by default (0: none): the last one made serving
        whose file is not quarantined (a corrupt serving version falls back to the one
        that served before it)."""
        for version in reversed(self.serving_stack(model)):
            if self.quarantined(model, version) is None:
                return version
        return 0

    def stages(self, model: str) -> dict[int, Stage]:
        """Each version's stage (absent: a candidate): retired once it was served."""
        served = ("promote", "rollback")
        promoted = {e.version for e in self.events(model) if e.event in served} if self._has_events() else set()
        stages = {v: Stage.RETIRED for v in promoted}
        serving = self.serving_version(model)
        if serving:
            stages[serving] = Stage.SERVING
        return stages

    # ---- staged rollouts (migration 8) ----------------------------------------

    def add_rollout(self, model: str, version: int, previous: int, agents: Sequence[str], policy: Mapping[str, Any],
                    actor: str, reason: str) -> RolloutRow:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO rollouts (model, version, previous, agents, policy, state, actor, reason, started)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (model, version, previous, json.dumps(list(agents)), json.dumps(dict(policy)),
                 RolloutState.CANARY.value, actor, reason, time.time()))
        return self._rollout_row(cursor.lastrowid)

    def end_rollout(self, rollout_id: int, state: RolloutState, reason: str) -> RolloutRow:
        with self._tx() as db:
            db.execute("UPDATE rollouts SET state = ?, reason = ?, ended = ? WHERE id = ?",
                       (state.value, reason, time.time(), rollout_id))
        return self._rollout_row(rollout_id)

    def _rollout_row(self, rollout_id: int | None) -> RolloutRow:
        row = self._one("SELECT * FROM rollouts WHERE id = ?", rollout_id)
        assert row is not None, rollout_id  # written by this connection just before
        return _rollout(row)

    def rollouts(self, model: str = "", state: RolloutState | None = None) -> list[RolloutRow]:
        query, args = "SELECT * FROM rollouts WHERE (? = '' OR model = ?)", [model, model]
        if state is not None:
            query += " AND state = ?"
            args.append(state.value)
        return [_rollout(r) for r in self._db.execute(query + " ORDER BY id", args)]

    # ---- jobs -------------------------------------------------------------

    def create_job(self, job_id: str, spec: Mapping[str, Any], version: int, first_round: int = 1) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (job_id, spec, state, current_round, version, message, created)"
                " VALUES (?,?,?,?,?,?,?)",
                (job_id, json.dumps(dict(spec)), JobState.RUNNING.value, first_round, version, "", time.time()),
            )

    def set_promotion(self, job_id: str, decision: str, message: str) -> None:
        """Record a completed job's promotion decision, and say it in its message."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET promotion = ?, message = ? WHERE job_id = ?", (decision, message, job_id))

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
        train_metrics: Mapping[str, float] | None = None, eval_metrics: Mapping[str, float] | None = None,
        phases: Mapping[str, float] | None = None, bytes_down: int = 0,
    ) -> None:
        """Publish the round's version and advance the job, in one transaction, with the
        cap on claimed example counts the round applied, its metrics, where its time
        went (cloud.phases) and the bytes of downloads counted in memory while it was open."""
        with self._tx() as db:
            # The version carries its round's evaluation, and the eval spec it was measured on.
            spec = db.execute("SELECT spec FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            eval_spec = str(json.loads(spec[0]).get("eval", "")) if spec is not None else ""
            db.execute(_INSERT_VERSION, _version_values(
                replace(version, metrics=dict(eval_metrics or {}), eval=eval_spec if eval_metrics else "")))
            now = time.time()
            db.execute(
                "UPDATE rounds SET state = 'closed', accuracy = ?, loss = ?, local_loss = ?, seconds = ? - opened,"
                " version = ?, sha256 = ?, closed = ?, example_cap = ?, capped = ?, train_metrics = ?,"
                " eval_metrics = ?, phases = ?, bytes_down = bytes_down + ? WHERE job_id = ? AND round = ?",
                (accuracy, loss, local_loss, now, version.version, version.sha256, now, example_cap,
                 json.dumps(sorted(capped)), json.dumps(dict(train_metrics or {})),
                 json.dumps(dict(eval_metrics or {})), json.dumps(dict(phases or {})), bytes_down, job_id, round_),
            )
            db.execute(
                "UPDATE jobs SET current_round = ?, version = ?, state = ? WHERE job_id = ?",
                (round_ + 1, version.version, (JobState.COMPLETED if final else JobState.RUNNING).value, job_id),
            )

    # ---- updates ----------------------------------------------------------

    def add_update(self, job_id: str, round_: int, row: UpdateRow, wire_bytes: int) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT INTO updates (job_id, round, received, {_UPDATE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, round_, time.time(), row.agent, row.digest, row.num_examples, row.local_loss, row.path,
                 row.bytes, row.codec, json.dumps(dict(row.metrics)), row.contributors),
            )
            db.execute(
                "UPDATE rounds SET bytes_up = bytes_up + ? WHERE job_id = ? AND round = ?", (wire_bytes, job_id, round_)
            )

    def get_update(self, job_id: str, round_: int, agent: str) -> UpdateRow | None:
        row = self._one(f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE job_id = ? AND round = ? AND agent = ?",
                        job_id, round_, agent)
        return _update(row) if row else None

    def list_updates(self, job_id: str, round_: int) -> list[UpdateRow]:
        rows = self._db.execute(
            f"SELECT {_UPDATE_COLUMNS} FROM updates WHERE job_id = ? AND round = ? ORDER BY agent", (job_id, round_)
        )
        return [_update(r) for r in rows]

    def updates_by_round(self, job_id: str) -> dict[int, list[UpdateRow]]:
        """Every update of a job, by round (one query: a job's status lists them all)."""
        rows = self._db.execute(
            f"SELECT round, {_UPDATE_COLUMNS} FROM updates WHERE job_id = ? ORDER BY round, agent", (job_id,)
        )
        found: dict[int, list[UpdateRow]] = {}
        for r in rows:
            found.setdefault(int(r["round"]), []).append(_update(r))
        return found

    def forget_update_files(self, job_id: str, round_: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE updates SET path = NULL WHERE job_id = ? AND round = ?", (job_id, round_))

    # ---- exclusions -------------------------------------------------------

    def exclude(self, job_id: str, agent: str, code: str, reason: str) -> bool:
        """Record that a job will not select an agent; False if it already was (the first reason stays)."""
        with self._tx() as db:
            cursor = db.execute("INSERT OR IGNORE INTO exclusions VALUES (?,?,?,?,?)",
                                (job_id, agent, code, reason, time.time()))
        return cursor.rowcount == 1

    def exclusions(self, job_id: str) -> list[Exclusion]:
        rows = self._db.execute("SELECT agent, code, reason FROM exclusions WHERE job_id = ? ORDER BY agent", (job_id,))
        return [_record(Exclusion, r) for r in rows]

    # ---- task failures ----------------------------------------------------

    def add_failure(self, job_id: str, round_: int, agent: str, reason: str, detail: str) -> None:
        """Record an agent's failure to train a round (a repeat counts, the latest text stays)."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO task_failures VALUES (?,?,?,?,?,1,?,?) ON CONFLICT (job_id, round, agent) DO UPDATE SET"
                " reason = excluded.reason, detail = excluded.detail, count = count + 1, last = excluded.last",
                (job_id, round_, agent, reason, detail, now, now),
            )

    def failures(self, job_id: str) -> list[FailureRow]:
        rows = self._db.execute("SELECT round, agent, reason, detail, count FROM task_failures WHERE job_id = ?"
                                " ORDER BY round, agent", (job_id,))
        return [_record(FailureRow, r) for r in rows]

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
