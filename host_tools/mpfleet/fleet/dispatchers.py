"""Which dispatchers are running: each `mpfleet serve` writes a heartbeat row
(`dispatchers` table, db/schema.py migration 2) when it starts and every few seconds
after, and removes it when it stops; a command that waits on the dispatcher
(`job status --watch`, `job create`) reads them to say so when none is running.

Which room: host library (the fleet). Imports the standard library and mpfleet.db.

A row whose heartbeat is older than `STALE_AFTER_S` belongs to a serve that was killed
(no clean stop): it is not counted as running, and the next serve that starts with the
same name takes its row over.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from mpfleet.db.store import Store

BEAT_EVERY_S = 5.0
STALE_AFTER_S = 3 * BEAT_EVERY_S


@dataclass(frozen=True)
class Dispatcher:
    name: str
    pid: int
    host: str
    started: float
    beat: float
    leads: float | None = None  # since when it leads (serve's workers, fleet/serve.py); None: it does not


def default_name() -> str:
    """host:pid, unique among the dispatchers of one database."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(store: Store, name: str, now: float | None = None) -> None:
    """Record that the dispatcher `name` (this process) is alive at `now`."""
    now = time.time() if now is None else now
    store.db.execute(
        "INSERT INTO dispatchers (name, pid, host, started, beat) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET beat = excluded.beat, pid = excluded.pid, host = excluded.host, "
        "started = CASE WHEN dispatchers.beat < ? THEN excluded.started ELSE dispatchers.started END",
        (name, os.getpid(), socket.gethostname(), now, now, now - STALE_AFTER_S))


def lead(store: Store, name: str, now: float | None = None) -> None:
    """The dispatcher `name` leads from `now`; no other row says it leads."""
    now = time.time() if now is None else now
    with store.transaction() as db:
        db.execute("UPDATE dispatchers SET leads = NULL WHERE name != ?", (name,))
        db.execute("UPDATE dispatchers SET leads = ? WHERE name = ?", (now, name))


def stepped_down(store: Store, name: str) -> None:
    """The dispatcher `name` no longer leads."""
    store.db.execute("UPDATE dispatchers SET leads = NULL WHERE name = ?", (name,))


def stopped(store: Store, name: str) -> None:
    """The dispatcher `name` stopped cleanly: its row goes."""
    store.db.execute("DELETE FROM dispatchers WHERE name = ?", (name,))


def running(store: Store, now: float | None = None) -> list[Dispatcher]:
    """The dispatchers whose heartbeat is recent, oldest start first."""
    now = time.time() if now is None else now
    rows = store.db.execute("SELECT name, pid, host, started, beat, leads FROM dispatchers WHERE beat >= ? "
                            "ORDER BY started, name", (now - STALE_AFTER_S,))
    return [Dispatcher(*row) for row in rows]
