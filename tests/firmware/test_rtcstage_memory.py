"""The RTC stage in RTC memory (agent/rtcstage.py and stagerecode.py), as units
on the MicroPython unix port with a fake machine.RTC: the bytes save() writes,
field by field as the module's layout gives them; what load() makes of damaged,
foreign, short and trailer-less memory; the capacity bound; the edges of
shift_times and drop_upto. test_agent_rtcstage.py checks the in-place rewrites
on generated stages against a model; this file does not repeat that."""

import struct
import zlib

import pytest

MODULES = ("lib/agent/rtcstage.py", "lib/agent/stagerecode.py", "lib/agent/varint.py")
RTC_MAX = 2048
HEADER = 32
TRAILER = 14
CAPACITY = RTC_MAX - HEADER - TRAILER

# The stage of the layout cases: three samples of two channels, seqs 41..43.
SAMPLES = [(1000, [5, None]), (1060, [3, 7]), (1050, [None, 8])]
# Its payload as the layout describes it, sample by sample:
#   bitmap 0b10, dt 0 (from base_t),    v0 5 - 0 -> zigzag 10
#   bitmap 0,    dt 60 -> 120,          v0 3 - 5 -> 3, v1 7 - 0 -> 14
#   bitmap 0b01, dt -10 -> 19,          v1 8 - 7 -> 2
PAYLOAD = "02000a" + "0078030e" + "011302"

DEVICE = f"SAMPLES = {SAMPLES!r}\n" + """
import binascii, hashlib
from agent import rtcstage


class FakeRTC:
    # machine.RTC as the ESP32 port has it: memory() returns the bytes the last
    # memory(data) stored, at most 2048 of them.
    stored = b""
    writes = 0

    def memory(self, data=None):
        if data is None:
            return FakeRTC.stored
        if len(data) > 2048:
            raise ValueError("buffer too long")
        FakeRTC.stored = bytes(data)
        FakeRTC.writes += 1


class FakeMachine:
    RTC = FakeRTC


rtcstage.machine = FakeMachine


def hx(b):
    return binascii.hexlify(b).decode()


def state_fields(st):
    return {"valid": st.valid, "nchan": st.nchan, "wake_count": st.wake_count, "next_seq": st.next_seq,
            "base_t": st.base_t, "staged": st.staged, "payload_len": st.payload_len,
            "skip_wakes": st.skip_wakes, "backoff_level": st.backoff_level, "flags": st.flags,
            "log_backlog": st.log_backlog, "crashes": st.crashes, "mark": hx(st.mark)}


def state(st):
    out = state_fields(st)
    out["samples"] = [list(s) for s in st.samples()]
    return out


def layout_stage():
    st = rtcstage.Stage()
    st.next_seq = 41
    for t, values in SAMPLES:
        st.add(t, values)
    st.wake_count = 7
    st.skip_wakes = 2
    st.backoff_level = 300  # more than the byte holds
    st.flags = rtcstage.FLAG_UPLOAD_REQUESTED | rtcstage.FLAG_JOBS
    st.log_backlog = 123456
    st.crashes = 2
    st.mark = b"abcdefgh"
    return st


def saved():
    FakeRTC.stored = b""
    layout_stage().save()
    return FakeRTC.stored


def digest(st):
    h = hashlib.sha256()
    for seq, t, values in st.samples():
        h.update(repr((seq, t, values)).encode())
    return hx(h.digest()[:8])


def summary(st):
    # state() with the samples as a digest: a few bytes of heap for any stage
    out = state_fields(st)
    out["samples"] = digest(st)
    return out


def load(memory, view=None):
    FakeRTC.stored = bytes(memory)
    st = rtcstage.Stage()
    try:
        ok = st.load()
    except Exception as e:
        return "raised %s: %s" % (type(e).__name__, e)
    return [ok, (view or state)(st)]


GOOD = saved()
END = 32 + layout_stage().payload_len
AFRESH = load(b"", summary)
WHOLE = load(GOOD, summary)[1]
WHOLE_NO_TRAILER = load(GOOD, summary)[1]
WHOLE_NO_TRAILER["crashes"] = 0
WHOLE_NO_TRAILER["mark"] = "00" * 8


def outcome(memory):
    # F: no stage, everything afresh; T: the stage whole; t: the stage whole,
    # its trailer forgotten; otherwise what load() did.
    got = load(memory, summary)
    if got == AFRESH:
        return "F"
    if got == [True, WHOLE]:
        return "T"
    if got == [True, WHOLE_NO_TRAILER]:
        return "t"
    return repr(got)


def damaged_everywhere(mask):
    out = []
    for i in range(len(GOOD)):
        raw = bytearray(GOOD)
        raw[i] ^= mask
        out.append(outcome(raw))
    return out


def with_byte(i, value):
    raw = bytearray(GOOD)
    raw[i] = value
    return raw


def other_channel_counts():
    # {what load() did: [byte-3 values]} for every value but the true 2 where
    # it did not start afresh
    odd = {}
    for n in range(256):
        if n != 2:
            got = outcome(with_byte(3, n))
            if got != "F":
                kind = got.split(":")[0].strip("'") if got.startswith("'raised") else "loaded as a stage"
                odd.setdefault(kind, []).append(n)
    return odd


def continues_after_load():
    # add() after load() goes on from the last staged time and values
    load(GOOD)
    st = rtcstage.Stage()
    st.load()
    seq = st.add(1110, [4, 8])
    return [seq, [list(s) for s in st.samples()][-1], st.payload_len]


def full(nchan, values):
    st = rtcstage.Stage()
    t = 1000
    while st.room_for(nchan):
        st.add(t, values(st.staged))
        t += 60
    try:
        st.add(t, values(st.staged))
        refused = None
    except ValueError as e:
        refused = str(e)
    FakeRTC.stored = b""
    st.save()
    return {"staged": st.staged, "payload_len": st.payload_len, "stored": len(FakeRTC.stored), "refused": refused,
            "loaded": load(FakeRTC.stored, summary)[1]["staged"]}


def worst(k):
    # every value delta as long as a uvarint's 64 bits allow: -2**62, then 2**62 - 1, ...
    return [(1 << 62) - 1 if k % 2 else -(1 << 62)] * 8


def older_full_stage():
    # An older agent saved a stage too full for the trailer: 1003 samples of no
    # channels, 2 bytes each (bitmap, dt 0), 2006 bytes: end + trailer > 2048.
    st = rtcstage.Stage()
    st.next_seq = 5000
    st.add(1000, [])
    for i in range(1, 1003):
        st.buf[32 + 2 * i] = 0
        st.buf[32 + 2 * i + 1] = 0
    st.staged = 1003
    st.payload_len = 2006
    st.next_seq = 6003
    st.crashes = 3
    FakeRTC.stored = b""
    st.save()
    stored = len(FakeRTC.stored)
    got = rtcstage.Stage()
    ok = got.load()
    first = last = None
    for sample in got.samples():
        first = first or list(sample)
        last = list(sample)
    return {"stored": stored, "loaded": ok, "staged": got.staged, "first": first, "last": last,
            "crashes": got.crashes}


def refused_add(values):
    rtcstage.Stage().add(1000, values)


def other_count():
    st = rtcstage.Stage()
    st.add(1000, [1, 2])
    staged = st.room_for(3)
    st.clear_samples()
    return [staged, st.room_for(3), st.add(1060, [1, 2, 3]), st.nchan]


def set_mark(mark):
    FakeRTC.stored = b""
    FakeRTC.writes = 0
    st = layout_stage()
    st.set_mark(mark)
    return [FakeRTC.writes, load(FakeRTC.stored)[1]["mark"]]


def uniform_shift():
    st = layout_stage()
    before = hx(st.buf[32:32 + st.payload_len])
    ok = st.shift_times(849000000, 2000)
    return [ok, st.base_t, hx(st.buf[32:32 + st.payload_len]) == before, [s[1] for s in st.samples()]]


def no_shift(delta, before):
    st = layout_stage()
    ok = st.shift_times(delta, before)
    return [ok, state(st)["samples"], st.base_t]


def drop(upto):
    st = layout_stage()
    st.drop_upto(upto)
    return {"staged": st.staged, "first_seq": st.first_seq, "next_seq": st.next_seq, "base_t": st.base_t,
            "samples": [list(s) for s in st.samples()], "payload": hx(st.buf[32:32 + st.payload_len])}


def drop_then_add():
    st = layout_stage()
    st.drop_upto(42)
    seq = st.add(1110, [4, 8])
    return [seq, [list(s) for s in st.samples()]]


case("saved", lambda: hx(GOOD))
case("loaded", lambda: load(GOOD))
case("empty memory", lambda: load(b""))
case("memory shorter than the header", lambda: outcome(GOOD[:31]))
case("payload past the memory's end", lambda: outcome(GOOD[:END - 1]))
case("damaged by bit 0", lambda: damaged_everywhere(0x01))
case("damaged by bit 7", lambda: damaged_everywhere(0x80))
case("every other channel count", lambda: other_channel_counts())
case("without a trailer", lambda: outcome(GOOD[:END]))
case("a trailer of another kind", lambda: outcome(with_byte(END, 0x55)))
case("continues after load", continues_after_load)
case("full, 8 worst-case channels", lambda: full(8, worst))
case("full, 2 small channels", lambda: full(2, lambda k: [k % 5, -(k % 3)]))
case("full, no channels", lambda: full(0, lambda k: []))
case("older full stage", older_full_stage)
case("nine channels", lambda: refused_add([0] * 9))
case("another channel count", other_count)
case("set_mark", lambda: set_mark(b"0123456789"))
case("set_mark None", lambda: set_mark(None))
case("uniform shift", uniform_shift)
case("shift by 0", lambda: no_shift(0, 2000))
case("shift of nothing before", lambda: no_shift(60, 1000))
case("shift of nothing staged", lambda: rtcstage.Stage().shift_times(60, 2000))
case("drop below the first", lambda: drop(40))
case("drop the oldest", lambda: drop(41))
case("drop all but the newest", lambda: drop(42))
case("drop all", lambda: drop(43))
case("drop past next_seq", lambda: drop(100))
case("drop then add", drop_then_add)
"""

LAYOUT_STATE = {
    "valid": True, "nchan": 2, "wake_count": 7, "next_seq": 44, "base_t": 1000, "staged": 3, "payload_len": 10,
    "skip_wakes": 2, "backoff_level": 255, "flags": 5, "log_backlog": 123456, "crashes": 2,
    "mark": b"abcdefgh".hex(), "samples": [[41, 1000, [5, None]], [42, 1060, [3, 7]], [43, 1050, [None, 8]]],
}
END = HEADER + len(PAYLOAD) // 2


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


def test_save_writes_the_documented_header_payload_and_trailer(device):
    raw = bytes.fromhex(device.value("saved"))
    assert len(raw) == END + TRAILER
    magic, version, nchan, crc = struct.unpack_from("<2sBBI", raw, 0)
    assert (magic, version, nchan) == (b"MS", 1, 2)
    assert crc == zlib.crc32(raw[8:END]), "the CRC covers bytes 8 up to the payload's end"
    assert struct.unpack_from("<IIIHHHBBI", raw, 8) == (7, 44, 1000, 3, 10, 2, 255, 5, 123456)
    assert raw[HEADER:END].hex() == PAYLOAD
    trailer = raw[END:]
    assert trailer[:10] == b"T" + bytes([2]) + b"abcdefgh"
    assert struct.unpack("<I", trailer[10:])[0] == zlib.crc32(trailer[:10])


def test_load_gives_back_every_saved_field_and_sample(device):
    assert device.value("loaded") == [True, LAYOUT_STATE]


def test_empty_rtc_memory_is_no_stage_and_every_field_starts_at_zero(device):
    ok, state = device.value("empty memory")
    assert ok is False
    assert state == {"valid": False, "nchan": 0, "wake_count": 0, "next_seq": 0, "base_t": 0, "staged": 0,
                     "payload_len": 0, "skip_wakes": 0, "backoff_level": 0, "flags": 0, "log_backlog": 0,
                     "crashes": 0, "mark": "00" * 8, "samples": []}


def test_memory_shorter_than_the_header_is_no_stage(device):
    assert device.value("memory shorter than the header") == "F"


def test_a_payload_that_runs_past_the_memory_is_no_stage(device):
    assert device.value("payload past the memory's end") == "F"


@pytest.mark.parametrize("mask", ["bit 0", "bit 7"])
def test_a_damaged_header_or_payload_byte_starts_afresh(device, mask):
    got = device.value("damaged by " + mask)[:END]
    assert {i: o for i, o in enumerate(got) if o != "F"} == {}


@pytest.mark.parametrize("mask", ["bit 0", "bit 7"])
def test_a_damaged_trailer_byte_keeps_the_stage_and_forgets_crashes_and_mark(device, mask):
    got = device.value("damaged by " + mask)[END:]
    assert got == ["t"] * TRAILER


def test_a_damaged_channel_count_starts_afresh_and_never_raises(device):
    """Byte 3 lies before the CRC's range: a wrong channel count must not pass
    as a stage (its samples decoded wrong) nor raise from load(), which would
    crash every wake, RTC memory surviving the crash's deep sleep."""
    assert device.value("every other channel count") == {}


def test_a_stage_saved_without_a_trailer_loads_with_no_crashes_and_no_mark(device):
    assert device.value("without a trailer") == "t"


def test_a_trailer_of_another_kind_is_ignored(device):
    assert device.value("a trailer of another kind") == "t"


def test_add_after_load_continues_the_deltas(device):
    seq, last, payload_len = device.value("continues after load")
    assert (seq, last) == (44, [44, 1110, [4, 8]])
    # bitmap, dt 60 -> 120, v0 4 - 3 -> 2, v1 8 - 8 -> 0: four bytes on the loaded ten
    assert payload_len == 14


@pytest.mark.parametrize("name", ["full, 8 worst-case channels", "full, 2 small channels", "full, no channels"])
def test_room_for_stops_adds_before_rtc_memory_overflows(device, name):
    got = device.value(name)
    assert got["refused"] == "RTC stage full"
    assert got["payload_len"] <= CAPACITY
    assert got["stored"] == HEADER + got["payload_len"] + TRAILER <= RTC_MAX
    assert got["loaded"] == got["staged"]


def _staged_when_full(nchan, first, then):
    """Samples add() takes before room_for(nchan) says no, for samples of `first`
    bytes and then `then` bytes each: room_for keeps room for the longest sample,
    a bitmap and nchan + 1 ten-byte varints."""
    size = staged = 0
    while size + 1 + 10 * (nchan + 1) <= CAPACITY:
        size += then if staged else first
        staged += 1
    return staged


def test_a_full_stage_holds_what_the_capacity_allows(device):
    # bitmap, dt (0, then 60 -> 120: one byte), 8 value deltas of 9 bytes (-2**62 from 0), then 10
    assert device.value("full, 8 worst-case channels")["staged"] == _staged_when_full(8, 2 + 8 * 9, 2 + 8 * 10) == 24
    # bitmap and dt: 2 bytes a sample
    assert device.value("full, no channels")["staged"] == _staged_when_full(0, 2, 2) == 996


def test_a_stage_too_full_for_the_trailer_is_saved_without_it_and_loads(device):
    assert device.value("older full stage") == {"stored": HEADER + 2006, "loaded": True, "staged": 1003,
                                                "first": [5000, 1000, []], "last": [6002, 1000, []], "crashes": 0}


def test_more_than_eight_channels_are_refused(device):
    assert device.error("nine channels") == ("ValueError", "too many channels")


def test_a_stage_takes_one_channel_count_until_it_is_emptied(device):
    assert device.value("another channel count") == [False, True, 1, 3], "seqs go on"


def test_set_mark_saves_at_once_the_first_eight_bytes(device):
    assert device.value("set_mark") == [1, b"01234567".hex()]


def test_set_mark_none_clears_the_mark(device):
    assert device.value("set_mark None") == [1, "00" * 8]


def test_a_shift_of_every_sample_moves_only_base_t(device):
    ok, base_t, same_bytes, times = device.value("uniform shift")
    assert (ok, base_t, same_bytes) == (True, 849001000, True)
    assert times == [849001000, 849001060, 849001050]


@pytest.mark.parametrize("name", ["shift by 0", "shift of nothing before"])
def test_a_shift_that_moves_nothing_changes_nothing(device, name):
    assert device.value(name) == [True, LAYOUT_STATE["samples"], 1000]


def test_a_shift_of_an_empty_stage_succeeds(device):
    assert device.value("shift of nothing staged") is True


def test_dropping_below_the_first_seq_changes_nothing(device):
    got = device.value("drop below the first")
    assert got["samples"] == LAYOUT_STATE["samples"] and got["payload"] == PAYLOAD
    assert (got["first_seq"], got["next_seq"]) == (41, 44)


def test_dropping_the_oldest_rebases_time_and_first_values(device):
    got = device.value("drop the oldest")
    assert got["samples"] == LAYOUT_STATE["samples"][1:]
    assert (got["staged"], got["first_seq"], got["next_seq"], got["base_t"]) == (2, 42, 44, 1060)
    # bitmap 0, dt 0, v0 3 -> 6, v1 7 -> 14; then the third sample as it was
    assert got["payload"] == "0000060e" + "011302"


def test_dropping_all_but_the_newest_leaves_it_alone(device):
    got = device.value("drop all but the newest")
    assert got["samples"] == [[43, 1050, [None, 8]]]
    assert got["payload"] == "010010", "dt 0 from its own base_t; v1 8 - 0 -> 16"


def test_dropping_every_sample_empties_the_stage_and_keeps_next_seq(device):
    got = device.value("drop all")
    assert (got["staged"], got["first_seq"], got["next_seq"], got["samples"]) == (0, 44, 44, [])


def test_an_ack_past_next_seq_moves_next_seq_so_seqs_are_never_reused(device):
    got = device.value("drop past next_seq")
    assert (got["staged"], got["first_seq"], got["next_seq"]) == (0, 101, 101)


def test_add_after_a_drop_continues_the_deltas(device):
    assert device.value("drop then add") == [44, [[43, 1050, [None, 8]], [44, 1110, [4, 8]]]]
