"""PostgreSQL for the tests: one database per test session, one schema per store.

The server is $MPFLEET_TEST_PG (default postgresql://postgres@127.0.0.1:5432/postgres,
the PostgreSQL this project's machines run, trust auth). `TestDatabase.create()` makes
`mpfleet_test_<pid>_<n>` there; `url(name)` gives a URL whose search_path is a fresh
schema of that database, so every store a test opens starts empty, as a new SQLite file
does; `drop()` removes the database and everything in it. Without a server (or without
psycopg) `unavailable()` says why, and the PostgreSQL tests skip with that reason.

Start one on a machine without it: `apt-get install postgresql`, then
`pg_ctlcluster 15 main start` (trust auth for 127.0.0.1 in pg_hba.conf), or any server
given as MPFLEET_TEST_PG.
"""

from __future__ import annotations

import itertools
import os
from urllib.parse import quote

SERVER = os.environ.get("MPFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_names = itertools.count(1)


def unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here (None: they can)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'mpfleet[postgres]')"
    try:
        psycopg.connect(SERVER, connect_timeout=3, autocommit=True).close()
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"no PostgreSQL at {SERVER} ({first}); set MPFLEET_TEST_PG or start one (tests/pgharness.py)"
    return None


class TestDatabase:
    """A database of its own on SERVER for one test session."""

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        self.name = f"mpfleet_test_{os.getpid()}_{next(_names)}"
        self._schemas = itertools.count(1)

    def _admin(self, url: str):
        import psycopg

        return psycopg.connect(url, autocommit=True, connect_timeout=5)

    @property
    def base(self) -> str:
        return SERVER.rsplit("/", 1)[0] + "/" + self.name

    def create(self) -> "TestDatabase":
        with self._admin(SERVER) as db:
            db.execute(f'CREATE DATABASE "{self.name}"')
        return self

    def url(self, schema: str | None = None) -> str:
        """A URL of this database whose tables live in a schema of their own (made now)."""
        schema = schema or f"s{next(self._schemas)}"
        with self._admin(self.base) as db:
            db.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        return f"{self.base}?options={quote(f'-csearch_path={schema} -csynchronous_commit=off')}"

    def drop(self) -> None:
        with self._admin(SERVER) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
