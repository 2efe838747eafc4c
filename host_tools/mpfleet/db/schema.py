"""The database's schema: every table and index mpfleet keeps, and the migrations that
bring an older file up to date.

Which room: the database. The one owner of the schema: no other module creates or
alters a table. Imports only the standard library and mpfleet.errors; the store (store.py) applies the
schema when it opens a file, and db/maint.py checks a file against `TABLES`.

Versions. The schema's version is SQLite's `PRAGMA user_version` (a 32-bit integer in
the file's header, 0 in a new file). `MIGRATIONS[i]` takes a file from version i to
i + 1; `SCHEMA_VERSION` is how many there are. `apply(db)` runs the ones a file has not
had, in order, inside one IMMEDIATE transaction together with the new user_version:
a migration that fails (or a process killed half way) leaves the file as it was, and
two processes opening the same old file at once migrate it once (the second waits for
the write lock, then finds the version current). A file whose version is above
SCHEMA_VERSION was made by a newer mpfleet and is refused: its tables may mean
something this code does not know.

Migration 1 adopts every file made before versions existed (user_version 0): those
were made by modules that each created their own tables when they started (the store
its seven, the rollout engine the jobs tables, serve `queue_published`, the image
store `images`), so such a file may hold any subset of the tables, and an `executions`
table from before two of its columns. Migration 1 creates what is missing and adds
those columns; on a new file it simply creates everything. Later changes are new
migrations appended to MIGRATIONS, never edits of an old one: a file that had
migration n never runs it again.

A migration runs inside the transaction, so it must not use `executescript` (which
commits first): one `execute` per statement.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from mpfleet.errors import MpfleetError

# ---------------------------------------------------------------- the tables
# Each table's statement as migration 1 creates it. Grouped by the module that reads
# and writes the table (a table still has one owner here: this file).

_STORE_TABLES = (  # mpfleet.db.store: devices, samples, acks, ingest errors, quarantine, keys, broker accounts
    """CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    board       TEXT,
    groups_json TEXT NOT NULL DEFAULT '[]',
    first_seen  REAL NOT NULL,
    last_seen   REAL,
    state_json  TEXT
)""",
    """CREATE TABLE IF NOT EXISTS samples (
    device      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    t           INTEGER NOT NULL,
    values_json TEXT NOT NULL,
    received    REAL NOT NULL,
    PRIMARY KEY (device, seq)
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS samples_by_time ON samples (device, t)",
    """CREATE TABLE IF NOT EXISTS acks (
    device      TEXT PRIMARY KEY,
    upto        INTEGER NOT NULL,
    updated     REAL NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS ingest_errors (
    id          INTEGER PRIMARY KEY,
    device      TEXT,
    at          REAL NOT NULL,
    reason      TEXT NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS quarantine (
    device      TEXT NOT NULL,
    digest      TEXT NOT NULL,
    first_at    REAL NOT NULL,
    last_at     REAL NOT NULL,
    times       INTEGER NOT NULL DEFAULT 1,
    reason      TEXT NOT NULL,
    frame       BLOB NOT NULL,
    PRIMARY KEY (device, digest)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS keys (
    kid         TEXT PRIMARY KEY,
    public_b64  TEXT NOT NULL,
    created     REAL NOT NULL,
    retired     REAL,
    active      INTEGER NOT NULL DEFAULT 1,
    last_seq    INTEGER NOT NULL DEFAULT 0
)""",
    """CREATE TABLE IF NOT EXISTS device_credentials (
    device      TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    password    TEXT NOT NULL,
    created     REAL NOT NULL
)""",
)

_ROLLOUT_TABLES = (  # mpfleet.fleet.rollout: jobs, their targets, executions, cancel jobs, unmatched rejections
    """CREATE TABLE IF NOT EXISTS jobs (
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
)""",
    """CREATE TABLE IF NOT EXISTS job_targets (
    job         TEXT NOT NULL,
    device      TEXT NOT NULL,
    rank        TEXT NOT NULL,
    added       REAL NOT NULL,
    left_at     REAL,
    PRIMARY KEY (job, device)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS executions (
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
    progress_json  TEXT,
    by_operator    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job, device, attempt)
)""",
    "CREATE INDEX IF NOT EXISTS executions_by_device ON executions (device, status)",
    "CREATE INDEX IF NOT EXISTS executions_by_status ON executions (job, status)",
    """CREATE TABLE IF NOT EXISTS job_controls (
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
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS job_rejects (
    device      TEXT NOT NULL,
    ref         TEXT NOT NULL,
    detail_json TEXT,
    at          REAL NOT NULL,
    PRIMARY KEY (device, ref)
) WITHOUT ROWID""",
)

_SERVE_TABLES = (  # mpfleet.fleet.serve: the digest of each device queue the broker confirmed
    """CREATE TABLE IF NOT EXISTS queue_published (
    device    TEXT PRIMARY KEY,
    digest    TEXT NOT NULL,
    confirmed REAL NOT NULL
) WITHOUT ROWID""",
)

_IMAGE_TABLES = (  # mpfleet.images.store: firmware images and app bundles
    """CREATE TABLE IF NOT EXISTS images (
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
)""",
)

# Columns `executions` gained after its first version, in the order they were added:
# a file made before them has the table without them (migration 1 adds them).
_LATER_EXECUTION_COLUMNS = (
    ("progress_json", "TEXT"),                          # update jobs report download progress
    ("by_operator", "INTEGER NOT NULL DEFAULT 0"),      # the operator's retry (RolloutEngine.retry)
)


def _adopt_unversioned(db: sqlite3.Connection) -> None:
    """Migration 1: a file made before schema versions (any subset of the tables, an old
    `executions`), or a new one, gets every table, index and column."""
    for statement in (*_STORE_TABLES, *_ROLLOUT_TABLES, *_SERVE_TABLES, *_IMAGE_TABLES):
        db.execute(statement)
    columns = {row[1] for row in db.execute("PRAGMA table_info(executions)")}
    for name, decl in _LATER_EXECUTION_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE executions ADD COLUMN {name} {decl}")


def _fleet_membership_and_liveness(db: sqlite3.Connection) -> None:
    """Migration 2: a device joins the fleet only by provisioning or an explicit accept,
    so a device id seen on the broker that is not registered waits in `strangers`
    (`mpfleet devices pending`, `devices accept`); `devices.reported_at` is the device's
    own time of its last report (its `time` field), beside `last_seen`, the time the
    host received it; `dispatchers` holds each running `serve`'s heartbeat, so a
    command that waits on the dispatcher can tell when none is running."""
    db.execute("ALTER TABLE devices ADD COLUMN reported_at REAL")
    for statement in _MEMBERSHIP_TABLES:
        db.execute(statement)


_MEMBERSHIP_TABLES = (  # migration 2: mpfleet.db.store (strangers), mpfleet.fleet.serve (dispatchers)
    """CREATE TABLE IF NOT EXISTS strangers (
    id          TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    times       INTEGER NOT NULL DEFAULT 1,
    state_json  TEXT
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS dispatchers (
    name        TEXT PRIMARY KEY,
    pid         INTEGER NOT NULL,
    host        TEXT NOT NULL,
    started     REAL NOT NULL,
    beat        REAL NOT NULL
) WITHOUT ROWID""",
)


def _certificates(db: sqlite3.Connection) -> None:
    """Migration 3: every certificate the fleet CA issued (mpfleet.fleet.certs), by
    serial (hex: serials are up to 159 bits): whose it is, what for, when it is
    valid, its DER, and when it was revoked. Never a private key."""
    for statement in _CERTIFICATE_TABLES:
        db.execute(statement)


_CERTIFICATE_TABLES = (  # migration 3: mpfleet.db.store (certificates), written by mpfleet.fleet.certs
    """CREATE TABLE IF NOT EXISTS certificates (
    serial      TEXT PRIMARY KEY,
    subject     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    issued      REAL NOT NULL,
    not_before  REAL NOT NULL,
    not_after   REAL NOT NULL,
    der         BLOB NOT NULL,
    revoked     REAL
) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS certificates_subject ON certificates (subject, issued)",
)


def _scrub_cert_keys(db: sqlite3.Connection) -> None:
    """Migration 4: a `cert` job's params carry the device's new private key (identity:
    base64 of certificate DER + key DER), and so does every envelope signed from them.
    Once the job can sign no further envelope and no execution of it is pending, the
    key is of no more use to the host: triggers replace it (params: identity null,
    `scrubbed` the Unix time; each envelope: the text 'scrubbed') in the statement that
    ends the last execution or the job, so in its transaction, whichever module or
    command wrote it. The certificate stays in `certificates`. A file that already
    holds such jobs is scrubbed here."""
    for statement in _CERT_SCRUB_TRIGGERS:
        db.execute(statement)
    db.execute(_scrub_params("jobs.id"))
    db.execute(_scrub_envelopes("executions.job"))


# A cert job is done with its key when none of its executions is pending (QUEUED,
# IN_PROGRESS: the device may still take that envelope from its queue) and it signs no
# further one by itself: it is no longer ACTIVE, or every target's latest execution is
# final and not to be retried (RolloutEngine._settled: FAILED or TIMED_OUT, not the
# operator's, within the `retries` budget, before `end_at`). {job} is the job's id as
# the statement sees it. The state names are those of mpfleet.fleet.jobs_model.
_CERT_DONE = """jobs.type = 'cert'
AND json_extract(jobs.params_json, '$.identity') IS NOT NULL
AND NOT EXISTS (SELECT 1 FROM executions p WHERE p.job = {job} AND p.status IN ('QUEUED', 'IN_PROGRESS'))
AND (jobs.status != 'ACTIVE' OR (
    EXISTS (SELECT 1 FROM executions x WHERE x.job = {job})
    AND NOT EXISTS (SELECT 1 FROM job_targets t WHERE t.job = {job} AND t.left_at IS NULL
                    AND NOT EXISTS (SELECT 1 FROM executions x WHERE x.job = {job} AND x.device = t.device))
    AND NOT EXISTS (
        SELECT 1 FROM executions l WHERE l.job = {job}
        AND l.attempt = (SELECT MAX(m.attempt) FROM executions m WHERE m.job = {job} AND m.device = l.device)
        AND l.status IN ('FAILED', 'TIMED_OUT') AND l.by_operator = 0
        AND (SELECT COUNT(*) FROM executions f WHERE f.job = {job} AND f.device = l.device
             AND f.status IN ('FAILED', 'TIMED_OUT'))
            <= COALESCE(json_extract(jobs.options_json, '$.retries'), 0)
        AND (json_extract(jobs.options_json, '$.end_at') IS NULL
             OR json_extract(jobs.options_json, '$.end_at') > CAST(strftime('%s', 'now') AS REAL)))))"""


def _scrub_params(job: str) -> str:
    """The statement that scrubs the params of job `job` (an SQL expression) when it is done."""
    return ("UPDATE jobs SET params_json = json_set(params_json, '$.identity', NULL, "
            "'$.scrubbed', CAST(strftime('%s', 'now') AS INTEGER)) "
            f"WHERE jobs.id = {job} AND " + _CERT_DONE.format(job="jobs.id"))


def _scrub_envelopes(job: str) -> str:
    """The statement that replaces the final envelopes of job `job` once its params are scrubbed."""
    return ("UPDATE executions SET envelope = 'scrubbed' WHERE executions.job = "
            f"{job} AND envelope != 'scrubbed' AND status NOT IN ('QUEUED', 'IN_PROGRESS') "
            "AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = executions.job AND jobs.type = 'cert' "
            "AND json_extract(jobs.params_json, '$.scrubbed') IS NOT NULL)")


_CERT_SCRUB_TRIGGERS = (  # migration 4: written by mpfleet.fleet.rollout, read by nobody else
    f"""CREATE TRIGGER IF NOT EXISTS cert_scrub_on_execution_end AFTER UPDATE OF status ON executions
WHEN NEW.status NOT IN ('QUEUED', 'IN_PROGRESS')
BEGIN
    {_scrub_params("NEW.job")};
    {_scrub_envelopes("NEW.job")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS cert_scrub_on_execution_final AFTER INSERT ON executions
WHEN NEW.status NOT IN ('QUEUED', 'IN_PROGRESS')
BEGIN
    {_scrub_params("NEW.job")};
    {_scrub_envelopes("NEW.job")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS cert_scrub_on_job_end AFTER UPDATE OF status ON jobs
WHEN NEW.status != 'ACTIVE' AND NEW.type = 'cert'
BEGIN
    {_scrub_params("NEW.id")};
    {_scrub_envelopes("NEW.id")};
END""",
)


Migration = Callable[[sqlite3.Connection], None]

# MIGRATIONS[i] takes a file from user_version i to i + 1 (module docstring). Append only.
MIGRATIONS: tuple[Migration, ...] = (
    _adopt_unversioned,
    _fleet_membership_and_liveness,
    _certificates,
    _scrub_cert_keys,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Every table of a current file, in the order migration 1 creates them: what
# db/maint.py looks for to tell an mpfleet database from another application's.
TABLES = ("devices", "samples", "acks", "ingest_errors", "quarantine", "keys", "device_credentials",
          "jobs", "job_targets", "executions", "job_controls", "job_rejects",
          "queue_published", "images", "strangers", "dispatchers", "certificates")


class SchemaError(MpfleetError):
    """The file's schema cannot be brought to SCHEMA_VERSION (the store names the file)."""


def version(db: sqlite3.Connection) -> int:
    """The file's schema version (0: a new file, or one made before versions)."""
    return db.execute("PRAGMA user_version").fetchone()[0]


def _refuse_newer(current: int, target: int) -> None:
    if current > target:
        raise SchemaError(f"its schema version is {current}, and this mpfleet knows versions up to {target}: "
                          f"it was made by a newer mpfleet")


def apply(db: sqlite3.Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the file of `db` (a connection in autocommit mode, isolation_level=None) to
    the schema of `migrations`; returns how many migrations ran. A current file costs
    one read of the header and takes no lock."""
    target = len(migrations)
    current = version(db)
    if current == target:
        return 0
    _refuse_newer(current, target)
    db.execute("BEGIN IMMEDIATE")
    try:
        current = version(db)  # again, under the write lock: another process may have migrated it
        _refuse_newer(current, target)
        for migration in migrations[current:]:
            migration(db)
        # PRAGMA takes no parameters; `target` is an int of our own
        db.execute(f"PRAGMA user_version = {int(target)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return target - current
