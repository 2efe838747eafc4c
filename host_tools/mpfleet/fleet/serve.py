"""`mpfleet serve`: the dispatcher between the database and the broker.

Which room: host library; `mpfleet serve` (cli_jobs.py) and the demo run it. It
drives the RolloutEngine (rollout.py) with MQTT:

- consumes every device's `jobs/status` (-> RolloutEngine.on_status), `state`
  (-> the registry) and `samples` (-> the sample store, then the ack);
- ticks the engine (stages, rate, timeouts, retries, aborts, completion);
- keeps each device's retained `jobs` topic equal to its queue as the engine computes
  it (RolloutEngine.all_queues(): the capped queue of device_queue(), for every
  device at once), encoded by rollout.encode_queue;

Restart safety. Everything the engine decides is in SQLite before it returns, so
the only state that matters outside the database is "what does the broker hold":

- incoming messages are acknowledged to the broker (manual MQTT acks) only after
  they are processed and committed; the session is persistent (clean_session=0,
  a fixed client id), so a status a device sent while `serve` was down, or that
  `serve` received and died before committing, is delivered again. Statuses are
  matched by (job, device, seq), so a second delivery changes nothing;
- the digest of each device's queue is recorded in `queue_published` when the
  broker acknowledges the retained publish. At start, and after every reconnect,
  the queues are compared against the engine again and anything not confirmed is
  published again. Publishing the same retained queue twice is harmless: the
  device drops jobs it has finished (by key and seq) and never runs a seq twice.

Jobs created, canceled or changed by other processes (`mpfleet job ...`) are
noticed through the connection's `changes()` (db/backend.py: SQLite's PRAGMA
data_version, PostgreSQL's notifications from the jobs tables' triggers, which name the
device whose execution changed, so the leader publishes only those queues again).

Workers (PostgreSQL only; docs/scale.md). On SQLite one serve runs per database
(DatabaseLock). On PostgreSQL several run, each with a name of its own (`worker`,
`--worker`; a second process of one name is refused through an advisory lock):

- every worker takes device statuses, states, samples and chunk requests through
  MQTT shared subscriptions (`$share/<group>/...`, the group one per database and
  root), so the broker hands each message to one of them; its persistent session
  (client id per worker name) keeps what it had not acknowledged when it died, for
  its restart. Applying them is idempotent and per device whichever worker does it:
  statuses by (job, device, seq) from a pending state only, samples by (device,
  seq) under the device's transaction lock (Store.transaction(device=...));
- one worker leads: the one holding the session advisory lock of the database and
  root (`pg_try_advisory_lock`, tried by the others every tick). Only the leader
  ticks the engine (stages, the rate, timeouts, retries, aborts: a final status on
  another worker is only applied, engine.follow_up) and publishes the queues. When
  the leader dies its session ends, the lock with it, and the next worker to try
  takes over: it reads the confirmed queues from `queue_published` and publishes
  what differs, as a restarted serve does. Its `dispatchers` row says since when
  it leads (`leads`).

- answers the devices' OTA chunk requests (`ota/get`, otaserve.py) from the
  image store.

A fleet on a shared broker. Only topics under the fleet's root (`root`, `--topic-root`)
are subscribed; within it only members count (ingest.py, "Members only"): a stranger's
state, samples and job statuses are counted in `strangers` and nothing is queued,
stored, acked or answered for it (the rollout engine targets registered devices only).
The client id is `mpfleet-serve-<host>-<8 hex of the database path and root>` unless
given: the same at each restart, so the persistent session is found again, and
different for every fleet, so two serves on one broker never throw each other off.

What an operator needs in the log (stderr, mpfleet.fleet.serve and mpfleet.mqtt): each
cancel as serve carries it out (INFO), each lost connection with its reason code, each
failed retry (WARNING) and the reconnect (INFO). Every BEAT_EVERY_S the worker writes
its heartbeat (fleet/dispatchers.py), removed again when it stops, so `job status
--watch` can tell whether any dispatcher is running.

Threads: paho's network thread only moves messages into an inbox; one worker
thread owns the database connection and does everything else, so SQLite objects
never cross threads. The one exception is `ota/get`: answered in paho's thread
at once (a download must not wait for a tick), with a read-only connection of
its own.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from mpfleet.db.backend import is_url, normalized, shown, storage_errors
from mpfleet.db.maint import require_sound_database
from mpfleet.errors import MpfleetError
from mpfleet.fleet import dispatchers
from mpfleet.fleet.ingest import (HeldMessages, IngestStats, MessageStats, handle_samples, handle_state,
                                  registered)
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import BrokerConfig, MqttLinkError, connect, default_client_id, make_client
from mpfleet.protocol.topics import TOPIC_ROOT, device_from_topic, reroot, topic
from mpfleet.fleet.otaserve import ArtifactServer, StreamStats
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import Changes, RolloutEngine, encode_queue
from mpfleet.db.store import DamagedDatabaseError, Store, is_damaged_database

log = logging.getLogger("mpfleet.fleet.serve")

EMPTY_QUEUE = "[]"
LEAD_TRY_EVERY_S = 0.2    # how often a worker that does not lead tries to (PostgreSQL)
LEAD_OFFLINE_S = 10.0     # a leader this long without the broker lets another worker lead
TICK_SHARE = 0.25         # at most this share of the worker's time goes to engine ticks
# Queue publishes the broker has not confirmed yet, at most: the rest wait for the next
# sync. MQTT packet ids are 16 bits; paho hands out the id of a publish it still holds to
# a new one past 65,535 outstanding, and the older is lost (a fan-out to 100,000 did).
QUEUE_WINDOW = 10_000
# PostgreSQL advisory lock namespaces (two-key form): who leads, which worker names run
_PG_LEADER_LOCKS, _PG_WORKER_LOCKS = 0x6D72, 0x6D73
RESYNC_EVERY_S = 5.0      # full queue comparison even when nothing seems to have changed
BATCH = 500               # messages handled between two ticks at most


class ServeError(MpfleetError):
    """The dispatcher could not start (database in use, broker unreachable...)."""


def queue_digest(payload: str) -> str:
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


EMPTY_DIGEST = queue_digest(EMPTY_QUEUE)


class ServeStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.statuses = 0            # jobs/status messages received
        self.statuses_applied = 0    # ... that changed an execution
        self.states = 0
        self.queue_publishes = 0
        self.queue_confirmed = 0
        self.ticks = 0
        self.reconnects = 0
        self.errors = 0
        self.last_error: str | None = None
        self.worker_cpu_s = 0.0      # CPU time of the worker thread (all the database work)
        self.ingest = IngestStats()
        self.messages = MessageStats()
        self.ota = StreamStats()

    def as_dict(self) -> dict:
        with self.lock:
            out = {k: v for k, v in vars(self).items() if k not in ("lock", "ingest", "messages", "ota")}
        out["ingest"] = self.ingest.as_dict()
        out["messages"] = self.messages.as_dict()
        out["ota"] = self.ota.as_dict()
        return out


class DatabaseLock:
    """One dispatcher per database: a POSIX record lock (lockf) on `<db>.serve.lock`.

    Record locks belong to the process: they are not inherited by forked children
    (the virtual fleet forks one per boot, an flock would ride along) and they go
    when the process dies, so a killed `serve` never blocks the next. Within one
    process a set of held paths stands in for the lock."""

    _held: set[str] = set()
    _held_lock = threading.Lock()

    def __init__(self, db_path: Path):
        self.path = Path(str(db_path) + ".serve.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with self._held_lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if key in self._held:
                    raise BlockingIOError
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ServeError(f"another `mpfleet serve` (pid {holder}) is running on this database "
                                 f"({self.path}); one dispatcher per database") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self._held.add(key)
            self._fd, self._key = fd, key

    def release(self) -> None:
        with self._held_lock:
            if self._fd is not None:
                os.close(self._fd)  # drops the record lock
                self._held.discard(self._key)
                self._fd = None


class Dispatcher:
    """The `serve` loop. `start()` returns once the broker confirmed the subscriptions;
    `stop()` ends the loop and disconnects. `on_event(kind, data)` (optional) hears of
    job progress: "queued", "advanced", "completed", "aborted", "timed_out", "stuck", "error"."""

    def __init__(self, broker: BrokerConfig, db_path: str | os.PathLike, keys_dir: str | os.PathLike | None = None,
                 client_id: str | None = None, tick_s: float = 0.25,
                 on_event: Callable[[str, dict], None] | None = None, clock: Callable[[], float] = time.time,
                 images_dir: str | os.PathLike | None = None, root: str = TOPIC_ROOT,
                 member: Callable[[Store, str], bool] = registered, worker: str | None = None):
        if tick_s <= 0:
            raise ServeError("tick must be positive")
        self.broker = broker
        self.db_path = normalized(db_path)
        self.workers = is_url(self.db_path)  # several workers share the database (module docstring)
        if worker is not None and not self.workers:
            raise ServeError("several serve workers need a PostgreSQL database (--db postgresql://...); "
                             "on a SQLite file one serve runs")
        self.worker = (worker or "1") if self.workers else None
        fleet = f"{shown(self.db_path)}|{root}" if self.workers else f"{self.db_path.resolve()}|{root}"
        self.group = "mpfleet-" + hashlib.sha256(fleet.encode()).hexdigest()[:8]  # the shared subscriptions'
        self._fleet_key = fleet
        self.keys_dir = keys_dir
        self.root = root
        self.member = member
        self.client_id = client_id if client_id is not None else default_client_id(
            "serve", stable_for=fleet if self.worker is None else f"{fleet}|{self.worker}")
        # this serve's heartbeat row: host:pid, and the worker's name (a process may run several)
        self.name = dispatchers.default_name() + (f"/{self.worker}" if self.worker else "")
        self.tick_s = tick_s
        self.on_event = on_event
        self.clock = clock
        self.stats = ServeStats()
        self.images_dir = images_dir
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._client = None
        self._lock = None if self.workers else DatabaseLock(self.db_path)
        self.leads = not self.workers  # on SQLite the one serve leads
        self._lead_tried = self._online_at = 0.0
        self._next_tick = 0.0
        # worker-thread state
        self._sent: dict[str, str] = {}        # device -> digest published (maybe not yet confirmed)
        self._in_flight: dict[int, tuple[str, str]] = {}
        self._dirty = True
        self._touched: set[str] = set()  # devices whose queue may differ from what was published
        self._last_resync = 0.0
        self._error_seen: set[str] = set()
        self._last_beat = 0.0
        self._canceled_seen: set[str] | None = None  # jobs canceled before this serve started are not logged

    # ------------------------------------------------------------ control
    def start(self) -> "Dispatcher":
        if self._lock is not None:
            self._lock.acquire()
        try:
            if not self.workers:
                # Never run on a damaged file: with a broken executions table nothing new
                # would ever be queued. One line naming the file and the reason.
                require_sound_database(self.db_path)
            self._thread = threading.Thread(target=self._run, name="mpfleet-serve", daemon=True)
            self._thread.start()
            self._ready.wait(30)
            if self._fatal is not None:
                raise ServeError(f"cannot start: {self._fatal}") from self._fatal
            client = make_client(self.broker, self.client_id, clean_session=False)
            client.manual_ack_set(True)
            client.on_message = lambda c, u, msg: self._inbox.put(("msg", msg))
            artifacts = ArtifactServer(self.db_path, self.images_dir,
                                       lambda t, payload: client.publish(reroot(t, self.root), payload))
            artifacts.stats = self.stats.ota
            self._artifacts = artifacts
            # OTA chunk requests are answered at once in paho's network thread. (paho matches a
            # callback against the message's topic, which carries no $share prefix.)
            client.message_callback_add(topic("+", "ota/get", self.root), lambda c, u, msg: self._on_ota_get(msg))
            client.on_publish = lambda c, u, mid, rc=None, props=None: self._inbox.put(("puback", mid))
            subscribed = threading.Event()
            client.on_subscribe = lambda *args: subscribed.set()
            self._client = client
            root = self.root

            share = f"$share/{self.group}/" if self.workers else ""

            def on_connected(c):
                self._inbox.put(("connected", None))
                c.subscribe([(share + topic("+", "jobs/status", root), 1), (share + topic("+", "state", root), 1),
                             (share + topic("+", "samples", root), 1), (share + topic("+", "ota/get", root), 0)])

            connect(client, self.broker, on_connected=on_connected, name="serve", stopping=self._stop.is_set)
            if not subscribed.wait(10):
                raise MqttLinkError(f"the broker at {self.broker.url()} did not confirm the subscriptions")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            if self._thread is not None:
                self._thread.join(30)
                self._thread = None
            if self._client is not None:
                client, self._client = self._client, None
                try:
                    client.disconnect()
                finally:
                    client.loop_stop()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> "Dispatcher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def failure(self) -> BaseException | None:
        """Why the dispatcher stopped on its own (None while it runs or after stop())."""
        return self._fatal

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ the worker
    def _run(self) -> None:
        try:
            self._open_store()
            self._held = HeldMessages(self.store, self._on_message, self._ack, self._note_error, self.stats.messages,
                                      self.root)
            self._canceled_seen = {job for (job,) in self.store.db.execute(
                "SELECT id FROM jobs WHERE status = 'CANCELED'")}
            self._beat()
            if self.leads:
                dispatchers.lead(self.store, self.name)
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._fatal = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if self.workers:
                    self._guarded("database connection", self._keep_connected)
                    self._guarded("leadership", self._try_to_lead)
                self._held.apply()
                self._drain()
                if self.leads:
                    self._guarded("tick", self._tick)
                    self._guarded("queue sync", self._sync_queues)
                if time.monotonic() - self._last_beat >= dispatchers.BEAT_EVERY_S:
                    self._guarded("heartbeat", self._beat)
                with self.stats.lock:
                    self.stats.worker_cpu_s = time.thread_time()
        except BaseException as e:  # noqa: BLE001 - whatever ends the worker ends serve, non-zero
            # Nothing more can be committed (a damaged database), or a bug: stop
            # (unacknowledged messages stay with the broker) rather than live on doing
            # nothing, and say why.
            self._fatal = e
            log.error("%s", e if isinstance(e, DamagedDatabaseError) else traceback.format_exc())
            self._event("error", {"error": f"{type(e).__name__}: {e}"})
        finally:
            try:
                dispatchers.stopped(self.store, self.name)
            except Exception:  # noqa: BLE001 - a damaged database: the row goes stale on its own
                log.warning("could not remove this dispatcher's heartbeat (%s); it goes stale in %.0f s",
                            self.name, dispatchers.STALE_AFTER_S)
            self.store.close()

    def _open_store(self) -> None:
        """The worker's connection, engine and what it knows of the queues; on PostgreSQL
        with the worker's name claimed (module docstring)."""
        self.store = Store(self.db_path)  # with serve's table queue_published (db/schema.py)
        if self.workers and not self.store.db.execute("SELECT pg_try_advisory_lock(?, hashtext(?))", (
                _PG_WORKER_LOCKS, f"{self._fleet_key}|{self.worker}")).fetchone()[0]:
            self.store.close()
            raise ServeError(f"a serve worker named {self.worker!r} already runs on this database and topic root: "
                             "give each worker its own --worker name")
        self.engine = RolloutEngine(self.store, KeyRing(self.store, self.keys_dir), Registry(self.store),
                                    clock=self.clock)
        self.engine.follow_up = self.leads
        self._sent = dict(self.store.db.execute("SELECT device, digest FROM queue_published"))

    def _keep_connected(self) -> None:
        """PostgreSQL: a connection the server dropped is opened again (leadership, held
        by the old session, is lost with it and tried for again)."""
        if not self.store.db.raw.closed:
            return
        log.warning("serve worker %s: the database connection was lost; connecting again", self.worker)
        self.leads = False
        self._open_store()
        self._held.store = self.store

    def _try_to_lead(self) -> None:
        """PostgreSQL: take the leader's lock when it is free (the leader died or stopped),
        while this worker has the broker; let it go when the broker has been gone for
        LEAD_OFFLINE_S (the queues it could not publish, another worker can)."""
        now = time.monotonic()
        online = self._client is not None and self._client.is_connected()
        if online:
            self._online_at = now
        if self.leads:
            if now - self._online_at >= LEAD_OFFLINE_S:
                self.leads = self.engine.follow_up = False
                dispatchers.stepped_down(self.store, self.name)
                self.store.db.execute("SELECT pg_advisory_unlock(?, hashtext(?))",
                                      (_PG_LEADER_LOCKS, self._fleet_key))
                log.warning("serve worker %s: no broker for %.0f s; another worker may lead", self.worker,
                            now - self._online_at)
            return
        if not online or now - self._lead_tried < LEAD_TRY_EVERY_S:
            return
        self._lead_tried = now
        got = self.store.db.execute("SELECT pg_try_advisory_lock(?, hashtext(?))",
                                    (_PG_LEADER_LOCKS, self._fleet_key)).fetchone()[0]
        if not got:
            return
        self.leads = self.engine.follow_up = True
        # what the broker holds, as the last leader had it confirmed; the rest is published again
        self._sent = dict(self.store.db.execute("SELECT device, digest FROM queue_published"))
        self._in_flight.clear()
        self._dirty = True
        self._canceled_seen = {job for (job,) in self.store.db.execute(
            "SELECT id FROM jobs WHERE status = 'CANCELED'")}
        dispatchers.lead(self.store, self.name)
        log.info("serve worker %s leads now", self.worker)
        self._event("leads", {"worker": self.worker})

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        dispatchers.beat(self.store, self.name)

    def _drain(self) -> None:
        """Handle inbox items for up to one tick (at most BATCH of them)."""
        until = time.monotonic() + self.tick_s
        for _ in range(BATCH):
            wait = until - time.monotonic()
            try:
                kind, item = self._inbox.get(timeout=max(0.0, wait)) if wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "msg":
                self._held.add(item)
            elif kind == "puback":
                # Recording a confirmation may fail (a full disk): the queue then only
                # counts as unconfirmed, and is compared and published again.
                self._guarded("queue confirmation", self._on_puback, item)
            elif kind == "connected":
                self._guarded("reconnect", self._on_connected)

    def _ack(self, msg) -> None:
        if msg.qos and self._client is not None:
            self._client.ack(msg.mid, msg.qos)  # committed or dropped: the broker may forget it

    def _guarded(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # one bad message or tick must not stop the dispatcher
            if is_damaged_database(e):
                raise DamagedDatabaseError(f"the database {self.db_path} is damaged: {e}; "
                                           "see `mpfleet db check`") from e
            self._note_error(f"{what}: {type(e).__name__}: {e}", e)

    def _note_error(self, text: str, e: Exception) -> None:
        with self.stats.lock:
            self.stats.errors += 1
            self.stats.last_error = text
        if text not in self._error_seen:  # log each distinct error once
            self._error_seen.add(text)
            log.error("%s\n%s", text, traceback.format_exc() if not isinstance(e, (MpfleetError, *storage_errors()))
                      else "")
            self._event("error", {"error": text})

    def _event(self, kind: str, data: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, data)
            except Exception:
                log.exception("on_event")

    # ------------------------------------------------------------ incoming
    def _on_message(self, msg) -> None:
        parsed = device_from_topic(msg.topic, self.root)
        if parsed is None:
            return
        device, leaf = parsed
        if leaf == "jobs/status" and not self.member(self.store, device):
            self.store.note_stranger(device)  # a stranger's status never reaches the engine
        elif leaf == "jobs/status":
            with self.stats.lock:
                self.stats.statuses += 1
            try:
                status = json.loads(msg.payload)
            except ValueError as e:
                self.store.record_ingest_error(device, f"unreadable job status: {e}")
                return
            if self.engine.on_status(device, status):
                if self.leads:
                    self._touched.add(device)
                if self.engine.job_ended:  # the status aborted its job: every queue holding it changes
                    self.engine.job_ended, self._dirty = False, True
                with self.stats.lock:
                    self.stats.statuses_applied += 1
        elif leaf == "state":
            with self.stats.lock:
                self.stats.states += 1
            if msg.retain and not msg.payload:
                return  # a cleared retained state
            handle_state(self.store, device, msg.payload, self._client.publish, live=not msg.retain,
                         root=self.root, member=self.member)
        elif leaf == "samples":
            handle_samples(self.store, device, msg.payload, self._client.publish, self.stats.ingest,
                           root=self.root, member=self.member)

    def _on_ota_get(self, msg) -> None:
        parsed = device_from_topic(msg.topic, self.root)
        if parsed is None:
            return
        try:
            self._artifacts.handle(parsed[0], msg.payload)
        except Exception:  # paho's thread must live on; the device asks again
            log.exception("ota/get from %s", parsed[0])

    def _on_puback(self, mid: int) -> None:
        sent = self._in_flight.pop(mid, None)
        if sent is None:
            return
        device, digest = sent
        self.store.db.execute("INSERT INTO queue_published (device, digest, confirmed) VALUES (?, ?, ?) "
                              "ON CONFLICT(device) DO UPDATE SET digest = excluded.digest, "
                              "confirmed = excluded.confirmed", (device, digest, time.time()))
        with self.stats.lock:
            self.stats.queue_confirmed += 1

    def _on_connected(self) -> None:
        # The broker may have lost its retained messages (a restart without
        # persistence): publish every queue again, empty ones included.
        with self.stats.lock:
            self.stats.reconnects += 1
        self._sent = {device: "" for device in self._sent}
        self._in_flight.clear()
        # Messages held from the old connection are delivered again by the broker
        # (the session is persistent); their packet ids belong to that connection.
        self._held.forget()
        self._dirty = True

    # ------------------------------------------------------------ rollout
    def _tick(self) -> None:
        """One engine tick, when it is due: every tick_s, and no more often than keeps the
        ticks to TICK_SHARE of the worker's time (a tick reads every target and execution
        of every active job, so it grows with the fleet; the messages must not wait)."""
        started = time.monotonic()
        if started < self._next_tick:
            return
        try:
            changes = self.engine.tick()
        finally:
            self._next_tick = started + max(self.tick_s, (time.monotonic() - started) / TICK_SHARE)
        with self.stats.lock:
            self.stats.ticks += 1
        if changes:
            if changes.advanced or changes.completed or changes.aborted:
                self._dirty = True  # a job's end takes its running executions off every queue
            self._touched |= changes.devices
            self._report(changes)
        for job, device, reason in getattr(changes, "stuck", ()):  # flagged, not changed: heard once each
            self._event("stuck", {"job": job, "device": device, "reason": reason})

    def _report(self, changes: Changes) -> None:
        if changes.queued:
            jobs: dict[str, int] = {}
            for job, _device, _attempt in changes.queued:
                jobs[job] = jobs.get(job, 0) + 1
            for job, n in jobs.items():
                self._event("queued", {"job": job, "devices": n})
        for job, device in changes.timed_out:
            self._event("timed_out", {"job": job, "device": device})
        for job, stage in changes.advanced:
            self._event("advanced", {"job": job, "stage": stage})
        for job in changes.completed:
            self._event("completed", {"job": job})
        for job in changes.aborted:
            self._event("aborted", {"job": job, "reason": self.engine.job_status(job).reason})

    def _sync_queues(self) -> None:
        """Publish every device queue that differs from what the broker was last given: all
        of them after another process changed a job (or every RESYNC_EVERY_S), else those
        of the devices whose executions changed since the last sync (`_touched`: statuses
        applied here, the tick's changes, other workers' commits on PostgreSQL)."""
        if self._client is None:
            return
        whole, devices = self.store.db.changes()
        now = time.monotonic()
        if whole:  # another process committed (a job created, canceled...)
            self._dirty = True
            self._note_cancels()
        self._touched |= devices
        if self._dirty or now - self._last_resync >= RESYNC_EVERY_S:
            self._dirty, self._last_resync = False, now
            self._touched.clear()
            desired = self.engine.all_queues()
            devices = set(desired) | {d for d, digest in self._sent.items() if digest != EMPTY_DIGEST}
        elif self._touched:
            devices, self._touched = self._touched, set()
            desired = self.engine.queues_of(devices)
        else:
            return
        ordered = sorted(devices)
        for i, device in enumerate(ordered):
            if len(self._in_flight) >= QUEUE_WINDOW:
                self._touched.update(ordered[i:])  # computed again and published as confirmations come
                break
            payload = encode_queue(desired.get(device, []))
            digest = queue_digest(payload)
            if self._sent.get(device) == digest:
                continue
            info = self._client.publish(topic(device, "jobs", self.root), payload, qos=1, retain=True)
            self._sent[device] = digest
            self._in_flight[info.mid] = (device, digest)
            with self.stats.lock:
                self.stats.queue_publishes += 1

    def _note_cancels(self) -> None:
        """Log each job canceled since this serve started, once, as serve carries the cancel
        out (the queues published next leave it out; devices running it get a cancel job)."""
        if self._canceled_seen is None:
            return
        db = self.store.db
        for job, reason in db.execute("SELECT id, reason FROM jobs WHERE status = 'CANCELED'").fetchall():
            if job in self._canceled_seen:
                continue
            self._canceled_seen.add(job)
            unstarted, started = db.execute(
                "SELECT COUNT(CASE WHEN started IS NULL AND status = 'CANCELED' THEN 1 END), "
                "COUNT(CASE WHEN started IS NOT NULL AND status IN ('CANCELED', 'IN_PROGRESS') THEN 1 END) "
                "FROM executions WHERE job = ?", (job,)).fetchone()
            log.info("job %s canceled (%s): taking it off the queues of %d device(s) that had not started it; "
                     "%d device(s) running it get a cancel job", job, reason or "no reason given", unstarted, started)
            self._event("canceled", {"job": job, "unstarted": unstarted, "running": started})

    # ------------------------------------------------------------ waiting (tests, demo)
    def wait_for(self, predicate: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._fatal is not None or not self.running:
                raise ServeError(f"the dispatcher stopped: {self._fatal or 'stopped'}")
            if predicate():
                return True
            time.sleep(poll_s)
        return predicate()
