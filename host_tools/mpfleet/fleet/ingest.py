"""Sample ingest: frames from `mpf/v1/<id>/samples` into SQLite, acks back.

For each frame: decode and check it (a corrupt one is counted and logged with
the device id, never fatal), insert its samples idempotently by (device, seq)
in one transaction, move the device's ack point over what is now stored
contiguously, commit, and only then publish the retained
`mpf/v1/<id>/samples/ack` = {"upto": N}. The device deletes samples only up
to that ack, so a sample is never lost between device and database, and
re-sent frames (lost acks, QoS 1 duplicates, a device reset mid-upload) add
no rows.

`Ingester` is the MQTT subscriber of `mpfleet ingest` (`mpfleet serve` does the
same with its own connection); the logic itself is `ingest_frame`, which needs
only a Store, and `HeldMessages`, which both use to acknowledge a message only
after it is committed.

Members only (docs/security.md, "A shared broker"). A device is in the fleet when it
was provisioned or accepted (`Store.is_member`); anything else seen under the topic
root is a stranger: its messages are counted in the bounded `strangers` table
(`mpfleet devices pending`), and nothing of it is stored, acked or answered. Only
topics under this fleet's root are read at all.

Liveness. A `state` carries the device's own time (`time`, once its clock is set):
that is its report time, `devices.reported_at`. `last_seen` is when the host
received a message, and only a live one: a retained state replayed on subscribe
(paho's `msg.retain`) was sent who knows when, so it updates the state and
`reported_at` but not `last_seen`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mpfleet.protocol.codec import FrameError, decode_frame
from mpfleet.broker.link import BrokerConfig, MqttLinkError, connect, default_client_id, make_client
from mpfleet.protocol.topics import TOPIC_ROOT, device_from_topic, topic
from mpfleet.db.store import DamagedDatabaseError, Store, is_damaged_database, is_storage_error

log = logging.getLogger("mpfleet.fleet.ingest")
# A device clock earlier than this (2020-01-01) has not been set since power loss.
CLOCK_SET_AFTER = 1577836800
STORAGE_RETRY_S = 1.0  # a message the database could not take is tried again after this
SEQ_LIMIT = 1 << 31      # no believable frame reaches this seq
SEQ_AHEAD_MAX = 1 << 24  # nor starts this far past the highest seq the host knows of the device
TIME_AHEAD_S = 86400     # nor has a sample this far ahead of the host's clock


@dataclass
class IngestResult:
    device: str
    new: int
    duplicates: int
    ack: int


class IngestStats:
    def __init__(self) -> None:
        self.frames = 0
        self.samples_new = 0
        self.duplicates = 0
        self.corrupt = 0
        self.quarantined = 0
        self.strangers = 0  # frames from devices not in the fleet: counted, never stored or acked
        self.lock = threading.Lock()

    def as_dict(self) -> dict:
        return {"frames": self.frames, "samples_new": self.samples_new, "duplicates": self.duplicates,
                "corrupt": self.corrupt, "quarantined": self.quarantined, "strangers": self.strangers}


class Quarantined(Exception):
    """A well-formed frame whose claims the host will not trust (see frame_doubt)."""


def frame_doubt(store: Store, device: str, frame, now: float) -> str | None:
    """Why a CRC-valid frame's claims cannot be real for this device, or None.

    A frame names its own seqs and times, and whoever holds the device's credentials
    can send one. Trusted blindly, one frame moves the ack (and with it the device's
    numbering) to the end of the 32-bit seq space, or files samples in the far
    future. So, against what the host knows of the device:
    - seqs: the frame's last seq must stay below SEQ_LIMIT (2**31: 68 years at one
      sample a second), and, once the host holds anything of the device, start at
      most SEQ_AHEAD_MAX (2**24) past the highest seq it knows; the oldest-held seq
      it claims may not lie beyond its own first seq;
    - times: no sample more than TIME_AHEAD_S (a day) ahead of the host's clock.
    (Times far in the past are what a device reports before its clock is set.)"""
    last = frame.first_seq + frame.count - 1
    if last >= SEQ_LIMIT:
        return f"seqs {frame.first_seq}..{last} reach past {SEQ_LIMIT}"
    if frame.oldest_seq is not None and frame.count and frame.oldest_seq > frame.first_seq:
        return f"claims it holds nothing below seq {frame.oldest_seq} but carries seq {frame.first_seq}"
    row = store.db.execute("SELECT MAX(seq) FROM samples WHERE device = ?", (device,)).fetchone()
    known = max(row[0] or 0, store.ack_point(device))
    if known and (frame.first_seq > known + SEQ_AHEAD_MAX
                  or (frame.oldest_seq or 0) > known + SEQ_AHEAD_MAX):
        return (f"starts at seq {max(frame.first_seq, frame.oldest_seq or 0)}, more than {SEQ_AHEAD_MAX} past "
                f"seq {known}, the highest the host knows of this device")
    latest = max((t for _, t, _ in frame.samples), default=0)
    if latest > now + TIME_AHEAD_S:
        return f"sample time {latest} is {int(latest - now)} s ahead of the host's clock"
    return None


def ingest_frame(store: Store, device: str, payload: bytes) -> IngestResult:
    """Store one frame from `device`; raises FrameError for a frame that cannot be trusted
    and Quarantined for one whose claims are not believable (frame_doubt)."""
    frame = decode_frame(payload)
    if frame.device_id != device:
        raise FrameError(f"frame names device {frame.device_id!r} but came on {device!r}'s topic")
    doubt = frame_doubt(store, device, frame, time.time())
    if doubt is not None:
        raise Quarantined(doubt)
    with store.transaction(device=device) as db:  # a device's samples and ack only: workers in parallel
        new = store.add_samples(db, device, ((seq, t, list(values)) for seq, t, values in frame.samples))
        ack = store.advance_ack(db, device, oldest_held=frame.oldest_seq)
    return IngestResult(device, new, frame.count - new, ack)


class MessageStats:
    """What became of the messages a HeldMessages was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.applied = 0          # committed, then acknowledged
        self.dropped = 0          # bad: recorded as an ingest error, then acknowledged
        self.storage_retries = 0  # times the database could not take one (it stayed held)
        self.held = 0             # waiting for the database now, unacknowledged

    def as_dict(self) -> dict:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class HeldMessages:
    """Received messages, applied in arrival order and acknowledged to the broker only
    once what they carry is committed: ack after commit.

    `apply(msg)` stores one message (and raises if it cannot). What it raises decides:
    - a storage failure (disk full, database locked, I/O error): the message and every
      one behind it stay held and unacknowledged and are tried again after
      STORAGE_RETRY_S; the broker, past its in-flight limit, keeps the rest;
    - a damaged database: DamagedDatabaseError propagates, the caller stops (nothing
      can be committed until an operator acts; unacknowledged messages stay with the
      broker);
    - anything else is the message's fault (malformed, hostile, or a handler's bug on
      it): recorded as an ingest error against its device, acknowledged and dropped, so
      that one message never stops the others.
    Every message type is applied idempotently, so a redelivery after a crash or a
    reconnect changes nothing."""

    def __init__(self, store: Store, apply, ack, note_error, stats: MessageStats, root: str = TOPIC_ROOT):
        self.store = store
        self.root = root
        self._apply, self._ack, self._note_error, self.stats = apply, ack, note_error, stats
        self._held: deque = deque()
        self._retry_at = 0.0

    def add(self, msg) -> None:
        self._held.append(msg)
        self.apply()

    def forget(self) -> None:
        """After a reconnect: the broker delivers the unacknowledged ones again (the
        session is persistent), under that connection's packet ids."""
        self._held.clear()
        with self.stats.lock:
            self.stats.held = 0

    def __len__(self) -> int:
        return len(self._held)

    def apply(self) -> None:
        if not self._held or time.monotonic() < self._retry_at:
            return
        while self._held:
            msg = self._held[0]
            try:
                self._apply(msg)
            except Exception as e:  # sorted below; one message must not stop the rest
                if is_damaged_database(e):
                    raise DamagedDatabaseError(f"the database {self.store.shown} is damaged: {e}; "
                                               "see `mpfleet db check`") from e
                if is_storage_error(e):
                    self._retry_at = time.monotonic() + STORAGE_RETRY_S
                    with self.stats.lock:
                        self.stats.storage_retries += 1
                        self.stats.held = len(self._held)
                    self._note_error(f"cannot store a message (held unacknowledged, retried every "
                                     f"{STORAGE_RETRY_S:.0f} s): {type(e).__name__}: {e}", e)
                    return
                self._drop(msg, e)
            else:
                with self.stats.lock:
                    self.stats.applied += 1
            self._held.popleft()
            self._ack(msg)
        with self.stats.lock:
            self.stats.held = 0

    def _drop(self, msg, e: Exception) -> None:
        parsed = device_from_topic(msg.topic, self.root)
        reason = f"{msg.topic}: dropped, {type(e).__name__}: {e}"[:500]
        with self.stats.lock:
            self.stats.dropped += 1
        self._note_error(reason, e)
        try:
            self.store.record_ingest_error(parsed[0] if parsed else None, reason)
        except Exception:  # logged above; the message is dropped either way
            log.exception("recording an ingest error")


class Ingester:
    """Subscribes to every device's samples and state; stores, then acks.

    paho's network thread only hands messages over; one worker thread owns the
    database connection (sqlite3 objects are per-thread) and applies them through
    HeldMessages. If the worker cannot go on (a damaged database) it stops, and
    `failure` says why: `mpfleet ingest` then exits non-zero instead of living on
    storing nothing.

    `client_id` None: one unique to this process, with a clean session (devices send
    again what was not acked, and their state is retained); a given one keeps a
    persistent session. `member(store, device)` decides who is in the fleet (default:
    registered, `Store.is_member`)."""

    def __init__(self, broker: BrokerConfig, db_path, client_id: str | None = None, root: str = TOPIC_ROOT,
                 member: Callable[[Store, str], bool] | None = None):
        self.broker = broker
        self.db_path = db_path
        self.persistent = client_id is not None
        self.client_id = client_id if client_id is not None else default_client_id("ingest")
        self.root = root
        self.member = member
        self.stats = IngestStats()
        self.messages = MessageStats()
        self.failure: BaseException | None = None
        self._errors_seen: set[str] = set()
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = None

    def start(self) -> None:
        from mpfleet.db.maint import require_sound_database  # dbmaint imports store only

        require_sound_database(self.db_path)
        store = Store(self.db_path)  # fail here, in the caller, when the database cannot be opened
        store.close()
        self._stop.clear()  # a stopped ingester can be started again
        self.failure = None
        self._client = make_client(self.broker, self.client_id, clean_session=not self.persistent)
        self._client.manual_ack_set(True)
        self._client.on_message = lambda c, u, msg: self._inbox.put(("msg", msg))
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        self._thread = threading.Thread(target=self._run, name="mpfleet-ingest", daemon=True)
        self._thread.start()
        connect(self._client, self.broker, on_connected=self._subscribe, name="ingest",
                stopping=self._stop.is_set)
        # Return only once the broker has the subscription: a frame published
        # after start() returns is then sure to be delivered.
        if not self._subscribed.wait(10):
            self.stop()
            raise MqttLinkError(f"the broker at {self.broker.url()} did not confirm the subscription")

    def _subscribe(self, client) -> None:
        self._inbox.put(("connected", None))
        client.subscribe([(topic("+", "samples", self.root), 1), (topic("+", "state", self.root), 1)])

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> "Ingester":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        store = Store(self.db_path)
        held = HeldMessages(store, lambda msg: self._on_message(store, msg), self._ack, self._note_error,
                            self.messages, self.root)
        try:
            while not self._stop.is_set():
                held.apply()
                try:
                    kind, msg = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "connected":
                    held.forget()
                else:
                    held.add(msg)
        except BaseException as e:  # whatever ends the worker ends ingest, non-zero
            self.failure = e
            log.exception("ingest stopped: %s", e)
        finally:
            store.close()

    def _ack(self, msg) -> None:
        if msg.qos and self._client is not None:
            self._client.ack(msg.mid, msg.qos)

    def _note_error(self, text: str, e: Exception) -> None:
        if text not in self._errors_seen:  # each distinct error once, not once a retry
            self._errors_seen.add(text)
            log.error("%s", text)

    def _on_message(self, store: Store, msg) -> None:
        parsed = device_from_topic(msg.topic, self.root)
        if parsed is None:
            return
        device, leaf = parsed
        member = registered if self.member is None else self.member
        if leaf == "samples":
            handle_samples(store, device, msg.payload, self._client.publish, self.stats, root=self.root,
                           member=member)
        elif leaf == "state" and msg.payload:
            handle_state(store, device, msg.payload, self._client.publish, live=not msg.retain, root=self.root,
                         member=member)


def registered(store: Store, device: str) -> bool:
    """The default membership rule: the device was provisioned or accepted."""
    return store.is_member(device)


def report_time(state: dict, now: float, live: bool) -> float | None:
    """When the device made this report: its own `time` once its clock is set (never
    later than `now`: a clock ahead would make it look fresh for ever), else `now` for a
    live message, else unknown (None: a retained state from a device without a clock)."""
    t = state.get("time")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= CLOCK_SET_AFTER:
        return min(float(t), now)
    return now if live else None


def handle_samples(store: Store, device: str, payload: bytes, publish, stats: IngestStats, root: str = TOPIC_ROOT,
                   member: Callable[[Store, str], bool] = registered) -> IngestResult | None:
    """Store one `samples` frame of a member and publish the ack (after the commit); a
    corrupt frame is counted, logged and recorded, never fatal; a stranger's frame is
    only counted (Store.note_stranger): not stored, not acked.
    `publish(topic, payload, qos=, retain=)`."""
    if not member(store, device):
        with stats.lock:
            stats.strangers += 1
        store.note_stranger(device)
        return None
    try:
        result = ingest_frame(store, device, payload)
    except Quarantined as e:
        with stats.lock:
            stats.quarantined += 1
        if store.quarantine(device, str(e), bytes(payload)):
            log.warning("sample frame from %s quarantined: %s", device, e)
            store.record_ingest_error(device, f"frame quarantined (nothing stored, ack unchanged): {e}")
        return None
    except FrameError as e:
        with stats.lock:
            stats.corrupt += 1
        log.warning("corrupt sample frame from %s: %s", device, e)
        store.record_ingest_error(device, str(e))
        return None
    with stats.lock:
        stats.frames += 1
        stats.samples_new += result.new
        stats.duplicates += result.duplicates
    store.report_device(device, live=True)
    # Only now, after the commit, may the device forget these samples.
    # The host's clock rides along: a device whose RTC restarted at power
    # loss sets its clock from it until it has better time.
    ack = {"upto": result.ack, "time": int(time.time())}
    publish(topic(device, "samples/ack", root), json.dumps(ack), qos=1, retain=True)
    return result


def handle_state(store: Store, device: str, payload: bytes, publish, live: bool = True, root: str = TOPIC_ROOT,
                 member: Callable[[Store, str], bool] = registered) -> dict | None:
    """Record a member's `state` report (report_time, and last_seen when `live`); answer
    a device whose clock is unset with the host's time. A stranger's state is kept in
    the strangers table (Store.note_stranger) and not answered."""
    try:
        state = json.loads(payload)
        if not isinstance(state, dict):
            raise ValueError("not an object")
    except ValueError as e:
        if member(store, device):
            store.record_ingest_error(device, f"unreadable state: {e}")
        else:
            store.note_stranger(device)
        return None
    if not member(store, device):
        store.note_stranger(device, state)
        return None
    board = state.get("board")
    if not (isinstance(board, str) and 0 < len(board) <= 64):
        board = None  # a board is a board definition's name; anything else is not taken as one
    if not isinstance(state.get("last_failure"), dict):
        # A device reports why it could not reach the broker once, at the next
        # connection (firmware agent.wake.FAILURE_PATH): the record stays with
        # the device's state until a newer failure replaces it.
        kept = store.kept_failure(device)
        if kept is not None:
            state["last_failure"] = kept
    store.report_device(device, live=live, board=board, state=state,
                        reported_at=report_time(state, time.time(), live))
    device_time = state.get("time")
    if isinstance(device_time, (int, float)) and device_time < CLOCK_SET_AFTER:
        # The device lost its clock with its power: answer at once with the
        # host's time (and the current ack) so its samples get real times.
        ack = {"upto": store.ack_point(device), "time": int(time.time())}
        publish(topic(device, "samples/ack", root), json.dumps(ack), qos=1, retain=True)
    return state
