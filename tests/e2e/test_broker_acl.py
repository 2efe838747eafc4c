"""`mpfleet broker config` against a real mosquitto: device X is confined to mpf/v1/X/..."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from mpfleet.broker.local import LocalBroker, find_mosquitto
from mpfleet.broker.config import HOST_ENTRY, acl_text, credentials_for, generate, host_credentials
from mpfleet.db.store import Store

QUIET_S = 0.6  # how long "never arrives" waits, after a round trip proved the path is live


class Client:
    """A paho client that records what it receives."""

    def __init__(self, broker: LocalBroker, user: str | None, password: str | None, client_id: str):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.connack = threading.Event()
        self.reason = None
        self.subacks: dict[int, list] = {}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.connect(broker.host, broker.port, keepalive=10)
        self.c.loop_start()
        if not self.connack.wait(5):
            self.close()
            raise AssertionError("no CONNACK")

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.reason = reason
        self.connack.set()

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload))

    def _on_subscribe(self, client, userdata, mid, reasons, properties):
        self.subacks[mid] = reasons

    @property
    def accepted(self) -> bool:
        return not self.reason.is_failure

    def subscribe(self, topic: str) -> None:
        _, mid = self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 5
        while mid not in self.subacks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mid in self.subacks, f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def got(self, topic: str, payload: bytes | None = None) -> bool:
        with self.lock:
            return any(t == topic and (payload is None or p == payload) for t, p in self.messages)

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.got(topic, payload):
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    tmp = tmp_path_factory.mktemp("acl")
    store = Store(tmp / "db.sqlite")
    store.touch_device("dev-b")  # from the registry
    files = generate(store, tmp / "broker", devices=["dev-a"])
    with LocalBroker(extra_config=files.conf_lines()) as broker:
        yield store, files, broker
    store.close()


@pytest.fixture
def clients(setup):
    store, _, broker = setup
    made = []

    def make(who: str | None, password: str | None = None, client_id: str | None = None) -> Client:
        if who == "host":
            creds = host_credentials(store)
            user, password = creds["username"], password or creds["password"]
        elif who is None:
            user = None
        else:
            creds = credentials_for(store, who)
            user, password = creds["username"], password or creds["password"]
        c = Client(broker, user, password, client_id or f"{who or 'anon'}-{len(made)}")
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_config_gives_every_device_and_the_host_an_account(setup):
    store, files, _ = setup
    assert files.devices == ["dev-a", "dev-b"] and set(files.new) == {"dev-a", "dev-b", HOST_ENTRY}
    assert set(files.new_accounts()) == {"dev-a", "dev-b", files.host_user}  # what `broker config` prints


def test_password_file_holds_hashes_only_readable_by_its_owner(setup):
    store, files, _ = setup
    passwd = files.passwd.read_text()
    for creds in (credentials_for(store, "dev-a"), credentials_for(store, "dev-b"), host_credentials(store)):
        assert len(creds["password"]) == 24
        assert creds["password"] not in passwd  # hashes only
        assert f"{creds['username']}:$" in passwd
    assert stat.S_IMODE(files.passwd.stat().st_mode) == 0o600


def test_acl_names_each_device_topics_and_the_broker_refuses_anonymous_clients(setup):
    _, files, _ = setup
    assert "user dev-a\ntopic read mpf/v1/dev-a/jobs\n" in files.acl.read_text()
    assert "allow_anonymous false" in files.conf.read_text()


def test_device_uses_its_own_topics(clients):
    host = clients("host")
    a = clients("dev-a", client_id="dev-a")
    assert host.accepted and a.accepted
    host.subscribe("mpf/v1/#")
    host.publish("mpf/v1/dev-a/jobs", b"jobs-for-a", retain=True)
    a.subscribe("mpf/v1/dev-a/jobs")
    assert a.wait_for("mpf/v1/dev-a/jobs", b"jobs-for-a")  # retained, readable
    a.publish("mpf/v1/dev-a/state", b"state-a", retain=True)
    a.publish("mpf/v1/dev-a/jobs/status", b"status-a")
    assert host.wait_for("mpf/v1/dev-a/state", b"state-a")
    assert host.wait_for("mpf/v1/dev-a/jobs/status", b"status-a")
    host.publish("mpf/v1/dev-a/jobs", b"", retain=True)  # clear


def test_device_cannot_reach_another_device(clients):
    host = clients("host")
    host.subscribe("mpf/v1/#")
    host.publish("mpf/v1/dev-b/jobs", b"jobs-for-b", retain=True)
    b = clients("dev-b", client_id="dev-b")
    b.subscribe("mpf/v1/dev-b/jobs")
    assert b.wait_for("mpf/v1/dev-b/jobs", b"jobs-for-b")

    a = clients("dev-a", client_id="dev-a")
    a.subscribe("mpf/v1/dev-b/jobs")  # granted or refused by version: either way nothing arrives
    a.subscribe("mpf/v1/#")
    a.subscribe("mpf/v1/dev-b/jobs/status")
    a.publish("mpf/v1/dev-b/jobs/status", b"forged-status")
    a.publish("mpf/v1/dev-b/jobs", b"forged-jobs", retain=True)
    a.publish("mpf/v1/dev-a/jobs", b"a-writes-own-jobs")  # read-only for the device
    # A round trip that must arrive proves the forged messages had time to arrive too.
    b.publish("mpf/v1/dev-b/jobs/status", b"real-status")
    assert host.wait_for("mpf/v1/dev-b/jobs/status", b"real-status")
    a.publish("mpf/v1/dev-a/state", b"marker")
    assert host.wait_for("mpf/v1/dev-a/state", b"marker")
    time.sleep(QUIET_S)
    assert not host.got("mpf/v1/dev-b/jobs/status", b"forged-status")
    assert not host.got("mpf/v1/dev-b/jobs", b"forged-jobs")
    assert not b.got("mpf/v1/dev-b/jobs", b"forged-jobs")
    assert not host.got("mpf/v1/dev-a/jobs", b"a-writes-own-jobs")
    with a.lock:
        leaked = [t for t, _ in a.messages if not t.startswith("mpf/v1/dev-a/")]
    assert leaked == []
    assert not a.got("mpf/v1/dev-b/jobs")
    host.publish("mpf/v1/dev-b/jobs", b"", retain=True)


def test_anonymous_and_wrong_password_refused(clients):
    anon = clients(None)
    assert not anon.accepted and anon.reason == "Not authorized"
    wrong = clients("dev-a", password="not-the-password-at-all")
    assert not wrong.accepted and wrong.reason == "Not authorized"


def test_host_reads_and_writes_everything(clients):
    host = clients("host")
    host.subscribe("mpf/v1/#")
    for topic in ("mpf/v1/dev-a/samples/ack", "mpf/v1/dev-b/ota/data", "mpf/v1/other/whatever"):
        host.publish(topic, b"x")
        assert host.wait_for(topic, b"x")


def test_existing_credentials_kept_unless_rotated(setup, tmp_path):
    store, files, _ = setup
    before = credentials_for(store, "dev-a")["password"], credentials_for(store, "dev-b")["password"]
    again = generate(store, tmp_path / "again", devices=["dev-c"], registry=False)
    assert again.devices == ["dev-a", "dev-b", "dev-c"] and again.new == ["dev-c"]
    assert (credentials_for(store, "dev-a")["password"], credentials_for(store, "dev-b")["password"]) == before
    rotated = generate(store, tmp_path / "rot", devices=["dev-c"], rotate=True)
    assert rotated.new == ["dev-c"]
    assert credentials_for(store, "dev-a")["password"] == before[0]
    assert "user dev-c" in acl_text(rotated.devices)


def test_cli_broker_config(tmp_path):
    db = tmp_path / "db.sqlite"
    cmd = [sys.executable, "-m", "mpfleet", "broker", "config", "--db", str(db), "--out", str(tmp_path / "out"),
           "--plaintext"]
    done = subprocess.run(cmd + ["--device", "dev-1", "--device", "dev-2", "--json"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["devices"] == ["dev-1", "dev-2"] and out["host_user"] == "mpfleet-host"
    assert (tmp_path / "out" / "acl").exists() and (tmp_path / "out" / "mosquitto.conf").exists()
    bad = subprocess.run(cmd + ["--device", "Bad/Id"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'Bad/Id' is not a valid device id" in bad.stderr
    clash = subprocess.run(cmd + ["--host-user", "dev-1"], capture_output=True, text=True, timeout=60)
    assert clash.returncode == 1 and clash.stderr.startswith("mpfleet: ") and "same name" in clash.stderr
