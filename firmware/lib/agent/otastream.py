# Pulling a job's artifact (a firmware image or an app bundle) from the host
# over MQTT, as a resumable chunk stream (docs/ota.md):
#
#   device -> mpf/v1/<id>/ota/get   {"job": id, "offset": o, "len": chunk, "count": n}   QoS 0
#   host   -> mpf/v1/<id>/ota/data  u32 offset, u32 artifact size (LE), then the bytes  QoS 0
#                                   offset 0xFFFFFFFF: the host refuses; the second u32 says
#                                   why (0 refused, 1 canceled), a UTF-8 reason follows
#
# A refusal of kind 1 means the operator canceled the job on this device while it
# was downloading: the Puller raises Canceled, and the job ends before set_boot.
#
# The device asks ahead: `window` chunks at first, then half a window more each
# time half of what it asked for has arrived, so the pipe never runs dry while
# flash is written. A chunk is taken only when its offset is the very next one
# needed (anything else is a late answer to an earlier request, and ignored) and
# goes straight from the client's receive buffer to sink(offset, memoryview).
# When nothing new arrives for timeout_ms it asks again from where it is; after
# `retries` such silences it raises OSError, like a dropped connection, and the
# caller reconnects and pulls again from the same offset: a disconnect costs at
# most the chunk that was on the wire.

import json
import time

from micropython import const

_HEADER = const(8)
_REFUSED = const(0xFFFFFFFF)
_KIND_CANCELED = const(1)


class Refused(Exception):
    """The host cannot serve this artifact (unknown job, missing image, size mismatch)."""


class Canceled(Refused):
    """The host refuses because the job was canceled on this device: stop, switch nothing."""


def _u32(b, i):
    return b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)


def check_chunk_size(chunk):
    """Chunks must tile 4 KiB flash blocks: a divisor or a multiple of 4096, 512..16384."""
    if not isinstance(chunk, int) or chunk < 512 or chunk > 16384 or chunk % 512 \
            or (4096 % chunk and chunk % 4096):
        raise ValueError("chunk must be 512..16384 bytes and divide or be a multiple of 4096")


class Puller:
    def __init__(self, device_id, job_id, size, chunk=4096, window=8, timeout_ms=3000, retries=3, rx=None):
        check_chunk_size(chunk)
        from agent.topics import topic

        self.get_topic = topic(device_id, "ota/get")
        self.data_topic = topic(device_id, "ota/data").encode()
        self.job_id = job_id
        self.size = size
        self.chunk = chunk
        self.window = max(2, window)
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.rx = rx if rx is not None and len(rx) >= _HEADER + chunk else bytearray(_HEADER + chunk)
        self.offset = 0
        self.received = 0  # payload bytes taken (for the benchmarks)
        self.ignored = 0   # chunks that were not the next one needed
        self.requests = 0
        self.reasked = 0   # bytes asked for again (lost in flight with a dropped link)
        self._high = 0     # end of everything asked so far
        self._sink = None
        self._error = None
        self._canceled = False
        self._other = None
        self._subscribed = None  # the client that is subscribed to ota/data

    def _on_message(self, topic, msg, retained):
        if topic != self.data_topic:
            if self._other is not None:
                self._other(topic, msg, retained)
            return
        if len(msg) < _HEADER:
            return
        off = _u32(msg, 0)
        if off == _REFUSED:
            self._error = bytes(msg[_HEADER:]).decode()
            self._canceled = _u32(msg, 4) == _KIND_CANCELED
            return
        total = _u32(msg, 4)
        if total != self.size:
            self._error = "the host's artifact is %d bytes, the signed job says %d" % (total, self.size)
            return
        n = len(msg) - _HEADER
        if off != self.offset or n != min(self.chunk, self.size - off):
            self.ignored += 1
            return
        self._sink(off, msg[_HEADER:])
        self.offset = off + n
        self.received += n

    def _ask(self, client, offset, count):
        client.publish(self.get_topic, json.dumps({"job": self.job_id, "offset": offset, "len": self.chunk,
                                                   "count": count}))
        self.requests += 1
        end = min(self.size, offset + count * self.chunk)
        if offset < self._high:
            self.reasked += min(end, self._high) - offset
        if end > self._high:
            self._high = end

    def pull(self, client, offset, sink, feed=None, other=None, until=None):
        """Fetch [offset, until or size) into sink(offset, mv), in order. Returns the offset
        reached. Raises Refused when the host refuses (Canceled when the job was
        canceled), OSError when the link fails."""
        end = self.size if until is None else min(until, self.size)
        self.offset = offset
        self._sink = sink
        self._error = None
        self._canceled = False
        self._other = other
        client.set_callback(self._on_message)
        client.set_rx_buffer(self.rx)
        if self._subscribed is not client:
            client.subscribe(self.data_topic, 0)
            self._subscribed = client
        try:
            asked = offset
            half = self.window // 2
            silences = 0
            last = time.ticks_ms()
            while self.offset < end:
                ahead = (asked - self.offset) // self.chunk
                if asked < end and ahead <= half:
                    count = min(self.window - ahead, (end - asked + self.chunk - 1) // self.chunk)
                    self._ask(client, asked, count)
                    asked = min(end, asked + count * self.chunk)
                before = self.offset
                client.wait_msg(self.timeout_ms)
                if self._error is not None:
                    raise (Canceled if self._canceled else Refused)(self._error)
                if self.offset != before:
                    silences = 0
                    last = time.ticks_ms()
                    if feed is not None:
                        feed()
                elif time.ticks_diff(time.ticks_ms(), last) >= self.timeout_ms:
                    silences += 1
                    if silences > self.retries:
                        raise OSError("no OTA data for %d ms, %d times" % (self.timeout_ms, silences))
                    asked = self.offset  # ask again from here
                    last = time.ticks_ms()
        finally:
            client.set_rx_buffer(None)
            self._sink = None
        return self.offset

    def confirm(self, client, feed=None, other=None):
        """Ask the host for the artifact's last chunk once more, right before the point
        of no return (set_boot, an app slot switch): raises Canceled if the job was
        canceled meanwhile, Refused if the host no longer serves it, OSError if the
        link fails. The chunk itself is discarded."""
        last = (self.size - 1) // self.chunk * self.chunk
        self.pull(client, last, _discard, feed, other)


def _discard(off, mv):
    pass
