"""Sample batch frame, device side: the encoder for the `samples` topic.

A sample is (seq, t, values): seq an integer, t seconds, values one number per
channel. A frame carries `count` samples with consecutive seqs; a gap in seqs,
a change of channels or a full buffer ends the frame and the next sample starts
a new one (add() returns False). A value may be None (no reading): such a
frame carries a missing-channel bitmap per sample. The host decoder is host_tools/mpfleet/protocol/codec.py;
both sides are checked against tests/vectors/sample_frames.json.

Layout (all multi-byte fixed fields little-endian):

    offset  width    field
    0       1        magic/version 0xB1 (0xB = batch frame, 1 = version)
    1       1        flags: bit 0 OLDEST (oldest-seq field present), bit 1
                     MISSING (per-sample bitmaps); other bits reserved: a
                     decoder rejects them
    2       1        device-id length L, 1..64
    3       L        device id, ASCII [a-z0-9_-]
    3+L     1..5     first seq, uvarint (< 2**32)
    .       1..5     count, uvarint (< 2**32)
    .       1..5     if OLDEST: oldest seq the device still holds, uvarint
                     (< 2**32): seqs below it are acked, dropped or lost, so
                     the host may advance its contiguous ack past a gap
    .       4        time base, u32 seconds
    .       1        channel count N, 0..16
    .       N        per-channel scale, i8 each, -9..9: the channel's value is
                     stored as the integer round(value * 10**scale)
    .       ...      count samples, each:
                       m       if MISSING: uvarint bitmap, bit i set = channel
                               i has no value in this sample
                       dt      zigzag varint, t - previous t (first: t - base)
                       dv[i]   zigzag varint per channel present, stored value
                               - the channel's previous stored value (first:
                               vs 0; a missing value leaves it unchanged)
    end-4   4        CRC-32 of every byte before it (IEEE 802.3, reflected
                     polynomial 0xEDB88320, init/final xor 0xFFFFFFFF:
                     binascii.crc32)

uvarint: LEB128, 7 bits per byte, least significant group first, high bit set
on every byte but the last; at most 10 bytes (64 bits). zigzag: n >= 0 -> 2n,
n < 0 -> -2n - 1. Sample i has seq = first seq + i.

Size: a slowly varying 2-channel series at 60 s intervals costs 3 bytes per
sample (dt 60 -> 0x78; small deltas one byte each) plus about 25 + L bytes
per frame, and MQTT adds ~2 + 2 + len(topic) + 2: a 100-sample frame is
about 3.7 bytes per sample on the wire.
"""

import binascii

from micropython import const

from agent.varint import missing_bits, put_uvarint, uvlen, zigzag

MAGIC = const(0xB1)
FLAG_OLDEST = const(0x01)
FLAG_MISSING = const(0x02)
MAX_ID = const(64)
MAX_CHANNELS = const(16)
_CRC_LEN = const(4)
_VARINT_MAX = const(10)


def to_stored(value, scale):
    """The integer a channel value is stored as: round(value * 10**scale)."""
    if scale >= 0:
        if isinstance(value, int):
            return value * 10 ** scale
        return int(round(value * 10 ** scale))
    return int(round(value / 10 ** (-scale)))


class FrameEncoder:
    """Streams samples into one preallocated buffer.

    enc = FrameEncoder("dev1", (2, 1), max_frame=1024)
    enc.begin(first_seq, t_base)
    while enc.add(seq, t, values): ...     # False: finish() and begin anew
    frame = enc.finish()                   # memoryview, valid until begin()

    With prescaled=True the values given to add() are already the stored
    integers (round(value * 10**scale)). A frame whose first sample has a None
    value is a MISSING frame; a None arriving later in a frame without it ends
    that frame (add() returns False, and the next frame starts with it).
    """

    def __init__(self, device_id, scales, max_frame=1024, prescaled=False):
        if isinstance(device_id, str):
            device_id = device_id.encode()
        if not 1 <= len(device_id) <= MAX_ID:
            raise ValueError("device id length must be 1..64")
        if len(scales) > MAX_CHANNELS:
            raise ValueError("at most 16 channels")
        for s in scales:
            if not -9 <= s <= 9:
                raise ValueError("scale must be -9..9")
        self._id = device_id
        self._prescaled = prescaled
        self._scales = tuple(scales)
        self._prev = [0] * len(scales)
        self._buf = bytearray(max_frame)
        self._mv = memoryview(self._buf)
        # fixed part before the varints, and after them
        self._fixed = 3 + len(device_id) + 4 + 1 + len(scales)
        if self._fixed + 5 + 5 + 1 + _CRC_LEN > max_frame:
            raise ValueError("max_frame too small for the header")
        self._first = 0
        self._base = 0
        self._count = 0
        self._pos = 0
        self._start = 0
        self._t = 0
        self._oldest = -1
        self._flags = 0

    @property
    def scales(self):
        return self._scales

    def begin(self, first_seq, t_base, oldest_seq=None):
        """Start a frame; oldest_seq: the lowest seq the device still holds."""
        if not 0 <= first_seq < 1 << 32 or not 0 <= t_base < 1 << 32:
            raise ValueError("first_seq and t_base must fit 32 bits")
        self._flags = 0
        self._oldest = -1
        if oldest_seq is not None:
            if not 0 <= oldest_seq < 1 << 32:
                raise ValueError("oldest_seq must fit 32 bits")
            self._flags = FLAG_OLDEST
            self._oldest = oldest_seq
        self._first = first_seq
        self._base = t_base
        self._count = 0
        self._t = t_base
        for i in range(len(self._prev)):
            self._prev[i] = 0
        # samples start where a one-byte count would put them; finish() moves
        # them right when the count needs more bytes.
        self._start = self._fixed + uvlen(first_seq) + 1
        if self._oldest >= 0:
            self._start += uvlen(self._oldest)
        self._pos = self._start

    @property
    def count(self):
        return self._count

    def add(self, seq, t, values):
        """Append one sample; False (nothing written) when it does not belong
        in this frame: seq not consecutive, or the frame is full."""
        if seq != self._first + self._count or len(values) != len(self._scales):
            return False
        scales = self._scales
        prev = self._prev
        missing = missing_bits(values)
        if missing and not self._flags & FLAG_MISSING:
            if self._count:
                return False  # this frame has no bitmaps: the next one will
            self._flags |= FLAG_MISSING
        dt = zigzag(t - self._t)
        need = uvlen(dt)
        if self._flags & FLAG_MISSING:
            need += uvlen(missing)
        # first pass: size, so a sample is written whole or not at all
        for i in range(len(scales)):
            if not missing & (1 << i):
                need += uvlen(zigzag(self._stored(values[i], scales[i]) - prev[i]))
        grow = uvlen(self._count + 1) - 1
        if self._pos + need + grow + _CRC_LEN > len(self._buf):
            return False
        buf = self._buf
        pos = self._pos
        if self._flags & FLAG_MISSING:
            pos = put_uvarint(buf, pos, missing)
        pos = put_uvarint(buf, pos, dt)
        for i in range(len(scales)):
            if not missing & (1 << i):
                v = self._stored(values[i], scales[i])
                pos = put_uvarint(buf, pos, zigzag(v - prev[i]))
                prev[i] = v
        self._pos = pos
        self._t = t
        self._count += 1
        return True

    def _stored(self, value, scale):
        return value if self._prescaled else to_stored(value, scale)

    def finish(self):
        """Write header and CRC; the frame as a memoryview of the buffer."""
        buf = self._buf
        shift = uvlen(self._count) - 1
        if shift:
            # move the samples right, last byte first (the ranges overlap)
            i = self._pos - 1
            while i >= self._start:
                buf[i + shift] = buf[i]
                i -= 1
            self._pos += shift
        buf[0] = MAGIC
        buf[1] = self._flags
        buf[2] = len(self._id)
        pos = 3 + len(self._id)
        buf[3:pos] = self._id
        pos = put_uvarint(buf, pos, self._first)
        pos = put_uvarint(buf, pos, self._count)
        if self._oldest >= 0:
            pos = put_uvarint(buf, pos, self._oldest)
        b = self._base
        buf[pos] = b & 0xFF
        buf[pos + 1] = (b >> 8) & 0xFF
        buf[pos + 2] = (b >> 16) & 0xFF
        buf[pos + 3] = (b >> 24) & 0xFF
        pos += 4
        buf[pos] = len(self._scales)
        pos += 1
        for s in self._scales:
            buf[pos] = s & 0xFF
            pos += 1
        end = self._pos
        crc = binascii.crc32(self._mv[:end]) & 0xFFFFFFFF
        buf[end] = crc & 0xFF
        buf[end + 1] = (crc >> 8) & 0xFF
        buf[end + 2] = (crc >> 16) & 0xFF
        buf[end + 3] = (crc >> 24) & 0xFF
        return self._mv[:end + _CRC_LEN]
