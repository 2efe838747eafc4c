"""MQTT over TLS with a certificate per device (issue 16), end to end: real mosquitto
with a TLS-only listener (require_certificate, use_identity_as_username, the CRL,
the per-device ACL), the fleet CA of mpfleet.fleet.certs, virtual boards running the
real agent, and a host that connects with its own client certificate.

A small loopback relay sits between a device and the broker where a test needs to
see the wire: it records every byte each way, so a test can search the capture for
plaintext, or read the TLS record types a device sent.

On the unix port mbedTLS checks certificate validity against the host's clock, not
the board's (docs/agent.md, "TLS"): the clock-floor test checks what the agent does
to its RTC, not what mbedTLS would make of an unset one.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_harness import make_device
from conftest import STRESS
from invariants import read_files
from wirecap import Relay, tls_record_types

from mpfleet.broker.config import acl_text, tls_listener_lines
from mpfleet.broker.local import LocalBroker, find_mosquitto
from mpfleet.fleet.certs import FleetCA
from mpfleet.protocol.codec import FrameError, decode_frame
from mpfleet.protocol.signing import SigningKey
from mpfleet.sim import VirtualBoard

UTC = dt.timezone.utc
HOST_ACCOUNT = "mpfleet-host"
# Every device id of the module's main broker: the ACL names each (acl_text).
DEVICES = ["tls-a", "tls-b", "tls-plain", "tls-other", "tls-expired", "tls-r1", "tls-r2", "tls-badca",
           "tls-badname", "tls-renew", "tls-refused", "tls-clock", "tls-noca", "tls-wrongcn", "tls-cajob"]
SWEEP_CN = "tls-sweep"  # every sweep device presents a certificate for this one name
KEY = SigningKey.generate()
CLOCK_SET_AFTER = 1577836800


# ---------------------------------------------------------------- the host
class TlsHost:
    """The host side on the TLS listener with its own client certificate: collects
    states, statuses and sample frames of every device, acks frames (with its time,
    as the ingester does) and publishes job queues."""

    def __init__(self, port: int, ca_file: Path, cert_files: tuple[Path, Path], client_id: str = HOST_ACCOUNT):
        self.lock = threading.Lock()
        self.states: dict[str, list[dict]] = {}
        self.statuses: dict[str, list[dict]] = {}
        self.frames: dict[str, list[bytes]] = {}
        self.acked: dict[str, int] = {}
        self.connected = threading.Event()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(ca_file))
        ctx.load_cert_chain(str(cert_files[0]), str(cert_files[1]))
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.tls_set_context(ctx)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: self.connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([("mpf/v1/+/state", 1), ("mpf/v1/+/jobs/status", 1), ("mpf/v1/+/samples", 1)])
        self.client.loop_start()
        assert self.connected.wait(10), "the host could not connect over TLS with its certificate"

    def _on_message(self, client, userdata, msg) -> None:
        parts = msg.topic.split("/")
        device, leaf = parts[2], "/".join(parts[3:])
        with self.lock:
            if leaf == "samples":
                self.frames.setdefault(device, []).append(bytes(msg.payload))
                try:
                    frame = decode_frame(msg.payload)
                except FrameError:
                    return
                last = frame.first_seq + frame.count - 1
                acked = self.acked.get(device, frame.first_seq - 1)
                if frame.first_seq <= acked + 1 and last > acked:
                    acked = last
                self.acked[device] = acked
                ack = json.dumps({"upto": acked, "time": int(time.time())})
                client.publish(f"mpf/v1/{device}/samples/ack", ack, qos=1, retain=True)
            elif leaf == "state" and not msg.retain:
                self.states.setdefault(device, []).append(json.loads(msg.payload))
            elif leaf == "jobs/status":
                self.statuses.setdefault(device, []).append(json.loads(msg.payload))

    def flush(self) -> None:
        """Everything the broker took before now has reached us (ordered delivery)."""
        done = threading.Event()
        mark = f"mpf/v1/{HOST_ACCOUNT}-mark/state"
        self.client.message_callback_add(mark, lambda c, u, m: done.set())
        self.client.subscribe(mark, 1)
        self.client.publish(mark, b"{}", qos=1)
        done.wait(5)
        self.client.message_callback_remove(mark)

    def states_of(self, device: str) -> list[dict]:
        self.flush()
        with self.lock:
            return list(self.states.get(device, []))

    def final(self, device: str) -> dict[str, set]:
        """{job id: {(status, attempt)}} of the final statuses the device reported."""
        self.flush()
        out: dict[str, set] = {}
        with self.lock:
            for s in self.statuses.get(device, []):
                if s["status"] in ("SUCCEEDED", "FAILED", "REJECTED"):
                    out.setdefault(s["job"], set()).add((s["status"], s["attempt"]))
        return out

    def details(self, device: str, job: str) -> list:
        with self.lock:
            return [s.get("detail") for s in self.statuses.get(device, []) if s["job"] == job]

    def forget(self, device: str) -> None:
        """Start afresh with `device`: what it reported, its ack and its queue, gone
        (a sweep runs every cut point as the same device)."""
        self.flush()
        for leaf in ("samples/ack", "jobs"):
            self.client.publish(f"mpf/v1/{device}/{leaf}", b"", qos=1, retain=True).wait_for_publish(5)
        with self.lock:
            for records in (self.states, self.statuses, self.frames, self.acked):
                records.pop(device, None)

    def publish_queue(self, device: str, envelopes: list[str]) -> None:
        self.client.publish(f"mpf/v1/{device}/jobs", json.dumps(envelopes), qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------- fixtures
def _tls_lines(ca: FleetCA, acl: Path | None) -> list[str]:
    """The listener `mpfleet broker config` writes (tls_listener_lines), for the broker
    certificate in `ca`'s directory."""
    return tls_listener_lines(ca, acl)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = FleetCA(root / "fleet")
    ca.init()
    ca.issue_broker(["127.0.0.1", "localhost"])
    host = ca.issue_host(HOST_ACCOUNT)
    # The same CA, a broker certificate for another name (copied aside: issue_broker
    # writes broker.crt/.key in the CA's directory).
    twin = FleetCA(root / "twin")
    twin.dir.mkdir()
    for name in ("ca.key", "ca.crt", "crl.pem"):
        shutil.copy2(ca.dir / name, twin.dir / name)
    twin.issue_broker(["broker.example.org"])
    other = FleetCA(root / "other")
    other.init()
    other.issue_broker(["127.0.0.1", "localhost"])
    return {"ca": ca, "host": host, "twin": twin, "other": other, "root": root}


@pytest.fixture(scope="module")
def world(pki):
    """The fleet's TLS-only broker with the per-device ACL, and the host on it."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    acl = pki["root"] / "acl"
    acl.write_text(acl_text(DEVICES, host_user=HOST_ACCOUNT))
    ca = pki["ca"]
    with LocalBroker(extra_config=_tls_lines(ca, acl)) as broker:
        host = TlsHost(broker.port, ca.cert_path, pki["host"])
        try:
            yield broker, host
        finally:
            host.close()


def device(tmp_path: Path, device_id: str, port: int, pki, identity: bytes | None = None, ca_der: bytes | None = None,
           **overrides) -> VirtualBoard:
    """A provisioned board for TLS: config, /tls/ca.der and /tls/id.der (a fresh
    certificate for `device_id` unless `identity` is given)."""
    ca = pki["ca"]
    broker = {"host": "127.0.0.1", "port": port, "tls": True, "tls_hostname": "127.0.0.1"}
    broker.update(overrides.pop("broker", {}))
    overrides.setdefault("upload_every_wakes", 1)
    vb = make_device(tmp_path / device_id, port, device_id=device_id, trusted_keys={KEY.kid: KEY.public_b64},
                     broker=broker, **overrides)
    files = {"/tls/ca.der": ca.ca_der() if ca_der is None else ca_der}
    files["/tls/id.der"] = identity if identity is not None else ca.issue_device(device_id).identity()
    vb.fs_put({k: v for k, v in files.items() if v})
    return vb


def wake(vb: VirtualBoard, n: int = 1) -> str:
    out = []
    for _ in range(n):
        rec = vb.boot(clock_scale=0)
        assert "Traceback" not in rec.output, rec.output
        assert rec.exit_reason in ("deepsleep", "reset"), (rec.exit_reason, rec.output[-2000:])
        out.append(rec.output)
    return "".join(out)


def signed(device_id: str, type_: str, params: dict, seq: int, job_id: str) -> str:
    return KEY.sign({"id": job_id, "seq": seq, "type": type_, "params": params, "targets": [device_id],
                     "iat": int(time.time())})


def cert_job(device_id: str, identity: bytes, seq: int = 1, job_id: str = "cert-1", **params) -> str:
    return signed(device_id, "cert", {"identity": base64.b64encode(identity).decode(), **params}, seq, job_id)


def upload_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("upload failed:")]


def sighup(broker: LocalBroker) -> None:
    """mosquitto re-reads its certificates and the CRL on SIGHUP."""
    broker.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)


# ---------------------------------------------------------------- the tests
def test_uploads_and_a_signed_job_over_mutual_tls_leave_no_plaintext_on_the_wire(tmp_path, world, pki,
                                                                                   mosquitto):
    broker, host = world
    relay = Relay(broker.port)
    try:
        vb = device(tmp_path, "tls-a", relay.port, pki)
        env = signed("tls-a", "diag", {}, 1, "diag-1")
        host.publish_queue("tls-a", [env])
        out = wake(vb, 2)
        assert host.final("tls-a") == {"diag-1": {("SUCCEEDED", 1)}}, out[-3000:]
        frames = host.frames.get("tls-a", [])
        assert frames and all(decode_frame(f).device_id == "tls-a" for f in frames)
        assert host.states_of("tls-a")[-1]["last_error"] is None
        wire = relay.up() + relay.down()
        assert b"\x17\x03\x03" in relay.up(), "the device sent TLS application data"
        assert b"mpf/v1/tls-a" not in wire, "a topic name in the clear"
        assert env[:40].encode() not in wire and b"mpf1." not in wire, "an envelope in the clear"
        for f in frames:
            assert f[:24] not in wire, "a sample frame in the clear"
    finally:
        relay.close()

    # The control: the same search on a plaintext run finds all of them.
    from agent_harness import JobDesk

    desk = JobDesk(mosquitto, "tls-plain", KEY)
    relay = Relay(mosquitto.port)
    try:
        vb = make_device(tmp_path / "plain", relay.port, device_id="tls-plain", upload_every_wakes=1,
                         trusted_keys={KEY.kid: KEY.public_b64})
        desk.publish_queue([signed("tls-plain", "diag", {}, 1, "diag-1")])
        wake(vb, 1)
        wire = relay.up() + relay.down()
        assert b"mpf/v1/tls-plain/samples" in wire and b"mpf1." in wire
    finally:
        relay.close()
        desk.close()


def test_a_device_with_bs_certificate_can_act_only_as_b(tmp_path, world, pki):
    broker, host = world
    before = len(host.states_of("tls-a"))
    frames_before = len(host.frames.get("tls-a", []))
    # (A short broker timeout: mosquitto drops the denied QoS 1 publish without a PUBACK.)
    impostor = device(tmp_path, "tls-a", broker.port, pki, identity=pki["ca"].issue_device("tls-b").identity(),
                      broker={"timeout_ms": 400})
    out = wake(impostor, 1)
    # The broker took the certificate (a member of the fleet: the handshake and
    # CONNECT pass) but knows the device as tls-b, whose ACL has no tls-a topic:
    # what it publishes as tls-a is dropped and nothing of tls-a reaches it.
    assert not [e for e in upload_errors(out) if "TLS" in e or "CONNACK" in e], out[-1500:]
    assert len(host.states_of("tls-a")) == before, "the host heard tls-a from a device holding tls-b's certificate"
    assert len(host.frames.get("tls-a", [])) == frames_before, "samples of tls-a from tls-b's certificate"
    # The same board with its own certificate is heard at once (the check can fail).
    impostor.fs_put({"/tls/id.der": pki["ca"].issue_device("tls-a").identity()})
    wake(impostor, 1)
    assert len(host.states_of("tls-a")) == before + 1


def test_certificates_of_another_ca_or_expired_are_refused(tmp_path, world, pki):
    broker, host = world
    now = dt.datetime.now(UTC)
    cases = {
        "tls-other": pki["other"].issue_device("tls-other").identity(),
        "tls-expired": pki["ca"].issue_device("tls-expired", not_before=now - dt.timedelta(days=30),
                                              not_after=now - dt.timedelta(days=1)).identity(),
    }
    for device_id, identity in cases.items():
        vb = device(tmp_path, device_id, broker.port, pki, identity=identity)
        errors = upload_errors(wake(vb, 1))
        assert errors and "refused this device's certificate?" in errors[0], (device_id, errors)
        assert host.states_of(device_id) == [], device_id


def test_a_revoked_device_is_refused_at_its_next_connect_and_the_others_carry_on(tmp_path, world, pki):
    broker, host = world
    ca = pki["ca"]
    r1, r2 = ca.issue_device("tls-r1"), ca.issue_device("tls-r2")
    d1 = device(tmp_path, "tls-r1", broker.port, pki, identity=r1.identity())
    d2 = device(tmp_path, "tls-r2", broker.port, pki, identity=r2.identity())
    wake(d1)
    wake(d2)
    assert len(host.states_of("tls-r1")) == 1 and len(host.states_of("tls-r2")) == 1
    ca.revoke_serial(r1.serial)
    sighup(broker)
    errors = upload_errors(wake(d1))
    wake(d2)
    assert errors and "refused this device's certificate?" in errors[0], errors
    assert len(host.states_of("tls-r1")) == 1, "the revoked device reached the host"
    assert len(host.states_of("tls-r2")) == 2, "a device that was not revoked was cut off"


def _refusing_broker(ca: FleetCA) -> LocalBroker:
    return LocalBroker(extra_config=_tls_lines(ca, None) + ["log_type notice", "connection_messages true"])


@pytest.mark.parametrize("case", ["another CA", "another host name"])
def test_the_device_refuses_a_broker_it_cannot_verify_and_sends_it_nothing(tmp_path, pki, case):
    device_id, ca, cause = {
        "another CA": ("tls-badca", pki["other"], "not correctly signed by the trusted CA"),
        "another host name": ("tls-badname", pki["twin"], "does not match"),
    }[case]
    with _refusing_broker(ca) as broker:
        relay = Relay(broker.port)
        try:
            vb = device(tmp_path, device_id, relay.port, pki)
            first = wake(vb, 1)
            errors = upload_errors(first)
            assert errors and "TLS handshake" in errors[0] and cause in errors[0], errors
            for up, _down in relay.sessions:
                types = set(tls_record_types(bytes(up)))
                assert types and types <= {0x15, 0x16}, f"the device sent more than a handshake: {sorted(types)}"
            log = (broker.workdir / "mosquitto.log").read_text(errors="replace")
            assert f"as {device_id}" not in log and "New client connected" not in log, log[-1500:]
            # It backs off like any broker failure: the next wake does not try.
            tried = len(relay.sessions)
            wake(vb, 1)
            assert len(relay.sessions) == tried
            wake(vb, 1)
            assert len(relay.sessions) == tried + 1
        finally:
            relay.close()


def test_plaintext_mqtt_to_the_tls_listener_is_refused(tmp_path, world):
    broker, host = world
    connect = bytes([0x10, 16, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 4]) + b"peek"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=3) as s:
        s.sendall(connect)
        try:
            answer = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"\x20"), f"the TLS listener answered plaintext MQTT with {answer!r}"
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plain-peek", protocol=mqtt.MQTTv311)
    got = threading.Event()
    c.on_connect = lambda *a, **k: got.set()
    try:
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        assert not got.wait(2), "paho got a CONNACK in plaintext from the TLS listener"
    except OSError:
        pass
    finally:
        c.loop_stop()


def test_a_device_without_the_fleet_ca_never_connects_unverified(tmp_path, world, pki):
    broker, host = world
    vb = device(tmp_path, "tls-noca", broker.port, pki, ca_der=b"")
    errors = upload_errors(wake(vb, 1))
    assert errors == ["upload failed: no /tls/ca.der: provision the device for TLS"], errors
    assert host.states_of("tls-noca") == []


def test_a_damaged_identity_is_a_broker_failure_with_its_cause(tmp_path, world, pki):
    broker, host = world
    whole = pki["ca"].issue_device("tls-noca").identity()
    vb = device(tmp_path, "tls-noca", broker.port, pki, identity=whole[:-7])
    errors = upload_errors(wake(vb, 1))
    assert len(errors) == 1 and errors[0].startswith("upload failed: /tls/id.der: DER:"), errors
    assert host.states_of("tls-noca") == []


def _tls_files(vb: VirtualBoard) -> dict[str, bytes | None]:
    from invariants import read_files

    return read_files(vb, ["/tls/id.der", "/tls/id.try", "/tls/id.bad", "/tls/id.try.tmp"])


def _run_until_final(vb, host, device_id, job_id, wakes=8) -> dict:
    for _ in range(wakes):
        wake(vb)
        if job_id in host.final(device_id):
            break
    return host.final(device_id)


def test_a_cert_job_renews_the_certificate_and_the_next_connect_uses_it(tmp_path, world, pki):
    broker, host = world
    ca = pki["ca"]
    old, new = ca.issue_device("tls-renew"), ca.issue_device("tls-renew")
    vb = device(tmp_path, "tls-renew", broker.port, pki, identity=old.identity())
    host.publish_queue("tls-renew", [cert_job("tls-renew", new.identity())])
    final = _run_until_final(vb, host, "tls-renew", "cert-1")
    assert final == {"cert-1": {("SUCCEEDED", 1)}}, host.details("tls-renew", "cert-1")
    files = _tls_files(vb)
    assert files["/tls/id.der"] == new.identity()
    assert files["/tls/id.try"] is None and files["/tls/id.bad"] is None
    assert b"identity" not in (vb.fs_get("/jobs.json") or b""), "the new key stayed in the job state"
    # The old certificate is revoked: the device still connects, so it presents the new one.
    ca.revoke_serial(old.serial)
    sighup(broker)
    seen = len(host.states_of("tls-renew"))
    out = wake(vb)
    assert upload_errors(out) == []
    assert len(host.states_of("tls-renew")) == seen + 1


def test_a_cert_job_the_broker_refuses_is_reverted_and_reported_failed(tmp_path, world, pki):
    broker, host = world
    old = pki["ca"].issue_device("tls-refused")
    foreign = pki["other"].issue_device("tls-refused")
    vb = device(tmp_path, "tls-refused", broker.port, pki, identity=old.identity())
    host.publish_queue("tls-refused", [cert_job("tls-refused", foreign.identity(), trial_wakes=2)])
    outputs = []
    for _ in range(8):
        outputs.append(wake(vb))
        if "cert-1" in host.final("tls-refused"):
            break
    final = host.final("tls-refused")
    assert final == {"cert-1": {("FAILED", 1)}}, final
    detail = [d for d in host.details("tls-refused", "cert-1") if isinstance(d, str) and "reverted" in d]
    assert detail and "broker refused the new certificate" in detail[0], host.details("tls-refused", "cert-1")
    tried = [o for o in outputs if "refused this device's certificate?" in o]
    assert len(tried) == 2, "the trial took exactly trial_wakes failed connections"
    files = _tls_files(vb)
    assert files["/tls/id.der"] == old.identity()
    assert files["/tls/id.try"] is None and files["/tls/id.bad"] is None
    seen = len(host.states_of("tls-refused"))
    assert upload_errors(wake(vb)) == [] and len(host.states_of("tls-refused")) == seen + 1
    # The first wake back on the old certificate told the host why the trial's could
    # not connect, once: the next state has no failure to report, and the record is gone.
    states = host.states_of("tls-refused")
    reported = [s["last_failure"] for s in states if s.get("last_failure")]
    assert len(reported) == 1 and "refused this device's certificate?" in reported[0]["error"], reported
    assert "last_failure" not in states[-1]
    assert read_files(vb, ["/failure.json"])["/failure.json"] is None


def test_a_cert_job_with_another_devices_certificate_fails_and_changes_nothing(tmp_path, world, pki):
    """The broker would take it (the fleet's CA) and then confine the device to the
    other device's topics, for good: the device refuses it before any trial."""
    broker, host = world
    mine = pki["ca"].issue_device("tls-wrongcn")
    vb = device(tmp_path, "tls-wrongcn", broker.port, pki, identity=mine.identity())
    host.publish_queue("tls-wrongcn", [cert_job("tls-wrongcn", pki["ca"].issue_device("tls-b").identity())])
    final = _run_until_final(vb, host, "tls-wrongcn", "cert-1", wakes=3)
    assert final == {"cert-1": {("FAILED", 1)}}, final
    assert "the certificate is for tls-b" in str(host.details("tls-wrongcn", "cert-1"))
    files = _tls_files(vb)
    assert files["/tls/id.der"] == mine.identity() and files["/tls/id.try"] is None


def test_a_cert_job_that_would_change_the_fleet_ca_of_a_tls_device_fails_and_changes_nothing(tmp_path, world,
                                                                                              pki):
    """The CA is what the device checks its broker against: a job may send it only to a
    device that does not use TLS yet (devices cert migrate), never swap it under TLS."""
    broker, host = world
    mine = pki["ca"].issue_device("tls-cajob")
    vb = device(tmp_path, "tls-cajob", broker.port, pki, identity=mine.identity())
    new = pki["other"].issue_device("tls-cajob")
    host.publish_queue("tls-cajob", [cert_job("tls-cajob", new.identity(),
                                              ca=base64.b64encode(pki["other"].ca_der()).decode())])
    final = _run_until_final(vb, host, "tls-cajob", "cert-1", wakes=3)
    assert final == {"cert-1": {("FAILED", 1)}}, final
    assert "the fleet CA cannot change" in str(host.details("tls-cajob", "cert-1"))
    files = read_files(vb, ["/tls/id.der", "/tls/id.try", "/tls/ca.der"])
    assert files == {"/tls/id.der": mine.identity(), "/tls/id.try": None, "/tls/ca.der": pki["ca"].ca_der()}
    assert upload_errors(wake(vb)) == []


def test_an_unset_clock_is_moved_to_the_floor_before_the_handshake_and_never_back(tmp_path, world, pki):
    broker, host = world
    ident = pki["ca"].issue_device("tls-clock")
    floor = max(ident.not_before.timestamp(), pki["ca"].certificate().not_valid_before_utc.timestamp(),
                dt.datetime(2026, 12, 1, tzinfo=UTC).timestamp())
    vb = device(tmp_path, "tls-clock", broker.port, pki, identity=ident.identity())
    vb.power_on()  # power lost: the RTC restarts at 2000-01-01
    assert vb.clock_s < CLOCK_SET_AFTER
    out = wake(vb, 1)
    assert "tls: clock set forward to its floor" in out, out[-1500:]
    first = host.states_of("tls-clock")[0]
    assert first["rtc_lost"] is True and first["time"] >= int(floor), (first["time"], floor)
    wake(vb, 3)
    times = [s["time"] for s in host.states_of("tls-clock")]
    assert times == sorted(times), f"the clock went backwards: {times}"
    assert times[-1] >= time.time() - 120, "the host's time (the ack) set the clock after the floor"


# ---------------------------------------------------------------- power cuts
# Every flash operation of the renewal path, as tests/e2e/test_promise_powercut.py
# sweeps the other job kinds: the board is snapshotted before each wake from the
# queue to the job's end; each snapshot's wake is run uncut to count its flash
# operations N, then cut at k (every k in 1..N under `make stress`, a deterministic
# slice in `make test`), and the device recovers over a few wakes. Every cut point
# runs as the same device, SWEEP_CN (a certificate is for one device id, and the
# agent refuses a renewal for another), on a broker of its own: the host forgets the
# device, its retained ack and queue are published afresh before each point.
STRIDE = 10
RECOVERY_WAKES = 6
LIFE_WAKES = 6


@pytest.fixture(scope="module")
def sweep_world(pki):
    ca = pki["ca"]
    with LocalBroker(extra_config=_tls_lines(ca, None)) as broker:
        host = TlsHost(broker.port, ca.cert_path, pki["host"])
        try:
            yield broker, host
        finally:
            host.close()


def sweep_points(n: int, phase: int) -> list[int]:
    """Every cut point under `make stress`; else the first, every STRIDE-th of the
    job's first wake, and the last two of every wake (where the commits land)."""
    if STRESS:
        return list(range(1, n + 1))
    picked = set(range(1, n + 1, STRIDE)) if phase == 0 else {1}
    picked |= {k for k in (n - 1, n) if k >= 1}
    return sorted(k for k in picked if 1 <= k <= n)


class RenewalSweep:
    def __init__(self, root: Path, world, pki, name: str, new_identity: bytes, want: str):
        self.broker, self.host = world
        self.pki = pki
        self.root = root / name
        self.root.mkdir()
        self.name = name
        self.old = pki["ca"].issue_device(SWEEP_CN).identity()
        self.new = new_identity
        self.want = want  # the uncut run's final status
        self.violations: dict[str, list[str]] = {}
        self.points = 0

    def queue(self, device_id: str) -> list[str]:
        return [cert_job(device_id, self.new, trial_wakes=1)]

    def boot(self, vb: VirtualBoard, cut: int | None = None):
        before = vb.counters()["ops"]
        if cut is not None:
            vb.schedule_power_cut(after_ops=cut, seed=cut)
        rec = vb.boot(clock_scale=0)
        if vb.state.get("cut_after_ops") is not None:
            vb.state["cut_after_ops"] = None
            vb.save()
        if rec.exit_reason == "power_cut":
            vb.power_on(clock_s=vb.clock_s + 5)
        return rec, vb.counters()["ops"] - before

    def build(self) -> list[Path]:
        base = SWEEP_CN
        self.host.forget(base)
        vb = device(self.root, base, self.broker.port, self.pki, identity=self.old)
        for _ in range(2):
            self.boot(vb)
        self.host.publish_queue(base, self.queue(base))
        snaps = []
        for phase in range(LIFE_WAKES):
            self.host.flush()
            snap = self.root / f"snap-{phase}"
            shutil.copytree(vb.path, snap)
            snaps.append(snap)
            self.boot(vb)
            if "cert-1" in self.host.final(base):
                return snaps
        pytest.fail(f"{self.name}: the uncut template did not end its cert job in {LIFE_WAKES} wakes")

    def restore(self, snap: Path) -> VirtualBoard:
        work = self.root / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(snap, work)
        self.host.forget(SWEEP_CN)
        self.host.publish_queue(SWEEP_CN, self.queue(SWEEP_CN))
        return VirtualBoard(work)

    def run_point(self, snap: Path, phase: int, k: int | None) -> int:
        device_id = SWEEP_CN
        label = f"phase {phase} " + (f"cut at op {k}" if k else "uncut")
        vb = self.restore(snap)
        rec, ops = self.boot(vb, cut=k)
        outputs = [rec.output]
        if k and rec.exit_reason != "power_cut":
            label += f" (no cut came: the wake took {ops} ops)"
        for _ in range(RECOVERY_WAKES):
            if "cert-1" in self.host.final(device_id):
                break
            outputs.append(self.boot(vb)[0].output)
        # One more wake after the end: the device reaches its broker.
        seen = len(self.host.states_of(device_id))
        last, _ = self.boot(vb)
        outputs.append(last.output)
        self.points += 1
        out = []
        text = "".join(outputs)
        if "Traceback" in text:
            out.append("a wake raised: " + text[text.index("Traceback"):][:300])
        statuses = {s for s, _attempt in self.host.final(device_id).get("cert-1", set())}
        if len(statuses) != 1:
            out.append(f"the job ended {sorted(statuses) or 'nowhere'}, not exactly once")
        elif not k and statuses != {self.want}:
            out.append(f"uncut, the job ended {sorted(statuses)}, not {self.want}")
        files = _tls_files(vb)
        want_id = self.new if statuses == {"SUCCEEDED"} else self.old
        if files["/tls/id.der"] != want_id:
            out.append(f"ended {sorted(statuses)} but /tls/id.der is "
                       + ("the new identity" if files["/tls/id.der"] == self.new else
                          "the old identity" if files["/tls/id.der"] == self.old else "neither identity"))
        if files["/tls/id.bad"] is not None:
            out.append("/tls/id.bad was left behind")
        if len(self.host.states_of(device_id)) != seen + 1 or upload_errors(last.output):
            out.append(f"the wake after the end did not reach the broker: {upload_errors(last.output)}")
        if out:
            self.violations[label] = out
            if len(self.violations) <= 2:
                shutil.copytree(vb.path, self.root / f"failed-p{phase}-k{k or 0}")
        return ops

    def report(self) -> str:
        lines = [f"{self.name}: {len(self.violations)} of {self.points} runs broke a promise"]
        for label, out in list(self.violations.items())[:10]:
            lines += [f"  {label}:"] + [f"    - {v}" for v in out]
        return "\n".join(lines)


@pytest.mark.parametrize("kind", ["renew", "refused"])
def test_power_cuts_at_every_flash_operation_of_a_renewal_leave_a_device_that_connects(tmp_path, sweep_world,
                                                                                        pki, kind):
    if kind == "renew":
        new, want = pki["ca"].issue_device(SWEEP_CN).identity(), "SUCCEEDED"
    else:
        new, want = pki["other"].issue_device(SWEEP_CN).identity(), "FAILED"
    sweep = RenewalSweep(tmp_path, sweep_world, pki, f"tlspc-{kind}", new, want)
    sizes = []
    for phase, snap in enumerate(sweep.build()):
        n = sweep.run_point(snap, phase, None)
        points = sweep_points(n, phase)
        sizes.append((phase, n, len(points)))
        for k in points:
            sweep.run_point(snap, phase, k)
    print("sweep", kind, json.dumps({"phases": sizes, "stress": STRESS}))
    assert sum(n for _, n, _ in sizes) > 0
    assert not sweep.violations, sweep.report()


def test_a_tls_wake_fits_the_heap_budget_and_costs_little_more_than_plaintext(tmp_path, world, pki, mosquitto):
    """The smallest heap an upload wake completes in (mpfleet.sim.heap), over TLS and
    in plaintext, both with a host that acks. mbedTLS's own buffers are not in this
    number on either port (docs/agent.md, "TLS": libc malloc on the unix port, the IDF
    heap on the ESP32); what it counts is the agent's side: the CA and identity bytes,
    agent.tlsid, the ssl objects."""
    from agent_harness import Host
    from mpfleet.sim.heap import heap_needed

    def completes(rec) -> bool:
        return (rec.exit_reason == "deepsleep" and "upload failed" not in rec.output
                and "Traceback" not in rec.output)

    broker, host = world
    tls = device(tmp_path, "tls-b", broker.port, pki)
    plain = make_device(tmp_path / "heap-plain", mosquitto.port, device_id="tls-heap-plain", upload_every_wakes=1)
    acks = Host(mosquitto, tmp_path / "heap.db", client_id="ingest-tls-heap").start()
    try:
        needed = {}
        for name, vb in (("tls", tls), ("plain", plain)):
            wake(vb, 2)  # past the first boot: a steady upload wake
            needed[name] = heap_needed(vb, completes, low=32 * 1024, high=128 * 1024, resolution=2048)
    finally:
        acks.close()
    print("heap needed by an upload wake", json.dumps(needed))
    assert needed["tls"] is not None, "a TLS upload wake does not complete in 128 KiB"
    assert needed["plain"] is not None
    assert needed["tls"] - needed["plain"] <= 24 * 1024, needed
