"""Broker sessions against a real mosquitto configured by mpfleet (issue 13).

Client ids are bound to accounts, so one account's credentials can neither wipe
nor take over another account's session (serve's, another device's); sessions and
retained messages survive a broker restart, and a kill -9 after an autosave.
Every broker here runs the configuration mpfleet writes: `broker config` accounts
behind the embedded broker, or the generated mosquitto.conf itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mpfleet.broker.local import embedded_broker, find_mosquitto, free_port, wait_for_port
from mpfleet.broker.config import (HOST_ACCOUNT_ENTRY, HOST_ENTRY, BrokerConfigError, credentials_for, generate,
                                host_credentials)
from mpfleet.db.store import Store

QUIET_S = 0.5  # how long "nothing happens" waits, after a round trip proved the path is live
STATUS = "mpf/v1/{}/jobs/status"


class Client:
    """A paho client that records its messages, its CONNACK and its disconnections."""

    def __init__(self, host: str, port: int, creds: dict, client_id: str, clean: bool = True):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connack = threading.Event()
        self.session_present = None
        self.reason = None
        self.disconnects = 0
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(creds["username"], creds["password"])
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *args: self.subscribed.set()
        self.c.connect(host, port, keepalive=10)
        self.c.loop_start()
        if not self.connack.wait(5):
            self.close()
            raise AssertionError(f"no CONNACK for {client_id}")
        assert not self.reason.is_failure, f"{creds['username']} refused: {self.reason}"

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.reason, self.session_present = reason, flags.session_present
        self.connack.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        with self.lock:
            self.disconnects += 1

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.c.subscribe(topic, qos=1)
        assert self.subscribed.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, topic: str, count: int = 1, timeout: float = 5.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.payloads(topic)) < count:
            time.sleep(0.01)
        return self.payloads(topic)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def accounts(tmp_path_factory):
    """`broker config` accounts: dev-a, dev-b, the host account (serve's) and a further
    host account for a second host process (the probe that publishes queues here:
    on serve's account, with a clean session, it would replace serve's session)."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    tmp = tmp_path_factory.mktemp("sessions")
    store = Store(tmp / "db.sqlite")
    files = generate(store, tmp / "broker", devices=["dev-a", "dev-b"], accounts=["mpfleet-probe"])
    creds = {"host": host_credentials(store), "probe": host_credentials(store, "mpfleet-probe"),
             "dev-a": credentials_for(store, "dev-a"), "dev-b": credentials_for(store, "dev-b")}
    yield files, creds
    store.close()


@pytest.fixture
def broker(accounts, tmp_path):
    """The embedded broker (what `make demo` runs) with the accounts and ACL, in its own data dir."""
    files, _ = accounts
    b = embedded_broker(extra_config=files.conf_lines(), workdir=tmp_path / "broker")
    assert b.kind == "mosquitto"
    with b:
        yield b


@pytest.fixture
def connect(accounts):
    _, creds = accounts
    made: list[Client] = []

    def make(broker, who: str, client_id: str, clean: bool = True) -> Client:
        c = Client(broker.host, broker.port, creds[who], client_id, clean)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _serve_session(broker, connect) -> Client:
    """serve as `mpfleet serve` connects: the host account, client id mpfleet-serve, persistent
    session subscribed to every device's status; then it goes offline (session kept)."""
    serve = connect(broker, "host", "mpfleet-serve", clean=False)
    serve.subscribe(STATUS.format("+"))
    serve.close()
    return serve


def test_device_cannot_wipe_serves_session_with_its_client_id(accounts, broker, connect):
    _serve_session(broker, connect)
    # Device A's credentials, serve's client id (and the host account's name, which a broker
    # that binds ids to usernames uses as serve's id), clean session: with ids free, this
    # discards serve's session and its subscriptions.
    for stolen_id in ("mpfleet-serve", accounts[1]["host"]["username"]):
        intruder = connect(broker, "dev-a", stolen_id, clean=True)
        intruder.close()
    b = connect(broker, "dev-b", "dev-b")
    b.publish(STATUS.format("dev-b"), b'{"status":"SUCCEEDED"}')

    serve = connect(broker, "host", "mpfleet-serve", clean=False)
    assert serve.session_present, "serve's persistent session is gone"
    assert serve.wait_for(STATUS.format("dev-b")) == [b'{"status":"SUCCEEDED"}']


def test_device_cannot_take_over_another_devices_connection(broker, connect):
    b = connect(broker, "dev-b", "dev-b")
    b.subscribe("mpf/v1/dev-b/jobs")
    intruder = connect(broker, "dev-a", "dev-b")  # accepted, but as dev-a's own session
    host = connect(broker, "probe", "probe")
    host.publish("mpf/v1/dev-b/jobs", b"queue-for-b")
    got = b.wait_for("mpf/v1/dev-b/jobs")
    time.sleep(QUIET_S)
    assert b.disconnects == 0, "dev-a's credentials kicked dev-b off the broker"
    assert got == [b"queue-for-b"]
    assert intruder.payloads("mpf/v1/dev-b/jobs") == []


def test_one_account_holds_one_connection(broker, connect):
    """The binding's cost, why every host process beside serve needs an account of its own."""
    first = connect(broker, "probe", "ingest-1")
    second = connect(broker, "probe", "ingest-2")  # the same session: mosquitto drops the first
    deadline = time.monotonic() + 5
    while first.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.disconnects >= 1
    first.close()  # stop its reconnecting before it takes the session back
    second.subscribe("mpf/v1/dev-a/state")
    a = connect(broker, "dev-a", "dev-a")
    a.publish("mpf/v1/dev-a/state", b"still-served")
    assert second.wait_for("mpf/v1/dev-a/state") == [b"still-served"]


def test_queued_and_retained_messages_survive_a_broker_restart(broker, connect):
    _serve_session(broker, connect)
    a = connect(broker, "dev-a", "dev-a")
    statuses = [b'{"seq":%d}' % i for i in range(3)]
    for s in statuses:
        a.publish(STATUS.format("dev-a"), s)
    a.publish("mpf/v1/dev-a/state", b"state-a", retain=True)
    host = connect(broker, "probe", "probe")
    host.publish("mpf/v1/dev-a/jobs", b"queue-for-a", retain=True)
    a.close()
    host.close()

    broker.restart()  # stop (SIGTERM) and start with the same configuration and data dir

    serve = connect(broker, "host", "mpfleet-serve", clean=False)
    assert serve.session_present
    assert serve.wait_for(STATUS.format("dev-a"), count=3) == statuses
    a = connect(broker, "dev-a", "dev-a")
    a.subscribe("mpf/v1/dev-a/jobs")
    assert a.wait_for("mpf/v1/dev-a/jobs") == [b"queue-for-a"]
    serve.subscribe("mpf/v1/dev-a/state")
    assert serve.wait_for("mpf/v1/dev-a/state") == [b"state-a"]


def test_a_broker_kill_after_an_autosave_loses_nothing_saved(broker, connect):
    _serve_session(broker, connect)
    a = connect(broker, "dev-a", "dev-a")
    a.publish(STATUS.format("dev-a"), b"before-the-kill")
    host = connect(broker, "probe", "probe")
    host.publish("mpf/v1/dev-a/jobs", b"queue-for-a", retain=True)
    published = time.time()
    a.close()
    host.close()
    db = broker.workdir / "mosquitto.db"
    deadline = time.monotonic() + 5
    while not (db.exists() and db.stat().st_mtime > published) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.exists() and db.stat().st_mtime > published, "the broker did not autosave within 5 s"

    broker.kill()  # SIGKILL: nothing is saved on the way down
    broker.start()

    serve = connect(broker, "host", "mpfleet-serve", clean=False)
    assert serve.session_present
    assert serve.wait_for(STATUS.format("dev-a")) == [b"before-the-kill"]
    a = connect(broker, "dev-a", "dev-a")
    a.subscribe("mpf/v1/dev-a/jobs")
    assert a.wait_for("mpf/v1/dev-a/jobs") == [b"queue-for-a"]


def test_generated_mosquitto_conf_binds_client_ids_and_persists(tmp_path):
    """The mosquitto.conf that `broker config` writes, run as mosquitto runs it."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    store = Store(tmp_path / "db.sqlite")
    port = free_port()
    files = generate(store, tmp_path / "broker", devices=["dev-a", "dev-b"], listen=f"127.0.0.1:{port}",
                     data_dir=tmp_path / "data")
    creds = {"host": host_credentials(store), "dev-a": credentials_for(store, "dev-a")}
    store.close()
    conf = files.conf
    if os.geteuid() == 0:
        # As root mosquitto would drop to the `mosquitto` user, which cannot read our 0600
        # files; include the generated file unchanged from a configuration that stays root.
        (tmp_path / "root.conf").write_text(f"user root\ninclude_dir {files.conf.parent}\n")
        conf = tmp_path / "root.conf"

    def start() -> subprocess.Popen:
        log = open(tmp_path / "mosquitto.log", "ab")
        proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log)
        log.close()
        try:
            wait_for_port("127.0.0.1", port)
        except Exception:  # noqa: BLE001 - whatever failed, the broker is killed and its log shown
            proc.kill()
            proc.wait()
            raise AssertionError((tmp_path / "mosquitto.log").read_text(errors="replace")[-2000:]) from None
        return proc

    proc = start()
    made = []
    try:
        serve = Client("127.0.0.1", port, creds["host"], "mpfleet-serve", clean=False)
        serve.subscribe(STATUS.format("+"))
        serve.close()
        intruder = Client("127.0.0.1", port, creds["dev-a"], "mpfleet-serve")
        intruder.publish(STATUS.format("dev-a"), b"queued")
        intruder.close()
        proc.terminate()
        proc.wait(5)
        assert list(Path(tmp_path / "data").glob("mosquitto.db")), "no persistence file in the data dir"
        proc = start()
        serve = Client("127.0.0.1", port, creds["host"], "mpfleet-serve", clean=False)
        made.append(serve)
        assert serve.session_present
        assert serve.wait_for(STATUS.format("dev-a")) == [b"queued"]
    finally:
        for c in made:
            c.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(5)


def test_host_accounts_are_kept_and_rotated_with_the_rest(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    first = generate(store, tmp_path / "b1", devices=["dev-a"], accounts=["mpfleet-ingest"])
    assert first.host_accounts == ["mpfleet-ingest"]
    assert set(first.new) == {"dev-a", HOST_ENTRY, HOST_ACCOUNT_ENTRY + "mpfleet-ingest"}
    ingest = host_credentials(store, "mpfleet-ingest")
    assert ingest["username"] == "mpfleet-ingest" and len(ingest["password"]) == 24
    again = generate(store, tmp_path / "b2")  # not named again: kept, with its password
    assert again.host_accounts == ["mpfleet-ingest"] and again.devices == ["dev-a"] and again.new == []
    assert host_credentials(store, "mpfleet-ingest")["password"] == ingest["password"]
    assert "mpfleet-ingest:$" in again.passwd.read_text()
    assert "user mpfleet-ingest\ntopic readwrite mpf/v1/#" in again.acl.read_text()
    rotated = generate(store, tmp_path / "b3", rotate=True)
    assert HOST_ACCOUNT_ENTRY + "mpfleet-ingest" in rotated.new
    assert host_credentials(store, "mpfleet-ingest")["password"] != ingest["password"]
    with pytest.raises(BrokerConfigError, match="same name as a device"):
        generate(store, tmp_path / "b4", accounts=["dev-a"])
    store.close()


def test_generated_conf_declares_its_listener_before_the_binding(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    files = generate(store, tmp_path / "b", devices=["dev-a"], listen="[::1]:8884")
    store.close()
    lines = [line for line in files.conf.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[:2] == ["listener 8884 ::1", "use_username_as_clientid true"]
    assert lines.count("use_username_as_clientid true") == 1 and sum(x.startswith("listener") for x in lines) == 1
    assert "persistence true" in lines and f"persistence_location {tmp_path.resolve() / 'b' / 'data'}/" in lines
    assert files.data_dir == (tmp_path / "b" / "data").resolve() and files.data_dir.is_dir()


def test_cli_broker_config_listen_and_host_accounts(tmp_path):
    cmd = [sys.executable, "-m", "mpfleet", "broker", "config", "--db", str(tmp_path / "db.sqlite"),
           "--out", str(tmp_path / "out"), "--device", "dev-1", "--plaintext"]
    done = subprocess.run(cmd + ["--host-account", "mpfleet-ingest", "--listen", "1884", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["host_user"] == "mpfleet-host" and out["host_accounts"] == ["mpfleet-ingest"]
    assert out["listen"] == "1884" and out["data_dir"] == str((tmp_path / "out" / "data").resolve())
    assert "use_username_as_clientid true" in out["conf_lines"]
    assert "\nlistener 1884\n" in (tmp_path / "out" / "mosquitto.conf").read_text()
    for bad, message in ((["--listen", "::1"]), "brackets"), ((["--host-account", "no spaces"]), "account name"):
        refused = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
