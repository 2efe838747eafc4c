"""Sample batch frame, host side: decoder (and an encoder for tests and vectors).

The layout is specified in firmware/lib/agent/codec.py (the device encoder) and
docs/flashlog.md; in short:

    magic 0xB1 | flags | id len u8 | id | first seq uvarint | count uvarint |
    [oldest seq uvarint] | time base u32 LE | N u8 | N x scale i8 |
    count x ([missing bitmap uvarint] zz dt, zz dv per present channel) | CRC-32 LE

flags bit 0 (OLDEST): the oldest-seq field is present; bit 1 (MISSING): every
sample starts with a bitmap of channels without a value (None).

Both sides are checked against tests/vectors/sample_frames.json.
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, field

from mpfleet.errors import MpfleetError
from mpfleet.protocol.ids import DEVICE_ID_BYTES_RE, DEVICE_ID_MAX_LEN

MAGIC = 0xB1
FLAG_OLDEST = 0x01
FLAG_MISSING = 0x02
MAX_CHANNELS = 16
VARINT_MAX_BYTES = 10
VALUE_LIMIT = 1 << 63  # a stored (scaled) value is a signed 64-bit integer


class FrameError(MpfleetError):
    """A sample frame that cannot be trusted; the message says exactly why."""


@dataclass
class Frame:
    device_id: str
    first_seq: int
    t_base: int
    scales: tuple[int, ...]
    samples: list[tuple[int, int, tuple]] = field(default_factory=list)
    oldest_seq: int | None = None  # lowest seq the device still holds, when it said

    @property
    def count(self) -> int:
        return len(self.samples)


def zigzag(n: int) -> int:
    return n << 1 if n >= 0 else ((-n) << 1) - 1


def unzigzag(z: int) -> int:
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


def to_stored(value, scale: int) -> int:
    """round(value * 10**scale) exactly as the device computes it."""
    if scale >= 0:
        if isinstance(value, int):
            return value * 10**scale
        return int(round(value * 10**scale))
    return int(round(value / 10 ** (-scale)))


def from_stored(stored, scale: int):
    if stored is None:
        return None
    if scale > 0:
        return stored / 10**scale
    return stored * 10 ** (-scale)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_frame(device_id: str, first_seq: int, t_base: int, scales, samples,
                 oldest_seq: int | None = None) -> bytes:
    """samples: iterable of (t, values); seqs are first_seq, first_seq+1, ...
    A None value is a missing reading (the frame then carries bitmaps)."""
    ident = device_id.encode()
    if not DEVICE_ID_BYTES_RE.match(ident):
        raise ValueError(f"bad device id {device_id!r}")
    if len(scales) > MAX_CHANNELS or any(not -9 <= s <= 9 for s in scales):
        raise ValueError(f"bad scales {scales!r}")
    samples = list(samples)
    if not (0 <= first_seq < 1 << 32 and 0 <= t_base < 1 << 32):
        raise ValueError("first_seq and t_base must fit 32 bits")
    missing_mode = any(v is None for _, values in samples for v in values)
    flags = (FLAG_OLDEST if oldest_seq is not None else 0) | (FLAG_MISSING if missing_mode else 0)
    out = bytearray([MAGIC, flags, len(ident)]) + ident
    out += _uvarint(first_seq) + _uvarint(len(samples))
    if oldest_seq is not None:
        if not 0 <= oldest_seq < 1 << 32:
            raise ValueError("oldest_seq must fit 32 bits")
        out += _uvarint(oldest_seq)
    out += struct.pack("<I", t_base)
    out.append(len(scales))
    out += bytes(s & 0xFF for s in scales)
    prev_t = t_base
    prev = [0] * len(scales)
    for t, values in samples:
        if len(values) != len(scales):
            raise ValueError("a sample's value count differs from the channel count")
        if missing_mode:
            out += _uvarint(sum(1 << i for i, v in enumerate(values) if v is None))
        out += _uvarint(zigzag(t - prev_t))
        prev_t = t
        for i, (v, s) in enumerate(zip(values, scales)):
            if v is None:
                continue
            stored = to_stored(v, s)
            out += _uvarint(zigzag(stored - prev[i]))
            prev[i] = stored
    out += struct.pack("<I", binascii.crc32(out) & 0xFFFFFFFF)
    return bytes(out)


class _Reader:
    def __init__(self, data: bytes, end: int):
        self.data = data
        self.pos = 0
        self.end = end

    def byte(self, what: str) -> int:
        if self.pos >= self.end:
            raise FrameError(f"truncated frame: header ends inside {what} at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise FrameError(f"truncated frame: {what} needs {n} bytes at byte {self.pos}, "
                             f"{self.end - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uvarint(self, what: str, in_samples: bool = False) -> int:
        start = self.pos
        value = 0
        for i in range(VARINT_MAX_BYTES):
            if self.pos >= self.end:
                if in_samples:
                    raise FrameError(f"count mismatch: data ends inside {what} (byte {start})")
                raise FrameError(f"truncated frame: header ends inside {what} at byte {start}")
            b = self.data[self.pos]
            self.pos += 1
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if value >= 1 << 64:
                    raise FrameError(f"varint overflow: {what} at byte {start} exceeds 64 bits")
                return value
        raise FrameError(f"varint overflow: {what} at byte {start} is longer than {VARINT_MAX_BYTES} bytes")


def decode_frame(data: bytes) -> Frame:
    """Check and decode one frame; raises FrameError with the precise reason."""
    data = bytes(data)
    if not data:
        raise FrameError("truncated frame: empty")
    if data[0] != MAGIC:
        raise FrameError(f"bad magic 0x{data[0]:02x} (expected 0x{MAGIC:02x})")
    minimum = 3 + 1 + 1 + 1 + 4 + 1 + 4
    if len(data) < minimum:
        raise FrameError(f"truncated frame: {len(data)} bytes, a frame has at least {minimum}")
    body_end = len(data) - 4
    (want,) = struct.unpack_from("<I", data, body_end)
    got = binascii.crc32(data[:body_end]) & 0xFFFFFFFF
    if got != want:
        raise FrameError(f"bad CRC: frame says 0x{want:08x}, bytes give 0x{got:08x} "
                         f"(corrupt or truncated, {len(data)} bytes)")
    r = _Reader(data, body_end)
    flags = data[1]
    r.pos = 2
    if flags & ~(FLAG_OLDEST | FLAG_MISSING):
        raise FrameError(f"unsupported flags 0x{flags:02x}")
    id_len = r.byte("device id length")
    if not 1 <= id_len <= DEVICE_ID_MAX_LEN:
        raise FrameError(f"bad device id length {id_len}")
    ident = r.take(id_len, "device id")
    if not DEVICE_ID_BYTES_RE.match(ident):
        raise FrameError(f"bad device id {ident!r}")
    first_seq = r.uvarint("first seq")
    count = r.uvarint("count")
    if first_seq >= 1 << 32 or count >= 1 << 32:
        raise FrameError(f"seq out of range: first {first_seq} count {count}")
    oldest = None
    if flags & FLAG_OLDEST:
        oldest = r.uvarint("oldest seq")
        if oldest >= 1 << 32:
            raise FrameError(f"seq out of range: oldest {oldest}")
    (t_base,) = struct.unpack("<I", r.take(4, "time base"))
    nch = r.byte("channel count")
    if nch > MAX_CHANNELS:
        raise FrameError(f"bad channel count {nch} (at most {MAX_CHANNELS})")
    scales = tuple(struct.unpack(f"<{nch}b", r.take(nch, "scales")))
    for s in scales:
        if not -9 <= s <= 9:
            raise FrameError(f"bad scale {s} (-9..9)")
    frame = Frame(ident.decode(), first_seq, t_base, scales, oldest_seq=oldest)
    t = t_base
    prev = [0] * nch
    for i in range(count):
        if r.pos >= body_end:
            raise FrameError(f"count mismatch: header says {count} samples, data holds {i}")
        missing = r.uvarint(f"sample {i} missing bitmap", True) if flags & FLAG_MISSING else 0
        if missing >> nch:
            raise FrameError(f"sample {i}: missing bitmap 0x{missing:x} names channels beyond {nch}")
        t += unzigzag(r.uvarint(f"sample {i} time", True))
        if not 0 <= t < 1 << 32:
            raise FrameError(f"sample {i}: time {t} outside 32 bits (the device's clock is a u32)")
        values = []
        for c in range(nch):
            if missing & (1 << c):
                values.append(None)
                continue
            prev[c] += unzigzag(r.uvarint(f"sample {i} channel {c}", True))
            if not -VALUE_LIMIT <= prev[c] < VALUE_LIMIT:
                raise FrameError(f"sample {i} channel {c}: stored value {prev[c]} beyond 64 bits")
            values.append(from_stored(prev[c], scales[c]))
        frame.samples.append((first_seq + i, t, tuple(values)))
    if r.pos != body_end:
        raise FrameError(f"count mismatch: {body_end - r.pos} bytes left after the {count} samples")
    return frame
