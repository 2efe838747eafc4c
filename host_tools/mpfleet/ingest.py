"""Sample ingest: frames from `mpf/v1/<id>/samples` into SQLite, acks back.

For each frame: decode and check it (a corrupt one is counted and logged with
the device id, never fatal), insert its samples idempotently by (device, seq)
in one transaction, move the device's ack point over what is now stored
contiguously, commit, and only then publish the retained
`mpf/v1/<id>/samples/ack` = {"upto": N}. The device deletes samples only up
to that ack, so a sample is never lost between device and database, and
re-sent frames (lost acks, QoS 1 duplicates, a device reset mid-upload) add
no rows.

`Ingester` is the MQTT subscriber (it becomes part of `mpfleet serve`); the
logic itself is `ingest_frame`, which needs only a Store.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

from mpfleet.codec import FrameError, decode_frame
from mpfleet.mqttlink import BrokerConfig, MqttLinkError, connect, device_from_topic, make_client, topic
from mpfleet.store import Store

log = logging.getLogger("mpfleet.ingest")
# A device clock earlier than this (2020-01-01) has not been set since power loss.
CLOCK_SET_AFTER = 1577836800


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
        self.lock = threading.Lock()

    def as_dict(self) -> dict:
        return {"frames": self.frames, "samples_new": self.samples_new, "duplicates": self.duplicates,
                "corrupt": self.corrupt}


def ingest_frame(store: Store, device: str, payload: bytes) -> IngestResult:
    """Store one frame from `device`; raises FrameError for a frame that cannot be trusted."""
    frame = decode_frame(payload)
    if frame.device_id != device:
        raise FrameError(f"frame names device {frame.device_id!r} but came on {device!r}'s topic")
    with store.transaction() as db:
        new = store.add_samples(db, device, ((seq, t, list(values)) for seq, t, values in frame.samples))
        ack = store.advance_ack(db, device, oldest_held=frame.oldest_seq)
    return IngestResult(device, new, frame.count - new, ack)


class Ingester:
    """Subscribes to every device's samples and state; stores, then acks."""

    def __init__(self, broker: BrokerConfig, db_path, client_id: str = "mpfleet-ingest"):
        self.broker = broker
        self.db_path = db_path
        self.client_id = client_id
        self.stats = IngestStats()
        self._store: Store | None = None
        self._client = None

    def start(self) -> None:
        # One connection, used only from paho's network thread (sqlite3 objects
        # are per-thread).
        self._client = make_client(self.broker, self.client_id, clean_session=False)
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: self._subscribed.set()
        connect(self._client, self.broker, on_connected=self._subscribe)
        # Return only once the broker has the subscription: a frame published
        # after start() returns is then sure to be delivered.
        if not self._subscribed.wait(10):
            self.stop()
            raise MqttLinkError(f"the broker at {self.broker.url()} did not confirm the subscription")

    def _subscribe(self, client) -> None:
        client.subscribe([(topic("+", "samples"), 1), (topic("+", "state"), 1)])

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> "Ingester":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _db(self) -> Store:
        if self._store is None:
            self._store = Store(self.db_path)
        return self._store

    def _on_message(self, client, userdata, msg) -> None:
        parsed = device_from_topic(msg.topic)
        if parsed is None:
            return
        device, leaf = parsed
        store = self._db()
        if leaf == "samples":
            self._on_samples(client, store, device, msg.payload)
        elif leaf == "state":
            self._on_state(store, device, msg.payload)

    def _on_samples(self, client, store: Store, device: str, payload: bytes) -> None:
        handle_samples(store, device, payload, client.publish, self.stats)

    def _on_state(self, store: Store, device: str, payload: bytes) -> None:
        handle_state(store, device, payload, self._client.publish)


def handle_samples(store: Store, device: str, payload: bytes, publish, stats: IngestStats) -> IngestResult | None:
    """Store one `samples` frame and publish the ack (after the commit); a corrupt frame is
    counted, logged and recorded, never fatal. `publish(topic, payload, qos=, retain=)`."""
    try:
        result = ingest_frame(store, device, payload)
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
    store.touch_device(device)
    # Only now, after the commit, may the device forget these samples.
    # The host's clock rides along: a device whose RTC restarted at power
    # loss sets its clock from it until it has better time.
    ack = {"upto": result.ack, "time": int(time.time())}
    publish(topic(device, "samples/ack"), json.dumps(ack), qos=1, retain=True)
    return result


def handle_state(store: Store, device: str, payload: bytes, publish) -> dict | None:
    """Record a device's `state` report in the registry (a device first seen this way is
    registered); answer a device whose clock is unset with the host's time."""
    try:
        state = json.loads(payload)
        if not isinstance(state, dict):
            raise ValueError("not an object")
    except ValueError as e:
        store.record_ingest_error(device, f"unreadable state: {e}")
        return None
    store.touch_device(device, board=state.get("board"), state=state)
    device_time = state.get("time")
    if isinstance(device_time, (int, float)) and device_time < CLOCK_SET_AFTER:
        # The device lost its clock with its power: answer at once with the
        # host's time (and the current ack) so its samples get real times.
        ack = {"upto": store.ack_point(device), "time": int(time.time())}
        publish(topic(device, "samples/ack"), json.dumps(ack), qos=1, retain=True)
    return state
