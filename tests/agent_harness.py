"""A device running the real agent on a virtual board, with a real broker and ingester."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

from conftest import firmware_files

from mpfleet.fleet.ingest import Ingester
from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.broker.link import parse_broker_url
from mpfleet.sim import VirtualBoard
from mpfleet.db.store import Store

WIFI = {"lab": {"password": "pw", "rssi": -58}}


def device_config(device_id: str, broker_port: int, **overrides) -> dict:
    cfg = {
        "device_id": device_id,
        "wifi": {"ssid": "lab", "password": "pw", "connect_timeout_ms": 500},
        "broker": {"host": "127.0.0.1", "port": broker_port, "timeout_ms": 1500},
        "sample_interval_s": 60,
        "upload_every_wakes": 5,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def make_device(path: Path, broker_port: int, device_id: str | None = None, clock_s: float | None = None,
                **overrides) -> VirtualBoard:
    """A provisioned virtual board: firmware, config, Wi-Fi world, power on.

    The device id defaults to one unique to the board's directory, so tests on
    one broker do not see each other's retained messages."""
    if device_id is None:
        device_id = "dev-" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    vb = VirtualBoard.create(path, device_id=device_id)
    vb.set_wifi(networks=WIFI, connect_ms=10)
    files = firmware_files()
    files["/config.json"] = json.dumps(device_config(device_id, broker_port, **overrides)).encode()
    vb.fs_put(files)
    vb.power_on(clock_s=time.time() if clock_s is None else clock_s)
    return vb


def flushed_seqs(output: str) -> set[int]:
    out: set[int] = set()
    for a, b in re.findall(r"flushed (\d+) (\d+)", output):
        out.update(range(int(a), int(b) + 1))
    return out


def last_state(vb: VirtualBoard, store: Store) -> dict | None:
    dev = store.device(vb.device_id)
    return dev["state"] if dev else None


def provisioned_on_sight(store: Store, device: str) -> bool:
    """The membership rule of these tests: every device a test makes is one it
    provisioned, so the first message of an unknown id registers it (as
    `mpfleet devices add` would have). Fleet isolation itself is tested in
    tests/host/test_strangers.py and tests/e2e/test_shared_broker.py."""
    if not store.is_member(device):
        store.add_device(device)
    return True


def wait(predicate, timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Until `predicate()` is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class FleetEnv:
    """The host's side of a fleet in one directory, on one broker: the database (`db`,
    else root/mpfleet.db), an initialised key ring and the rollout engine (what `mpfleet
    keys init` and `mpfleet job create` use). The caller closes `store`."""

    poll_s = 0.1  # how often `wait` asks

    def __init__(self, root: Path, broker, db: Path | None = None):
        self.root = root
        self.broker = broker
        self.cfg = parse_broker_url(broker.url)
        self.db = db or root / "mpfleet.db"
        self.keys = root / "keys"
        self.store = Store(self.db)
        self.ring = KeyRing(self.store, self.keys)
        self.ring.init()
        self.engine = RolloutEngine(self.store, self.ring, Registry(self.store))

    @classmethod
    def wait(cls, predicate, timeout: float, what: str) -> None:
        wait(predicate, timeout, what, cls.poll_s)


class Host:
    """The ingest side: an Ingester on the broker and a Store to read."""

    def __init__(self, broker, db_path: Path, client_id: str = "ingest-test"):
        self.ingester = Ingester(parse_broker_url(broker.url), db_path, client_id=client_id,
                                 member=provisioned_on_sight)
        self.db_path = db_path
        self.store = Store(db_path)

    def start(self) -> "Host":
        self.ingester.start()
        return self

    def stop(self) -> None:
        self.ingester.stop()

    def close(self) -> None:
        self.stop()
        self.store.close()

    def rows(self, device: str) -> list:
        return list(self.store.samples(device))

    def wait_idle(self, quiet_s: float = 0.3, timeout_s: float = 15.0) -> None:
        """Wait until the ingester has taken nothing new for `quiet_s` (what the
        broker held for it has drained), at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            now = self.ingester.stats.as_dict()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.05)


class JobDesk:
    """The host side of signed jobs in tests: signs, publishes a device's
    retained queue, and collects what the device reports on jobs/status."""

    def __init__(self, broker, device_id: str, key=None):
        import threading

        import paho.mqtt.client as mqtt

        from mpfleet.protocol.signing import SigningKey

        self.device_id = device_id
        self.key = key or SigningKey.generate()
        self.next_seq = 1
        self.statuses: list[dict] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"desk-{device_id}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"mpf/v1/{device_id}/jobs/status", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.statuses.append(json.loads(msg.payload))

    def trusted(self) -> dict:
        return {self.key.kid: self.key.public_b64}

    def job(self, type_: str, params: dict | None = None, targets=None, seq: int | None = None,
            job_id: str | None = None, **extra) -> tuple[dict, str]:
        if seq is None:
            seq = self.next_seq
        self.next_seq = max(self.next_seq, seq + 1)
        payload = {"id": job_id or f"job-{seq}", "seq": seq, "type": type_, "params": params or {},
                   "targets": targets if targets is not None else [self.device_id], "iat": int(time.time())}
        payload.update(extra)
        return payload, self.key.sign(payload)

    def publish_queue(self, envelopes: list[str]) -> None:
        self.client.publish(f"mpf/v1/{self.device_id}/jobs", json.dumps(envelopes), qos=1,
                            retain=True).wait_for_publish(5)

    def final(self, again: bool = False) -> dict[str, list[dict]]:
        """{job id: [final statuses]} (SUCCEEDED, FAILED, REJECTED). The desk leaves
        finished jobs in the queue, so the device reports them again at each wake
        ({"reported_again": true}); those are left out unless `again`."""
        out: dict[str, list[dict]] = {}
        with self._lock:
            for s in self.statuses:
                repeat = isinstance(s.get("detail"), dict) and s["detail"].get("reported_again") is True
                if s["status"] in ("SUCCEEDED", "FAILED", "REJECTED") and repeat == again:
                    out.setdefault(s["job"], []).append(s)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
