"""Where the database lives and how to speak to it: a SQLite file (the default) or a
PostgreSQL server (`--db postgresql://...`, `MPFLEET_DB`).

Which room: the database. Imports the standard library and mpfleet.errors; psycopg
only when a PostgreSQL URL is opened (the `postgres` extra).

One set of statements for both. mpfleet's SQL is written once, in the common subset
of the two dialects (`INSERT ... ON CONFLICT`, `RETURNING`, `COALESCE`, `CASE`, qmark
placeholders); the connection of each dialect takes it as it is:

- SQLite: the standard library's `sqlite3` connection itself (a subclass that only
  names its dialect), in autocommit mode: no layer in between on the hot path;
- PostgreSQL: `PgConnection`, a psycopg 3 connection in autocommit mode with
  client-side binding (psycopg's ClientCursor: parameters become literals, as in
  SQLite, so `? IS NULL` needs no declared type). Its `execute` turns `?` into `%s`
  (and a literal `%` into `%%`) before psycopg sees the statement; rows come back as
  tuples, `rowcount` counts what a statement changed, as in sqlite3.

What the dialects do not share is said where it is used, by `db.dialect`: the table
definitions (schema.py translates SQLite's types to PostgreSQL's), the schema version
(SQLite's `user_version`, a table in PostgreSQL), how a write transaction starts
(store.Store.transaction), how another process's commit is noticed (`changes()`).

Why not SQLAlchemy. Its Core would translate expressions built in Python; mpfleet's
statements are already portable text, tested on both, and the few differences are
the table definitions. Alembic would replace schema.py's versions, which already
migrate once under a lock and refuse a newer schema, on both. Neither would remove a
line of mpfleet's own; both would add a large dependency to every install.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mpfleet.errors import MpfleetError

POSTGRES_SCHEMES = ("postgresql", "postgres")
CHANGES_CHANNEL = "mpfleet_changes"  # NOTIFY'd by the jobs tables' triggers (schema.py), PostgreSQL only


class BackendError(MpfleetError):
    """The database named cannot be reached with what is installed."""


DbTarget = str | os.PathLike


def is_url(target: DbTarget | None) -> bool:
    """Whether `target` names a PostgreSQL database (a URL) rather than a SQLite file."""
    return target is not None and str(target).split("://", 1)[0].lower() in POSTGRES_SCHEMES \
        and "://" in str(target)


def shown(target: DbTarget) -> str:
    """`target` as messages show it: a file's path, a URL without its password."""
    if not is_url(target):
        return str(target)
    parts = urlsplit(str(target))
    if parts.password is None:
        return str(target)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def normalized(target: DbTarget) -> DbTarget:
    """A URL as given; a file's path as a Path (what `Path(target)` would mangle, a URL's
    `//`, is kept)."""
    return str(target) if is_url(target) else Path(target)


class SqliteConnection(sqlite3.Connection):
    """sqlite3's connection, naming its dialect (sqlite3.connect(factory=...))."""

    dialect = "sqlite"

    _seen_version: int | None = None

    def changes(self) -> tuple[bool, set[str]]:
        """(whether another connection committed since the last call, set()): SQLite's
        PRAGMA data_version, which tells that, not what."""
        version = self.execute("PRAGMA data_version").fetchone()[0]
        changed, self._seen_version = version != self._seen_version, version
        return changed, set()


def connect_sqlite(path: str | os.PathLike, timeout: float = 30) -> SqliteConnection:
    return sqlite3.connect(path, timeout=timeout, isolation_level=None, factory=SqliteConnection)


@functools.lru_cache(maxsize=1024)
def _pg_text(sql: str) -> str:
    """A qmark statement as psycopg's client-side binding takes it: each `?` outside a
    quoted literal or name becomes `%s`, every `%` becomes `%%`."""
    out, quote = [], None
    for ch in sql:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


class PgConnection:
    """A psycopg 3 connection that takes mpfleet's qmark statements (module docstring)."""

    dialect = "postgresql"

    def __init__(self, url: str, connect_timeout: float = 10):
        try:
            import psycopg
        except ImportError:
            raise BackendError("a PostgreSQL database needs psycopg: pip install 'mpfleet[postgres]'") from None
        self.url = url
        self.errors = psycopg
        self.raw = psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                                   connect_timeout=int(connect_timeout))
        self._whole = False
        self._devices: set[str] = set()
        self._listening = False

    def execute(self, sql: str, params=()):
        if params:
            return self.raw.execute(_pg_text(sql), params)
        return self.raw.execute(sql)

    def executemany(self, sql: str, rows):
        cur = self.raw.cursor()
        cur.executemany(_pg_text(sql), list(rows))
        return cur

    def close(self) -> None:
        self.raw.close()

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def changes(self) -> tuple[bool, set[str]]:
        """What was committed to the jobs tables since the last call, by anyone (this
        connection too), from their triggers' notifications (schema.py): (whether a job
        or its targets changed, the devices whose executions or control jobs changed).
        The first call reports a change: what happened before it is not known."""
        if not self._listening:
            self.raw.add_notify_handler(self._on_notify)
            self.raw.execute(f"LISTEN {CHANGES_CHANNEL}")
            self._listening, self._whole = True, True
        self.raw.execute("SELECT 1")  # delivers what arrived since the last statement
        out = (self._whole, self._devices)
        self._whole, self._devices = False, set()
        return out

    def _on_notify(self, notify) -> None:
        if notify.payload:
            self._devices.add(notify.payload)
        else:
            self._whole = True


Connection = SqliteConnection | PgConnection


def dialect(db) -> str:
    """"sqlite" or "postgresql": a plain sqlite3 connection (a test's, a tool's) is SQLite."""
    return getattr(db, "dialect", "sqlite")


def connect(target: DbTarget, timeout: float = 30) -> Connection:
    """A connection to the database `target` names (a PostgreSQL URL or a SQLite file)."""
    if is_url(target):
        return PgConnection(str(target))
    return connect_sqlite(target, timeout)


def storage_errors(db: Connection | None = None) -> tuple[type[BaseException], ...]:
    """The exceptions a database call raises for the storage, of both dialects (psycopg's
    when it is installed)."""
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    try:
        import psycopg
    except ImportError:
        return errors
    return (*errors, psycopg.Error)
