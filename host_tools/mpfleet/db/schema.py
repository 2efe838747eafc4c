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
commits first): one `execute` per statement, through `_ddl`.

PostgreSQL (db/backend.py). The same migrations, the same tables: `_ddl` translates
each statement's SQLite types to PostgreSQL's (INTEGER -> BIGINT, REAL -> DOUBLE
PRECISION, BLOB -> BYTEA, an INTEGER PRIMARY KEY -> an identity column; a table that
has a rowid in SQLite gets a `rowid` identity column, which some orderings use), and
the version lives in the one-row table `mpfleet_schema`; `apply` holds a transaction
advisory lock while it migrates, as SQLite's write lock does. What only PostgreSQL
needs is created with migration 1 there (no PostgreSQL database predates it): SQLite's
`json_array_length(text)`, and the triggers that NOTIFY `mpfleet_changes` when a jobs
table changes, naming the device when an execution or control job changed (how
serve hears of another process's commit: SQLite has PRAGMA data_version for it).
Migration 4's triggers are written in each dialect.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mpfleet.db.backend import CHANGES_CHANNEL, Connection, dialect

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
_PG_ONLY = (  # migration 1 on PostgreSQL: what SQLite has built in
    # SQLite's json_array_length of a TEXT column (store.sample_widths)
    "CREATE OR REPLACE FUNCTION json_array_length(text) RETURNS integer LANGUAGE sql IMMUTABLE "
    "AS 'SELECT json_array_length($1::json)'",
    # a job or its targets changed: every queue may have (payload '')
    f"""CREATE OR REPLACE FUNCTION mpfleet_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANGES_CHANNEL}', '');
    RETURN NULL;
END $$""",
    # (for each row: a statement that changes none, as the key scrub's on other jobs, tells nothing)
    *(f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
      "FOR EACH ROW EXECUTE FUNCTION mpfleet_notify_change()" for table in ("jobs", "job_targets")),
    # one device's execution or control job changed: its queue may have (payload: the device;
    # PostgreSQL sends one of equal notifications of a transaction)
    f"""CREATE OR REPLACE FUNCTION mpfleet_notify_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('{CHANGES_CHANNEL}', OLD.device);
    ELSE
        PERFORM pg_notify('{CHANGES_CHANNEL}', NEW.device);
    END IF;
    RETURN NULL;
END $$""",
    *(f"CREATE TRIGGER {table}_changed AFTER INSERT OR UPDATE OR DELETE ON {table} "
      "FOR EACH ROW EXECUTE FUNCTION mpfleet_notify_device()" for table in ("executions", "job_controls")),
)

_LATER_EXECUTION_COLUMNS = (
    ("progress_json", "TEXT"),                          # update jobs report download progress
    ("by_operator", "INTEGER NOT NULL DEFAULT 0"),      # the operator's retry (RolloutEngine.retry)
)


def _pg_type(statement: str) -> str:
    """A SQLite table, index or column definition of this module as PostgreSQL takes it."""
    rowid_table = statement.startswith("CREATE TABLE") and "WITHOUT ROWID" not in statement \
        and "INTEGER PRIMARY KEY" not in statement
    s = statement.replace(" WITHOUT ROWID", "")
    s = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", s)
    s = re.sub(r"\bINTEGER\b", "BIGINT", s)
    s = re.sub(r"\bREAL\b", "DOUBLE PRECISION", s)
    s = re.sub(r"\bBLOB\b", "BYTEA", s)
    if rowid_table:  # what SQLite gives every such table, and ORDER BY ..., rowid uses
        s = s[:s.rindex(")")] + ",\n    rowid       BIGINT GENERATED ALWAYS AS IDENTITY\n)"
    return s


def _ddl(db: Connection, statement: str) -> None:
    """Run one of this module's definitions (written for SQLite) in `db`'s dialect."""
    db.execute(_pg_type(statement) if dialect(db) == "postgresql" else statement)


def _adopt_unversioned(db: Connection) -> None:
    """Migration 1: a file made before schema versions (any subset of the tables, an old
    `executions`), or a new one, gets every table, index and column. On PostgreSQL (always
    a new database) also what only it needs (module docstring)."""
    for statement in (*_STORE_TABLES, *_ROLLOUT_TABLES, *_SERVE_TABLES, *_IMAGE_TABLES):
        _ddl(db, statement)
    if dialect(db) == "postgresql":
        for statement in _PG_ONLY:
            db.execute(statement)
        return
    columns = {row[1] for row in db.execute("PRAGMA table_info(executions)")}
    for name, decl in _LATER_EXECUTION_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE executions ADD COLUMN {name} {decl}")


def _fleet_membership_and_liveness(db: Connection) -> None:
    """Migration 2: a device joins the fleet only by provisioning or an explicit accept,
    so a device id seen on the broker that is not registered waits in `strangers`
    (`mpfleet devices pending`, `devices accept`); `devices.reported_at` is the device's
    own time of its last report (its `time` field), beside `last_seen`, the time the
    host received it; `dispatchers` holds each running `serve`'s heartbeat, so a
    command that waits on the dispatcher can tell when none is running."""
    _ddl(db, "ALTER TABLE devices ADD COLUMN reported_at REAL")
    for statement in _MEMBERSHIP_TABLES:
        _ddl(db, statement)


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


def _certificates(db: Connection) -> None:
    """Migration 3: every certificate the fleet CA issued (mpfleet.fleet.certs), by
    serial (hex: serials are up to 159 bits): whose it is, what for, when it is
    valid, its DER, and when it was revoked. Never a private key."""
    for statement in _CERTIFICATE_TABLES:
        _ddl(db, statement)


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


def _scrub_cert_keys(db: Connection) -> None:
    """Migration 4: a `cert` job's params carry the device's new private key (identity:
    base64 of certificate DER + key DER), and so does every envelope signed from them.
    Once the job can sign no further envelope and no execution of it is pending, the
    key is of no more use to the host: triggers replace it (params: identity null,
    `scrubbed` the Unix time; each envelope: the text 'scrubbed') in the statement that
    ends the last execution or the job, so in its transaction, whichever module or
    command wrote it. The certificate stays in `certificates`. A file that already
    holds such jobs is scrubbed here."""
    sql = _SQLITE_SQL if dialect(db) == "sqlite" else _PG_SQL
    for statement in (_cert_scrub_triggers_sqlite() if dialect(db) == "sqlite" else _cert_scrub_triggers_pg()):
        db.execute(statement)
    db.execute(_scrub_params("jobs.id", sql))
    db.execute(_scrub_envelopes("executions.job", sql))


# A cert job is done with its key when none of its executions is pending (QUEUED,
# IN_PROGRESS: the device may still take that envelope from its queue) and it signs no
# further one by itself: it is no longer ACTIVE, or every target's latest execution is
# final and not to be retried (RolloutEngine._settled: FAILED or TIMED_OUT, not the
# operator's, within the `retries` budget, before `end_at`). {job} is the job's id as
# the statement sees it; {identity}, {retries}, {end_at}, {now} the dialect's words
# (_SQLITE_SQL, _PG_SQL). The state names are those of mpfleet.fleet.jobs_model.
_CERT_DONE = """jobs.type = 'cert'
AND {identity} IS NOT NULL
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
            <= COALESCE({retries}, 0)
        AND ({end_at} IS NULL
             OR {end_at} > {now}))))"""

_SQLITE_SQL = {
    "identity": "json_extract(jobs.params_json, '$.identity')",
    "retries": "json_extract(jobs.options_json, '$.retries')",
    "end_at": "json_extract(jobs.options_json, '$.end_at')",
    "now": "CAST(strftime('%s', 'now') AS REAL)",
    "scrubbed": "json_extract(jobs.params_json, '$.scrubbed')",
    "scrub": "json_set(params_json, '$.identity', NULL, '$.scrubbed', CAST(strftime('%s', 'now') AS INTEGER))",
}
_PG_SQL = {
    "identity": "(jobs.params_json::jsonb ->> 'identity')",
    "retries": "(jobs.options_json::jsonb ->> 'retries')::double precision",
    "end_at": "(jobs.options_json::jsonb ->> 'end_at')::double precision",
    "now": "extract(epoch from now())",
    "scrubbed": "(jobs.params_json::jsonb ->> 'scrubbed')",
    "scrub": "(params_json::jsonb || jsonb_build_object('identity', NULL, 'scrubbed', "
             "floor(extract(epoch from now()))::bigint))::text",
}


def _scrub_params(job: str, sql: dict = _SQLITE_SQL) -> str:
    """The statement that scrubs the params of job `job` (an SQL expression) when it is done."""
    return (f"UPDATE jobs SET params_json = {sql['scrub']} "
            f"WHERE jobs.id = {job} AND " + _CERT_DONE.format(job="jobs.id", **sql))


def _scrub_envelopes(job: str, sql: dict = _SQLITE_SQL) -> str:
    """The statement that replaces the final envelopes of job `job` once its params are scrubbed."""
    return ("UPDATE executions SET envelope = 'scrubbed' WHERE executions.job = "
            f"{job} AND envelope != 'scrubbed' AND status NOT IN ('QUEUED', 'IN_PROGRESS') "
            "AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = executions.job AND jobs.type = 'cert' "
            f"AND {sql['scrubbed']} IS NOT NULL)")


def _cert_scrub_triggers_sqlite(guarded: bool = False) -> tuple[str, ...]:
    """Migration 4's triggers (written by mpfleet.fleet.rollout); `guarded`: migration 6's,
    whose execution triggers ask the job's type first."""
    cert = " AND (SELECT type FROM jobs WHERE id = NEW.job) = 'cert'" if guarded else ""
    return (
        f"""CREATE TRIGGER IF NOT EXISTS cert_scrub_on_execution_end AFTER UPDATE OF status ON executions
WHEN NEW.status NOT IN ('QUEUED', 'IN_PROGRESS'){cert}
BEGIN
    {_scrub_params("NEW.job")};
    {_scrub_envelopes("NEW.job")};
END""",
        f"""CREATE TRIGGER IF NOT EXISTS cert_scrub_on_execution_final AFTER INSERT ON executions
WHEN NEW.status NOT IN ('QUEUED', 'IN_PROGRESS'){cert}
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


def _cert_scrub_triggers_pg(guarded: bool = False) -> tuple[str, ...]:
    """The same three triggers in PostgreSQL: one function does the scrub, two trigger
    functions call it with the job's id. `guarded`: migration 6's function, which
    returns at once for a job that is not a `cert` job."""
    final = "NEW.status NOT IN ('QUEUED', 'IN_PROGRESS')"
    cert = ("IF NOT EXISTS (SELECT 1 FROM jobs WHERE id = scrub_job AND type = 'cert') THEN\n        RETURN;\n"
            "    END IF;\n    ") if guarded else ""
    return (
        f"""CREATE OR REPLACE FUNCTION mpfleet_cert_scrub(scrub_job text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    {cert}{_scrub_params("scrub_job", _PG_SQL)};
    {_scrub_envelopes("scrub_job", _PG_SQL)};
END $$""",
        """CREATE OR REPLACE FUNCTION mpfleet_cert_scrub_execution() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mpfleet_cert_scrub(NEW.job);
    RETURN NULL;
END $$""",
        """CREATE OR REPLACE FUNCTION mpfleet_cert_scrub_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM mpfleet_cert_scrub(NEW.id);
    RETURN NULL;
END $$""",
        f"CREATE TRIGGER cert_scrub_on_execution_end AFTER UPDATE OF status ON executions FOR EACH ROW "
        f"WHEN ({final}) EXECUTE FUNCTION mpfleet_cert_scrub_execution()",
        f"CREATE TRIGGER cert_scrub_on_execution_final AFTER INSERT ON executions FOR EACH ROW "
        f"WHEN ({final}) EXECUTE FUNCTION mpfleet_cert_scrub_execution()",
        "CREATE TRIGGER cert_scrub_on_job_end AFTER UPDATE OF status ON jobs FOR EACH ROW "
        "WHEN (NEW.status != 'ACTIVE' AND NEW.type = 'cert') EXECUTE FUNCTION mpfleet_cert_scrub_job()",
    )


def _cert_scrub_only_for_cert_jobs(db: Connection) -> None:
    """Migration 6: migration 4's triggers on `executions` looked at the job's type only
    inside their statements, after walking every execution of the job: every final
    status of every job cost time in proportion to the job's size (6.8 ms a status at
    10,000 devices, bench/scale.py). Now they ask the job's type first (SQLite: in the
    trigger's WHEN; PostgreSQL: the scrub function returns at once)."""
    if dialect(db) == "postgresql":
        db.execute(_cert_scrub_triggers_pg(guarded=True)[0])
        return
    for name in ("cert_scrub_on_execution_end", "cert_scrub_on_execution_final"):
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    for statement in _cert_scrub_triggers_sqlite(guarded=True)[:2]:
        db.execute(statement)


def _dispatcher_leads(db: Connection) -> None:
    """Migration 5: serve may run as several workers (PostgreSQL), one of which leads
    (fleet/serve.py): `dispatchers.leads` is when this one took the lead (NULL: it does
    not lead). On SQLite the one serve leads from its start."""
    _ddl(db, "ALTER TABLE dispatchers ADD COLUMN leads REAL")


Migration = Callable[[Connection], None]

# MIGRATIONS[i] takes a file from user_version i to i + 1 (module docstring). Append only.
MIGRATIONS: tuple[Migration, ...] = (
    _adopt_unversioned,
    _fleet_membership_and_liveness,
    _certificates,
    _scrub_cert_keys,
    _dispatcher_leads,
    _cert_scrub_only_for_cert_jobs,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Every table of a current file, in the order migration 1 creates them: what
# db/maint.py looks for to tell an mpfleet database from another application's.
TABLES = ("devices", "samples", "acks", "ingest_errors", "quarantine", "keys", "device_credentials",
          "jobs", "job_targets", "executions", "job_controls", "job_rejects",
          "queue_published", "images", "strangers", "dispatchers", "certificates")


class SchemaError(MpfleetError):
    """The file's schema cannot be brought to SCHEMA_VERSION (the store names the file)."""


# PostgreSQL has no user_version: the version is this table's one row.
_PG_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS mpfleet_schema (version BIGINT NOT NULL)"
_PG_SCHEMA_LOCK = 0x6D70666C  # the transaction advisory lock apply() holds on PostgreSQL ("mpfl")


def version(db: Connection) -> int:
    """The database's schema version (0: a new one, or a file made before versions)."""
    if dialect(db) == "sqlite":
        return db.execute("PRAGMA user_version").fetchone()[0]
    # pg_tables is read with the statement's snapshot: it sees a table another session has
    # just committed (to_regclass looks in this session's catalog cache, which may not yet)
    if not db.execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = current_schema() "
                      "AND tablename = 'mpfleet_schema')").fetchone()[0]:
        return 0
    row = db.execute("SELECT version FROM mpfleet_schema").fetchone()
    return row[0] if row else 0


def _set_version(db: Connection, target: int) -> None:
    if dialect(db) == "sqlite":
        # PRAGMA takes no parameters; `target` is an int of our own
        db.execute(f"PRAGMA user_version = {int(target)}")
        return
    db.execute(_PG_VERSION_TABLE)
    db.execute("DELETE FROM mpfleet_schema")
    db.execute("INSERT INTO mpfleet_schema (version) VALUES (?)", (int(target),))


def _refuse_newer(current: int, target: int) -> None:
    if current > target:
        raise SchemaError(f"its schema version is {current}, and this mpfleet knows versions up to {target}: "
                          f"it was made by a newer mpfleet")


def apply(db: Connection, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Bring the database of `db` (a connection in autocommit mode) to the schema of
    `migrations`; returns how many migrations ran. A current database costs one read
    and takes no lock."""
    target = len(migrations)
    current = version(db)
    if current == target:
        return 0
    _refuse_newer(current, target)
    if dialect(db) == "sqlite":
        db.execute("BEGIN IMMEDIATE")
    else:
        db.execute("BEGIN")
        db.execute("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
    try:
        current = version(db)  # again, under the write lock: another process may have migrated it
        _refuse_newer(current, target)
        for migration in migrations[current:]:
            migration(db)
        _set_version(db, target)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return target - current
