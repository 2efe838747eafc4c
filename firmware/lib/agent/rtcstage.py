# Samples staged in RTC memory between wakes, and the wake counters.
#
# RTC slow memory survives deep sleep and resets but not power loss, and
# holds at most 2048 bytes. Staging a few dozen wakes of samples here and
# flushing them to the flash log in one batch costs one flash write per
# batch instead of one per wake (see docs/flashlog.md for the wear numbers).
# What is staged when the power fails is lost: at most one batch.
#
# Layout (little endian), protected by a CRC-32 over everything after it (the
# channel count before it is checked by load(): the payload must decode as
# exactly `staged` samples of that many channels):
#
#   off size field
#   0   2    magic b"MS"
#   2   1    version (1)
#   3   1    channel count of the staged samples
#   4   4    crc32 (binascii.crc32) of bytes 8 .. 32+payload_len
#   8   4    wake_count     wakes since the RTC was last valid
#   12  4    next_seq       sequence number of the next sample
#   16  4    base_t         time of the first staged sample (s since 1970)
#   20  2    staged         number of staged samples
#   22  2    payload_len    bytes of staged payload
#   24  2    skip_wakes     uploads to skip (network backoff)
#   26  1    backoff_level  consecutive failed uploads (capped)
#   27  1    flags          FLAG_* below
#   28  4    log_backlog    samples waiting in the flash log (as of its last use)
#   32  ..   payload        per sample: a missing-channel bitmap byte, the
#                           time delta (zigzag varint) from the previous sample
#                           (the first from base_t), then per channel present the
#                           value delta (zigzag varint) from the previous present
#                           value of that channel (the first from 0)
#   ..   14   trailer        (optional; older stages have none) b"T", crashes
#                           u8 (consecutive wakes that ended in a crash), mark
#                           8 bytes (digest prefix of the envelope being checked,
#                           zeros for none), crc32 of the 10 bytes before it
#
# The clock correction after a power loss (shift_times) and the trim by the
# host's ack (drop_upto) rewrite the payload in place, in a few integers of
# heap: a list of every staged sample once ran out of heap at the wake that set
# the clock, a few hundred wakes after a power loss (issue 13).
#
# The trailer lets a wake that follows a crash know what the crashed wake was
# doing (agent.jobs rejects the envelope that crashed the agent) without a
# flash write: RTC memory costs no wear and survives the crash's deep sleep.

import binascii
import struct

import machine

from agent.varint import get_uvarint, missing_bits, put_uvarint, unzigzag, zigzag

_MAGIC = b"MS"
_VERSION = 1
_HEADER = 32
_RTC_MAX = 2048
_TRAILER = 14
_TRAILER_MAGIC = 84  # "T"
_CAPACITY = _RTC_MAX - _HEADER - _TRAILER
_MAX_CHANNELS = 8
_NO_MARK = b"\x00" * 8
# The flag bits, one owner (agent.wake and agent.jobs use these names):
FLAG_UPLOAD_REQUESTED = 1  # connect at the next wake whatever the cadence
FLAG_TRIAL = 2  # a connectivity config, a certificate or an update is on trial: connect every wake
FLAG_JOBS = 4  # a job in progress or a status to send: load the job code
FLAG_CLOCK_FLOOR = 8  # the clock was only moved to a TLS floor (agent.tlsid): the host's time may set it


class Stage:
    """The RTC-resident wake state; `load()` it at wake, `save()` before sleep."""

    def __init__(self):
        self.buf = bytearray(_RTC_MAX)
        self.valid = False
        self.nchan = 0
        self.wake_count = 0
        self.next_seq = 0
        self.base_t = 0
        self.staged = 0
        self.payload_len = 0
        self.skip_wakes = 0
        self.backoff_level = 0
        self.flags = 0
        self.log_backlog = 0
        self.crashes = 0
        self.mark = _NO_MARK
        # Decoding state of the last staged sample, to append deltas.
        self._last_t = 0
        self._last_values = [0] * _MAX_CHANNELS

    def load(self):
        """Read RTC memory; returns False (and starts afresh) when it holds no valid stage."""
        raw = machine.RTC().memory()
        n = len(raw)
        self.valid = False
        if n >= _HEADER and raw[0:2] == _MAGIC and raw[2] == _VERSION:
            (crc,) = struct.unpack_from("<I", raw, 4)
            fields = struct.unpack_from("<IIIHHHBBI", raw, 8)
            payload_len = fields[4]
            if _HEADER + payload_len <= n and binascii.crc32(memoryview(raw)[8:_HEADER + payload_len]) == crc:
                self.nchan = raw[3]
                (self.wake_count, self.next_seq, self.base_t, self.staged, self.payload_len,
                 self.skip_wakes, self.backoff_level, self.flags, self.log_backlog) = fields
                self.buf[:_HEADER + payload_len] = raw[:_HEADER + payload_len]
                self.valid = True
                self._load_trailer(raw, _HEADER + payload_len)
        if self.valid and not self._replay():
            self.valid = False
        if not self.valid:
            self.nchan = 0
            self.wake_count = self.next_seq = self.base_t = self.staged = self.payload_len = 0
            self.skip_wakes = self.backoff_level = self.flags = self.log_backlog = 0
            self.crashes = 0
            self.mark = _NO_MARK
            return False
        return True

    def _load_trailer(self, raw, end):
        self.crashes = 0
        self.mark = _NO_MARK
        if len(raw) >= end + _TRAILER and raw[end] == _TRAILER_MAGIC:
            (crc,) = struct.unpack_from("<I", raw, end + 10)
            if binascii.crc32(memoryview(raw)[end:end + 10]) == crc:
                self.crashes = raw[end + 1]
                self.mark = bytes(raw[end + 2:end + 10])

    def save(self):
        buf = self.buf
        buf[0:2] = _MAGIC
        buf[2] = _VERSION
        buf[3] = self.nchan
        struct.pack_into("<IIIHHHBBI", buf, 8, self.wake_count, self.next_seq, self.base_t, self.staged,
                         self.payload_len, self.skip_wakes, min(self.backoff_level, 255), self.flags,
                         self.log_backlog)
        end = _HEADER + self.payload_len
        struct.pack_into("<I", buf, 4, binascii.crc32(memoryview(buf)[8:end]))
        if end + _TRAILER > _RTC_MAX:  # a full stage saved by an agent without the trailer
            machine.RTC().memory(memoryview(buf)[:end])
            return
        buf[end] = _TRAILER_MAGIC
        buf[end + 1] = min(self.crashes, 255)
        buf[end + 2:end + 10] = self.mark
        struct.pack_into("<I", buf, end + 10, binascii.crc32(memoryview(buf)[end:end + 10]))
        machine.RTC().memory(memoryview(buf)[:end + _TRAILER])

    def set_mark(self, mark):
        """Note (8 bytes, or None to clear) what this wake is about to risk, in RTC
        memory only: if it crashes, the next wake finds it in `mark`."""
        self.mark = _NO_MARK if mark is None else bytes(mark[:8])
        self.save()

    # --- samples -----------------------------------------------------------
    def room_for(self, nchan):
        """Whether one more sample of `nchan` channels surely fits."""
        if self.staged and nchan != self.nchan:
            return False
        return self.payload_len + 1 + 10 * (nchan + 1) <= _CAPACITY

    def add(self, t, values):
        """Stage a sample (values: ints or None); returns its seq. Check room_for first."""
        nchan = len(values)
        if nchan > _MAX_CHANNELS:
            raise ValueError("too many channels")
        if not self.room_for(nchan):
            raise ValueError("RTC stage full")
        buf = self.buf
        pos = _HEADER + self.payload_len
        if self.staged == 0:
            self.nchan = nchan
            self.base_t = t
            self._last_t = t
            for i in range(_MAX_CHANNELS):
                self._last_values[i] = 0
        missing = missing_bits(values)
        buf[pos] = missing
        pos = put_uvarint(buf, pos + 1, zigzag(t - self._last_t))
        self._last_t = t
        for i in range(nchan):
            v = values[i]
            if v is not None:
                pos = put_uvarint(buf, pos, zigzag(v - self._last_values[i]))
                self._last_values[i] = v
        self.payload_len = pos - _HEADER
        seq = self.next_seq
        self.next_seq += 1
        self.staged += 1
        return seq

    def samples(self):
        """Yield the staged samples as (seq, t, values list with None for missing)."""
        buf = self.buf
        pos = _HEADER
        end = _HEADER + self.payload_len
        t = self.base_t
        last = [0] * self.nchan
        seq = self.next_seq - self.staged
        for _ in range(self.staged):
            missing = buf[pos]
            z, pos = get_uvarint(buf, pos + 1, end)
            t += unzigzag(z)
            values = []
            for i in range(self.nchan):
                if missing & (1 << i):
                    values.append(None)
                else:
                    z, pos = get_uvarint(buf, pos, end)
                    last[i] += unzigzag(z)
                    values.append(last[i])
            yield seq, t, values
            seq += 1
        if pos != end:
            raise ValueError("stage payload has trailing bytes")

    def _replay(self):
        # Rebuild the delta state so that add() can continue after load(); False
        # when the payload is not `staged` samples of `nchan` channels. The
        # channel count (byte 3) lies outside the CRC: a damaged one must start
        # afresh, not raise, which would crash every wake (RTC memory survives
        # the crash's deep sleep).
        if self.nchan > _MAX_CHANNELS:
            return False
        self._last_t = self.base_t
        try:
            for _seq, t, values in self.samples():
                self._last_t = t
                for i in range(len(values)):
                    if values[i] is not None:
                        self._last_values[i] = values[i]
        except ValueError:
            return False
        return True

    def clear_samples(self):
        self.staged = 0
        self.payload_len = 0

    @property
    def first_seq(self):
        """Seq of the oldest staged sample (== next_seq when none is staged)."""
        return self.next_seq - self.staged

    def shift_times(self, delta, before):
        """Add `delta` seconds to every staged sample time earlier than `before`
        (the clock was just set: those samples were taken on the unset one).

        In place, in the stage's own buffer: a few integers of heap however
        many samples are staged, never an object per sample. When every time
        is on one side of `before` (the agent's case: a power loss empties the
        stage, and Wake.set_clock moves every sample taken since), only base_t
        changes. Times on both sides (a clock set some other way, by an exec
        job or at the REPL) change the time deltas where they cross; if the
        corrected stage would not fit in RTC memory, or could not be written
        in place, this returns False and changes nothing."""
        if not self.staged or not delta:
            return True
        return self._recode(0, delta, before)

    def drop_upto(self, upto):
        """Forget staged samples with seq <= upto (the host has them), in place."""
        first = self.first_seq
        if upto < first:
            return
        if upto - first + 1 >= self.staged:
            self.clear_samples()
        else:
            self._recode(upto - first + 1, 0, 0)  # never grows: always done
        self.next_seq = max(self.next_seq, upto + 1)

    def _recode(self, drop, delta, before):
        # The rewrite lives in its own module, loaded only when a correction or a
        # trim needs it and unloaded with the upload code before any job runs.
        from agent import stagerecode

        return stagerecode.recode(self, drop, delta, before)
