"""The host's half of the promises, through `serve` and `ingest` with real mosquitto:
a message is acknowledged to the broker only once it is committed, one bad message
stops nothing, and a frame's claims are bounded before they are believed.

The device side is played by plain MQTT clients here (the chaos test in
test_host_chaos.py runs virtual boards): what a device, or anyone holding its
credentials, can publish is exactly what these clients publish.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_harness import FleetEnv

from mpfleet.protocol.codec import _uvarint, encode_frame, zigzag
from mpfleet.fleet.ingest import SEQ_AHEAD_MAX, Ingester
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.serve import Dispatcher
from mpfleet.db.store import Store

NOW = int(time.time())


def _job_of(envelope: str) -> tuple[str, int]:
    payload = envelope.split(".")[2]
    job = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return job["id"], job["seq"]


class Device:
    """A device's side of the broker: its retained queue, and what it publishes."""

    def __init__(self, broker, device: str):
        self.device = device
        self.lock = threading.Lock()
        self.queue: list[str] = []
        self.acks: list[dict] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(f"mpf/v1/{device}/jobs", 1), (f"mpf/v1/{device}/samples/ack", 1)])
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            if msg.topic.endswith("/jobs"):
                self.queue = json.loads(msg.payload or b"[]")
            else:
                self.acks.append(json.loads(msg.payload))

    def publish(self, leaf: str, payload, qos: int = 1) -> None:
        data = payload if isinstance(payload, (bytes, bytearray)) else json.dumps(payload)
        self.client.publish(f"mpf/v1/{self.device}/{leaf}", data, qos=qos).wait_for_publish(5)

    def status(self, job: str, seq: int, status: str) -> None:
        self.publish("jobs/status", {"job": job, "seq": seq, "status": status, "attempt": 1, "ts": NOW})

    def last_ack(self) -> int | None:
        with self.lock:
            return self.acks[-1]["upto"] if self.acks else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Host(FleetEnv):
    poll_s = 0.05

    def execution(self, job: str, device: str) -> str:
        return self.store.db.execute("SELECT status FROM executions WHERE job = ? AND device = ?",
                                     (job, device)).fetchone()[0]


def _queued(host: Host, dev: Device, job: str) -> int:
    host.wait(lambda: any(_job_of(e)[0] == job for e in dev.queue), 10, f"{job} in {dev.device}'s queue")
    return next(_job_of(e)[1] for e in dev.queue if _job_of(e)[0] == job)


# ---------------------------------------------------------------- ack after commit
@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB file system that can be filled (tmpfs; needs root to mount)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512, 1):  # to the last byte
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


def test_a_status_serve_cannot_commit_is_not_acked_and_lands_once_the_disk_has_room(tmp_path, mosquitto, small_disk):
    host = Host(tmp_path, mosquitto, db=small_disk / "mpfleet.db")
    Registry(host.store).add("full-0001")
    job = host.engine.create_job("config", {"set": {"upload_watermark": 301}}, ["full-0001"], job_id="on-a-full-disk")
    dev = Device(mosquitto, "full-0001")
    with Dispatcher(host.cfg, host.db, keys_dir=host.keys, tick_s=0.05, client_id="serve-full") as d:
        seq = _queued(host, dev, job)
        # Checkpoint and shrink the WAL, so that the next commit needs new space.
        host.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = _fill(small_disk)
        dev.status(job, seq, "IN_PROGRESS")
        dev.status(job, seq, "SUCCEEDED")
        host.wait(lambda: d.stats.messages.as_dict()["storage_retries"] >= 2, 15, "serve to hit the full disk")
        assert d.stats.messages.as_dict()["held"] >= 1
        assert host.execution(job, "full-0001") == "QUEUED"
        assert d.running
        filler.unlink()
        host.wait(lambda: host.execution(job, "full-0001") == "SUCCEEDED", 15,
                  "the held status to be committed once there is room")
        host.wait(lambda: host.engine.job_status(job).status == "COMPLETED", 10, "the job to complete")
        assert d.stats.messages.as_dict()["held"] == 0
    dev.close()
    host.store.close()


# ---------------------------------------------------------------- one bad message stops nothing
def _raw_frame(device: str, first_seq: int, t_base: int, dts: list[int], values: list[int], scale: int = 0,
               oldest: int | None = None) -> bytes:
    """A CRC-valid frame with any field values, including ones encode_frame refuses."""
    import binascii
    import struct

    ident = device.encode()
    out = bytearray([0xB1, 1 if oldest is not None else 0, len(ident)]) + ident
    out += _uvarint(first_seq) + _uvarint(len(dts))
    if oldest is not None:
        out += _uvarint(oldest)
    out += struct.pack("<I", t_base) + bytes([1, scale & 0xFF])
    for dt, v in zip(dts, values):
        out += _uvarint(zigzag(dt)) + _uvarint(zigzag(v))
    return bytes(out + struct.pack("<I", binascii.crc32(out) & 0xFFFFFFFF))


def _hostile_statuses(rng: random.Random, job: str, seq: int, other_job: str, other_seq: int) -> list:
    """Statuses a device's credentials can publish: wrong types, nesting, oversize, other
    devices' jobs, states the device may not set, duplicates."""
    junk = [None, True, 1.5, -1, 2**70, "", "x" * 5000, [], {}, [[[[[]]]]], {"a": {"b": {"c": {}}}}]
    out: list = [b"", b"\xff\xfe", b"{", b"[1,2", b"null", b"[]", b'"text"', b"1e999", b"[" * 5000 + b"]" * 5000,
                 json.dumps({"job": job, "seq": seq, "status": "SUCCEEDED", "x": "y" * 100_000}).encode()]
    keys = ["job", "seq", "status", "progress", "detail", "attempt", "ts"]
    for _ in range(60):
        msg = {"job": job, "seq": seq, "status": rng.choice(["IN_PROGRESS", "FAILED", "REJECTED"]),
               "attempt": 1}
        for k in rng.sample(keys, rng.randint(1, 4)):
            msg[k] = rng.choice(junk + [other_job, other_seq, "CANCELED", "TIMED_OUT", "REMOVED", "QUEUED"])
        if rng.random() < 0.2:
            msg["job"], msg["seq"] = other_job, other_seq  # another device's execution
        if rng.random() < 0.1:
            msg["job"] = "envelope:" + rng.choice(["", "x" * 300, "a/b"])
        out.append(msg)
    return out


def _hostile_frames(rng: random.Random, device: str) -> list[bytes]:
    out = [_raw_frame(device, 5, NOW, [0, 2**40], [1, 2]),                  # time past 64 bits of sum
           _raw_frame(device, 5, NOW, [-(2**33)], [1]),                      # time below zero
           _raw_frame(device, 5, NOW, [0], [2**70]),                         # value beyond 64 bits
           _raw_frame(device, 5, NOW, [0], [2**63], scale=9),
           _raw_frame(device, 4_294_967_256, NOW, [0], [1]),                 # the 32-bit edge
           _raw_frame(device, 1 << 31, NOW, [0], [1]),
           _raw_frame(device, 3 + SEQ_AHEAD_MAX + 10, NOW, [0], [1]),         # far past what the host knows
           _raw_frame(device, 5, NOW, [0], [1], oldest=4_000_000_000),      # claims the device lost everything
           _raw_frame(device, 5, NOW + 10 * 86400, [0], [1]),                # the far future
           encode_frame("someone-else", 5, NOW, [0], [(NOW, (1,))])]         # another device's frame
    for _ in range(20):
        n = rng.randint(1, 5)
        # Every one of these claims something no real frame can (a seq past the bounds).
        out.append(_raw_frame(device, rng.choice([2**31 - 1, 2**32 - 1, 2**40, 2 * SEQ_AHEAD_MAX]),
                              rng.choice([0, NOW, 2**32 - 1]),
                              [rng.choice([0, 1, -1, 2**31, -(2**31), 2**63]) for _ in range(n)],
                              [rng.choice([0, 1, -1, 2**63, -(2**63), 2**64]) for _ in range(n)],
                              scale=rng.choice([0, 9, -9])))
    return out


def test_hostile_messages_on_a_devices_own_topics_are_recorded_and_stop_nothing(tmp_path, mosquitto):
    host = Host(tmp_path, mosquitto)
    for d in ("bad-0001", "good-0001"):
        Registry(host.store).add(d)
    job = host.engine.create_job("diag", {}, ["bad-0001"], job_id="hostile-target")
    other = host.engine.create_job("diag", {}, ["good-0001"], job_id="someone-elses")
    bad, good = Device(mosquitto, "bad-0001"), Device(mosquitto, "good-0001")
    rng = random.Random(13)
    with Dispatcher(host.cfg, host.db, keys_dir=host.keys, tick_s=0.05, client_id="serve-hostile") as d:
        seq, other_seq = _queued(host, bad, job), _queued(host, good, other)
        # Three real samples first: the host's ack is 3.
        bad.publish("samples", encode_frame("bad-0001", 1, NOW, [0], [(NOW + i, (i,)) for i in range(3)]))
        host.wait(lambda: bad.last_ack() == 3, 10, "the first ack")
        hostile: list = []
        for status in _hostile_statuses(rng, job, seq, other, other_seq):
            hostile.append(("jobs/status", status))
        for frame in _hostile_frames(rng, "bad-0001"):
            hostile.append(("samples", frame))
        for state in [b"", b"[]", b"{" * 3000, json.dumps({"board": {"x": 1}, "time": "soon"}).encode(),
                      json.dumps({"board": 7, "time": 2**80}).encode(), json.dumps({"board": "x" * 10_000}).encode()]:
            hostile.append(("state", state))
        rng.shuffle(hostile)
        for leaf, payload in hostile:
            bad.publish(leaf, payload)
        # After all of it, ordinary messages still go through, for both devices.
        bad.publish("samples", encode_frame("bad-0001", 4, NOW, [0], [(NOW + 3, (3,))]))
        bad.status(job, seq, "SUCCEEDED")
        good.status(other, other_seq, "SUCCEEDED")
        host.wait(lambda: host.execution(other, "good-0001") == "SUCCEEDED", 20, "the other device's status")
        host.wait(lambda: host.store.sample_count("bad-0001") == 4, 10, "the good frame after the hostile ones")
        assert d.running and d.failure is None
        messages = d.stats.messages.as_dict()
        assert messages["held"] == 0 and messages["storage_retries"] == 0
    # Invariants: the ack moved over real samples only; nothing of another device changed
    # by this device's messages; every bad message left a trace.
    assert host.store.ack_point("bad-0001") == 4
    assert bad.last_ack() == 4
    assert [s for _, s, _, _ in host.store.samples("bad-0001")] == [1, 2, 3, 4]
    assert host.execution(job, "bad-0001") in ("SUCCEEDED", "FAILED", "REJECTED")
    assert host.execution(other, "good-0001") == "SUCCEEDED"
    assert host.store.sample_count("someone-else") == 0
    errors = [r for dev_, r in host.store.ingest_errors() if dev_ == "bad-0001"]
    assert any("quarantined" in r for r in errors) and any("outside 32 bits" in r for r in errors)
    assert len(host.store.quarantined("bad-0001")) >= 4
    bad.close()
    good.close()
    host.store.close()


def test_an_absurd_first_seq_does_not_move_the_ack(tmp_path, mosquitto):
    """The frame that once moved a device's ack from 4 to 4,294,967,256."""
    host = Host(tmp_path, mosquitto)
    host.store.add_device("seq-0001")  # provisioned: only members are stored
    dev = Device(mosquitto, "seq-0001")
    with Ingester(host.cfg, host.db, client_id="ingest-seq"):
        dev.publish("samples", encode_frame("seq-0001", 1, NOW, [0], [(NOW + i, (i,)) for i in range(4)]))
        Host.wait(lambda: dev.last_ack() == 4, 10, "the ack of 4")
        dev.publish("samples", encode_frame("seq-0001", 4_294_967_256, NOW, [0], [(NOW, (1,))]))
        dev.publish("samples", encode_frame("seq-0001", 5, NOW, [0], [(NOW + 5, (5,))]))
        Host.wait(lambda: dev.last_ack() == 5, 10, "the next real frame's ack")
    assert host.store.ack_point("seq-0001") == 5
    assert [q["reason"] for q in host.store.quarantined("seq-0001")] == [
        "seqs 4294967256..4294967256 reach past 2147483648"]
    dev.close()
    host.store.close()


def test_mpfleet_ingest_goes_on_storing_after_a_frame_whose_time_overflows(tmp_path, mosquitto):
    """The ingest process itself, as a user runs it."""
    db = tmp_path / "ingest.db"
    env = dict(os.environ, MPFLEET_HOME=str(tmp_path))
    subprocess.run([sys.executable, "-m", "mpfleet", "devices", "add", "ovf-0001", "--db", str(db)], check=True,
                   env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "mpfleet", "ingest", "--broker", mosquitto.url, "--db", str(db),
                             "--client-id", "ingest-cli"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    dev = Device(mosquitto, "ovf-0001")
    try:
        Host.wait(lambda: db.exists() and proc.poll() is None, 15, "mpfleet ingest to start")
        time.sleep(1.0)  # its subscription (start() returns only once the broker confirmed it)
        dev.publish("samples", _raw_frame("ovf-0001", 1, NOW, [0, 2**62, 2**62], [1, 2, 3]))  # t past 2**63
        dev.publish("samples", encode_frame("ovf-0001", 1, NOW, [0], [(NOW, (1,)), (NOW + 1, (2,))]))
        Host.wait(lambda: dev.last_ack() == 2, 15, "the frame after the overflowing one to be stored")
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
        dev.close()
    with Store(db) as store:
        assert store.sample_count("ovf-0001") == 2
        assert any("outside 32 bits" in r for _, r in store.ingest_errors("ovf-0001")), out


def test_serve_stops_with_a_failure_on_a_damaged_database_rather_than_living_on(tmp_path, mosquitto):
    host = Host(tmp_path, mosquitto)
    host.store.add_device("dmg-0001")
    dev = Device(mosquitto, "dmg-0001")
    with Dispatcher(host.cfg, host.db, keys_dir=host.keys, tick_s=0.05, client_id="serve-dmg") as d:
        dev.publish("samples", encode_frame("dmg-0001", 1, NOW, [0], [(NOW + i, (i,)) for i in range(50)]))
        host.wait(lambda: dev.last_ack() == 50, 10, "the first frame")
        host.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = host.store.db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'samples'").fetchone()[0]
        page = host.store.db.execute("PRAGMA page_size").fetchone()[0]
        with open(host.db, "r+b") as f:  # the samples b-tree's root page, overwritten
            f.seek((root - 1) * page)
            f.write(b"\x5a" * page)
        dev.publish("samples", encode_frame("dmg-0001", 51, NOW, [0], [(NOW + 60, (1,))]))
        host.wait(lambda: not d.running, 15, "serve to stop")
        assert "damaged" in str(d.failure)
    dev.close()
    host.store.close()


def test_serve_and_ingest_refuse_to_start_on_a_damaged_database(tmp_path, mosquitto):
    """`mpfleet serve` and `mpfleet ingest` as users run them: one line naming the file, exit 1."""
    host = Host(tmp_path, mosquitto)
    Registry(host.store).add("dmg-0002")
    host.engine.create_job("diag", {}, ["dmg-0002"], job_id="before-the-damage")
    host.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = host.store.db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'executions'").fetchone()[0]
    page = host.store.db.execute("PRAGMA page_size").fetchone()[0]
    host.store.close()
    with open(host.db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)
    env = dict(os.environ, MPFLEET_HOME=str(tmp_path))
    for argv in (["serve", "--keys-dir", str(host.keys)], ["ingest"]):
        r = subprocess.run([sys.executable, "-m", "mpfleet", *argv, "--broker", mosquitto.url, "--db", str(host.db)],
                           capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "damaged" in lines[0] and str(host.db) in lines[0], (argv, r.stderr)


def test_a_full_disk_when_the_broker_confirms_a_queue_stops_nothing(tmp_path, small_disk):
    """Found by the chaos test: the broker's confirmation of a retained queue is recorded
    in the database; on a full disk that write ended serve's worker, and `mpfleet serve`
    then exited 0. A reconnect makes serve publish (and the broker confirm) every queue."""
    from mpfleet.broker.local import LocalBroker

    with LocalBroker() as broker:
        host = Host(tmp_path, broker, db=small_disk / "mpfleet.db")
        Registry(host.store).add("conf-0001")
        job = host.engine.create_job("diag", {}, ["conf-0001"], job_id="confirmed-on-a-full-disk")
        dev = Device(broker, "conf-0001")
        with Dispatcher(host.cfg, host.db, keys_dir=host.keys, tick_s=0.05, client_id="serve-conf") as d:
            seq = _queued(host, dev, job)
            host.wait(lambda: d.stats.queue_confirmed >= 1, 10, "the first confirmation")
            host.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            filler = _fill(small_disk)
            broker.restart()  # no persistence: serve reconnects and publishes every queue again
            host.wait(lambda: d.stats.queue_confirmed >= 2 or d.stats.errors >= 1, 30, "the queue again")
            time.sleep(0.5)
            assert d.running and d.failure is None, d.failure
            filler.unlink()
            dev.close()
            dev = Device(broker, "conf-0001")
            dev.status(job, seq, "SUCCEEDED")
            host.wait(lambda: host.execution(job, "conf-0001") == "SUCCEEDED", 15, "the status after the disk freed")
        dev.close()
        host.store.close()
