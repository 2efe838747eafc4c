"""The host's store: devices, samples and acks, keys, broker accounts.

One SQLite file (default ~/.mpfleet/mpfleet.db, or $MPFLEET_DB, or --db), or one
PostgreSQL database (a `postgresql://` URL there instead; db/backend.py). Opening it applies
the schema (db/schema.py: every table of every module, migrations run once), so the
modules that share the connection (the rollout engine, serve, the image store) find
their tables there and create none.

Samples are stored idempotently by (device, seq): a batch delivered twice, or re-sent
after a lost ack, inserts nothing the second time. The ack point per device is the
highest seq up to which the host holds every sample the device still had.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mpfleet.db import backend, schema
from mpfleet.errors import MpfleetError


class StoreError(MpfleetError):
    """The database could not be opened or used."""


class DamagedDatabaseError(StoreError):
    """The database file is damaged: nothing more can be committed without an operator."""


def is_damaged_database(e: BaseException) -> bool:
    """SQLite reports a damaged file as a plain DatabaseError ("database disk image is
    malformed", "file is not a database"); its subclasses are other failures."""
    return type(e) is sqlite3.DatabaseError or isinstance(e, DamagedDatabaseError)


def is_storage_error(e: BaseException) -> bool:
    """A failure of the storage, not of what was being stored: the same write may succeed
    later (disk full, database locked, an I/O error, the PostgreSQL server gone)."""
    if isinstance(e, (sqlite3.OperationalError, OSError)):
        return True
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(e, psycopg.OperationalError)


# PostgreSQL: the two-key advisory lock namespaces of Store.transaction (key 1: the one
# writer at a time SQLite has; key 2: one device's samples and ack).
_PG_WRITE_LOCK = (0x6D70, 1)
_PG_DEVICE_LOCKS = 0x6D71


def default_db_path() -> Path | str:
    """$MPFLEET_DB (a file's path or a PostgreSQL URL), else ~/.mpfleet/mpfleet.db."""
    env = os.environ.get("MPFLEET_DB")
    if env:
        return backend.normalized(env)
    return Path(os.environ.get("MPFLEET_HOME", Path.home() / ".mpfleet")) / "mpfleet.db"


class Store:
    """A connection to the mpfleet database (one per thread). `target`: a SQLite file's
    path or a PostgreSQL URL (db/backend.py); `path` is the same, as given."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = backend.normalized(path) if path else default_db_path()
        self.dialect = "postgresql" if backend.is_url(self.path) else "sqlite"
        try:
            if self.dialect == "sqlite":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = backend.connect_sqlite(self.path)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
            else:
                self.db = backend.PgConnection(self.path)
            schema.apply(self.db)  # every table, created or migrated once (db/schema.py)
        except (*backend.storage_errors(), schema.SchemaError) as e:
            if getattr(self, "db", None) is not None:
                self.db.close()
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"cannot open database {backend.shown(self.path)}: {reason}") from None

    @property
    def shown(self) -> str:
        """The database as messages name it (a URL without its password)."""
        return backend.shown(self.path)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self, device: str | None = None) -> Iterator[backend.Connection]:
        """One write transaction. SQLite: BEGIN IMMEDIATE, the file's one writer at a time.
        PostgreSQL: the same one writer at a time among mpfleet's transactions (an
        advisory lock held to the commit), so every read-then-write written for SQLite
        stays right; or, given `device`, one transaction at a time for that device only
        (a device's samples and ack, which no other transaction writes)."""
        if self.dialect == "sqlite":
            self.db.execute("BEGIN IMMEDIATE")
        else:
            self.db.execute("BEGIN")
            if device is None:
                self.db.execute("SELECT pg_advisory_xact_lock(?, ?)", _PG_WRITE_LOCK)
            else:
                self.db.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (_PG_DEVICE_LOCKS, device))
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------ devices
    _DEVICE_COLS = "id, board, groups_json, first_seen, last_seen, state_json, reported_at"

    @staticmethod
    def _device_row(r) -> dict:
        return {"id": r[0], "board": r[1], "groups": json.loads(r[2]), "first_seen": r[3],
                "last_seen": r[4], "state": json.loads(r[5]) if r[5] else None, "reported_at": r[6]}

    def touch_device(self, device: str, board: str | None = None, state: dict | None = None) -> None:
        """Register `device` if it is not yet, and record that it was seen now (with its
        board and state, when given). For tests and tools that make a device out of
        nothing; what arrives from the broker goes through `report_device`, which never
        registers anyone."""
        now = time.time()
        self.db.execute(
            "INSERT INTO devices (id, board, first_seen, last_seen, state_json) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen, "
            "board = COALESCE(excluded.board, devices.board), "
            "state_json = COALESCE(excluded.state_json, devices.state_json)",
            (device, board, now, now, json.dumps(state) if state is not None else None),
        )

    def is_member(self, device: str) -> bool:
        """Whether `device` is in this fleet (registered by provisioning or accepted)."""
        return self.db.execute("SELECT 1 FROM devices WHERE id = ?", (device,)).fetchone() is not None

    def report_device(self, device: str, *, live: bool, board: str | None = None, state: dict | None = None,
                      reported_at: float | None = None) -> bool:
        """Record what a member device reported; False (and nothing written) for a device
        that is not a member. `live`: the message was sent to us now, not a retained copy
        replayed on subscribe, so it moves `last_seen` (the host's receive time);
        `reported_at` (the device's own time of the report) only ever moves forward."""
        now = time.time()
        cur = self.db.execute(
            "UPDATE devices SET last_seen = CASE WHEN ? = 1 THEN ? ELSE last_seen END, "
            "board = COALESCE(?, board), state_json = COALESCE(?, state_json), "
            "reported_at = CASE WHEN ? IS NULL THEN reported_at "
            "WHEN reported_at IS NULL OR reported_at < ? THEN ? ELSE reported_at END WHERE id = ?",
            (1 if live else 0, now, board, json.dumps(state) if state is not None else None,
             reported_at, reported_at, reported_at, device))
        return cur.rowcount == 1

    def kept_failure(self, device: str) -> dict | None:
        """The `last_failure` of the device's stored state, if it has one (read and parsed
        only then: every state report asks, few states hold one)."""
        row = self.db.execute("SELECT state_json FROM devices WHERE id = ? AND state_json LIKE ?",
                              (device, '%"last_failure": {%')).fetchone()
        if row is None:
            return None
        kept = json.loads(row[0]).get("last_failure")
        return kept if isinstance(kept, dict) else None

    def device(self, device: str) -> dict | None:
        row = self.db.execute(f"SELECT {self._DEVICE_COLS} FROM devices WHERE id = ?", (device,)).fetchone()
        return None if row is None else self._device_row(row)

    # Registry (mpfleet.fleet.registry) additions: list, provision, set board/groups.
    def devices(self) -> list[dict]:
        """Every device record (as `device()` returns them), ordered by id."""
        return [self._device_row(r) for r in self.db.execute(f"SELECT {self._DEVICE_COLS} FROM devices ORDER BY id")]

    # ------------------------------------------------------------ strangers
    # Device ids seen on the broker that are not members (docs/security.md, "A shared
    # broker"). Bounded: at most STRANGERS_MAX rows are kept; a message from a further
    # new id is only counted, in the one row STRANGERS_OVERFLOW ('@' is never a device id).
    STRANGERS_MAX = 1000
    STRANGERS_OVERFLOW = "@overflow"
    STRANGER_STATE_MAX = 4096  # bytes of a stranger's last state kept; a larger one is noted by its size

    def note_stranger(self, device: str, state: dict | None = None) -> bool:
        """Count one message from `device`, not a member (its last state kept, when given);
        False when the table was full and it was only counted in the overflow row."""
        now = time.time()
        text = None
        if state is not None:
            text = json.dumps(state)
            if len(text) > self.STRANGER_STATE_MAX:
                text = json.dumps({"state_too_large": len(text)})
        with self.transaction() as db:
            if db.execute("UPDATE strangers SET times = times + 1, last_seen = ?, "
                          "state_json = COALESCE(?, state_json) WHERE id = ?", (now, text, device)).rowcount:
                return True
            held = db.execute("SELECT COUNT(*) FROM strangers WHERE id != ?", (self.STRANGERS_OVERFLOW,)).fetchone()[0]
            if held >= self.STRANGERS_MAX:
                db.execute("INSERT INTO strangers (id, first_seen, last_seen, times) VALUES (?, ?, ?, 1) "
                           "ON CONFLICT(id) DO UPDATE SET times = strangers.times + 1, last_seen = excluded.last_seen",
                           (self.STRANGERS_OVERFLOW, now, now))
                return False
            db.execute("INSERT INTO strangers (id, first_seen, last_seen, times, state_json) VALUES (?, ?, ?, 1, ?)",
                       (device, now, now, text))
        return True

    def strangers(self) -> list[dict]:
        """The strangers kept, most recently seen first; the overflow row is not among them
        (see `strangers_dropped`)."""
        rows = self.db.execute("SELECT id FROM strangers WHERE id != ? ORDER BY last_seen DESC, id",
                               (self.STRANGERS_OVERFLOW,)).fetchall()
        return [self.stranger(r[0]) for r in rows]

    def strangers_dropped(self) -> int:
        """Messages from further new ids, counted but not kept (the table was full)."""
        row = self.db.execute("SELECT times FROM strangers WHERE id = ?", (self.STRANGERS_OVERFLOW,)).fetchone()
        return row[0] if row else 0

    def stranger(self, device: str) -> dict | None:
        r = self.db.execute("SELECT id, first_seen, last_seen, times, state_json FROM strangers WHERE id = ?",
                            (device,)).fetchone()
        return None if r is None else {"id": r[0], "first_seen": r[1], "last_seen": r[2], "times": r[3],
                                       "state": json.loads(r[4]) if r[4] else None}

    def forget_stranger(self, device: str) -> None:
        self.db.execute("DELETE FROM strangers WHERE id = ?", (device,))

    def add_device(self, device: str, board: str | None = None, groups: Iterable[str] = (),
                   state: dict | None = None) -> bool:
        """Insert a device not seen yet (last_seen stays NULL; `state`: what it reported
        before it joined, if anything); False if it already exists."""
        cur = self.db.execute("INSERT INTO devices (id, board, groups_json, first_seen, state_json) "
                              "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                              (device, board, json.dumps(list(groups)), time.time(),
                               json.dumps(state) if state is not None else None))
        return cur.rowcount == 1

    def set_device(self, device: str, board: str | None = None, groups: Iterable[str] | None = None) -> None:
        """Replace the board and/or groups of a device; None leaves that column alone."""
        if board is not None:
            self.db.execute("UPDATE devices SET board = ? WHERE id = ?", (board, device))
        if groups is not None:
            self.db.execute("UPDATE devices SET groups_json = ? WHERE id = ?", (json.dumps(list(groups)), device))

    # ------------------------------------------------------------ samples
    def add_samples(self, db: backend.Connection, device: str,
                    samples: Iterable[tuple[int, int, list]]) -> int:
        """Insert samples inside an open transaction; returns how many were new."""
        now = time.time()
        cur = db.executemany(
            "INSERT INTO samples (device, seq, t, values_json, received) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [(device, seq, t, json.dumps(values), now) for seq, t, values in samples],
        )
        return max(cur.rowcount, 0)

    def ack_point(self, device: str) -> int:
        row = self.db.execute("SELECT upto FROM acks WHERE device = ?", (device,)).fetchone()
        return row[0] if row else 0

    def advance_ack(self, db: backend.Connection, device: str, oldest_held: int | None = None) -> int:
        """Move the device's ack point over every seq now stored contiguously.

        `oldest_held` is the oldest seq the device still holds: anything before
        it is gone from the device (dropped by its capacity bound), so the ack
        may pass over that gap, never over a gap the device could still fill.
        """
        row = db.execute("SELECT upto FROM acks WHERE device = ?", (device,)).fetchone()
        upto = row[0] if row else 0  # seqs start at 1: an ack of 0 covers nothing
        if oldest_held is not None and oldest_held - 1 > upto:
            upto = oldest_held - 1
        for (seq,) in db.execute("SELECT seq FROM samples WHERE device = ? AND seq > ? ORDER BY seq",
                                 (device, upto)):
            if seq != upto + 1:
                break
            upto = seq
        db.execute("INSERT INTO acks (device, upto, updated) VALUES (?, ?, ?) ON CONFLICT(device) DO UPDATE "
                   "SET upto = excluded.upto, updated = excluded.updated", (device, upto, time.time()))
        return upto

    @staticmethod
    def _sample_filter(device: str | None, since: float | None, until: float | None) -> tuple[str, list]:
        """The WHERE clause (and its arguments) of the samples a device/time filter selects:
        the one rule `samples` and `sample_widths` share."""
        where, args = "WHERE 1=1", []
        if device:
            where += " AND device = ?"
            args.append(device)
        if since is not None:
            where += " AND t >= ?"
            args.append(int(since))
        if until is not None:
            where += " AND t < ?"
            args.append(int(until))
        return where, args

    def samples(self, device: str | None = None, since: float | None = None,
                until: float | None = None) -> Iterator[tuple[str, int, int, list]]:
        where, args = self._sample_filter(device, since, until)
        query = f"SELECT device, seq, t, values_json FROM samples {where} ORDER BY device, seq"
        for dev, seq, t, values in self.db.execute(query, args):
            yield dev, seq, t, json.loads(values)

    def sample_widths(self, device: str | None = None, since: float | None = None,
                      until: float | None = None) -> list[tuple[str, int]]:
        """(device, most channels in one of its samples) for each device the filter selects."""
        where, args = self._sample_filter(device, since, until)
        return self.db.execute(f"SELECT device, MAX(json_array_length(values_json)) FROM samples {where} "
                               "GROUP BY device ORDER BY device", args).fetchall()

    def sample_count(self, device: str | None = None) -> int:
        if device:
            return self.db.execute("SELECT COUNT(*) FROM samples WHERE device = ?", (device,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def quarantine(self, device: str, reason: str, frame: bytes, keep: int = 100) -> bool:
        """Keep a frame the host will not trust (its samples are not stored, the ack does
        not move) for an operator to look at; True the first time this frame is seen.
        At most `keep` distinct frames per device are kept; beyond, only counted."""
        digest = hashlib.sha256(frame).hexdigest()[:16]
        now = time.time()
        with self.transaction() as db:
            if db.execute("UPDATE quarantine SET times = times + 1, last_at = ? WHERE device = ? AND digest = ?",
                          (now, device, digest)).rowcount:
                return False
            held = db.execute("SELECT COUNT(*) FROM quarantine WHERE device = ?", (device,)).fetchone()[0]
            if held >= keep:  # one row stands for all the rest
                digest, frame = "overflow", b""
                if db.execute("UPDATE quarantine SET times = times + 1, last_at = ? "
                              "WHERE device = ? AND digest = ?", (now, device, digest)).rowcount:
                    return False
            db.execute("INSERT INTO quarantine (device, digest, first_at, last_at, reason, frame) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (device, digest, now, now, reason, frame))
        return True

    def quarantined(self, device: str | None = None) -> list[dict]:
        query = "SELECT device, digest, first_at, last_at, times, reason, length(frame) FROM quarantine"
        rows = self.db.execute(query + (" WHERE device = ?" if device else "") + " ORDER BY device, first_at",
                               (device,) if device else ())
        return [dict(zip(("device", "digest", "first_at", "last_at", "times", "reason", "bytes"), r)) for r in rows]

    def record_ingest_error(self, device: str | None, reason: str) -> None:
        self.db.execute("INSERT INTO ingest_errors (device, at, reason) VALUES (?, ?, ?)",
                        (device, time.time(), reason))

    def ingest_errors(self, device: str | None = None) -> list[tuple[str, str]]:
        if device:
            rows = self.db.execute("SELECT device, reason FROM ingest_errors WHERE device = ? ORDER BY id",
                                   (device,))
        else:
            rows = self.db.execute("SELECT device, reason FROM ingest_errors ORDER BY id")
        return list(rows)

    # ------------------------------------------------------------ signing keys (mpfleet.fleet.keys)
    _KEY_COLS = "kid, public_b64, created, retired, active, last_seq"

    def add_key(self, kid: str, public_b64: str) -> None:
        """A new key's seqs start above every other key's: a device sorts its queue by seq
        across keys, so one device's jobs keep their creation order through a rotation."""
        self.db.execute("INSERT INTO keys (kid, public_b64, created, last_seq) "
                        "VALUES (?, ?, ?, (SELECT COALESCE(MAX(last_seq), 0) FROM keys))",
                        (kid, public_b64, time.time()))

    def keys(self) -> list[dict]:
        """Every key, oldest first."""
        rows = self.db.execute(f"SELECT {self._KEY_COLS} FROM keys ORDER BY created, rowid")
        return [dict(zip(("kid", "public_b64", "created", "retired", "active", "last_seq"), r)) for r in rows]

    def retire_key(self, kid: str) -> None:
        self.db.execute("UPDATE keys SET active = 0, retired = ? WHERE kid = ?", (time.time(), kid))

    def next_seq(self, kid: str) -> int:
        """The next job seq for `kid`: strictly increasing, never reused, safe across processes
        (one IMMEDIATE transaction takes the write lock before reading)."""
        with self.transaction() as db:
            row = db.execute("UPDATE keys SET last_seq = last_seq + 1 WHERE kid = ? RETURNING last_seq",
                             (kid,)).fetchone()
        if row is None:
            raise StoreError(f"unknown signing key {kid}")
        return row[0]

    # ------------------------------------------------------------ certificates (mpfleet.fleet.certs)
    _CERT_COLS = ("serial", "subject", "kind", "issued", "not_before", "not_after", "der", "revoked")

    def put_certificate(self, serial: int, subject: str, kind: str, not_before: float, not_after: float,
                        der: bytes) -> None:
        self.db.execute("INSERT INTO certificates (serial, subject, kind, issued, not_before, not_after, der) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (f"{serial:x}", subject, kind, time.time(), not_before, not_after, der))

    def certificates(self, subject: str | None = None) -> list[dict]:
        """Issued certificates (of `subject`), oldest first; serial as an int."""
        sql = f"SELECT {', '.join(self._CERT_COLS)} FROM certificates"
        rows = (self.db.execute(sql + " WHERE subject = ? ORDER BY issued", (subject,)) if subject is not None
                else self.db.execute(sql + " ORDER BY subject, issued"))
        out = []
        for r in rows:
            c = dict(zip(self._CERT_COLS, r))
            c["serial"] = int(c["serial"], 16)
            out.append(c)
        return out

    def revoke_certificate(self, serial: int) -> None:
        self.db.execute("UPDATE certificates SET revoked = ? WHERE serial = ? AND revoked IS NULL",
                        (time.time(), f"{serial:x}"))

    # ------------------------------------------------------------ broker credentials (mpfleet.broker.config)
    def device_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM devices ORDER BY id")]

    def credentials(self, device: str) -> dict | None:
        row = self.db.execute("SELECT device, username, password, created FROM device_credentials "
                              "WHERE device = ?", (device,)).fetchone()
        return dict(zip(("device", "username", "password", "created"), row)) if row else None

    def all_credentials(self) -> list[dict]:
        rows = self.db.execute("SELECT device, username, password, created FROM device_credentials ORDER BY device")
        return [dict(zip(("device", "username", "password", "created"), r)) for r in rows]

    def put_credentials(self, device: str, username: str, password: str) -> None:
        self.db.execute("INSERT INTO device_credentials (device, username, password, created) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(device) DO UPDATE SET username = excluded.username, "
                        "password = excluded.password, created = excluded.created",
                        (device, username, password, time.time()))
