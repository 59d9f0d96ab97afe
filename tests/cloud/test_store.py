"""The coordinator's store: typed records, and a schema that migrates forward and
refuses a database from a newer tandem. Plain SQLite in a temporary directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from cloud.aggregation import Defence
from cloud.migrations import MIGRATIONS, Migration, SchemaError
from cloud.spec import JobSpec, LocalTraining, ServerStrategy, Transport
from cloud.store import AgentRow, FileKind, JobRow, JobState, RoundRow, RoundState, Store, UpdateRow, VersionRow

# The schema as the coordinator created it before it had a version (user_version 0),
# copied here as it was: the test must not depend on the code it checks.
UNVERSIONED_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL,
    job_id TEXT, round INTEGER, created REAL NOT NULL, bytes INTEGER NOT NULL,
    delta_path TEXT, delta_from INTEGER, delta_codec TEXT, delta_bytes INTEGER,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL, current_round INTEGER NOT NULL,
    version INTEGER NOT NULL, message TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
    base_version INTEGER NOT NULL, selected TEXT NOT NULL, opened REAL NOT NULL, deadline REAL NOT NULL,
    rejected INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, accuracy REAL, loss REAL, local_loss REAL, seconds REAL,
    version INTEGER, sha256 TEXT, closed REAL,
    PRIMARY KEY (job_id, round));
CREATE TABLE IF NOT EXISTS updates (
    job_id TEXT NOT NULL, round INTEGER NOT NULL, agent TEXT NOT NULL, digest TEXT NOT NULL,
    num_examples INTEGER NOT NULL, local_loss REAL NOT NULL, path TEXT, bytes INTEGER NOT NULL,
    received REAL NOT NULL, codec TEXT NOT NULL,
    PRIMARY KEY (job_id, round, agent));
CREATE TABLE IF NOT EXISTS agents (
    agent TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    connects INTEGER NOT NULL, num_examples INTEGER NOT NULL, device TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pins (
    agent TEXT NOT NULL, model TEXT NOT NULL, placement TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (agent, model));
"""

SPEC = JobSpec(model="mlp", rounds=2, min_clients=2, transport=Transport(codec="int8"))


@contextmanager
def _raw(directory: Path) -> Iterator[sqlite3.Connection]:
    """The database itself, behind the store's back (autocommit, closed on exit)."""
    with closing(sqlite3.connect(directory / "tandem.db", isolation_level=None)) as db:
        yield db


def _user_version(directory: Path) -> int:
    with _raw(directory) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def _version(number: int) -> VersionRow:
    return VersionRow("mlp", number, f"sha-{number}", f"models/mlp/v{number}.safetensors", "job-1", number - 1, 1.0, 100)


def test_records_round_trip_typed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.create_job("job-1", SPEC.to_dict(), 1)
    job = store.get_job("job-1")
    assert isinstance(job, JobRow)
    assert (job.state, job.current_round, job.version, job.message) == (JobState.RUNNING, 1, 1, "")
    assert job.spec == SPEC

    store.open_round("job-1", 1, 1, 1, ["agent-1", "agent-0"], deadline=50.0)
    store.add_update("job-1", 1, UpdateRow("agent-0", "d0", 10, 0.5, "u0", 40, "int8"), wire_bytes=44)
    store.add_round_bytes("job-1", 1, down=7, rejected=1)
    opened = store.get_round("job-1", 1)
    assert isinstance(opened, RoundRow)
    assert (opened.state, opened.attempt, opened.base_version, opened.selected) == (
        RoundState.OPEN, 1, 1, ("agent-1", "agent-0"))
    assert (opened.bytes_up, opened.bytes_down, opened.rejected, opened.version, opened.seconds) == (44, 7, 1, None, None)
    assert store.get_update("job-1", 1, "agent-0") == UpdateRow("agent-0", "d0", 10, 0.5, "u0", 40, "int8")
    assert store.updates_by_round("job-1") == {1: [UpdateRow("agent-0", "d0", 10, 0.5, "u0", 40, "int8")]}

    store.close_round("job-1", 1, _version(2), accuracy=0.9, loss=0.3, local_loss=0.5, final=False)
    [closed] = store.closed_rounds("job-1")
    assert (closed.state, closed.version, closed.sha256, closed.accuracy) == (RoundState.CLOSED, 2, "sha-2", 0.9)
    assert closed.seconds is not None and closed.closed is not None
    assert store.get_version("mlp", 2) == _version(2)
    job = store.get_job("job-1")
    assert job is not None and (job.state, job.current_round, job.version) == (JobState.RUNNING, 2, 2)

    store.set_job_state("job-1", JobState.FAILED, "boom")
    assert [j.job_id for j in store.list_jobs(JobState.FAILED)] == ["job-1"]
    assert store.list_jobs(JobState.RUNNING) == []

    store.agent_connected("agent-0", 10, "cpu")
    [agent] = store.list_agents()
    assert isinstance(agent, AgentRow)
    assert (agent.agent, agent.connects, agent.num_examples, agent.device) == ("agent-0", 1, 10, "cpu")
    store.close()

    # What is stored is unchanged by the enums: the same strings as before them.
    with _raw(tmp_path) as db:
        assert db.execute("SELECT state, message FROM jobs").fetchone() == ("failed", "boom")
        assert db.execute("SELECT state, selected FROM rounds").fetchone() == ("closed", '["agent-1", "agent-0"]')


def test_job_states_are_their_wire_strings() -> None:
    assert [str(s) for s in JobState] == ["running", "completed", "stopped", "failed"]
    assert JobState("completed") is JobState.COMPLETED
    assert f"job x is {JobState.STOPPED}" == "job x is stopped"


def test_a_fresh_directory_is_created_at_the_newest_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    assert store.schema_version == len(MIGRATIONS) >= 1
    store.close()
    assert _user_version(tmp_path) == len(MIGRATIONS)


def test_a_directory_written_before_versioning_is_version_1_and_reads_back(tmp_path: Path) -> None:
    with _raw(tmp_path) as db:
        db.executescript(UNVERSIONED_SCHEMA)
        db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?)",
                   ("old", '{"model": "mlp", "rounds": 2, "min_clients": 2}', "running", 2, 3, "", 1.0))
        db.execute("INSERT INTO rounds (job_id, round, state, attempt, base_version, selected, opened, deadline)"
                   " VALUES ('old', 2, 'open', 1, 3, '[\"agent-0\"]', 1.0, 2.0)")
        db.execute("INSERT INTO agents VALUES ('agent-0', 1.0, 2.0, 3, 40, 'cpu')")
    assert _user_version(tmp_path) == 0

    seen: list[int] = []

    def later(db: sqlite3.Connection) -> None:
        seen.append(db.execute("PRAGMA user_version").fetchone()[0])

    store = Store(tmp_path, [*MIGRATIONS, later])
    assert seen == [len(MIGRATIONS)]  # recognised as the first version: only what came after it ran
    assert store.schema_version == len(MIGRATIONS) + 1
    job = store.get_job("old")
    assert job is not None and (job.state, job.current_round, job.version) == (JobState.RUNNING, 2, 3)
    assert job.spec == JobSpec(model="mlp", rounds=2, min_clients=2)
    current = store.get_round("old", 2)
    assert current is not None and (current.state, current.selected) == (RoundState.OPEN, ("agent-0",))
    assert store.list_agents() == [AgentRow("agent-0", 1.0, 2.0, 3, 40, "cpu")]
    store.close()


# A version-1 spec as the coordinator stored it: 25 flat keys, none at its default.
FLAT_SPEC = {
    "model": "mlp", "rounds": 7, "min_clients": 4, "clients_per_round": 5, "deadline": 90.0, "eval": "digits",
    "epochs": 2, "batch_size": 16, "learning_rate": 0.05, "codec": "topk:0.1+int8", "seed": 11,
    "max_update_bytes": 1 << 20, "strategy": "fedprox", "mu": 0.01, "server_lr": 0.5, "downlink_codec": "int8",
    "target_upload_seconds": 3.0, "aggregator": "trimmed_mean", "trim_fraction": 0.25, "hostile_agents": 1,
    "krum_selected": 0, "clip_norm": 2.0, "clip_to_median": False, "dp_noise_multiplier": 0.0, "dp_delta": 1e-6,
}


def test_migration_2_groups_a_flat_spec(tmp_path: Path) -> None:
    with _raw(tmp_path) as db:
        db.executescript(UNVERSIONED_SCHEMA)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?)",
                   ("flat", json.dumps(FLAT_SPEC), "running", 2, 3, "", 1.0))

    store = Store(tmp_path)
    job = store.get_job("flat")
    assert job is not None
    assert job.spec == JobSpec(
        model="mlp", rounds=7, min_clients=4, clients_per_round=5, deadline=90.0, eval="digits", seed=11,
        training=LocalTraining(epochs=2, batch_size=16, learning_rate=0.05),
        strategy=ServerStrategy(name="fedprox", mu=0.01, server_lr=0.5),
        transport=Transport(codec="topk:0.1+int8", downlink_codec="int8", target_upload_seconds=3.0,
                            max_update_bytes=1 << 20),
        defence=Defence(aggregator="trimmed_mean", trim_fraction=0.25, hostile=1, clip_norm=2.0, dp_delta=1e-6),
    ).validate()
    # Stored in the grouped form itself; fields added since (issue 14's) are absent and take their defaults.
    grouped = job.spec.to_dict()
    for added in ("max_examples", "weight_cap"):
        del grouped["defence"][added]
    assert json.loads(job.spec_json) == grouped
    store.close()
    assert _user_version(tmp_path) == len(MIGRATIONS)


def test_migration_3_adds_delta_hashes_and_a_quarantine_kept_out_of_serving(tmp_path: Path) -> None:
    with _raw(tmp_path) as db:
        db.executescript(UNVERSIONED_SCHEMA)
        db.execute("PRAGMA user_version = 2")
        for number in (1, 2):
            db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       ("mlp", number, f"sha-{number}", f"v{number}", "job-1", number - 1, 1.0, 100,
                        "d2" if number == 2 else None, 1 if number == 2 else None, None, None))

    store = Store(tmp_path)
    assert store.get_version("mlp", 2) == VersionRow("mlp", 2, "sha-2", "v2", "job-1", 1, 1.0, 100, "d2", 1,
                                                     origin="round")  # migration 6 derives the origin
    assert store.get_version("mlp", 2).delta_sha256 is None  # type: ignore[union-attr]  # deltas before it: never served
    store.set_delta_sha256("mlp", 2, "delta-sha")
    assert store.get_version("mlp", 2).delta_sha256 == "delta-sha"  # type: ignore[union-attr]

    assert store.quarantine("mlp", 2, FileKind.MODEL, "its file is 3 bytes")
    assert not store.quarantine("mlp", 2, FileKind.MODEL, "another reason")  # the first reason stays
    quarantined = store.quarantined("mlp", 2)
    assert quarantined is not None and (quarantined.kind, quarantined.reason) == (FileKind.MODEL, "its file is 3 bytes")
    assert store.quarantined("mlp", 2, FileKind.DELTA) is None
    assert store.get_version("mlp", 0) == store.get_version("mlp", 1)  # the newest good one
    assert store.get_version("mlp", 2) is not None  # still on record, by number
    assert [v.version for v in store.list_versions()] == [1]
    assert [v.version for v in store.list_versions("mlp", quarantined=True)] == [1, 2]
    assert store.next_version("mlp") == 3  # a quarantined number is never reused
    store.close()

    readonly = Store(tmp_path, readonly=True)
    assert [v.version for v in readonly.list_versions(quarantined=True)] == [1, 2]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        readonly.set_delta_sha256("mlp", 1, "x")
    readonly.close()


def test_migration_4_records_weight_caps_and_keeps_closed_rounds(tmp_path: Path) -> None:
    """A version-3 directory's closed round reads back with no cap; rounds closed after
    the upgrade record the cap on claimed example counts and the agents it cut down."""
    Store(tmp_path, MIGRATIONS[:3]).close()
    old = Store(tmp_path, MIGRATIONS[:3])
    old.create_job("job-1", SPEC.to_dict(), 1)
    old.open_round("job-1", 1, 1, 1, ["agent-0"], deadline=50.0)
    with _raw(tmp_path) as db:  # closed as version 3 did: without the new columns
        db.execute("UPDATE rounds SET state = 'closed', version = 2, sha256 = 'sha-2', closed = 3.0")
    old.close()
    assert _user_version(tmp_path) == 3

    store = Store(tmp_path)
    assert store.schema_version == len(MIGRATIONS)
    [before] = store.closed_rounds("job-1")
    assert (before.version, before.example_cap, before.capped) == (2, None, ())
    store.open_round("job-1", 2, 1, 2, ["agent-0", "agent-1"], deadline=50.0)
    store.close_round("job-1", 2, _version(3), accuracy=None, loss=None, local_loss=0.5, final=True,
                      example_cap=150.0, capped=["agent-1"])
    after = store.get_round("job-1", 2)
    assert after is not None and (after.example_cap, after.capped) == (150.0, ("agent-1",))
    store.close()


def test_migration_7_records_task_failures_per_round_and_agent(tmp_path: Path) -> None:
    """Task failures (TaskFailed) are kept per (job, round, agent): a repeat counts, the
    latest text stays. Migration 7 sits after 5 until the model lifecycle's 6 is merged."""
    from cloud.migrations import _v7_task_failures

    before = MIGRATIONS.index(_v7_task_failures)
    Store(tmp_path, MIGRATIONS[:before]).close()
    store = Store(tmp_path)
    assert store.schema_version == len(MIGRATIONS)
    store.create_job("job-1", SPEC.to_dict(), 1)
    assert store.failures("job-1") == []
    store.add_failure("job-1", 1, "agent-0", "DATA_MISMATCH", "RuntimeError: shapes")
    store.add_failure("job-1", 1, "agent-0", "DATA_MISMATCH", "RuntimeError: shapes")
    store.add_failure("job-1", 2, "agent-1", "EXCEPTION", "KeyError: 'x'")
    assert [(f.round, f.agent, f.reason, f.detail, f.count) for f in store.failures("job-1")] == [
        (1, "agent-0", "DATA_MISMATCH", "RuntimeError: shapes", 2), (2, "agent-1", "EXCEPTION", "KeyError: 'x'", 1)]
    store.close()


def test_added_migrations_run_once_in_order_and_keep_the_data(tmp_path: Path) -> None:
    Store(tmp_path).close()  # a directory at today's version
    store = Store(tmp_path)
    store.create_job("job-1", SPEC.to_dict(), 1)
    store.close()

    calls: list[str] = []

    def add_column(db: sqlite3.Connection) -> None:
        calls.append("add_column")
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")

    def fill_column(db: sqlite3.Connection) -> None:
        calls.append("fill_column")  # fails unless add_column ran first
        db.execute("UPDATE jobs SET owner = 'admin'")

    migrations = [*MIGRATIONS, add_column, fill_column]
    for _ in range(2):
        store = Store(tmp_path, migrations)
        assert store.schema_version == len(MIGRATIONS) + 2
        job = store.get_job("job-1")
        assert job is not None and job.spec == SPEC
        store.close()
    assert calls == ["add_column", "fill_column"]
    with _raw(tmp_path) as db:
        assert db.execute("SELECT owner FROM jobs").fetchall() == [("admin",)]

    fresh = tmp_path / "fresh"
    Store(fresh, migrations).close()
    assert calls == ["add_column", "fill_column"] * 2
    assert _user_version(fresh) == len(MIGRATIONS) + 2


def test_a_failing_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    Store(tmp_path).close()

    def half_done(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        Store(tmp_path, [*MIGRATIONS, half_done])
    assert _user_version(tmp_path) == len(MIGRATIONS)
    with _raw(tmp_path) as db:
        assert "owner" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]


def test_a_migration_that_commits_on_its_own_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()

    def script(db: sqlite3.Connection) -> None:
        db.executescript("CREATE TABLE extra (x INTEGER);")  # executescript commits first

    migrations: list[Migration] = [*MIGRATIONS, script]
    with pytest.raises(RuntimeError, match="ended its transaction"):
        Store(tmp_path, migrations)
    assert _user_version(tmp_path) == len(MIGRATIONS)


def test_a_database_from_a_newer_tandem_is_refused(tmp_path: Path) -> None:
    Store(tmp_path).close()
    with _raw(tmp_path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaError, match=f"schema version {len(MIGRATIONS) + 1} was written by a newer tandem"):
        Store(tmp_path)
    assert _user_version(tmp_path) == len(MIGRATIONS) + 1  # untouched


@pytest.mark.process
def test_tandem_cloud_refuses_a_newer_database_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    with _raw(state) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    result = subprocess.run(
        [sys.executable, "-m", "tandem_cli", "cloud", "--listen", "127.0.0.1:0", "--state", str(state),
         "--certs", str(tmp_path / "no-certs")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "newer tandem" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_migration_6_records_origins_and_keeps_serving_what_was_served(tmp_path: Path) -> None:
    """A version-5 directory (issue 16): each version gets the origin its job and round
    imply; the newest good version of each model stays what is served (recorded as
    promoted by "migration 6"); jobs that had ended are marked decided."""
    with _raw(tmp_path) as db:
        db.executescript(UNVERSIONED_SCHEMA)
        db.execute("PRAGMA user_version = 2")
    Store(tmp_path, MIGRATIONS[:5]).close()
    with _raw(tmp_path) as db:
        for model, number, job, round_ in (("mlp", 1, "job-1", 0), ("mlp", 2, "job-1", 1), ("mlp", 3, None, None),
                                           ("cnn", 1, None, None)):
            db.execute("INSERT INTO versions (model, version, sha256, path, job_id, round, created, bytes)"
                       " VALUES (?,?,?,?,?,?,?,?)", (model, number, f"sha-{number}", f"v{number}", job, round_, 1.0, 9))
        db.execute("INSERT INTO quarantine VALUES ('mlp', 3, 'model', 'corrupt', 1.0)")
        db.execute("INSERT INTO jobs (job_id, spec, state, current_round, version, message, created)"
                   " VALUES ('job-1', ?, 'completed', 2, 2, '', 1.0)", (json.dumps(SPEC.to_dict()),))
        db.execute("INSERT INTO jobs (job_id, spec, state, current_round, version, message, created)"
                   " VALUES ('job-2', ?, 'running', 1, 2, '', 1.0)", (json.dumps(SPEC.to_dict()),))

    store = Store(tmp_path)
    assert store.schema_version == len(MIGRATIONS) >= 6
    assert [(v.version, v.origin) for v in store.list_versions("mlp", quarantined=True)] == [
        (1, "initial"), (2, "round"), (3, "publish")]
    assert (store.serving_version("mlp"), store.serving_version("cnn")) == (2, 1)  # v3 is quarantined
    [event] = store.events("mlp")
    assert (event.event, event.version, event.previous, event.actor) == ("promote", 2, 0, "migration 6")
    assert store.stages("mlp") == {2: "serving"}
    assert [store.get_job(j).promotion for j in ("job-1", "job-2")] == ["", None]  # type: ignore[union-attr]
    # Rounds closed after the upgrade record their evaluation and its eval spec with the version.
    store.open_round("job-2", 1, 1, 2, ["agent-0"], deadline=50.0)
    store.close_round("job-2", 1, _version(4), accuracy=0.9, loss=0.3, local_loss=0.5, final=False,
                      eval_metrics={"accuracy": 0.9, "loss": 0.3})
    recorded = store.get_version("mlp", 4)
    assert recorded is not None and (dict(recorded.metrics), recorded.eval) == ({"accuracy": 0.9, "loss": 0.3},
                                                                                 SPEC.eval)
    store.add_event("mlp", "promote", 4, 2, "admin", "")
    store.add_event("mlp", "rollback", 2, 4, "admin", "")
    assert store.serving_stack("mlp") == [2] and store.stages("mlp") == {2: "serving", 4: "retired"}
    store.close()
