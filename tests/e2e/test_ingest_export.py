"""Host ingest into SQLite and the export command."""

import json
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from mpfleet.protocol.codec import FrameError, encode_frame
from mpfleet.fleet.ingest import Ingester, ingest_frame
from mpfleet.broker.link import parse_broker_url
from mpfleet.db.store import Store

T0 = 1_790_000_000


def frame(device, first, n, oldest=None, t0=T0):
    return encode_frame(device, first, t0, (3, 1), [(t0 + 60 * i, (1.0 + i / 1000, 20.0 + i / 10)) for i in range(n)],
                        oldest_seq=oldest)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


def test_samples_are_stored_once_however_often_they_arrive(store):
    for _ in range(3):
        ingest_frame(store, "d1", frame("d1", 1, 10))
    assert store.sample_count("d1") == 10
    again = ingest_frame(store, "d1", frame("d1", 5, 10))
    assert (again.new, again.duplicates, again.ack) == (4, 6, 14)


def test_ack_stops_at_a_gap_the_device_can_still_fill(store):
    ingest_frame(store, "d1", frame("d1", 1, 5))
    result = ingest_frame(store, "d1", frame("d1", 8, 3, oldest=1))
    assert result.ack == 5
    assert ingest_frame(store, "d1", frame("d1", 6, 2, oldest=1)).ack == 10


def test_ack_passes_seqs_the_device_no_longer_holds(store):
    ingest_frame(store, "d1", frame("d1", 1, 5))
    result = ingest_frame(store, "d1", frame("d1", 40, 3, oldest=40))  # 6..39 dropped on the device
    assert result.ack == 42


def test_frame_from_another_device_topic_is_refused(store):
    with pytest.raises(FrameError, match="came on"):
        ingest_frame(store, "d2", frame("d1", 1, 3))
    assert store.sample_count() == 0


def test_ingester_acks_only_after_commit_and_counts_corrupt_frames(mosquitto, tmp_path):
    db = tmp_path / "db.sqlite"
    acks = []
    got_ack = threading.Event()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: (acks.append(json.loads(m.payload)), got_ack.set())
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe("mpf/v1/+/samples/ack", qos=1)
    watcher.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect(mosquitto.host, mosquitto.port)
    pub.loop_start()
    with Store(db) as s:
        s.add_device("ing-1")  # provisioned: only members are stored and acked
    with Ingester(parse_broker_url(mosquitto.url), db, client_id="ingest-unit") as ing:
        bad = bytearray(frame("ing-1", 1, 5))
        bad[-1] ^= 0xFF
        pub.publish("mpf/v1/ing-1/samples", bytes(bad), qos=1).wait_for_publish(5)
        pub.publish("mpf/v1/ing-1/samples", frame("ing-1", 1, 5), qos=1).wait_for_publish(5)
        assert got_ack.wait(5)
        with Store(db) as s:
            assert s.sample_count("ing-1") == 5, "the ack was published only after the rows were committed"
            errors = s.ingest_errors("ing-1")
        assert ing.stats.corrupt == 1 and "CRC" in errors[0][1]
    pub.loop_stop()
    watcher.loop_stop()
    assert acks[-1]["upto"] == 5 and abs(acks[-1]["time"] - time.time()) < 60


def _mpfleet(*args):
    return subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True)


def test_export_csv_and_jsonl(store, tmp_path):
    ingest_frame(store, "d1", frame("d1", 1, 3))
    ingest_frame(store, "d2", frame("d2", 1, 2))
    out = _mpfleet("samples", "export", "--db", store.path, "--device", "d1", "--format", "csv")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "device,seq,time,t,ch0,ch1"
    assert lines[1].startswith("d1,1,") and len(lines) == 4
    target = tmp_path / "all.jsonl"
    out = _mpfleet("samples", "export", "--db", store.path, "--format", "jsonl", "-o", target)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["device"], r["seq"]) for r in rows] == [("d1", 1), ("d1", 2), ("d1", 3), ("d2", 1), ("d2", 2)]
    assert rows[0]["values"] == [1.0, 20.0] and rows[0]["time"].endswith("Z")


def test_export_since_filters_by_time(store):
    ingest_frame(store, "d1", frame("d1", 1, 10))
    out = _mpfleet("samples", "export", "--db", store.path, "--since", T0 + 300, "--format", "jsonl")
    assert [json.loads(x)["seq"] for x in out.stdout.splitlines()] == [6, 7, 8, 9, 10]


def test_export_with_nothing_matching_says_so(store):
    ingest_frame(store, "d1", frame("d1", 1, 2))
    out = _mpfleet("samples", "export", "--db", store.path, "--device", "nobody")
    assert out.returncode == 1 and "not known to this database" in out.stderr
    out = _mpfleet("samples", "export", "--db", store.path, "--since", "2099-01-01")
    assert out.returncode == 1 and "no samples from any device since 2099-01-01" in out.stderr
    out = _mpfleet("samples", "export", "--db", store.path, "--since", "yesterday-ish")
    assert out.returncode == 2 and "cannot read the time 'yesterday-ish'" in out.stderr
