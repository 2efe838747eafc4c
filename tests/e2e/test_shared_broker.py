"""Two fleets and a stranger on one broker (docs/security.md, "A shared broker"), through
`mpfleet serve` itself: real mosquitto, virtual boards running the real firmware.

Fleet A lives under the topic root `site-a/mpf` (its boards' config broker.topic_root,
its serve's --topic-root); fleet B under the default `mpf/v1`, with its own database
and serve. A third board publishes under A's root but was never provisioned there.
Both serves run with their default client ids at once. Checked after the boards woke:
each database holds its own fleet only; the stranger is pending in A, never stored,
acked, given an account or targeted, until `devices accept`; neither serve lost its
connection to the other (client ids that collide throw each other off).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_harness import wait
from cli_harness import mpfleet

from mpfleet.broker.link import parse_broker_url
from mpfleet.db.store import Store
from mpfleet.fleet.keys import KeyRing
from mpfleet.sim.fleet import AWAKE_CONFIG, provision_sim_fleet

ROOT_A = "site-a/mpf"


class Retained:
    """Every retained message under '#' as the broker holds it now."""

    def __init__(self, broker):
        self.topics: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"retained-{time.time_ns()}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("#", 0)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.topics[msg.topic] = msg.payload

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def samples_of(db: Path, device: str) -> int:
    with Store(db) as store:
        return store.db.execute("SELECT COUNT(*) FROM samples WHERE device = ?", (device,)).fetchone()[0]


def start_serve(db: Path, keys: Path, broker, log: Path, *root_args) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mpfleet", "serve", "--broker", broker.url, "--db", str(db),
                             "--keys-dir", str(keys), "--tick", "0.1", *root_args],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    wait(lambda: b"serving" in log.read_bytes() or proc.poll() is not None, 30, f"serve on {db} to start")
    assert proc.poll() is None, log.read_text()
    return proc


@pytest.fixture
def fleets(tmp_path, mosquitto):
    cfg = parse_broker_url(mosquitto.url)
    made = {}
    for name, root, count in (("a", ROOT_A, 3), ("b", None, 2), ("stranger", ROOT_A, 1)):
        home = tmp_path / name
        db, keys = home / "mpfleet.db", home / "keys"
        store = Store(db)
        ring = KeyRing(store, keys)
        ring.init()
        overrides = dict(AWAKE_CONFIG, **({"broker": {"topic_root": root}} if root else {}))
        boards = provision_sim_fleet(store, ring, home / "boards", count, cfg, prefix=f"fleet-{name}",
                                     with_credentials=False, config_overrides=overrides)
        store.close()
        made[name] = {"db": db, "keys": keys, "boards": boards, "ids": [b.device_id for b in boards]}
    yield cfg, made


def test_two_fleets_and_a_stranger_share_a_broker(fleets, mosquitto, tmp_path):
    cfg, f = fleets
    a, b, stranger = f["a"], f["b"], f["stranger"]
    intruder = stranger["ids"][0]
    retained = Retained(cfg)
    logs = {"a": tmp_path / "serve-a.log", "b": tmp_path / "serve-b.log"}
    serves = [start_serve(a["db"], a["keys"], mosquitto, logs["a"], "--topic-root", ROOT_A),
              start_serve(b["db"], b["keys"], mosquitto, logs["b"])]
    try:
        for _ in range(2):
            for board in [*a["boards"], *b["boards"], *stranger["boards"]]:
                board.boot()
        wait(lambda: all(samples_of(a["db"], d) for d in a["ids"]) and all(samples_of(b["db"], d) for d in b["ids"]),
             60, "both fleets' samples to be stored")
        time.sleep(1)  # what the stranger sent has been handled by now, if it were going to be

        # each database holds its own fleet, and only it
        listed_a = json.loads(mpfleet("devices", "list", "--db", a["db"], "--json").stdout)
        listed_b = json.loads(mpfleet("devices", "list", "--db", b["db"], "--json").stdout)
        assert [d["id"] for d in listed_a] == a["ids"] and [d["id"] for d in listed_b] == b["ids"]
        assert all(d["state"] and d["reported_at"] and d["stale"] is False for d in listed_a + listed_b)
        # the stranger under A's root is pending there, with nothing of it stored or answered
        pending_a = json.loads(mpfleet("devices", "pending", "--db", a["db"], "--json").stdout)["pending"]
        assert [p["id"] for p in pending_a] == [intruder] and pending_a[0]["times"] >= 2
        assert json.loads(mpfleet("devices", "pending", "--db", b["db"], "--json").stdout)["pending"] == []
        assert samples_of(a["db"], intruder) == 0
        with retained.lock:
            topics = dict(retained.topics)
        assert f"{ROOT_A}/{intruder}/samples/ack" not in topics
        assert all(f"{ROOT_A}/{d}/samples/ack" in topics for d in a["ids"])
        assert all(f"mpf/v1/{d}/samples/ack" in topics for d in b["ids"])
        assert not any(t.startswith(f"mpf/v1/{d}/") for d in a["ids"] for t in topics)
        # the stranger is never targeted, nor given a broker account
        mpfleet("job", "create", "reboot", "--all", "--id", "everyone", "--db", a["db"],
                "--keys-dir", a["keys"])
        everyone = json.loads(mpfleet("job", "status", "everyone", "--db", a["db"], "--json", check=False).stdout)
        assert sorted(r["device"] for r in everyone["devices"]) == a["ids"]
        running = mpfleet("job", "status", "everyone", "--db", a["db"], check=False)
        assert "is running on" not in running.stdout + running.stderr  # serve's heartbeat is seen
        conf = json.loads(mpfleet("broker", "config", "--plaintext", "--out", tmp_path / "broker-a",
                                  "--topic-root", ROOT_A, "--db", a["db"], "--json").stdout)
        assert conf["devices"] == a["ids"]
        acl = (tmp_path / "broker-a" / "acl").read_text()
        assert intruder not in acl and f"topic write {ROOT_A}/{a['ids'][0]}/samples" in acl

        # accepted, it is a member from its next report on
        mpfleet("devices", "accept", intruder, "--db", a["db"])
        stranger["boards"][0].boot()
        wait(lambda: samples_of(a["db"], intruder) > 0, 30, "the accepted device's samples to be stored")
        wait(lambda: f"{ROOT_A}/{intruder}/samples/ack" in retained.topics, 10, "its samples to be acked")
    finally:
        retained.close()
        for proc in serves:
            proc.terminate()
            proc.wait(30)
    stopped = mpfleet("job", "status", "everyone", "--db", a["db"], check=False)
    assert "no `mpfleet serve` is running on" in " ".join((stopped.stdout + stopped.stderr).split())
    for name, log in logs.items():
        text = log.read_text()
        assert "lost the connection" not in text, (name, text)
        assert "client id mpfleet-serve-" in text, (name, text)
    ids = {log.read_text().split("client id ")[1].split()[0] for log in logs.values()}
    assert len(ids) == 2  # one fleet, one client id: two serves never throw each other off
