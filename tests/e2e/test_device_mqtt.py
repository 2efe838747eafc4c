"""The device's MQTT client (firmware/lib/agent/mqtt.py), run on the real
MicroPython unix port at the 128 KiB heap budget against a real mosquitto,
with paho-mqtt on the host side checking interoperability."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import firmware_files
from paho.mqtt.enums import CallbackAPIVersion

from mpfleet.broker.local import LocalBroker, free_port, wait_for_port

CLIENT_FILES = ("lib/agent/__init__.py", "lib/agent/mqtt.py")

PRELUDE = """
import network, time
from agent.mqtt import MQTTClient, MQTTError
_w = network.WLAN(network.STA_IF)
_w.active(True)
_w.connect("lab", "pw")
while not _w.isconnected():
    time.sleep_ms(5)
HOST = %r
PORT = %d
"""


def run_device(new_board, host: str, port: int, body: str, name: str = "dev"):
    """Boot a board whose main.py joins Wi-Fi, then runs `body` with HOST/PORT set."""
    vb = new_board(name)
    vb.set_wifi(networks={"lab": {"password": "pw"}}, connect_ms=10)
    files = firmware_files(CLIENT_FILES)
    files["/main.py"] = ((PRELUDE % (host, port)) + textwrap.dedent(body)).encode()
    vb.fs_put(files)
    rec = vb.boot()
    assert "Traceback" not in rec.output, rec.output
    return rec


def paho_client(broker, client_id: str, **kwargs) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kwargs)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


class Inbox:
    """Messages a paho subscriber received, with a wait for a topic."""

    def __init__(self):
        self.messages: list[paho.MQTTMessage] = []
        self.cond = threading.Condition()

    def on_message(self, client, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def wait_for(self, topic: str, timeout_s: float = 10.0) -> paho.MQTTMessage:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(m.topic == topic for m in self.messages), timeout_s)
            assert ok, f"no message on {topic}"
            return next(m for m in self.messages if m.topic == topic)


def subscriber(broker, topics: list[tuple[str, int]], client_id="host-sub"):
    inbox = Inbox()
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    c.on_message = inbox.on_message
    c.on_subscribe = lambda *a: done.set()
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.subscribe(topics)
    assert done.wait(5)
    return c, inbox


def stop(c: paho.Client):
    c.disconnect()
    c.loop_stop()


# ------------------------------------------------------------------ publishing


def test_qos0_and_qos1_publishes_reach_a_paho_subscriber_including_20_kb(new_board, mosquitto):
    sub, inbox = subscriber(mosquitto, [("dev/q0", 1), ("dev/q1", 1), ("dev/big", 1)])
    try:
        rec = run_device(new_board, mosquitto.host, mosquitto.port, """
            c = MQTTClient("pub-dev", HOST, PORT)
            print("session", c.connect())
            c.publish("dev/q0", b"zero")
            c.publish(b"dev/q1", "one", qos=1)
            big = bytearray(20 * 1024)
            for i in range(len(big)):
                big[i] = i & 0xFF
            c.publish("dev/big", big, qos=1)
            c.disconnect()
            print("published")
            """)
        assert "session False" in rec.output and "published" in rec.output
        assert inbox.wait_for("dev/q0").payload == b"zero"
        assert inbox.wait_for("dev/q1").payload == b"one"
        big = inbox.wait_for("dev/big").payload
        assert big == bytes(i & 0xFF for i in range(20 * 1024))
    finally:
        stop(sub)


def test_incoming_qos1_is_acked_so_the_paho_publish_completes(new_board, mosquitto):
    done = {}

    def host_side():
        # Wait for the device's "ready" (it has subscribed), then publish QoS 1 and
        # wait for the broker's PUBACK to paho; the device's ack shows in its output.
        sub, inbox = subscriber(mosquitto, [("dev/ready", 0)], client_id="host-ack")
        inbox.wait_for("dev/ready")
        info = sub.publish("dev/cmd", b"do it", qos=1)
        info.wait_for_publish(5)
        done["published"] = info.is_published()
        stop(sub)

    t = threading.Thread(target=host_side)
    t.start()
    rec = run_device(new_board, mosquitto.host, mosquitto.port, """
        got = []
        c = MQTTClient("ack-dev", HOST, PORT)
        c.set_callback(lambda t, m, r: got.append((t, bytes(m), r)))
        c.connect()
        print("granted", c.subscribe("dev/cmd", 1))
        c.publish("dev/ready", b"1")
        print("delivered", c.wait_msg(8000), got)
        c.disconnect()
        """)
    t.join(10)
    assert "granted 1" in rec.output
    assert "delivered True [(b'dev/cmd', b'do it', False)]" in rec.output
    assert done.get("published") is True


def test_retained_message_arrives_on_subscribe_flagged_retained(new_board, mosquitto):
    pub = paho_client(mosquitto, "host-retain")
    pub.publish("dev/cfg", b"retained-value", qos=1, retain=True).wait_for_publish(5)
    stop(pub)
    rec = run_device(new_board, mosquitto.host, mosquitto.port, """
        got = []
        c = MQTTClient("ret-dev", HOST, PORT)
        c.set_callback(lambda t, m, r: got.append((t, bytes(m), r)))
        c.connect()
        c.subscribe("dev/cfg", 1)
        print("delivered", c.wait_msg(5000), got)
        c.disconnect()
        """)
    assert "delivered True [(b'dev/cfg', b'retained-value', True)]" in rec.output


def test_persistent_session_delivers_messages_published_while_offline(new_board, mosquitto):
    first = run_device(new_board, mosquitto.host, mosquitto.port, """
        c = MQTTClient("persist-dev", HOST, PORT, clean_session=False)
        print("present", c.connect())
        c.subscribe("dev/offline", 1)
        c.disconnect()
        """)
    assert "present False" in first.output
    pub = paho_client(mosquitto, "host-offline")
    for i in range(3):
        pub.publish("dev/offline", b"m%d" % i, qos=1).wait_for_publish(5)
    stop(pub)
    second = run_device(new_board, mosquitto.host, mosquitto.port, name="dev-again", body="""
        got = []
        c = MQTTClient("persist-dev", HOST, PORT, clean_session=False)
        c.set_callback(lambda t, m, r: got.append(bytes(m)))
        print("present", c.connect())
        while c.wait_msg(2000):
            pass
        print("got", got)
        c.disconnect()
        """)
    assert "present True" in second.output
    assert "got [b'm0', b'm1', b'm2']" in second.output


def test_keepalive_ping_gets_a_pingresp_and_idle_loop_pings(new_board, mosquitto):
    rec = run_device(new_board, mosquitto.host, mosquitto.port, """
        c = MQTTClient("ping-dev", HOST, PORT, keepalive_s=1)
        c.connect()
        rtt = c.ping()
        print("rtt ok", 0 <= rtt < 1000)
        # Idle 2.5 s with keepalive 1 s: check_msg pings at half the keepalive,
        # and the broker (which drops us after 1.5 s of silence) keeps us.
        end = time.ticks_add(time.ticks_ms(), 2500)
        while time.ticks_diff(end, time.ticks_ms()) > 0:
            c.check_msg(100)
        print("still up", c.ping() >= 0)
        c.disconnect()
        """)
    assert "rtt ok True" in rec.output and "still up True" in rec.output


def test_oversized_incoming_message_is_discarded_and_counted(new_board, mosquitto):
    pub = paho_client(mosquitto, "host-big")
    pub.publish("dev/huge", b"x" * 3000, qos=1, retain=True).wait_for_publish(5)
    pub.publish("dev/small", b"ok", qos=1, retain=True).wait_for_publish(5)
    stop(pub)
    rec = run_device(new_board, mosquitto.host, mosquitto.port, """
        got = []
        c = MQTTClient("big-dev", HOST, PORT, max_packet=1024)
        c.set_callback(lambda t, m, r: got.append((t, len(m))))
        c.connect()
        c.subscribe("dev/huge", 1)
        c.subscribe("dev/small", 1)
        while c.wait_msg(1000):
            pass
        print("got", got, "dropped", c.dropped, "up", c.ping() >= 0)
        c.disconnect()
        """)
    assert "got [(b'dev/small', 2)] dropped 1 up True" in rec.output


# ------------------------------------------------------------------ credentials


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory):
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(passwd).exists():
        pytest.fail("mosquitto_passwd not found (it ships with mosquitto)")
    pwfile = tmp_path_factory.mktemp("pw") / "passwd"
    subprocess.run([passwd, "-b", "-c", str(pwfile), "dev1", "s3cret"], check=True, capture_output=True)
    pwfile.chmod(0o600)
    config = [f"password_file {pwfile}", "allow_anonymous false"]
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to the `mosquitto` user before it reads the
        # password file, which then cannot open our 0600 root-owned file.
        config.append("user root")
    with LocalBroker(extra_config=config) as broker:
        yield broker


def test_username_and_password_are_accepted(new_board, password_broker):
    rec = run_device(new_board, password_broker.host, password_broker.port, """
        c = MQTTClient("auth-dev", HOST, PORT, user="dev1", password="s3cret")
        print("session", c.connect())
        c.publish("dev/auth", b"hi", qos=1)
        c.disconnect()
        print("ok")
        """)
    assert "session False" in rec.output and "ok" in rec.output


def test_wrong_password_is_refused_with_a_named_return_code(new_board, password_broker):
    rec = run_device(new_board, password_broker.host, password_broker.port, """
        c = MQTTClient("auth-dev", HOST, PORT, user="dev1", password="wrong")
        try:
            c.connect()
        except MQTTError as e:
            print("refused:", e, "rc", e.rc, "oserror", isinstance(e, OSError), "open", c.is_connected())
        """)
    # mosquitto 2.x answers bad credentials from a 3.1.1 client with rc 5.
    assert "refused: CONNACK refused: not authorized (rc=5) rc 5" in rec.output, rec.output
    assert "oserror True open False" in rec.output


# ------------------------------------------------------------------ failures


def test_broker_killed_mid_session_raises_within_the_deadline(new_board):
    broker = LocalBroker().start()
    killer = threading.Thread(target=lambda: (time.sleep(1.0), broker.stop()))
    try:
        killer.start()
        rec = run_device(new_board, broker.host, broker.port, """
            c = MQTTClient("kill-dev", HOST, PORT, timeout_ms=1500, keepalive_s=2)
            c.connect()
            t0 = time.ticks_ms()
            try:
                while True:
                    c.check_msg(200)
                    c.publish("dev/alive", b"x", qos=1)
            except MQTTError as e:
                print("error:", e)
            except OSError as e:
                print("oserror:", e)
            print("after_ms", time.ticks_diff(time.ticks_ms(), t0), "open", c.is_connected())
            """)
    finally:
        killer.join()
        broker.stop()
    assert "error:" in rec.output, rec.output
    assert "connection" in rec.output or "timeout" in rec.output
    after_ms = int(rec.output.split("after_ms ")[1].split()[0])
    assert after_ms < 1000 + 3 * 1500 + 1000
    assert "open False" in rec.output


def test_peer_that_accepts_but_never_answers_times_out_on_connect(new_board):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    held = []
    stop_evt = threading.Event()

    def silent():
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        held.append(conn)
        while not stop_evt.wait(0.05):  # read nothing, answer nothing
            pass

    t = threading.Thread(target=silent, daemon=True)
    t.start()
    try:
        rec = run_device(new_board, "127.0.0.1", port, """
            c = MQTTClient("silent-dev", HOST, PORT, timeout_ms=800)
            t0 = time.ticks_ms()
            try:
                c.connect()
                print("connected?!")
            except MQTTError as e:
                print("error:", e)
            print("after_ms", time.ticks_diff(time.ticks_ms(), t0))
            """)
    finally:
        stop_evt.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
    assert "error: timeout waiting for CONNACK from 127.0.0.1:%d" % port in rec.output, rec.output
    after_ms = int(rec.output.split("after_ms ")[1].split()[0])
    assert 700 <= after_ms < 1500


def test_frozen_broker_makes_qos1_publish_fail_after_its_retries(new_board):
    # SIGSTOP: the TCP connection stays up but nothing answers, as with a hung broker
    # or a dead NAT path; the device must give up after 1 + retries deadlines.
    broker = LocalBroker().start()
    try:
        rec = _run_frozen(new_board, broker)
    finally:
        if broker.process is not None:
            broker.process.send_signal(signal.SIGCONT)
        broker.stop()
    assert "error: timeout waiting for PUBACK of packet 2 (3 attempts, 400 ms each)" in rec.output, rec.output
    after_ms = int(rec.output.split("after_ms ")[1].split()[0])
    assert 1100 <= after_ms < 2000


def _run_frozen(new_board, broker):
    # Freeze the broker once the device's first publish has gone through it (a
    # paho subscriber sees it), while the device sleeps before its second one.
    sub, inbox = subscriber(broker, [("dev/x", 0)], client_id="host-freeze")

    def freeze():
        inbox.wait_for("dev/x", 20)
        stop(sub)
        broker.process.send_signal(signal.SIGSTOP)

    t = threading.Thread(target=freeze)
    t.start()
    try:
        return run_device(new_board, broker.host, broker.port, """
            c = MQTTClient("frozen-dev", HOST, PORT, timeout_ms=400, retries=2)
            c.connect()
            c.publish("dev/x", b"before", qos=1)
            time.sleep_ms(1000)
            t0 = time.ticks_ms()
            try:
                c.publish("dev/x", b"after", qos=1)
            except MQTTError as e:
                print("error:", e)
            print("after_ms", time.ticks_diff(time.ticks_ms(), t0))
            """)
    finally:
        t.join()


class ScriptedPeer:
    """A fake broker on 127.0.0.1: for one connection, reads whole MQTT packets and
    sends canned bytes, following `script` (b"..." to send, "read" for a packet,
    "hold" to stay silent until stopped). Records the packets it read."""

    def __init__(self, script):
        self.script = script
        self.packets: list[bytes] = []
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(1)
        self.port = self.srv.getsockname()[1]
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _recv_exact(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _read_packet(self, conn):
        first = self._recv_exact(conn, 1)
        n, shift, raw = 0, 0, b""
        while True:
            b = self._recv_exact(conn, 1)
            raw += b
            n |= (b[0] & 0x7F) << shift
            shift += 7
            if not b[0] & 0x80:
                break
        self.packets.append(first + raw + self._recv_exact(conn, n))

    def _serve(self):
        self.srv.settimeout(10)
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        conn.settimeout(10)
        try:
            for step in self.script:
                if step == "read":
                    self._read_packet(conn)
                elif step == "hold":
                    self.stopped.wait(15)
                else:
                    conn.sendall(step)
            self.stopped.wait(15)
        except (OSError, EOFError):
            pass
        finally:
            conn.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join(5)
        self.srv.close()


CONNACK_OK = b"\x20\x02\x00\x00"


def test_broker_silent_in_the_middle_of_a_packet_raises_a_timeout(new_board):
    # A PUBLISH header announcing 16 bytes, then only 3 of them.
    with ScriptedPeer(["read", CONNACK_OK, b"\x30\x10\x00\x03ab", "hold"]) as peer:
        rec = run_device(new_board, "127.0.0.1", peer.port, """
            c = MQTTClient("mid-dev", HOST, PORT, timeout_ms=500)
            c.connect()
            t0 = time.ticks_ms()
            try:
                c.wait_msg(3000)
            except MQTTError as e:
                print("error:", e)
            print("after_ms", time.ticks_diff(time.ticks_ms(), t0))
            """)
    assert "error: timeout while receiving PUBLISH" in rec.output, rec.output
    after_ms = int(rec.output.split("after_ms ")[1].split()[0])
    assert after_ms < 1200


def test_remaining_length_longer_than_four_bytes_is_a_protocol_error(new_board):
    with ScriptedPeer(["read", CONNACK_OK, b"\x30\xff\xff\xff\xff\x01"]) as peer:
        rec = run_device(new_board, "127.0.0.1", peer.port, """
            c = MQTTClient("len-dev", HOST, PORT, timeout_ms=500)
            c.connect()
            try:
                c.check_msg(1000)
            except MQTTError as e:
                print("error:", e, "open", c.is_connected())
            """)
    assert "error: malformed remaining length (more than 4 bytes) open False" in rec.output, rec.output


def test_refused_subscription_raises(new_board):
    with ScriptedPeer(["read", CONNACK_OK, "read", b"\x90\x03\x00\x01\x80"]) as peer:
        rec = run_device(new_board, "127.0.0.1", peer.port, """
            c = MQTTClient("sub-dev", HOST, PORT, timeout_ms=500)
            c.connect()
            try:
                c.subscribe("mpf/v1/other/jobs", 1)
            except MQTTError as e:
                print("error:", e)
            """)
    assert "error: subscription to mpf/v1/other/jobs refused by the broker (SUBACK 0x80)" in rec.output


def test_unacked_qos1_publish_is_resent_with_the_dup_flag(new_board):
    # The peer ignores the first PUBLISH and acks the re-send.
    with ScriptedPeer(["read", CONNACK_OK, "read", "read", b"\x40\x02\x00\x01"]) as peer:
        rec = run_device(new_board, "127.0.0.1", peer.port, """
            c = MQTTClient("dup-dev", HOST, PORT, timeout_ms=300, retries=2)
            c.connect()
            c.publish("t", b"p", qos=1)
            print("acked")
            """)
        packets = list(peer.packets)
    assert "acked" in rec.output
    first, second = packets[1], packets[2]
    assert first[0] == 0x32 and second[0] == 0x3A  # QoS 1, then QoS 1 + DUP
    assert first[1:] == second[1:]


def test_no_wifi_means_name_resolution_fails_with_a_clear_error(new_board, mosquitto):
    vb = new_board()
    files = firmware_files(CLIENT_FILES)
    files["/main.py"] = textwrap.dedent("""
        from agent.mqtt import MQTTClient, MQTTError
        try:
            MQTTClient("nowifi", "broker.local").connect()
        except MQTTError as e:
            print("error:", e)
        """).encode()
    vb.fs_put(files)
    rec = vb.boot()
    assert "error: cannot resolve broker.local" in rec.output, rec.output


# ------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """mosquitto with a TLS listener and a self-signed certificate for localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def self_signed(key):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=30))
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key)
    other = self_signed(ec.generate_private_key(ec.SECP256R1()))
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    config = [f"certfile {d / 'cert.pem'}", f"keyfile {d / 'key.pem'}"]
    if os.geteuid() == 0:
        config.append("user root")
    with LocalBroker(extra_config=config) as broker:
        broker.ca_der = cert.public_bytes(serialization.Encoding.DER)
        broker.other_ca_der = other.public_bytes(serialization.Encoding.DER)
        yield broker


def test_tls_session_verifies_the_broker_certificate(new_board, tls_broker):
    sub_ok = """
        c = MQTTClient("tls-dev", HOST, PORT, tls=True, timeout_ms=4000,
                       tls_params={"cadata": %r, "server_hostname": "localhost"})
        print("session", c.connect())
        c.publish("dev/tls", b"secret", qos=1)
        print("ping", c.ping() >= 0)
        c.disconnect()
        """ % tls_broker.ca_der
    rec = run_device(new_board, tls_broker.host, tls_broker.port, sub_ok)
    assert "session False" in rec.output and "ping True" in rec.output


def test_tls_without_a_ca_fails_closed(new_board, tls_broker):
    # MicroPython's client context defaults to CERT_NONE; the client must not.
    rec = run_device(new_board, tls_broker.host, tls_broker.port, """
        c = MQTTClient("tls-noca", HOST, PORT, tls=True, timeout_ms=4000)
        try:
            c.connect()
            print("connected without verification?!")
        except MQTTError as e:
            print("error:", e)
        """)
    assert "error: TLS handshake with 127.0.0.1:%d failed" % tls_broker.port in rec.output, rec.output
    assert "CA_CHAIN_REQUIRED" in rec.output


def test_tls_with_an_untrusted_certificate_fails_verification(new_board, tls_broker):
    rec = run_device(new_board, tls_broker.host, tls_broker.port, """
        c = MQTTClient("tls-bad", HOST, PORT, tls=True, timeout_ms=4000,
                       tls_params={"cadata": %r, "server_hostname": "localhost"})
        try:
            c.connect()
            print("connected to an untrusted broker?!")
        except MQTTError as e:
            print("error:", e)
        """ % tls_broker.other_ca_der)
    assert "error: TLS handshake with 127.0.0.1:%d failed" % tls_broker.port in rec.output, rec.output
    assert "not correctly signed by the trusted CA" in rec.output, rec.output


def test_tls_handshake_with_a_silent_peer_times_out(new_board):
    with ScriptedPeer(["hold"]) as peer:
        rec = run_device(new_board, "127.0.0.1", peer.port, """
            c = MQTTClient("tls-silent", HOST, PORT, tls=True, timeout_ms=600, tls_params={"insecure": True})
            t0 = time.ticks_ms()
            try:
                c.connect()
            except MQTTError as e:
                print("error:", e)
            print("after_ms", time.ticks_diff(time.ticks_ms(), t0))
            """)
    assert "error: TLS handshake with 127.0.0.1:%d failed" % peer.port in rec.output, rec.output
    assert int(rec.output.split("after_ms ")[1].split()[0]) < 1200


# ------------------------------------------------------------------ amqtt


@pytest.fixture(scope="module")
def amqtt_broker(tmp_path_factory):
    try:
        import amqtt  # noqa: F401 - only whether it is installed
    except ImportError:
        pytest.skip("amqtt is not installed (optional `broker` extra): pip install amqtt")
    port = free_port()
    cfg = tmp_path_factory.mktemp("amqtt") / "amqtt.yaml"
    cfg.write_text(textwrap.dedent(f"""
        listeners:
          default:
            type: tcp
            bind: 127.0.0.1:{port}
        plugins:
          amqtt.plugins.authentication.AnonymousAuthPlugin:
            allow_anonymous: true
        """))
    script = ("import asyncio, sys, yaml\n"
              "from amqtt.broker import Broker\n"
              "async def main():\n"
              "    b = Broker(yaml.safe_load(open(sys.argv[1])))\n"
              "    await b.start()\n"
              "    await asyncio.Event().wait()\n"
              "asyncio.run(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, 15)
    except Exception:  # noqa: BLE001 - whatever failed, the broker is killed and its stderr shown
        proc.kill()
        err = proc.communicate()[1].decode(errors="replace")[-1500:]
        pytest.fail(f"amqtt broker did not start:\n{err}")

    class B:
        host = "127.0.0.1"

    B.port = port
    yield B
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_connect_publish_subscribe_interoperate_with_amqtt(new_board, amqtt_broker):
    sub, inbox = subscriber(amqtt_broker, [("dev/amqtt/out", 1)], client_id="host-amqtt")
    try:
        rec = run_device(new_board, amqtt_broker.host, amqtt_broker.port, """
            got = []
            c = MQTTClient("amqtt-dev", HOST, PORT)
            c.set_callback(lambda t, m, r: got.append((t, bytes(m))))
            print("session", c.connect())
            print("granted", c.subscribe("dev/amqtt/in", 1))
            c.publish("dev/amqtt/in", b"loop", qos=1)
            print("delivered", c.wait_msg(5000), got)
            c.publish("dev/amqtt/out", b"to-paho", qos=1)
            c.publish("dev/amqtt/out0", b"q0")
            print("ping", c.ping() >= 0)
            c.disconnect()
            """)
        assert "session False" in rec.output and "granted 1" in rec.output
        assert "delivered True [(b'dev/amqtt/in', b'loop')]" in rec.output
        assert "ping True" in rec.output
        assert inbox.wait_for("dev/amqtt/out").payload == b"to-paho"
    finally:
        stop(sub)
