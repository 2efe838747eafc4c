"""The database's schema (mpfleet.db.schema): a new file gets every table at the current
version, and every file made before schema versions existed opens and is migrated
once, in one transaction, its rows kept and usable.

The old files are made here from the statements the code wrote before versions (each
module created its own tables when it started: the store, then the rollout engine,
serve and the image store), copied below as they were; nothing of mpfleet's own
schema is used to make them.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from mpfleet.db import schema
from mpfleet.db.store import Store, StoreError
from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine

# ---------------------------------------------------------------- the old files
# mpfleet.db.store's SCHEMA before versions: every file had these.
OLD_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    board       TEXT,
    groups_json TEXT NOT NULL DEFAULT '[]',
    first_seen  REAL NOT NULL,
    last_seen   REAL,
    state_json  TEXT
);
CREATE TABLE IF NOT EXISTS samples (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    t           INTEGER NOT NULL,
    values_json TEXT NOT NULL,
    received    REAL NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (device, t);
CREATE TABLE IF NOT EXISTS acks (
    device      TEXT PRIMARY KEY,
    upto        INTEGER NOT NULL,
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_errors (
    id          INTEGER PRIMARY KEY,
    device      TEXT,
    at          REAL NOT NULL,
    reason      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    device      TEXT NOT NULL,
    digest      TEXT NOT NULL,
    first_at    REAL NOT NULL,
    last_at     REAL NOT NULL,
    times       INTEGER NOT NULL DEFAULT 1,
    reason      TEXT NOT NULL,
    frame       BLOB NOT NULL,
    PRIMARY KEY (device, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    kid         TEXT PRIMARY KEY,
    public_b64  TEXT NOT NULL,
    created     REAL NOT NULL,
    retired     REAL,
    active      INTEGER NOT NULL DEFAULT 1,
    last_seq    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS device_credentials (
    device      TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    password    TEXT NOT NULL,
    created     REAL NOT NULL
);
"""

# mpfleet.fleet.rollout's SCHEMA before versions, with `executions` as the engine
# created it at first: without progress_json and by_operator, which its __init__ added
# (ALTER TABLE) to files made before them.
OLD_ROLLOUT_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    params_json  TEXT NOT NULL,
    targets_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    status       TEXT NOT NULL,
    stage        INTEGER NOT NULL DEFAULT 0,
    resolved     REAL,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    finished     REAL,
    reason       TEXT
);
CREATE TABLE IF NOT EXISTS job_targets (
    job         TEXT NOT NULL,
    device      TEXT NOT NULL,
    rank        TEXT NOT NULL,
    added       REAL NOT NULL,
    left_at     REAL,
    PRIMARY KEY (job, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS executions (
    id             INTEGER PRIMARY KEY,
    job            TEXT NOT NULL,
    device         TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    kid            TEXT NOT NULL,
    envelope       TEXT NOT NULL,
    status         TEXT NOT NULL,
    stage          INTEGER NOT NULL,
    queued         REAL NOT NULL,
    started        REAL,
    finished       REAL,
    updated        REAL NOT NULL,
    device_attempt INTEGER,
    detail_json    TEXT,
    note           TEXT,
    UNIQUE (job, device, attempt)
);
CREATE INDEX IF NOT EXISTS executions_by_device ON executions (device, status);
CREATE INDEX IF NOT EXISTS executions_by_status ON executions (job, status);
CREATE TABLE IF NOT EXISTS job_controls (
    job         TEXT NOT NULL,
    device      TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    type        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    envelope    TEXT NOT NULL,
    status      TEXT NOT NULL,
    created     REAL NOT NULL,
    finished    REAL,
    detail_json TEXT,
    PRIMARY KEY (job, device, type)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_rejects (
    device      TEXT NOT NULL,
    ref         TEXT NOT NULL,
    detail_json TEXT,
    at          REAL NOT NULL,
    PRIMARY KEY (device, ref)
) WITHOUT ROWID;
"""
# What RolloutEngine.__init__ ran on such a file, in this order.
OLD_EXECUTIONS_UPGRADES = """
ALTER TABLE executions ADD COLUMN progress_json TEXT;
ALTER TABLE executions ADD COLUMN by_operator INTEGER NOT NULL DEFAULT 0;
"""

# mpfleet.fleet.serve's and mpfleet.images.store's SCHEMA before versions.
OLD_SERVE_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_published (
    device    TEXT PRIMARY KEY,
    digest    TEXT NOT NULL,
    confirmed REAL NOT NULL
) WITHOUT ROWID;
"""
OLD_IMAGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id             TEXT PRIMARY KEY,
    sha256         TEXT NOT NULL UNIQUE,
    chip           TEXT NOT NULL,
    version        TEXT NOT NULL,
    secure_version INTEGER NOT NULL,
    project        TEXT NOT NULL,
    idf_ver        TEXT NOT NULL,
    size           INTEGER NOT NULL,
    source         TEXT NOT NULL,
    kind           TEXT NOT NULL,
    added          REAL NOT NULL
);
"""

# A job's options as the engine stored them before versions (validate_options: every
# option, defaults filled in).
OLD_OPTIONS = {"rate_per_min": None, "stages": [0.5, 1.0], "success_threshold": 1.0, "abort_threshold": None,
               "abort_min_finished": 1, "timeout_s": 600.0, "queued_timeout_s": None, "retries": 1,
               "start_at": None, "end_at": None, "continuous": False, "sign_kid": None, "rotation": None}
T0 = 1_800_000_000.0


def old_file(path, *scripts: str, rows: bool = True):
    """A file as code before schema versions left it (user_version 0), with two
    devices, their samples and a job the rollout has not reached yet."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    for script in scripts:
        db.executescript(script)
    if rows:
        for device in ("dev-1", "dev-2"):
            db.execute("INSERT INTO devices (id, board, groups_json, first_seen, last_seen) VALUES (?, ?, ?, ?, ?)",
                       (device, "virtual", '["pumps"]', T0, T0))
        db.executemany("INSERT INTO samples (device, seq, t, values_json, received) VALUES (?, ?, ?, ?, ?)",
                       [("dev-1", seq, 1_800_000_000 + seq, "[21.5]", T0) for seq in range(1, 11)])
        if "CREATE TABLE IF NOT EXISTS jobs" in "".join(scripts):
            db.execute("INSERT INTO jobs (id, type, params_json, targets_json, options_json, status, stage, created, "
                       "updated) VALUES (?, ?, ?, ?, ?, 'ACTIVE', 0, ?, ?)",
                       ("old-job", "diag", "{}", json.dumps({"all": False, "ids": [], "groups": ["pumps"],
                                                             "query": None}), json.dumps(OLD_OPTIONS), T0, T0))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    return path


def shape(path) -> dict:
    """Every table's columns (name, type, not null, default, primary key) and every
    index's columns: what a query can rely on, whatever text made it."""
    db = sqlite3.connect(path)
    try:
        out = {}
        for kind, name, table in db.execute("SELECT type, name, tbl_name FROM sqlite_master "
                                            "WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"):
            if kind == "table":
                out[name] = [r[1:] for r in db.execute(f"PRAGMA table_info({name})")]
            else:
                out[name] = (table, [r[2] for r in db.execute(f"PRAGMA index_info({name})")])
        return out
    finally:
        db.close()


def user_version(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


@pytest.fixture
def fresh(tmp_path):
    """The shape of a file the current code made."""
    Store(tmp_path / "fresh.db").close()
    return shape(tmp_path / "fresh.db")


# ---------------------------------------------------------------- a new file
def test_a_new_file_has_every_table_at_the_current_version(tmp_path):
    Store(tmp_path / "m.db").close()
    assert user_version(tmp_path / "m.db") == schema.SCHEMA_VERSION >= 1
    tables = {name for name, cols in shape(tmp_path / "m.db").items() if isinstance(cols, list)}
    assert tables == set(schema.TABLES)  # TABLES, what `db check` looks for, names them all
    assert len(schema.TABLES) == len(set(schema.TABLES))


def test_opening_a_current_file_runs_no_migration_and_takes_no_lock(tmp_path):
    Store(tmp_path / "m.db").close()
    db = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with Store(tmp_path / "m.db") as store:  # (the store would wait 30 s for it)
            assert schema.apply(store.db) == 0
    finally:
        db.execute("ROLLBACK")
        db.close()


# ---------------------------------------------------------------- files made before versions
def test_a_file_made_by_the_store_alone_gets_the_other_tables_and_keeps_its_rows(tmp_path, fresh):
    path = old_file(tmp_path / "old.db", OLD_STORE_SCHEMA)
    with Store(path) as store:
        assert store.sample_count("dev-1") == 10 and store.device_ids() == ["dev-1", "dev-2"]
    assert shape(path) == fresh and user_version(path) == schema.SCHEMA_VERSION


def test_a_file_made_by_serve_before_versions_opens_and_its_job_rolls_on(tmp_path, fresh):
    path = old_file(tmp_path / "old.db", OLD_STORE_SCHEMA, OLD_ROLLOUT_SCHEMA, OLD_EXECUTIONS_UPGRADES,
                    OLD_SERVE_SCHEMA, OLD_IMAGES_SCHEMA)
    with Store(path) as store:
        ring = KeyRing(store, tmp_path / "keys")
        ring.init()
        registry = Registry(store)
        engine = RolloutEngine(store, ring, registry, clock=lambda: T0 + 60)
        status = engine.job_status("old-job")
        assert status.status == "ACTIVE" and status.options.to_json() == OLD_OPTIONS
        engine.tick()
        [first] = engine.job_status("old-job").devices  # stage 1 of 2: half of two devices
        assert engine.on_status(first.device, {"job": "old-job", "seq": first.seq, "status": "SUCCEEDED"})
        engine.tick()
        engine.tick()
        second = [r for r in engine.job_status("old-job").devices if r.device != first.device]
        assert [r.status for r in second] == ["QUEUED"]
    assert shape(path) == fresh and user_version(path) == schema.SCHEMA_VERSION


def test_an_executions_table_from_before_progress_and_operator_retries_gains_both_columns(tmp_path, fresh):
    path = old_file(tmp_path / "old.db", OLD_STORE_SCHEMA, OLD_ROLLOUT_SCHEMA)
    db = sqlite3.connect(path)
    db.execute("INSERT INTO executions (job, device, attempt, seq, kid, envelope, status, stage, queued, updated, "
               "finished) VALUES ('old-job', 'dev-1', 1, 7, '0123456789abcdef', 'e', 'FAILED', 0, ?, ?, ?)",
               (T0, T0, T0))
    db.commit()
    db.close()
    with Store(path) as store:
        row = store.db.execute("SELECT seq, status, progress_json, by_operator FROM executions").fetchone()
    assert row == (7, "FAILED", None, 0)  # an attempt the engine made, not the operator
    assert shape(path) == fresh  # the columns in the order a new file has them


def test_every_old_file_migrates_to_the_shape_of_a_new_one(tmp_path, fresh):
    made = [(OLD_STORE_SCHEMA,),
            (OLD_STORE_SCHEMA, OLD_ROLLOUT_SCHEMA),
            (OLD_STORE_SCHEMA, OLD_ROLLOUT_SCHEMA, OLD_EXECUTIONS_UPGRADES),
            (OLD_STORE_SCHEMA, OLD_IMAGES_SCHEMA),
            (OLD_STORE_SCHEMA, OLD_ROLLOUT_SCHEMA, OLD_EXECUTIONS_UPGRADES, OLD_SERVE_SCHEMA, OLD_IMAGES_SCHEMA)]
    for i, scripts in enumerate(made):
        path = old_file(tmp_path / f"old-{i}.db", *scripts)
        Store(path).close()
        assert shape(path) == fresh, scripts


# ---------------------------------------------------------------- once, and all or nothing
def test_migrations_run_once_per_file(tmp_path):
    path = old_file(tmp_path / "old.db", OLD_STORE_SCHEMA)
    ran = []
    migrations = (*schema.MIGRATIONS, lambda db: ran.append(db.execute("PRAGMA user_version").fetchone()[0]))
    for _ in range(3):
        db = sqlite3.connect(path, isolation_level=None)
        try:
            schema.apply(db, migrations)
        finally:
            db.close()
    assert ran == [0] and user_version(path) == len(migrations)  # the version moves at the commit


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path):
    path = old_file(tmp_path / "old.db", OLD_STORE_SCHEMA)
    before = shape(path)

    def fails(db):
        raise sqlite3.OperationalError("disk I/O error")

    db = sqlite3.connect(path, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            schema.apply(db, (*schema.MIGRATIONS, fails))
        assert not db.in_transaction
    finally:
        db.close()
    assert shape(path) == before and user_version(path) == 0  # not even migration 1's tables
    with Store(path) as store:  # the next open migrates it
        assert store.device_ids() == ["dev-1", "dev-2"]
    assert user_version(path) == schema.SCHEMA_VERSION


def test_a_file_from_a_newer_mpfleet_is_refused_and_left_alone(tmp_path):
    path = old_file(tmp_path / "new.db", OLD_STORE_SCHEMA)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 1}")
    db.close()
    before = shape(path)
    with pytest.raises(StoreError, match=rf"cannot open database .*new\.db: its schema version is "
                                         rf"{schema.SCHEMA_VERSION + 1}, .* made by a newer mpfleet"):
        Store(path)
    assert shape(path) == before and user_version(path) == schema.SCHEMA_VERSION + 1


# ---------------------------------------------------------------- migration 2
def test_a_version_1_file_gains_strangers_dispatchers_and_the_reported_time_and_keeps_its_devices(tmp_path, fresh):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path, isolation_level=None)
    schema.apply(db, schema.MIGRATIONS[:1])
    db.execute("INSERT INTO devices (id, first_seen, last_seen) VALUES ('dev-1', 1.0, 2.0)")
    db.close()
    assert user_version(path) == 1
    with Store(path) as store:
        assert store.device_ids() == ["dev-1"]
        assert store.db.execute("SELECT reported_at FROM devices").fetchone() == (None,)
    assert shape(path) == fresh and user_version(path) == schema.SCHEMA_VERSION
