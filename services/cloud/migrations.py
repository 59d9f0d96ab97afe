"""The coordinator database's schema, as an ordered list of migrations.

`MIGRATIONS[i]` takes a database from schema version i to i + 1; the version lives
in SQLite's `PRAGMA user_version`. A fresh state directory runs them all, an older
one the ones it lacks, each in a transaction of its own, so a crash mid-upgrade
leaves the last complete version. Changing the schema is appending a function here
(and its test in tests/cloud/test_store.py); nothing else counts versions.

A migration uses `db.execute` only: `executescript` commits the open transaction
first, and `migrate` refuses a migration that ends it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence

Migration = Callable[[sqlite3.Connection], None]


class SchemaError(ValueError):
    """A database this code cannot use: written by a newer tandem. A ValueError, so
    `tandem cloud` exits with its message on one line."""


def _v1_tables(db: sqlite3.Connection) -> None:
    """Version 1, the schema before versioning existed. IF NOT EXISTS: a state
    directory written then (user_version 0, tables present) passes unchanged."""
    for statement in (
        """CREATE TABLE IF NOT EXISTS versions (
            model TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
            job_id TEXT, round INTEGER, created REAL NOT NULL, bytes INTEGER NOT NULL,
            delta_path TEXT, delta_from INTEGER, delta_codec TEXT, delta_bytes INTEGER,
            PRIMARY KEY (model, version))""",
        """CREATE TABLE IF NOT EXISTS jobs (
            job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, current_round INTEGER NOT NULL,
            version INTEGER NOT NULL, message TEXT NOT NULL DEFAULT '', created REAL NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS rounds (
            job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
            base_version INTEGER NOT NULL, selected TEXT NOT NULL, opened REAL NOT NULL, deadline REAL NOT NULL,
            rejected INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
            bytes_down INTEGER NOT NULL DEFAULT 0, accuracy REAL, loss REAL, local_loss REAL, seconds REAL,
            version INTEGER, sha256 TEXT, closed REAL,
            PRIMARY KEY (job_id, round))""",
        """CREATE TABLE IF NOT EXISTS updates (
            job_id TEXT NOT NULL, round INTEGER NOT NULL, agent TEXT NOT NULL, digest TEXT NOT NULL,
            num_examples INTEGER NOT NULL, local_loss REAL NOT NULL, path TEXT, bytes INTEGER NOT NULL,
            received REAL NOT NULL, codec TEXT NOT NULL,
            PRIMARY KEY (job_id, round, agent))""",
        """CREATE TABLE IF NOT EXISTS agents (
            agent TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
            connects INTEGER NOT NULL, num_examples INTEGER NOT NULL, device TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS pins (
            agent TEXT NOT NULL, model TEXT NOT NULL, placement TEXT NOT NULL, created REAL NOT NULL,
            PRIMARY KEY (agent, model))""",
    ):
        db.execute(statement)


# Where each flat job-spec key of version 1 went in version 2: (group, key in it), the
# group None for the job itself. A literal copy: JobSpec will change again, this must not.
_V2_SPEC_KEYS: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"), "rounds": (None, "rounds"), "min_clients": (None, "min_clients"),
    "clients_per_round": (None, "clients_per_round"), "deadline": (None, "deadline"), "eval": (None, "eval"),
    "seed": (None, "seed"),
    "epochs": ("training", "epochs"), "batch_size": ("training", "batch_size"),
    "learning_rate": ("training", "learning_rate"),
    "strategy": ("strategy", "name"), "mu": ("strategy", "mu"), "server_lr": ("strategy", "server_lr"),
    "codec": ("transport", "codec"), "downlink_codec": ("transport", "downlink_codec"),
    "target_upload_seconds": ("transport", "target_upload_seconds"),
    "max_update_bytes": ("transport", "max_update_bytes"),
    "aggregator": ("defence", "aggregator"), "trim_fraction": ("defence", "trim_fraction"),
    "hostile_agents": ("defence", "hostile"), "krum_selected": ("defence", "krum_selected"),
    "clip_norm": ("defence", "clip_norm"), "clip_to_median": ("defence", "clip_to_median"),
    "dp_noise_multiplier": ("defence", "dp_noise_multiplier"), "dp_delta": ("defence", "dp_delta"),
}


def _v2_grouped_specs(db: sqlite3.Connection) -> None:
    """Version 2: a job's spec groups its settings (training, strategy, transport,
    defence) instead of 25 flat keys. A key the flat spec lacks stays absent (its
    default); one this mapping does not know stays at the top, so reading it fails
    loudly rather than losing it."""
    rows = db.execute("SELECT job_id, spec FROM jobs").fetchall()
    for job_id, text in rows:
        top: dict[str, object] = {}
        groups: dict[str, dict[str, object]] = {"training": {}, "strategy": {}, "transport": {}, "defence": {}}
        for key, value in json.loads(text).items():
            group, name = _V2_SPEC_KEYS.get(key, (None, key))
            (top if group is None else groups[group])[name] = value
        db.execute("UPDATE jobs SET spec = ? WHERE job_id = ?", (json.dumps({**top, **groups}), job_id))


def _v3_file_integrity(db: sqlite3.Connection) -> None:
    """Version 3 (issue 14, item 4: corrupt files): a delta's content hash beside the
    version it leads to, so that a delta is checked before it is served as the version
    itself is (NULL for deltas written before: those are never served, the whole version
    goes instead); and the quarantine, one row per file found not to match its hash
    (`kind` model or delta), kept out of serving with the reason it was found bad."""
    db.execute("ALTER TABLE versions ADD COLUMN delta_sha256 TEXT")
    db.execute(
        """CREATE TABLE quarantine (
            model TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, reason TEXT NOT NULL,
            found REAL NOT NULL, PRIMARY KEY (model, version, kind))"""
    )


def _v4_weight_caps(db: sqlite3.Connection) -> None:
    """Version 4 (issue 14, item 1: example counts): a closed round records the cap on
    claimed example counts it
    applied (examples; NULL for rounds closed before caps existed) and the agents capped."""
    db.execute("ALTER TABLE rounds ADD COLUMN example_cap REAL")
    db.execute("ALTER TABLE rounds ADD COLUMN capped TEXT NOT NULL DEFAULT '[]'")


def _v5_task_metrics(db: sqlite3.Connection) -> None:
    """Version 5 (issue 15: the user's task on the training path): each update keeps the
    agent's training metrics, each closed round their example-weighted mean and the
    cloud's evaluation (JSON objects of floats; empty for rounds closed before), and a
    job records the connected agents it will not select and why (once per agent)."""
    db.execute("ALTER TABLE updates ADD COLUMN metrics TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE rounds ADD COLUMN train_metrics TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE rounds ADD COLUMN eval_metrics TEXT NOT NULL DEFAULT '{}'")
    db.execute(
        """CREATE TABLE exclusions (
            job_id TEXT NOT NULL, agent TEXT NOT NULL, code TEXT NOT NULL, reason TEXT NOT NULL,
            excluded REAL NOT NULL, PRIMARY KEY (job_id, agent))"""
    )


def _v6_model_lifecycle(db: sqlite3.Connection) -> None:
    """Version 6 (issue 16: model lifecycle): each version records where it came from
    (`origin`: round, initial, publish), the evaluation metrics it was published with
    and the eval spec they were measured on; `model_events` records every change of
    what is served (promote, rollback) and a job's decision to keep it (kept), with
    who and when; a job records its promotion decision (NULL: not taken yet).

    What a state directory served before keeps serving: the newest good version of
    each model is recorded as promoted by "migration 6", and jobs that ended before
    are marked decided (an empty decision)."""
    db.execute("ALTER TABLE versions ADD COLUMN origin TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE versions ADD COLUMN metrics TEXT NOT NULL DEFAULT '{}'")
    db.execute("ALTER TABLE versions ADD COLUMN eval TEXT NOT NULL DEFAULT ''")
    db.execute("UPDATE versions SET origin = CASE WHEN job_id IS NULL OR job_id = '' THEN 'publish'"
               " WHEN round = 0 THEN 'initial' ELSE 'round' END")
    db.execute(
        """CREATE TABLE model_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, event TEXT NOT NULL,
            version INTEGER NOT NULL, previous INTEGER NOT NULL, actor TEXT NOT NULL, reason TEXT NOT NULL,
            at REAL NOT NULL)"""
    )
    db.execute(
        "INSERT INTO model_events (model, event, version, previous, actor, reason, at)"
        " SELECT model, 'promote', MAX(version), 0, 'migration 6',"
        " 'the newest version, served by default before model stages existed', strftime('%s', 'now')"
        " FROM versions v WHERE NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.model = v.model"
        " AND q.version = v.version AND q.kind = 'model') GROUP BY model ORDER BY model"
    )
    db.execute("ALTER TABLE jobs ADD COLUMN promotion TEXT")
    db.execute("UPDATE jobs SET promotion = '' WHERE state != 'running'")


def _v7_task_failures(db: sqlite3.Connection) -> None:
    """Version 7 (issue 16, guards: task failures): what agents reported when they failed
    to train a round (TaskFailed), one row per (job, round, agent) with the latest reason
    and detail and how many times it was reported."""
    db.execute(
        """CREATE TABLE task_failures (
            job_id TEXT NOT NULL, round INTEGER NOT NULL, agent TEXT NOT NULL, reason TEXT NOT NULL,
            detail TEXT NOT NULL, count INTEGER NOT NULL, first REAL NOT NULL, last REAL NOT NULL,
            PRIMARY KEY (job_id, round, agent))"""
    )


def _v8_rollouts(db: sqlite3.Connection) -> None:
    """Version 8 (issue 16: staged rollouts): one row per rollout of a model version to
    a canary share of the agents, its policy (JSON), the canary agents (a JSON list),
    its state (canary, promoted, rolled-back, aborted) and why it ended. A rollout in
    state canary when the coordinator stops resumes at start."""
    db.execute(
        """CREATE TABLE rollouts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version INTEGER NOT NULL,
            previous INTEGER NOT NULL, agents TEXT NOT NULL, policy TEXT NOT NULL, state TEXT NOT NULL,
            actor TEXT NOT NULL, reason TEXT NOT NULL, started REAL NOT NULL, ended REAL)"""
    )


def _v9_round_phases(db: sqlite3.Connection) -> None:
    """Version 9 (issue 18: where a round's time goes): a closed round records its wall
    time by phase (a JSON object of seconds, cloud.phases; empty for rounds closed before)."""
    db.execute("ALTER TABLE rounds ADD COLUMN phases TEXT NOT NULL DEFAULT '{}'")


def _v10_partial_aggregates(db: sqlite3.Connection) -> None:
    """Version 10 (issue 20: regional aggregators): how many agents' updates an update
    stands for (more than 1: a region's partial aggregate; 1 for every update before)."""
    db.execute("ALTER TABLE updates ADD COLUMN contributors INTEGER NOT NULL DEFAULT 1")


MIGRATIONS: list[Migration] = [_v1_tables, _v2_grouped_specs, _v3_file_integrity, _v4_weight_caps, _v5_task_metrics,
                               _v6_model_lifecycle, _v7_task_failures, _v8_rollouts, _v9_round_phases,
                               _v10_partial_aggregates]


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version `db` is at (0: empty, or written before versioning)."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(db: sqlite3.Connection, path: str, migrations: Sequence[Migration] = MIGRATIONS) -> None:
    """Bring `db` (an autocommit connection) to version len(migrations); SchemaError
    if it is newer. `path` names the database in that error."""
    newest = len(migrations)
    found = schema_version(db)
    while found < newest:
        # The version is read again under the write lock: another process opening the
        # same directory may have migrated it meanwhile.
        db.execute("BEGIN IMMEDIATE")
        try:
            found = schema_version(db)
            if found < newest:
                migrations[found](db)
                if not db.in_transaction:
                    raise RuntimeError(f"migration {found} -> {found + 1} ended its transaction (executescript?)")
                found += 1
                db.execute(f"PRAGMA user_version = {found}")  # a pragma takes no parameters
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    if found > newest:
        raise SchemaError(
            f"{path}: schema version {found} was written by a newer tandem (this one knows up to {newest}); "
            "upgrade tandem to use this state directory"
        )
