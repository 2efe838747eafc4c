"""The device's MQTT client (agent/mqtt.py) byte for byte, as units on the
MicroPython unix port against a fake socket and a fake clock, no broker: the
packets it writes (MQTT 3.1.1 sections cited), the packets it reads, the
remaining-length varint at its width edges, and each failure's MQTTError with
its cause, timeouts included (the fake clock moves by the socket's timeout
when nothing arrives, so a timeout costs no time). Interoperability with real
brokers is tests/e2e/test_device_mqtt.py's."""

import pytest

MODULES = ("lib/agent/mqtt.py",)


def s(text: str | bytes) -> str:
    """An MQTT string (section 1.5.3): u16 length, then the bytes, as hex."""
    raw = text.encode() if isinstance(text, str) else text
    return len(raw).to_bytes(2, "big").hex() + raw.hex()


def remaining(n: int) -> str:
    """The remaining length (section 2.2.3) as hex."""
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return out.hex()


def connect_packet(flags: int, payload: str, keepalive: int = 60) -> str:
    # section 3.1: protocol name "MQTT", level 4, connect flags, keepalive, then the payload
    variable = s("MQTT") + "04" + f"{flags:02x}" + f"{keepalive:04x}"
    body = variable + payload
    return "10" + remaining(len(body) // 2) + body


DEVICE = r"""
# The 16 KB buffers of the remaining-length edges, allocated first: later the
# heap is in pieces too small for them (the script's own objects are spread over it).
ZEROS = bytearray(16400)   # payloads, never written
WIRE = bytearray(16400)    # a big packet from the broker
RX = bytearray(16400)      # the client's receive buffer for it

import binascii
from agent import mqtt
from agent.mqtt import MQTTClient, MQTTError


class FakeClock:
    # time for mqtt: ms ticks that move when the fake socket waits out a timeout
    now = 0

    @staticmethod
    def ticks_ms():
        return FakeClock.now

    @staticmethod
    def ticks_add(t, d):
        return t + d

    @staticmethod
    def ticks_diff(a, b):
        return a - b


class FakeSock:
    # A TCP socket with a timeout: readinto gives what the broker "sent" (at
    # most max_read bytes a call); with nothing to give it waits out the
    # timeout on the fake clock and raises ETIMEDOUT (EAGAIN when non-blocking),
    # or returns 0 once the broker has closed (eof). write takes at most
    # max_write bytes a call, and raises EAGAIN on every eagain_every-th call.
    def __init__(self, incoming=b"", max_read=1 << 30, max_write=1 << 30, eagain_every=0):
        self.incoming = bytearray(incoming)
        self.keep = 1 << 30  # bytes of `sent` kept; `total` counts them all
        self.total = 0
        self.pos = 0
        self.max_read = max_read
        self.max_write = max_write
        self.eagain_every = eagain_every
        self.write_error = None
        self.eof = False
        self.sent = bytearray()
        self.writes = 0
        self.timeout = None
        self.closed = False
        self.connected_to = None

    def feed(self, data):
        self.incoming += data

    def settimeout(self, t):
        self.timeout = t

    def connect(self, addr):
        if FakeSocketModule.connect_error:
            raise OSError(FakeSocketModule.connect_error)
        self.connected_to = addr

    def setsockopt(self, level, option, value):
        pass

    def write(self, mv):
        self.writes += 1
        if self.eagain_every and self.writes % self.eagain_every == 0:
            raise OSError(11)
        if self.write_error:
            raise OSError(self.write_error)
        n = min(len(mv), self.max_write)
        if len(self.sent) < self.keep:
            self.sent += bytes(mv[:min(n, self.keep - len(self.sent))])
        self.total += n
        return n

    def readinto(self, mv):
        left = len(self.incoming) - self.pos
        if not left:
            if self.eof:
                return 0
            FakeClock.now += int(self.timeout * 1000) if self.timeout else 0
            raise OSError(110 if self.timeout else 11)
        n = min(len(mv), left, self.max_read)
        mv[:n] = self.incoming[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self):
        self.closed = True


class FakeSocketModule:
    SOCK_STREAM = 1
    sock = None
    resolve_error = None
    connect_error = None
    resolved = []

    @staticmethod
    def getaddrinfo(host, port, af, kind):
        if FakeSocketModule.resolve_error:
            raise OSError(FakeSocketModule.resolve_error)
        FakeSocketModule.resolved.append([host, port])
        return [(2, 1, 6, "", ("10.0.0.9", port))]

    @staticmethod
    def socket(af, kind, proto):
        return FakeSocketModule.sock


mqtt.socket = FakeSocketModule
mqtt.time = FakeClock


def hx(b):
    return binascii.hexlify(b).decode()


def client(**kw):
    args = {"timeout_ms": 100, "keepalive_s": 60}
    args.update(kw)
    return MQTTClient("dev1", "broker", **args)


def connect(connack="20020000", setup=None, **kw):
    # A client that connects through a fresh fake socket whose broker answers `connack`
    FakeSocketModule.sock = sock = FakeSock(binascii.unhexlify(connack))
    c = client(**kw)
    if setup:
        setup(c)
    start = FakeClock.now
    try:
        present = c.connect()
    except MQTTError as e:
        return {"error": str(e), "rc": e.rc, "closed": sock.closed, "sent": hx(sock.sent),
                "waited_ms": FakeClock.now - start, "connected": c.is_connected()}
    return {"present": present, "sent": hx(sock.sent), "to": list(sock.connected_to),
            "resolved": FakeSocketModule.resolved[-1], "connected": c.is_connected()}


def connected(**kw):
    # A connected client and its socket, with CONNECT already cleared from `sent`
    FakeSocketModule.sock = sock = FakeSock(b"\x20\x02\x00\x00")
    c = client(**kw)
    c.connect()
    sock.sent = bytearray()
    sock.writes = sock.total = 0
    return c, sock


def failure(c, sock, fn):
    start = FakeClock.now
    try:
        fn()
    except MQTTError as e:
        return {"error": str(e), "rc": e.rc, "is_oserror": isinstance(e, OSError), "closed": sock.closed,
                "connected": c.is_connected(), "waited_ms": FakeClock.now - start, "sent": hx(sock.sent)}
    return {"no error": True, "sent": hx(sock.sent)}


def publish(topic, msg, qos=0, retain=False, incoming="", **kw):
    c, sock = connected(**kw)
    sock.feed(binascii.unhexlify(incoming))
    c.publish(topic, msg, qos, retain)
    return {"sent": hx(sock.sent), "writes": sock.writes, "left": len(sock.incoming) - sock.pos}


def publish_of_remaining_length(n):
    # QoS 0 to topic "t": remaining length = 2 + 1 + payload
    c, sock = connected()
    sock.keep = 8
    c.publish("t", memoryview(ZEROS)[:n - 3])
    return [hx(sock.sent[:1 + (1 if n < 128 else 2 if n < 16384 else 3)]), sock.total]


def put_length(n):
    c = client()
    return hx(c._hdr[1:c._put_length(1, n)])


def incoming_publish(first, topic, body, pid=None, **kw):
    # The client's handling of one PUBLISH from the broker (body: bytes, or the
    # length of a body of zeros): what the callback got, and what the client wrote back.
    c, sock = connected(**kw)
    var = len(topic).to_bytes(2, "big") + topic + (b"" if pid is None else pid.to_bytes(2, "big"))
    if isinstance(body, int):
        # a big one, in the preallocated buffers
        n = len(var) + body
        head = bytes([first]) + bytes(c._hdr[1:c._put_length(1, n)])
        WIRE[:len(head) + len(var)] = head + var
        WIRE[len(head) + len(var):len(head) + len(var) + 8] = bytes(8)
        sock.incoming = memoryview(WIRE)[:len(head) + n]
        sock.pos = 0
        c.set_rx_buffer(RX)
    else:
        n = len(var) + len(body)
        head = bytes([first]) + bytes(c._hdr[1:c._put_length(1, n)])
        sock.feed(head + var + body)
    got = []
    c.set_callback(lambda t, m, r: got.append([t.decode(), len(m), hx(bytes(m[:4])), r]))
    delivered = c.check_msg(100)
    return {"delivered": delivered, "got": got, "sent": hx(sock.sent), "dropped": c.dropped,
            "left": len(sock.incoming) - sock.pos}


def queued_while_waiting():
    # A QoS 1 message arrives between our PUBLISH and its PUBACK: it is acked at
    # once, held, and delivered by the next check_msg.
    c, sock = connected()
    got = []
    c.set_callback(lambda t, m, r: got.append([t.decode(), bytes(m).decode(), r]))
    sock.feed(binascii.unhexlify("3207" + "0001" + "6a" + "0009" + "6869"))  # topic "j", packet 9, "hi"
    sock.feed(binascii.unhexlify("40020001"))
    c.publish("t", "x", qos=1)
    during = list(got)
    delivered = c.check_msg(0)
    return {"during": during, "after": got, "delivered": delivered, "sent": hx(sock.sent)}


def wait_past_a_dropped_message():
    c, sock = connected(max_packet=100)
    got = []
    c.set_callback(lambda t, m, r: got.append([t.decode(), bytes(m).decode()]))
    sock.feed(b"\x30\x70\x00\x01t" + bytes(109))  # 112 bytes: past max_packet
    sock.feed(b"\x30\x04\x00\x01tk")
    return [c.wait_msg(100), got, c.dropped]


def full_queue():
    # Five QoS 1 messages between our PUBLISH and its PUBACK, queue_len 4: four
    # are acked and held, the fifth dropped unacknowledged (the broker sends it again).
    c, sock = connected(queue_len=4)
    for pid in range(1, 6):
        sock.feed(bytes([0x32, 6, 0, 1, 0x6A, 0, 10 + pid, 0x30 + pid]))
    sock.feed(binascii.unhexlify("40020001"))
    c.publish("t", "x", qos=1)
    got = []
    c.set_callback(lambda t, m, r: got.append(bytes(m).decode()))
    while c.check_msg(0):
        pass
    return {"got": got, "dropped": c.dropped, "sent": hx(sock.sent)}


def subscribe(topic, qos, suback):
    c, sock = connected()
    sock.feed(binascii.unhexlify(suback))
    try:
        granted = c.subscribe(topic, qos)
    except MQTTError as e:
        return {"error": str(e), "sent": hx(sock.sent), "connected": c.is_connected()}
    return {"granted": granted, "sent": hx(sock.sent)}


def ping():
    c, sock = connected()
    sock.feed(b"\xd0\x00")
    return [c.ping(), hx(sock.sent)]


def keepalive():
    # Idle for half the keepalive, check_msg pings; a PINGRESP clears it; with
    # no PINGRESP, the next check_msg past timeout_ms gives up.
    c, sock = connected(keepalive_s=10)
    FakeClock.now += 4999
    c.check_msg(0)
    quiet = hx(sock.sent)
    FakeClock.now += 1
    c.check_msg(0)
    pinged = hx(sock.sent)
    sock.feed(b"\xd0\x00")
    c.check_msg(0)
    FakeClock.now += 5000
    c.check_msg(0)
    FakeClock.now += 101
    out = failure(c, sock, lambda: c.check_msg(0))
    out.update({"quiet": quiet, "pinged": pinged})
    return out


def disconnect():
    c, sock = connected()
    c.disconnect()
    return [hx(sock.sent), sock.closed, c.is_connected()]


def slow_socket():
    # A socket that takes 3 bytes a write, refuses every 4th write with EAGAIN,
    # and gives 1 byte a read: the same bytes go out, the PUBACK is still read.
    c, sock = connected()
    sock.max_write = 3
    sock.eagain_every = 4
    sock.max_read = 1
    sock.feed(b"\x40\x02\x00\x01")
    c.publish("mpf/v1/dev1/state", "x" * 300, qos=1)
    return [hx(sock.sent), sock.writes]


def wait_msg_timeout():
    c, sock = connected()
    start = FakeClock.now
    got = c.wait_msg(250)
    return [got, FakeClock.now - start]


def pids():
    c, sock = connected()
    sock.feed(binascii.unhexlify("40020001" + "40020002"))
    c.publish("t", "a", qos=1)
    c.publish("t", "b", qos=1)
    c._pid = 65535
    sock.feed(binascii.unhexlify("40020001"))
    c.publish("t", "c", qos=1)
    return hx(sock.sent)


def refused(value, fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "accepted %r" % (value,)


def closed_by_broker():
    c, sock = connected()
    sock.eof = True
    return failure(c, sock, lambda: c.publish("t", "x", qos=1))


def write_error():
    c, sock = connected()
    sock.write_error = 104
    return failure(c, sock, lambda: c.publish("t", "x"))


def no_puback():
    c, sock = connected()
    return failure(c, sock, lambda: c.publish("t", "x", qos=1))


def other_pid_puback():
    c, sock = connected()
    sock.feed(binascii.unhexlify("40020007" + "40020001"))
    c.publish("t", "x", qos=1)
    return len(sock.incoming) - sock.pos


def silent_mid_packet():
    c, sock = connected()
    sock.feed(b"\x40")
    return failure(c, sock, lambda: c.publish("t", "x", qos=1))


def stream_failure(incoming):
    c, sock = connected()
    sock.feed(binascii.unhexlify(incoming))
    return failure(c, sock, lambda: c.check_msg(100))


def resolve_failure():
    FakeSocketModule.resolve_error = -2
    try:
        return connect()
    finally:
        FakeSocketModule.resolve_error = None


def tcp_failure():
    FakeSocketModule.connect_error = 111
    try:
        return connect()
    finally:
        FakeSocketModule.connect_error = None


case("connect", lambda: connect())
case("connect to a session present", lambda: connect("20020100"))
case("connect keeping the session", lambda: connect(clean_session=False))
case("connect with a will, user and password", lambda: connect(
    setup=lambda c: c.set_last_will("mpf/v1/dev1/state", "gone", retain=True, qos=1), user="u", password="pw"))
case("connect refused for the password", lambda: connect("20020004"))
case("connect refused for no known reason", lambda: connect("20020009"))
case("connect answered by another packet", lambda: connect("30020000"))
case("connect to a silent broker", lambda: connect(""))
case("connect to a name that does not resolve", resolve_failure)
case("connect refused by TCP", tcp_failure)
case("publish qos 0", lambda: publish("mpf/v1/dev1/samples", b"\x01\x02\x03"))
case("publish retained", lambda: publish("t", "on", retain=True))
case("publish qos 1", lambda: publish("t", "x", qos=1, incoming="40020001"))
case("publish of 200 bytes", lambda: publish("t", "y" * 200))
case("publish qos 2", lambda: refused(2, lambda: client().publish("t", "x", qos=2)))
case("packet ids", pids)
case("a PUBACK for another packet", other_pid_puback)
case("no PUBACK", no_puback)
for n in (127, 128, 16383, 16384):
    case("publish of remaining length %d" % n, lambda: publish_of_remaining_length(n))
for n in (0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455):
    case("remaining length %d" % n, lambda: put_length(n))
case("remaining length past the limit", lambda: refused(268435456, lambda: put_length(268435456)))
case("incoming qos 0", lambda: incoming_publish(0x30, b"mpf/v1/dev1/jobs", b"[1]"))
case("incoming retained", lambda: incoming_publish(0x31, b"j", b"x"))
case("incoming qos 1", lambda: incoming_publish(0x32, b"j", b"hello", pid=42))
for n in (127, 128, 16383, 16384):
    case("incoming of remaining length %d" % n, lambda: incoming_publish(0x30, b"t", n - 3))
case("incoming past max_packet", lambda: incoming_publish(0x30, b"t", 16382))
case("incoming qos 1 past max_packet", lambda: incoming_publish(0x32, b"t", bytes(200), pid=5, max_packet=100))
case("a message while waiting for PUBACK", queued_while_waiting)
case("wait_msg past a dropped message", wait_past_a_dropped_message)
case("a full queue", full_queue)
case("subscribe", lambda: subscribe("mpf/v1/dev1/jobs", 1, "9003000101"))
case("subscribe to two topics", lambda: subscribe(["a", "b"], 0, "900400010000"))
case("subscribe refused", lambda: subscribe("a", 0, "9003000180"))
case("subscribe granted more than asked", lambda: subscribe("a", 0, "9003000101"))
case("subscribe qos 2", lambda: refused(2, lambda: client().subscribe("a", 2)))
case("ping", ping)
case("keepalive", keepalive)
case("disconnect", disconnect)
case("a slow socket", slow_socket)
case("wait_msg with nothing to wait for", wait_msg_timeout)
case("closed by the broker", closed_by_broker)
case("a write error", write_error)
case("silent in the middle of a packet", silent_mid_packet)
case("a remaining length of five bytes", lambda: stream_failure("30ffffffff01"))
case("an unexpected packet", lambda: stream_failure("20020000"))
case("a PUBLISH of qos 2", lambda: stream_failure("340500016a0001"))
case("a PUBLISH whose topic is longer than it", lambda: stream_failure("30030009aa"))
case("a PUBACK of the wrong length", lambda: stream_failure("4003000100"))
case("a PINGRESP with a body", lambda: stream_failure("d00100"))
"""

CONNECT = connect_packet(0x02, s("dev1"))


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


# ------------------------------------------------------------------ CONNECT
def test_connect_sends_connect_for_a_clean_session(device):
    got = device.value("connect")
    assert got["sent"] == CONNECT == "101000044d5154540402003c000464657631"
    assert got["present"] is False and got["connected"] is True


def test_connect_resolves_the_host_and_connects_to_its_address(device):
    got = device.value("connect")
    assert (got["resolved"], got["to"]) == (["broker", 1883], ["10.0.0.9", 1883])


def test_connect_returns_the_session_present_flag_of_connack(device):
    assert device.value("connect to a session present")["present"] is True


def test_connect_keeping_the_session_clears_the_clean_session_flag(device):
    assert device.value("connect keeping the session")["sent"] == connect_packet(0x00, s("dev1"))


def test_connect_carries_the_will_user_and_password_in_order(device):
    # flags (section 3.1.2.3): user 0x80, password 0x40, will retain 0x20, will qos 1 0x08, will 0x04, clean 0x02
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04 | 0x02
    payload = s("dev1") + s("mpf/v1/dev1/state") + s("gone") + s("u") + s("pw")
    assert device.value("connect with a will, user and password")["sent"] == connect_packet(flags, payload)


def test_a_refused_connack_names_the_return_code(device):
    got = device.value("connect refused for the password")
    assert got["error"] == "CONNACK refused: bad user name or password (rc=4)"
    assert got["rc"] == 4 and got["closed"] and not got["connected"]


def test_a_connack_code_past_the_spec_is_an_unknown_reason(device):
    got = device.value("connect refused for no known reason")
    assert (got["error"], got["rc"]) == ("CONNACK refused: unknown reason (rc=9)", 9)


def test_another_packet_instead_of_connack_fails_the_connect(device):
    got = device.value("connect answered by another packet")
    assert got["error"] == "expected CONNACK from broker:1883, got packet 0x30"
    assert got["rc"] is None and got["closed"]


def test_a_silent_broker_times_out_the_connect_at_timeout_ms(device):
    got = device.value("connect to a silent broker")
    assert got["error"] == "timeout waiting for CONNACK from broker:1883"
    assert got["waited_ms"] == 100 and got["closed"]


def test_a_name_that_does_not_resolve_is_an_mqtt_error(device):
    assert device.value("connect to a name that does not resolve")["error"] == "cannot resolve broker: -2"


def test_a_refused_tcp_connect_is_an_mqtt_error_naming_the_address(device):
    got = device.value("connect refused by TCP")
    assert got["error"] == "TCP connect to broker:1883 failed: [Errno 111] ECONNREFUSED"
    assert got["closed"]


# ------------------------------------------------------------------ PUBLISH
def test_a_qos0_publish_is_one_packet_in_one_write(device):
    got = device.value("publish qos 0")
    assert got["sent"] == "30" + remaining(2 + 19 + 3) + s("mpf/v1/dev1/samples") + "010203"
    assert got["writes"] == 1


def test_a_retained_publish_sets_the_retain_bit(device):
    assert device.value("publish retained")["sent"] == "31" + "05" + s("t") + b"on".hex()


def test_a_qos1_publish_carries_a_packet_id_and_reads_its_puback(device):
    got = device.value("publish qos 1")
    assert got["sent"] == "32" + "06" + s("t") + "0001" + b"x".hex()
    assert got["left"] == 0, "the PUBACK was read"


def test_a_publish_too_big_for_one_write_goes_out_whole(device):
    assert device.value("publish of 200 bytes")["sent"] == "30" + remaining(203) + s("t") + b"y".hex() * 200


def test_packet_ids_count_up_and_wrap_past_65535_to_1(device):
    sent = device.value("packet ids")
    packets = [sent[i:i + 16] for i in range(0, len(sent), 16)]
    assert [p[10:14] for p in packets] == ["0001", "0002", "0001"]


def test_a_puback_for_another_packet_is_not_taken_for_ours(device):
    assert device.value("a PUBACK for another packet") == 0, "both PUBACKs were read"


def test_an_unacknowledged_qos1_publish_is_resent_with_dup_then_fails(device):
    got = device.value("no PUBACK")
    assert got["error"] == "timeout waiting for PUBACK of packet 1 (3 attempts, 100 ms each)"
    first = "32" + "06" + s("t") + "0001" + b"x".hex()
    assert got["sent"] == first + ("3a" + first[2:]) * 2, "the same packet id, DUP set on the re-sends"
    assert got["waited_ms"] == 300 and got["closed"] and got["is_oserror"]


def test_qos2_is_refused_before_anything_is_sent(device):
    assert device.value("publish qos 2") == "qos must be 0 or 1"


# ------------------------------------------------------------------ remaining length
@pytest.mark.parametrize("n, encoded", [(127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001")])
def test_a_publish_writes_its_remaining_length_at_the_width_edges(device, n, encoded):
    head, total = device.value(f"publish of remaining length {n}")
    assert head == "30" + encoded
    assert total == 1 + len(encoded) // 2 + n


@pytest.mark.parametrize("n, encoded", [(0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
                                        (2097151, "ffff7f"), (2097152, "80808001"), (268435455, "ffffff7f")])
def test_the_remaining_length_is_the_spec_varint(device, n, encoded):
    assert device.value(f"remaining length {n}") == encoded == remaining(n)


def test_a_remaining_length_past_four_bytes_is_refused(device):
    assert device.value("remaining length past the limit") == "packet too large for MQTT"


@pytest.mark.parametrize("n", [127, 128, 16383, 16384])
def test_an_incoming_remaining_length_is_read_at_the_width_edges(device, n):
    got = device.value(f"incoming of remaining length {n}")
    assert got["delivered"] is True
    assert got["got"] == [["t", n - 3, "00000000", False]]
    assert got["left"] == 0


def test_a_remaining_length_of_five_bytes_is_a_protocol_error(device):
    got = device.value("a remaining length of five bytes")
    assert got["error"] == "malformed remaining length (more than 4 bytes)" and got["closed"]


# ------------------------------------------------------------------ incoming
def test_an_incoming_message_reaches_the_callback_with_its_topic(device):
    got = device.value("incoming qos 0")
    assert got["got"] == [["mpf/v1/dev1/jobs", 3, b"[1]".hex(), False]]
    assert got["sent"] == "", "QoS 0: nothing to acknowledge"


def test_an_incoming_retained_message_is_flagged_retained(device):
    assert device.value("incoming retained")["got"] == [["j", 1, b"x".hex(), True]]


def test_an_incoming_qos1_message_is_acked_with_its_packet_id(device):
    got = device.value("incoming qos 1")
    assert got["got"] == [["j", 5, b"hell".hex(), False]]
    assert got["sent"] == "4002002a"


def test_an_incoming_message_past_max_packet_is_dropped_counted_and_not_reported_delivered(device):
    got = device.value("incoming past max_packet")
    assert (got["delivered"], got["got"], got["dropped"], got["left"]) == (False, [], 1, 0)


def test_an_incoming_qos1_message_past_max_packet_is_still_acked(device):
    got = device.value("incoming qos 1 past max_packet")
    assert (got["got"], got["dropped"], got["sent"]) == ([], 1, "40020005")


def test_a_message_that_arrives_while_waiting_for_a_puback_is_acked_held_and_delivered_next(device):
    got = device.value("a message while waiting for PUBACK")
    assert got["during"] == []
    assert got["after"] == [["j", "hi", False]] and got["delivered"] is True
    assert got["sent"] == "32" + "06" + s("t") + "0001" + b"x".hex() + "40020009"


def test_a_dropped_message_does_not_end_wait_msg(device):
    assert device.value("wait_msg past a dropped message") == [True, [["t", "k"]], 1]


def test_messages_past_the_queue_while_waiting_are_dropped_unacknowledged(device):
    got = device.value("a full queue")
    assert got["got"] == ["1", "2", "3", "4"] and got["dropped"] == 1
    assert got["sent"] == "32" + "06" + s("t") + "0001" + b"x".hex() + "4002000b4002000c4002000d4002000e"


@pytest.mark.parametrize("name, error", [
    ("an unexpected packet", "unexpected packet 0x20 from broker while idle"),
    ("a PUBLISH of qos 2", "PUBLISH with QoS 2 (never subscribed above 1)"),
    ("a PUBLISH whose topic is longer than it", "malformed PUBLISH (topic length 9 > packet 3)"),
    ("a PUBACK of the wrong length", "malformed packet 0x40 (length 3)"),
    ("a PINGRESP with a body", "malformed PINGRESP"),
])
def test_a_malformed_or_unexpected_packet_fails_the_session_naming_it(device, name, error):
    got = device.value(name)
    assert got["error"] == error and got["closed"] and not got["connected"]


# ------------------------------------------------------------------ SUBSCRIBE, PING, DISCONNECT
def test_subscribe_sends_subscribe_and_returns_the_granted_qos(device):
    got = device.value("subscribe")
    assert got["sent"] == "82" + remaining(2 + 18 + 1) + "0001" + s("mpf/v1/dev1/jobs") + "01"
    assert got["granted"] == 1


def test_subscribe_to_a_list_is_one_packet(device):
    got = device.value("subscribe to two topics")
    assert got["sent"] == "82" + "0a" + "0001" + s("a") + "00" + s("b") + "00"
    assert got["granted"] == 0


def test_a_refused_subscription_raises(device):
    got = device.value("subscribe refused")
    assert got["error"] == "subscription to a refused by the broker (SUBACK 0x80)"


def test_a_grant_above_the_qos_asked_for_fails_the_session(device):
    got = device.value("subscribe granted more than asked")
    assert got["error"] == "broker granted QoS 1 above the 0 asked for" and not got["connected"]


def test_subscribe_refuses_qos2(device):
    assert device.value("subscribe qos 2") == "qos must be 0 or 1"


def test_ping_sends_pingreq_and_reads_pingresp(device):
    assert device.value("ping") == [0, "c000"]


def test_an_idle_client_pings_at_half_the_keepalive_and_gives_up_without_pingresp(device):
    got = device.value("keepalive")
    assert got["quiet"] == "", "not before half the keepalive"
    assert got["pinged"] == "c000"
    assert got["sent"] == "c000c000", "a PINGRESP cleared the first; the second went unanswered"
    assert got["error"] == "no PINGRESP within 100 ms: broker unreachable" and got["closed"]


def test_disconnect_sends_disconnect_and_closes(device):
    assert device.value("disconnect") == ["e000", True, False]


# ------------------------------------------------------------------ the socket
def test_partial_writes_and_eagain_still_send_every_byte_in_order(device):
    sent, writes = device.value("a slow socket")
    assert sent == "32" + remaining(2 + 17 + 2 + 300) + s("mpf/v1/dev1/state") + "0001" + b"x".hex() * 300
    assert writes > 100


def test_wait_msg_returns_false_after_its_timeout(device):
    assert device.value("wait_msg with nothing to wait for") == [False, 250]


def test_a_connection_closed_by_the_broker_names_what_was_waiting(device):
    got = device.value("closed by the broker")
    assert got["error"] == "connection closed by broker while waiting for PUBACK of packet 1" and got["closed"]


def test_a_socket_error_on_write_names_the_operation_and_the_cause(device):
    got = device.value("a write error")
    assert got["error"] == "connection lost while sending PUBLISH to t: [Errno 104] ECONNRESET" and got["closed"]


def test_a_broker_silent_in_the_middle_of_a_packet_times_out(device):
    got = device.value("silent in the middle of a packet")
    assert got["error"] == "timeout waiting for PUBACK of packet 1" and got["closed"]
    assert got["waited_ms"] == 100
