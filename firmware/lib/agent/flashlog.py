"""Durable sample log on LittleFS: append a batch, read for upload, trim on ack.

Records are opaque byte strings (0..255 bytes, one sample each) numbered by
the log with consecutive seqs from 1. They live in segment files
`<dir>/<first seq as 8 hex digits>.seg` of at most one LittleFS block (4096 B),
as CRC-framed chunks:

    offset  width  field (little-endian)
    0       1      magic 0xC7
    1       1      format version 1
    2       2      payload length L (u16), 0..1010
    4       2      record count n (u16)
    6       4      seq of the first record (u32); must continue the segment
    10      4      CRC-32 of bytes 0..9 then the L payload bytes (IEEE 802.3,
                   reflected polynomial 0xEDB88320, init and final xor
                   0xFFFFFFFF: binascii.crc32)
    14      L      n records, each: length u8, then that many bytes

A chunk is at most 1024 bytes, the one read buffer. State (ack point, floor,
dropped counter) is `<dir>/state`, replaced atomically by write-then-rename.
docs/flashlog.md explains the format, the choices and every power-loss case.

Wear: LittleFS copies a file's partly filled last block to a freshly erased
block whenever a closed file is appended to, so every append() costs one erase
whatever its size. Appending a full segment's worth (BATCH_BYTES) at a time
makes that one erase per 4 KiB of records.
"""

import binascii
import os
import struct

from micropython import const

SEGMENT_BYTES = const(4096)  # one LittleFS block: an append never spans two blocks
BATCH_BYTES = const(3840)  # records (1 + len each) one append should bring: fits a segment
DEFAULT_MAX_SEGMENTS = const(48)  # 192 KiB: ~11,000 samples of 16 B
MAX_RECORD = const(255)
_CHUNK_BYTES = const(1024)
_HDR = const(14)
_MAGIC = const(0xC7)
_VERSION = const(1)
_STATE_LEN = const(28)
_STATE_MAGIC = const(0x326C666D)  # b"mfl2" little-endian
_SEQ_MAX = const(0xFFFFFFFF)


class Batch:
    """Records for one append(), packed into two preallocated buffers: no object per
    record. A list of a few hundred small bytes objects (and the list itself) needs
    tens of KiB and, at the end of a long stage, a large contiguous block; this needs
    BATCH_BYTES + 2 bytes per record, allocated once. Indexing gives a memoryview."""

    def __init__(self, capacity=BATCH_BYTES, max_records=BATCH_BYTES // 4):
        self.buf = bytearray(capacity)
        self._ends = bytearray(2 * max_records)  # u16 end offset of each record
        self._mv = memoryview(self.buf)
        self.max_records = max_records
        self.n = 0
        self.size = 0  # bytes the records take in a chunk: 1 + len each

    def __len__(self):
        return self.n

    def _end(self, k):
        return self._ends[2 * k] | (self._ends[2 * k + 1] << 8)

    def __getitem__(self, k):
        if k < 0 or k >= self.n:
            raise IndexError
        return self._mv[self._end(k - 1) if k else 0:self._end(k)]

    def fits(self, length):
        start = self._end(self.n - 1) if self.n else 0
        return self.n < self.max_records and start + length <= len(self.buf) \
            and self.size + 1 + length <= BATCH_BYTES

    def add(self, record):
        """Append a record (bytes-like); the caller checked fits()."""
        start = self._end(self.n - 1) if self.n else 0
        end = start + len(record)
        self.buf[start:end] = record
        self._ends[2 * self.n] = end & 0xFF
        self._ends[2 * self.n + 1] = end >> 8
        self.n += 1
        self.size += 1 + len(record)

    def clear(self):
        self.n = 0
        self.size = 0


class FlashLog:
    """The log in one directory. Open it once per wake; it recovers on open."""

    def __init__(self, path="/log", max_segments=DEFAULT_MAX_SEGMENTS):
        if max_segments < 2:
            raise ValueError("max_segments must be at least 2")
        self._dir = path
        self._max_segments = max_segments
        self._buf = bytearray(_CHUNK_BYTES)
        self._mv = memoryview(self._buf)
        try:
            os.mkdir(path)
        except OSError:
            pass  # already there
        self._floor = 0  # every seq <= floor is acked or dropped: never handed out
        self._acked = 0
        self._dropped = 0
        self._reserved = 0  # highest seq handed out by the caller before it was stored (reserve())
        # Seqs outside this class are stored seq + offset (rebase()); inside, stored seqs.
        self._offset = 0
        self._load_state()
        self._segs = sorted(int(n[:8], 16) for n in os.listdir(path) if len(n) == 12 and n[8:] == ".seg")
        self._tail_size = 0
        self._tail_ok = True
        tail_end = 1
        if self._segs:
            tail_end, self._tail_size, size = self._scan(self._segs[-1])
            # a damaged tail is never appended to, and its seqs are never
            # reused: each damaged byte might have been a record the host has
            # seen, so the next append starts a new segment past all of them
            self._tail_ok = size == self._tail_size
            tail_end += size - self._tail_size
        self._next = max(tail_end, self._floor + 1)

    # ------------------------------------------------------------ files
    def _name(self, first):
        return "%s/%08x.seg" % (self._dir, first)

    def _load_state(self):
        for name in ("/state", "/state.new"):
            try:
                with open(self._dir + name, "rb") as f:
                    n = f.readinto(self._mv[:_STATE_LEN])
            except OSError:
                continue
            if n != _STATE_LEN:
                continue
            magic, floor, acked, dropped, reserved, offset, crc = struct.unpack_from("<IIIIIII", self._buf, 0)
            if magic == _STATE_MAGIC and crc == binascii.crc32(self._mv[:24]) & 0xFFFFFFFF:
                self._floor, self._acked, self._dropped = floor, acked, dropped
                self._reserved, self._offset = reserved, offset
                return

    def _save_state(self):
        struct.pack_into("<IIIIII", self._buf, 0, _STATE_MAGIC, self._floor, self._acked, self._dropped,
                         self._reserved, self._offset)
        struct.pack_into("<I", self._buf, 24, binascii.crc32(self._mv[:24]) & 0xFFFFFFFF)
        tmp = self._dir + "/state.new"
        with open(tmp, "wb") as f:
            f.write(self._mv[:_STATE_LEN])
        os.rename(tmp, self._dir + "/state")

    def _chunk(self, f, expected):
        """Read the next chunk of an open segment into the buffer.

        Returns its record count, or -1 at the end of the segment's good data
        (end of file, torn chunk, bad CRC, broken seq continuity)."""
        mv = self._mv
        if f.readinto(mv[:_HDR]) != _HDR:
            return -1
        magic, version, length, count, first, crc = struct.unpack_from("<BBHHII", self._buf, 0)
        if magic != _MAGIC or version != _VERSION or length > _CHUNK_BYTES - _HDR or first != expected:
            return -1
        if length and f.readinto(mv[_HDR:_HDR + length]) != length:
            return -1
        if binascii.crc32(mv[_HDR:_HDR + length], binascii.crc32(mv[:10])) & 0xFFFFFFFF != crc:
            return -1
        pos = _HDR
        end = _HDR + length
        for _ in range(count):
            if pos >= end:
                return -1
            pos += 1 + self._buf[pos]
        if pos != end:
            return -1
        return count

    def _scan(self, first):
        """(next seq, bytes of good chunks, file size) of one segment."""
        seq = first
        good = 0
        with open(self._name(first), "rb") as f:
            while True:
                count = self._chunk(f, seq)
                if count < 0:
                    break
                seq += count
                good += _HDR + struct.unpack_from("<H", self._buf, 2)[0]
            size = f.seek(0, 2)
        return seq, good, size

    # ------------------------------------------------------------ append
    def _fit(self, records, i, room):
        """How far records[i:] fill `room` bytes when packed as chunks."""
        used = 0
        chunk = -1
        n = len(records)
        while i < n:
            need = 1 + len(records[i])
            if chunk >= 0 and chunk + need <= _CHUNK_BYTES - _HDR:
                chunk += need
            else:
                need += _HDR
                chunk = need - _HDR
            if used + need > room:
                break
            used += need
            i += 1
        return i

    def _write(self, f, records, i, j, seq):
        buf = self._buf
        mv = self._mv
        while i < j:
            pos = _HDR
            k = i
            while k < j and pos + 1 + len(records[k]) <= _CHUNK_BYTES:
                r = records[k]
                buf[pos] = len(r)
                buf[pos + 1:pos + 1 + len(r)] = r
                pos += 1 + len(r)
                k += 1
            struct.pack_into("<BBHHI", buf, 0, _MAGIC, _VERSION, pos - _HDR, k - i, seq)
            crc = binascii.crc32(mv[_HDR:pos], binascii.crc32(mv[:10])) & 0xFFFFFFFF
            struct.pack_into("<I", buf, 10, crc)
            f.write(mv[:pos])
            seq += k - i
            i = k
        return seq

    def _new_segment(self):
        """Make room for a segment named next seq; returns True if it is new."""
        if self._segs and self._segs[-1] == self._next:
            return False  # a tail that holds no good chunk: rewritten in place
        self._forget_upto(self._floor)
        while len(self._segs) >= self._max_segments:
            self._drop_oldest()
        self._segs.append(self._next)
        return True

    def _drop_oldest(self):
        first = self._segs[0]
        end = self._segs[1]  # max_segments >= 2 and the log is full
        lost = end - max(first, self._floor + 1)
        if lost > 0:
            self._dropped += lost
        if end - 1 > self._floor:
            self._floor = end - 1
        # state first: a cut before the remove leaves a segment that is
        # already below the floor, which nobody reads and the next trim removes
        self._save_state()
        os.remove(self._name(first))
        self._segs.pop(0)

    def append(self, records):
        """Store a batch of records durably; returns the seq of the first.

        When it returns, every record is committed. The batch is atomic (all
        or none survive a power cut) when it fits one segment, which a batch
        of at most BATCH_BYTES (records of at most 64 B) always does."""
        for r in records:
            if len(r) > MAX_RECORD:
                raise ValueError("record longer than 255 bytes")
        first = self._next
        if self._next + len(records) > _SEQ_MAX:
            raise ValueError("seq space exhausted")
        i = 0
        n = len(records)
        while i < n:
            room = SEGMENT_BYTES - self._tail_size if self._segs and self._tail_ok else 0
            j = self._fit(records, i, room)
            if j < n and (j == i or self._fit(records, i, SEGMENT_BYTES) == n):
                # rest does not fit the current segment: start a new one (the
                # batch stays in one file, so it commits at once)
                self._new_segment()
                self._tail_size = 0
                self._tail_ok = True
                mode = "wb"
                j = self._fit(records, i, SEGMENT_BYTES)
            else:
                mode = "ab"
            with open(self._name(self._segs[-1]), mode) as f:
                self._next = self._write(f, records, i, j, self._next)
                self._tail_size = f.tell()
            i = j
        return first + self._offset

    # ------------------------------------------------------------ read / trim
    def read(self, from_seq=0, max_records=100):
        """Yield (seq, record) in seq order, starting at from_seq (or the
        first one not acked), at most max_records. `record` is a memoryview
        into the log's buffer, valid until the next item: copy what you keep.
        Finish (or close()) the iteration before the next append or trim."""
        seq0 = max(from_seq - self._offset, self._floor + 1)
        offset = self._offset
        given = 0
        segs = self._segs
        for idx in range(len(segs)):
            end = segs[idx + 1] if idx + 1 < len(segs) else self._next
            if end <= seq0:
                continue
            seq = segs[idx]
            with open(self._name(seq), "rb") as f:
                while True:
                    count = self._chunk(f, seq)
                    if count < 0:
                        break
                    pos = _HDR
                    for k in range(count):
                        size = self._buf[pos]
                        if seq + k >= seq0:
                            yield seq + k + offset, self._mv[pos + 1:pos + 1 + size]
                            given += 1
                            if given >= max_records:
                                return
                        pos += 1 + size
                    seq += count

    def trim(self, upto):
        """The host committed every seq <= upto: persist that, then delete
        the segments that hold nothing newer."""
        upto = min(upto - self._offset, self._next - 1)
        if upto > self._acked:
            self._acked = upto
            if upto > self._floor:
                self._floor = upto
            self._save_state()
        self._forget_upto(self._floor)

    def advance(self, next_seq):
        """The host committed every seq below `next_seq`, including seqs this
        log never stored (samples uploaded straight from RTC memory): persist
        that, drop whatever is covered, and number the next append from there.

        Only for an ack: every record held must be below `next_seq`."""
        next_seq -= self._offset
        upto = next_seq - 1
        if upto <= self._floor and next_seq <= self._next:
            return
        if upto > self._acked:
            self._acked = upto
        if upto > self._floor:
            self._floor = upto
        if next_seq > self._next:
            self._next = next_seq
            self._tail_ok = False  # chunks must continue their segment's seqs: start a new one
        self._save_state()
        self._forget_upto(self._floor)

    def rebase(self, next_seq):
        """Number the oldest record held (or the next append) `next_seq`, and
        everything after it accordingly; seqs only ever move up.

        For a device whose log restarted (fresh flash) under an id the host
        already holds samples for: its ack is then beyond anything this log
        numbered, and without a rebase the host would take the new samples
        for duplicates of old ones."""
        first = self._floor + 1
        if self._segs and self._segs[0] > first:
            first = self._segs[0]
        if first > self._next:
            first = self._next
        offset = next_seq - first
        if offset > self._offset:
            self._offset = offset
            self._save_state()

    def reserve(self, upto):
        """Persist that seqs up to `upto` are in use although not stored yet
        (samples sent from RTC memory before they reached flash). After a
        power loss, stats()["reserved"] tells the caller which seqs were lost."""
        if upto > self._reserved:
            self._reserved = upto
            self._save_state()

    def _forget_upto(self, floor):
        segs = self._segs
        while segs:
            end = segs[1] if len(segs) > 1 else self._next
            if end - 1 > floor:
                break
            os.remove(self._name(segs[0]))
            segs.pop(0)
            if not segs:
                self._tail_size = 0
                self._tail_ok = True

    def stats(self):
        first = self._floor + 1
        if self._segs and self._segs[0] > first:
            first = self._segs[0]
        if first > self._next:
            first = self._next
        size = 0
        for s in self._segs:
            size += os.stat(self._name(s))[6]
        offset = self._offset
        return {
            "first_seq": first + offset,
            "next_seq": self._next + offset,
            "backlog": self._next - first,
            "bytes": size,
            "segments": len(self._segs),
            "dropped": self._dropped,
            "acked": self._acked + offset if self._acked else 0,
            "reserved": self._reserved,
            "offset": offset,
        }
