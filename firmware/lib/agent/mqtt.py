# MQTT 3.1.1 client for the device agent (MicroPython: ESP32 and the unix port).
#
# One class, MQTTClient, in the spirit of micropython-lib's umqtt.simple, plus
# what a battery device in the field needs:
#
# - Every read and write has a deadline: the socket timeout is re-armed before
#   each call from a ticks_add() deadline, so a broker that stops answering,
#   even in the middle of a packet, raises MQTTError within timeout_ms instead
#   of hanging.
# - MQTTError is a subclass of OSError, so one `except OSError` around a
#   session catches socket faults and protocol faults alike (one reconnect
#   path). Its message names the cause ("timeout waiting for PUBACK of packet
#   7", "CONNACK refused: bad user name or password (rc=4)"); `rc` holds the
#   CONNACK return code when the broker refused the connection, else None.
#   After any MQTTError raised by I/O the socket is closed: call connect().
# - Memory: outgoing headers are built in a preallocated bytearray; topic and
#   payload are written straight from the caller's buffer (memoryview), never
#   concatenated. Each incoming message allocates its topic (bytes) and its
#   payload (a fresh bytearray the callback may keep), unless set_rx_buffer()
#   gave a buffer: then payloads that fit it are read into it and the callback
#   gets a memoryview it must not keep (OTA chunks: no allocation per chunk).
# - Incoming packets larger than max_packet are read and discarded through a
#   64-byte scratch buffer (never allocated whole), counted in `dropped`; a
#   QoS 1 one is still acknowledged, otherwise the broker would redeliver a
#   message this device can never accept, on every reconnect, forever.
# - The callback cb(topic, msg, retained) runs only from check_msg() and
#   wait_msg(). Messages that arrive while publish()/subscribe()/ping() wait
#   for their acknowledgement are queued (at most queue_len; beyond that they
#   are dropped unacknowledged and counted in `dropped`, so a persistent
#   session gets them again). An incoming QoS 1 message is acknowledged after
#   the callback returns (at least once: a crash inside the callback means
#   redelivery, not loss). The callback may itself publish.
# - TLS (tls=True) uses ssl.SSLContext(PROTOCOL_TLS_CLIENT) and always verifies
#   the broker unless tls_params["insecure"] is set: tls_params keys "cadata"
#   (DER CA certificate), "server_hostname" (default: host), "cert"/"key"
#   (client certificate). A failed handshake raises MQTTError with mbedtls's cause;
#   a broker that drops the connection while it checks the client certificate
#   (EPIPE/ECONNRESET in the handshake, or before CONNACK under TLS 1.3) is
#   named as a probable refusal of this device's certificate.
# - QoS 2 is not supported (subscribe() refuses qos 2, so a broker never
#   sends it one).

import socket
import struct
import time

from micropython import const

try:
    import errno

    _ETIMEDOUT = errno.ETIMEDOUT
    _EAGAIN = errno.EAGAIN
except ImportError:
    _ETIMEDOUT = const(110)
    _EAGAIN = const(11)
# The same numbers on Linux and lwIP; MicroPython's errno does not name EPIPE.
_EPIPE = const(32)
_ECONNRESET = const(104)

# A broker that refuses the client certificate (expired, another CA, revoked)
# ends the connection inside the handshake; mbedTLS reports only the closed socket.
_CERT_REFUSED = " (the broker closed the connection: it refused this device's certificate?)"

# Control packet types, first byte with the flags MQTT 3.1.1 fixes (section 2.2).
_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_UNSUBSCRIBE = const(0xA2)
_UNSUBACK = const(0xB0)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_DUP = const(0x08)
_RETAIN = const(0x01)
_SUBACK_FAILURE = const(0x80)

_PROTOCOL_LEVEL = const(4)  # 3.1.1
_MAX_REMAINING = const(268435455)  # 4-byte varint limit (section 2.2.3)
_SMALL_PUBLISH = const(160)  # whole packets up to this size are sent in one write
_SCRATCH = const(64)
# A packet's pieces (fixed header, lengths, topic, packet id) are gathered up to this
# size and go out in one write: over TLS every write is a record of its own, with 29
# bytes of header, nonce and tag (AES-GCM), so a SUBSCRIBE of three topics written in
# ten pieces cost 290 bytes of records for 60 of MQTT.
_GATHER = const(256)
_UNDELIVERED = const(0x01)  # _step's answer for a PUBLISH that did not reach the callback (no packet type)

# CONNACK return codes 1..5 (section 3.2.2.3), index = rc.
_REFUSED = (
    "accepted",
    "unacceptable protocol version",
    "identifier rejected",
    "server unavailable",
    "bad user name or password",
    "not authorized",
)


class MQTTError(OSError):
    """A session failure with its cause; rc is the CONNACK return code or None."""

    def __init__(self, msg, rc=None):
        super().__init__(msg)
        self.rc = rc


def _closed_by_peer(e):
    return isinstance(e, OSError) and bool(e.args) and e.args[0] in (_EPIPE, _ECONNRESET)


def _as_bytes(s):
    return s.encode() if isinstance(s, str) else s


class MQTTClient:
    def __init__(self, client_id, host, port=1883, user=None, password=None, keepalive_s=60,
                 tls=False, tls_params=None, clean_session=True, timeout_ms=5000,
                 max_packet=16384, retries=2, queue_len=4):
        if keepalive_s < 0 or keepalive_s > 65535:
            raise ValueError("keepalive_s out of range")
        self.client_id = _as_bytes(client_id)
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive_s = keepalive_s
        self.tls = tls
        self.tls_params = tls_params or {}
        self.clean_session = clean_session
        self.timeout_ms = timeout_ms
        self.max_packet = max_packet
        self.retries = retries  # QoS 1 re-sends (DUP) after the first attempt
        self.queue_len = queue_len
        self.dropped = 0  # incoming messages discarded (oversized or queue full)
        self._cb = None
        self._will = None
        self._raw = None  # the TCP socket: timeouts are set on it
        self._sock = None  # what we read and write: the TCP or the TLS socket
        self._poll = None  # TLS only: reads wait here, never inside mbedTLS (see _readinto)
        self._wait_ms = 0
        self._pid = 0
        self._ack_type = 0  # last acknowledgement seen: packet type, id, SUBACK code
        self._ack_pid = 0
        self._granted = 0
        self._ping_out = False
        self._last_tx = 0
        self._queue = []
        self._op = "idle"  # what the session is doing, for error messages
        self._hdr = bytearray(8)
        self._small = bytearray(_SMALL_PUBLISH)
        self._scratch = bytearray(_SCRATCH)
        self._gathered = bytearray(_GATHER)
        self._gathering = -1  # bytes gathered for the packet being sent; -1: not gathering
        self._rx = memoryview(self._scratch)
        self._rx_buf = None

    # -- public API -------------------------------------------------------

    def set_callback(self, cb):
        """cb(topic: bytes, msg: bytearray, retained: bool) for every incoming message."""
        self._cb = cb

    def set_rx_buffer(self, buf):
        """Read delivered payloads of at most len(buf) bytes into `buf` (None: allocate
        each). The callback then gets a memoryview valid only until it returns."""
        self._rx_buf = buf

    def set_last_will(self, topic, msg, retain=False, qos=0):
        if qos not in (0, 1, 2):
            raise ValueError("will qos")
        self._will = (_as_bytes(topic), _as_bytes(msg), retain, qos)

    def is_connected(self):
        return self._sock is not None

    def connect(self):
        """Open TCP (and TLS), send CONNECT, wait for CONNACK. Returns session_present."""
        self.close()
        self._queue = []
        self._ping_out = False
        where = "%s:%d" % (self.host, self.port)
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        try:
            ai = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        except OSError as e:
            raise MQTTError("cannot resolve %s: %s" % (self.host, e))
        self._op = "connecting to " + where
        sock = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
        self._raw = self._sock = sock
        try:
            sock.settimeout(self.timeout_ms / 1000)
            sock.connect(ai[-1])
        except OSError as e:
            raise self._fail("TCP connect to %s failed: %s" % (where, e))
        try:
            # TCP_NODELAY (IPPROTO_TCP 6, option 1 on lwIP and Linux alike): a request
            # is not held back until the broker ACKs the one before (OTA chunk requests).
            sock.setsockopt(6, 1, 1)
        except (OSError, AttributeError):
            pass
        if self.tls:
            self._op = "in TLS handshake with " + where
            self._arm(deadline)  # the handshake's reads time out with the socket
            try:
                self._sock = self._wrap_tls(sock)
            except (OSError, ValueError) as e:
                # MicroPython reports a certificate that fails verification as ValueError.
                why = str(e).strip()
                if _closed_by_peer(e):
                    # mbedTLS raises the bare errno: OSError(32) reads "32".
                    why = "errno %d" % e.args[0]
                    if "cert" in self.tls_params:
                        why += _CERT_REFUSED
                raise self._fail("TLS handshake with %s failed: %s" % (where, why))
            import select

            self._poll = select.poll()
            self._poll.register(self._sock, select.POLLIN)
        self._send_connect(deadline)
        self._op = "waiting for CONNACK from " + where
        op, n = self._read_header(deadline)
        if op != _CONNACK or n != 2:
            raise self._fail("expected CONNACK from %s, got packet 0x%02x" % (where, op))
        self._read_into(self._rx[:2], deadline)
        flags, rc = self._scratch[0], self._scratch[1]
        if rc:
            name = _REFUSED[rc] if rc < len(_REFUSED) else "unknown reason"
            raise self._fail("CONNACK refused: %s (rc=%d)" % (name, rc), rc)
        self._op = "idle"
        return bool(flags & 1)

    def publish(self, topic, msg, qos=0, retain=False):
        """Send msg (bytes-like or str) to topic. QoS 1 waits for PUBACK, re-sending
        with DUP up to `retries` times, and raises MQTTError if none comes."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        topic = _as_bytes(topic)
        msg = _as_bytes(msg)
        pid = self._next_pid() if qos else 0
        flags = _PUBLISH | (qos << 1) | (_RETAIN if retain else 0)
        for attempt in range(1 + (self.retries if qos else 0)):
            deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
            self._op = "sending PUBLISH to " + topic.decode()
            self._send_publish(flags | (_DUP if attempt else 0), topic, msg, pid, deadline)
            if not qos:
                return
            self._op = "waiting for PUBACK of packet %d" % pid
            if self._wait_ack(_PUBACK, pid, deadline):
                self._op = "idle"
                return
        raise self._fail("timeout waiting for PUBACK of packet %d (%d attempts, %d ms each)"
                         % (pid, 1 + self.retries, self.timeout_ms))

    def subscribe(self, topic, qos=0):
        """Subscribe and wait for SUBACK; returns the granted QoS. A refusal (0x80) raises.
        `topic` may be a list of topics: one SUBSCRIBE, one round trip, for them all
        (the highest QoS granted is returned; a refusal of any raises)."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        topics = [_as_bytes(t) for t in topic] if isinstance(topic, list) else [_as_bytes(topic)]
        if not 1 <= len(topics) <= 8:
            raise ValueError("1 to 8 topics per subscribe")
        topic = b", ".join(topics)
        pid = self._next_pid()
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        self._op = "sending SUBSCRIBE"
        hdr = self._hdr
        hdr[0] = _SUBSCRIBE
        n = 2
        for t in topics:
            n += 2 + len(t) + 1
        i = self._put_length(1, n)
        struct.pack_into("!H", hdr, i, pid)
        self._gathering = 0
        self._write(memoryview(hdr)[:i + 2], deadline)
        qos_byte = bytes((qos,))
        for t in topics:
            self._write_str(t, deadline)
            self._write(qos_byte, deadline)
        self._flush(deadline)
        self._op = "waiting for SUBACK of packet %d" % pid
        if not self._wait_ack(_SUBACK, pid, deadline):
            raise self._fail("timeout waiting for SUBACK of packet %d" % pid)
        self._op = "idle"
        if self._granted == _SUBACK_FAILURE:
            raise MQTTError("subscription to %s refused by the broker (SUBACK 0x80)" % topic.decode())
        if self._granted > qos:
            raise self._fail("broker granted QoS %d above the %d asked for" % (self._granted, qos))
        return self._granted

    def unsubscribe(self, topic):
        topic = _as_bytes(topic)
        pid = self._next_pid()
        deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        self._op = "sending UNSUBSCRIBE"
        self._send_with_pid(_UNSUBSCRIBE, pid, topic, 0, deadline)
        self._op = "waiting for UNSUBACK of packet %d" % pid
        if not self._wait_ack(_UNSUBACK, pid, deadline):
            raise self._fail("timeout waiting for UNSUBACK of packet %d" % pid)
        self._op = "idle"

    def ping(self):
        """PINGREQ and wait for PINGRESP; returns the round trip in ms."""
        start = time.ticks_ms()
        deadline = time.ticks_add(start, self.timeout_ms)
        self._send_ping(deadline)
        self._op = "waiting for PINGRESP"
        while self._ping_out:
            if not self._step(deadline, False):
                raise self._fail("timeout waiting for PINGRESP (%d ms)" % self.timeout_ms)
        self._op = "idle"
        return time.ticks_diff(time.ticks_ms(), start)

    def check_msg(self, timeout_ms=0):
        """Handle at most one incoming packet, waiting up to timeout_ms for one to start,
        and keep the connection alive. Returns True if a message reached the callback."""
        if self._queue:
            self._deliver(*self._queue.pop(0))
            return True
        self._keepalive()
        start = time.ticks_ms()
        got = self._step(time.ticks_add(start, timeout_ms), True)
        return got == _PUBLISH

    def wait_msg(self, timeout_ms=None):
        """Handle packets until a message reaches the callback (True) or timeout_ms
        (default: the client's timeout_ms) passes (False)."""
        if timeout_ms is None:
            timeout_ms = self.timeout_ms
        deadline = time.ticks_add(time.ticks_ms(), timeout_ms)
        while True:
            if self._queue:
                self._deliver(*self._queue.pop(0))
                return True
            self._keepalive()
            got = self._step(deadline, True)
            if got == _PUBLISH:
                return True
            if not got and time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                return False

    def disconnect(self):
        """Send DISCONNECT (the broker then discards the will) and close."""
        if self._sock is None:
            return
        self._op = "sending DISCONNECT"
        hdr = self._hdr
        hdr[0] = _DISCONNECT
        hdr[1] = 0
        try:
            self._write(memoryview(hdr)[:2], time.ticks_add(time.ticks_ms(), self.timeout_ms))
        finally:
            self.close()

    def close(self):
        """Close the socket without DISCONNECT (the broker publishes the will)."""
        self._gathering = -1
        sock, raw = self._sock, self._raw
        self._sock = self._raw = self._poll = None
        for s in (sock, raw):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

    # -- sending ----------------------------------------------------------

    def _next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    def _put_length(self, i, n):
        # Remaining length as a varint (section 2.2.3) into _hdr at i; returns the next index.
        if n > _MAX_REMAINING:
            raise ValueError("packet too large for MQTT")
        while True:
            b = n & 0x7F
            n >>= 7
            self._hdr[i] = b | (0x80 if n else 0)
            i += 1
            if not n:
                return i

    def _send_connect(self, deadline):
        self._op = "sending CONNECT"
        will = self._will
        n = 10 + 2 + len(self.client_id)
        flags = 0x02 if self.clean_session else 0
        if will:
            n += 4 + len(will[0]) + len(will[1])
            flags |= 0x04 | (will[3] << 3) | (0x20 if will[2] else 0)
        user = _as_bytes(self.user) if self.user is not None else None
        password = _as_bytes(self.password) if self.password is not None else None
        if user is not None:
            n += 2 + len(user)
            flags |= 0x80
        if password is not None:
            n += 2 + len(password)
            flags |= 0x40
        hdr = self._hdr
        hdr[0] = _CONNECT
        i = self._put_length(1, n)
        self._gathering = 0
        self._write(memoryview(hdr)[:i], deadline)
        # Variable header: protocol name "MQTT", level 4, flags, keepalive (section 3.1.2).
        self._write(struct.pack("!H4sBBH", 4, b"MQTT", _PROTOCOL_LEVEL, flags, self.keepalive_s), deadline)
        self._write_str(self.client_id, deadline)
        if will:
            self._write_str(will[0], deadline)
            self._write_str(will[1], deadline)
        if user is not None:
            self._write_str(user, deadline)
        if password is not None:
            self._write_str(password, deadline)
        self._flush(deadline)

    def _write_str(self, s, deadline):
        struct.pack_into("!H", self._hdr, 0, len(s))
        self._write(memoryview(self._hdr)[:2], deadline)
        if s:
            self._write(s, deadline)

    def _send_publish(self, first, topic, msg, pid, deadline):
        n = 2 + len(topic) + len(msg) + (2 if pid else 0)
        hdr = self._hdr
        hdr[0] = first
        i = self._put_length(1, n)
        if i + n <= _SMALL_PUBLISH:
            # One write, one TCP segment: a small message is copied into the
            # preallocated buffer instead of going out in four pieces.
            buf = self._small
            buf[0:i] = hdr[0:i]
            buf[i] = len(topic) >> 8
            buf[i + 1] = len(topic) & 0xFF
            j = i + 2 + len(topic)
            buf[i + 2:j] = topic
            if pid:
                buf[j] = pid >> 8
                buf[j + 1] = pid & 0xFF
                j += 2
            buf[j:j + len(msg)] = msg
            self._write(memoryview(buf)[:j + len(msg)], deadline)
            return
        self._gathering = 0
        self._write(memoryview(hdr)[:i], deadline)
        self._write_str(topic, deadline)
        if pid:
            struct.pack_into("!H", hdr, 0, pid)
            self._write(memoryview(hdr)[:2], deadline)
        if msg:
            self._write(memoryview(msg), deadline)
        self._flush(deadline)

    def _send_with_pid(self, first, pid, topic, extra, deadline):
        # SUBSCRIBE / UNSUBSCRIBE with one topic filter; `extra` bytes follow the filter.
        hdr = self._hdr
        hdr[0] = first
        i = self._put_length(1, 2 + 2 + len(topic) + extra)
        struct.pack_into("!H", hdr, i, pid)
        self._gathering = 0
        self._write(memoryview(hdr)[:i + 2], deadline)
        self._write_str(topic, deadline)
        self._flush(deadline)

    def _send_ping(self, deadline):
        self._op = "sending PINGREQ"
        hdr = self._hdr
        hdr[0] = _PINGREQ
        hdr[1] = 0
        self._write(memoryview(hdr)[:2], deadline)
        self._ping_out = True

    def _send_puback(self, pid):
        hdr = self._hdr
        hdr[0] = _PUBACK
        hdr[1] = 2
        struct.pack_into("!H", hdr, 2, pid)
        self._op = "sending PUBACK of packet %d" % pid
        self._write(memoryview(hdr)[:4], time.ticks_add(time.ticks_ms(), self.timeout_ms))

    def _keepalive(self):
        if not self.keepalive_s or self._sock is None:
            return
        idle_ms = time.ticks_diff(time.ticks_ms(), self._last_tx)
        if self._ping_out:
            # The broker had timeout_ms to answer the last PINGREQ.
            if idle_ms > self.timeout_ms:
                raise self._fail("no PINGRESP within %d ms: broker unreachable" % self.timeout_ms)
        elif idle_ms >= self.keepalive_s * 500:
            # Ping at half the keepalive: the broker drops us after 1.5x (section 3.1.2.10).
            self._send_ping(time.ticks_add(time.ticks_ms(), self.timeout_ms))

    # -- receiving --------------------------------------------------------

    def _wait_ack(self, kind, pid, deadline):
        self._ack_type = 0
        while not (self._ack_type == kind and self._ack_pid == pid):
            if not self._step(deadline, False):
                return False
        return True

    def _step(self, deadline, deliver):
        """Read and handle one packet if one starts before deadline: returns its type
        (high nibble), _UNDELIVERED for a PUBLISH the callback did not get, or 0 if
        none came. deliver=False queues incoming messages."""
        if not self._read_first(deadline):
            return 0
        op = self._scratch[0]
        doing = self._op
        pkt_deadline = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        n = self._read_length(pkt_deadline)
        kind = op & 0xF0
        if kind == _PUBLISH:
            if not self._recv_publish(op, n, pkt_deadline, deliver):
                kind = _UNDELIVERED  # dropped or queued: check_msg and wait_msg did not deliver it
        elif kind == _PUBACK or kind == _SUBACK or kind == _UNSUBACK:
            if (n < 3 or n > 10) if kind == _SUBACK else n != 2:
                raise self._fail("malformed packet 0x%02x (length %d)" % (op, n))
            self._read_into(self._rx[:n], pkt_deadline)
            self._ack_pid = (self._scratch[0] << 8) | self._scratch[1]
            granted = 0
            for k in range(2, n):  # SUBACK: one return code per topic; keep the worst
                code = self._scratch[k]
                if code == _SUBACK_FAILURE or (granted != _SUBACK_FAILURE and code > granted):
                    granted = code
            self._granted = granted
            self._ack_type = kind
        elif kind == _PINGRESP:
            if n:
                raise self._fail("malformed PINGRESP")
            self._ping_out = False
        else:
            raise self._fail("unexpected packet 0x%02x from broker while %s" % (op, self._op))
        self._op = doing
        return kind

    def _recv_publish(self, op, n, deadline, deliver):
        # Returns whether the message reached the callback.
        qos = (op >> 1) & 3
        if qos > 1:
            raise self._fail("PUBLISH with QoS %d (never subscribed above 1)" % qos)
        self._op = "receiving PUBLISH"
        if n < 2 + (2 if qos else 0):
            raise self._fail("malformed PUBLISH (length %d)" % n)
        self._read_into(self._rx[:2], deadline)
        tlen = (self._scratch[0] << 8) | self._scratch[1]
        rest = n - 2 - tlen - (2 if qos else 0)
        if rest < 0:
            raise self._fail("malformed PUBLISH (topic length %d > packet %d)" % (tlen, n))
        if n > self.max_packet:
            self._skip(tlen, deadline)
            pid = self._read_pid(deadline) if qos else 0
            self._skip(rest, deadline)
            self.dropped += 1
            if qos:
                self._send_puback(pid)
            return False
        topic = bytearray(tlen)
        self._read_into(memoryview(topic), deadline)
        topic = bytes(topic)
        pid = self._read_pid(deadline) if qos else 0
        if deliver and self._rx_buf is not None and rest <= len(self._rx_buf):
            msg = memoryview(self._rx_buf)[:rest]
        else:
            try:
                msg = bytearray(rest)
            except MemoryError:
                # No room for it now: skipped like an oversized one (a QoS 1 one is
                # not acknowledged, so the broker sends it again).
                self._skip(rest, deadline)
                self.dropped += 1
                return False
        if rest:
            self._read_into(memoryview(msg), deadline)
        retained = bool(op & _RETAIN)
        if deliver:
            self._deliver(topic, msg, retained, pid)
            return True
        if len(self._queue) < self.queue_len:
            # Acknowledged now, not when delivered: some brokers (amqtt) hold back
            # every later packet to this client, the SUBACK or PUBACK being waited
            # for included, until the message is acknowledged. What arrives here
            # is retained (jobs, samples/ack), so a reset before delivery loses
            # nothing: the next subscription brings it again.
            if pid:
                self._send_puback(pid)
            self._queue.append((topic, msg, retained, 0))
        else:
            self.dropped += 1  # not acknowledged: a persistent session redelivers it

    def _deliver(self, topic, msg, retained, pid):
        if self._cb is not None:
            self._cb(topic, msg, retained)
        if pid:
            self._send_puback(pid)
        self._op = "idle"

    def _read_pid(self, deadline):
        self._read_into(self._rx[:2], deadline)
        return (self._scratch[0] << 8) | self._scratch[1]

    def _skip(self, n, deadline):
        while n > 0:
            k = min(n, _SCRATCH)
            self._read_into(self._rx[:k], deadline)
            n -= k

    def _read_header(self, deadline):
        self._read_into(self._rx[:1], deadline)
        op = self._scratch[0]
        return op, self._read_length(deadline)

    def _read_length(self, deadline):
        n = 0
        for shift in (0, 7, 14, 21):
            self._read_into(self._rx[:1], deadline)
            b = self._scratch[0]
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
        raise self._fail("malformed remaining length (more than 4 bytes)")

    def _read_first(self, deadline):
        """Wait until deadline for the first byte of a packet; False if none came."""
        if self._sock is None:
            raise MQTTError("not connected")
        rem = time.ticks_diff(deadline, time.ticks_ms())
        self._raw.settimeout(rem / 1000 if rem > 0 else 0)
        self._wait_ms = rem if rem > 0 else 0
        r = self._readinto(self._rx[:1])
        if r is None:
            return False
        if r == 0:
            raise self._fail("connection closed by broker while " + self._op)
        return True

    def _read_into(self, mv, deadline):
        got = 0
        n = len(mv)
        while got < n:
            self._arm(deadline)
            r = self._readinto(mv[got:])
            if r is None:
                continue
            if r == 0:
                raise self._fail("connection closed by broker while " + self._op + self._refused_hint(None))
            got += r

    def _readinto(self, mv):
        # None when the socket timed out (the ports differ: None, EAGAIN or ETIMEDOUT).
        # Over TLS the wait is a poll of the TLS socket (it counts what mbedTLS holds
        # decrypted already): a socket timeout inside mbedTLS's read is an error
        # mbedTLS keeps, and every later read and write of the session fails with it.
        if self._poll is not None and not self._poll.poll(self._wait_ms):
            return None
        try:
            return self._sock.readinto(mv)
        except OSError as e:
            if e.args and e.args[0] in (_ETIMEDOUT, _EAGAIN):
                return None
            raise self._fail("connection lost while %s: %s%s" % (self._op, e, self._refused_hint(e)))

    def _refused_hint(self, e):
        # Under TLS 1.3 the client's handshake ends before the broker has checked
        # the client certificate: a refusal then shows while waiting for CONNACK.
        op = self._op
        if (self.tls and "cert" in self.tls_params and (e is None or _closed_by_peer(e))
                and (op.startswith("in TLS handshake") or op.startswith("waiting for CONNACK"))):
            return _CERT_REFUSED
        return ""

    def _write(self, buf, deadline):
        """Send `buf`, or, while a packet is gathered (_gathering >= 0), add it to the
        gathered bytes; what does not fit sends what was gathered first."""
        at = self._gathering
        if at < 0:
            self._send(buf, deadline)
            return
        n = len(buf)
        if at + n > _GATHER:
            self._gathering = 0
            if at:
                self._send(memoryview(self._gathered)[:at], deadline)
            at = 0
            if n > _GATHER:
                self._send(buf, deadline)
                return
        self._gathered[at:at + n] = buf
        self._gathering = at + n

    def _flush(self, deadline):
        """Send what was gathered for the packet and stop gathering."""
        at = self._gathering
        self._gathering = -1
        if at > 0:
            self._send(memoryview(self._gathered)[:at], deadline)

    def _send(self, buf, deadline):
        mv = memoryview(buf)
        sent = 0
        n = len(mv)
        while sent < n:
            self._arm(deadline)
            try:
                w = self._sock.write(mv[sent:])
            except OSError as e:
                if e.args and e.args[0] in (_ETIMEDOUT, _EAGAIN):
                    continue
                raise self._fail("connection lost while %s: %s%s" % (self._op, e, self._refused_hint(e)))
            if w:
                sent += w
        self._last_tx = time.ticks_ms()

    def _arm(self, deadline):
        if self._sock is None:
            raise MQTTError("not connected")
        rem = time.ticks_diff(deadline, time.ticks_ms())
        if rem <= 0:
            raise self._fail("timeout " + self._op if self._op.startswith("waiting")
                             else "timeout while " + self._op)
        self._raw.settimeout(rem / 1000)
        self._wait_ms = rem

    def _fail(self, msg, rc=None):
        self.close()
        self._op = "idle"
        return MQTTError(msg, rc)

    def _wrap_tls(self, sock):
        import ssl

        p = self.tls_params
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # MicroPython's client context defaults to CERT_NONE (unlike CPython's):
        # ask for verification explicitly, so a missing CA fails closed.
        if p.get("insecure"):
            ctx.verify_mode = ssl.CERT_NONE  # test brokers only: no server authentication
        else:
            ctx.verify_mode = ssl.CERT_REQUIRED
            if "cadata" in p:
                ctx.load_verify_locations(cadata=p["cadata"])
        if "cert" in p:
            ctx.load_cert_chain(p["cert"], p["key"])
        return ctx.wrap_socket(sock, server_hostname=p.get("server_hostname", self.host))
