"""The RTC stage's in-place rewrites (agent.rtcstage: shift_times, drop_upto),
checked on generated stages against a model in CPython.

Each case fills a stage on the virtual board (real MicroPython, 128 KiB heap)
to its full capacity, or partly, with samples from a generator that runs
unchanged on both sides (every channel count 0..8, regular, jumpy, shuffled
and interleaved times, small to 44-bit values, none to all readings missing), then
applies a random run of clock corrections (deltas up to 2**31, `before`
below, inside and above the staged times), partial and whole acks, more
samples, and save/load round trips. The model is a list of (seq, t, values)
plus the format's canonical encoding, written from docs (agent.rtcstage's
layout), not from the implementation: it predicts every sample, the payload
length byte for byte, the seqs, and which corrections do not fit in RTC
memory (and so leave the stage as it was)."""

import hashlib
import json
import random

import pytest

from conftest import firmware_files

from mpfleet.protocol.codec import zigzag  # the host's, checked against the shared frame vectors

STAGE_FILES = firmware_files(("lib/agent/rtcstage.py", "lib/agent/stagerecode.py", "lib/agent/varint.py"))
RTC_MAX = 2048
HEADER = 32
TRAILER = 14
CAPACITY = RTC_MAX - HEADER - TRAILER
CLOCK_SET_AFTER = 1577836800
CASES = 160

# Runs on both sides (MicroPython and CPython): the staged samples of a case.
GEN = """
def _xorshift(s):
    s ^= (s << 13) & 0xFFFFFFFF
    s ^= s >> 17
    s ^= (s << 5) & 0xFFFFFFFF
    return s


def _rand(state, bits):
    v = 0
    n = 0
    while n < bits:
        state[0] = _xorshift(state[0])
        v = (v << 32) | state[0]
        n += 32
    return v & ((1 << bits) - 1)


def generate(seed, nchan, t0, tprofile, vbits, missing_pct):
    state = [seed | 1]
    t = t0
    last = [_rand(state, vbits + 1) - (1 << vbits) for _ in range(nchan)]
    while True:
        if tprofile == 0:  # a sample a minute, give or take
            t += 55 + _rand(state, 4)
        elif tprofile == 1:  # mostly regular, now and then a jump either way
            t += 55 + _rand(state, 4) if _rand(state, 4) else _rand(state, 31) - (1 << 30)
        elif tprofile == 2:  # anywhere
            t = _rand(state, 31)
        else:  # two clocks a second apart, interleaved (a shift moves every other sample)
            t = t0 + _rand(state, 1)
        t %= 1 << 31
        values = []
        for c in range(nchan):
            last[c] += _rand(state, vbits + 1) - (1 << vbits)
            values.append(None if _rand(state, 7) % 100 < missing_pct else last[c])
        yield t, values
"""

DEVICE = GEN + """
import hashlib, json
from agent import rtcstage


def digest(st):
    h = hashlib.sha256()
    for seq, t, values in st.samples():
        h.update(("%d:%d:%s;" % (seq, t, ",".join("-" if v is None else str(v) for v in values))).encode())
    return "".join("%02x" % b for b in h.digest())


with open("/cases.json") as f:
    cases = json.load(f)
for case in cases:
    nchan = case["nchan"]
    gen = generate(case["seed"], nchan, case["t0"], case["tprofile"], case["vbits"], case["missing"])
    st = rtcstage.Stage()
    st.next_seq = case["first_seq"]
    while st.room_for(nchan) and st.staged < case["fill"]:
        t, values = next(gen)
        st.add(t, values)
    results = []
    for op in case["ops"]:
        if op[0] == "shift":
            results.append("T" if st.shift_times(op[1], op[2]) else "F")
        elif op[0] == "drop":
            st.drop_upto(op[1])
        elif op[0] == "add":
            for _ in range(op[1]):
                if st.room_for(nchan):
                    t, values = next(gen)
                    st.add(t, values)
        else:
            st.save()
            st = rtcstage.Stage()
            results.append("L" if st.load() else "X")
    print("R", case["id"], st.payload_len, st.staged, st.first_seq, st.next_seq, "".join(results) or "-",
          digest(st))
"""


def _uvlen(n):
    size = 1
    while n > 0x7F:
        n >>= 7
        size += 1
    return size


def _fields(samples):
    """Byte length of each field of the canonical payload, in order: per sample
    the bitmap and time delta (the first from base_t = its own time), then each
    present value's delta from that channel's previous present value (from 0)."""
    out = []
    last_t = samples[0][1] if samples else 0
    last = {}
    for _, t, values in samples:
        out.append(1 + _uvlen(zigzag(t - last_t)))
        last_t = t
        for c, v in enumerate(values):
            if v is not None:
                out.append(_uvlen(zigzag(v - last.get(c, 0))))
                last[c] = v
    return out


class Model:
    def __init__(self, case):
        scope = {}
        exec(GEN, scope)  # noqa: S102 - the same generator the device runs
        self.nchan = case["nchan"]
        self.gen = scope["generate"](case["seed"], case["nchan"], case["t0"], case["tprofile"], case["vbits"],
                                     case["missing"])
        self.samples = []
        self.next_seq = case["first_seq"]
        self.results = []
        self.kinds = set()

    @property
    def payload_len(self):
        return sum(_fields(self.samples))

    def room(self):
        return self.payload_len + 1 + 10 * (self.nchan + 1) <= CAPACITY

    def add(self):
        t, values = next(self.gen)
        self.samples.append((self.next_seq, t, values))
        self.next_seq += 1

    def shift(self, delta, before):
        moved = [(s, t + delta if t < before else t, v) for s, t, v in self.samples]
        old, new = _fields(self.samples), _fields(moved)
        # In place: the new payload must fit, and where its encoding runs ahead
        # of the old one, by no more than the buffer's free end.
        ahead, run = 0, 0
        for a, b in zip(old, new):
            run += b - a
            ahead = max(ahead, run)
        fits = sum(new) <= max(CAPACITY, sum(old)) and ahead <= RTC_MAX - HEADER - sum(old)
        below = sum(1 for _, t, _ in self.samples if t < before)
        if below in (0, len(self.samples)):
            self.kinds.add("uniform")
        else:
            self.kinds.add("straddling, fits" if fits else "straddling, does not fit")
            if fits and ahead:
                self.kinds.add("runs ahead")
        if fits:
            self.samples = moved
        self.results.append("T" if fits else "F")

    def drop(self, upto):
        kept = [s for s in self.samples if s[0] > upto]
        if 0 < len(kept) < len(self.samples):
            self.kinds.add("partial drop")
        if upto >= (self.samples[0][0] if self.samples else self.next_seq):
            self.next_seq = max(self.next_seq, upto + 1)
        self.samples = kept

    def digest(self):
        h = hashlib.sha256()
        for seq, t, values in self.samples:
            h.update(("%d:%d:%s;" % (seq, t, ",".join("-" if v is None else str(v) for v in values))).encode())
        return h.hexdigest()

    def first_seq(self):
        return self.samples[0][0] if self.samples else self.next_seq


def _case(rng, i):
    nchan = i % 9
    case = {
        "id": i, "nchan": nchan, "seed": rng.getrandbits(32),
        "t0": rng.choice([946684800, CLOCK_SET_AFTER - 60 * rng.randrange(1, 2000), rng.getrandbits(31)]),
        "tprofile": rng.choice([0, 0, 1, 2, 3]), "vbits": rng.choice([0, 3, 10, 20, 44]),
        "missing": rng.choice([0, 0, 20, 70, 100]), "first_seq": rng.choice([0, 1, rng.getrandbits(31)]),
        "fill": rng.choice([10 ** 6, 10 ** 6, 10 ** 6, rng.randrange(1, 40)]),  # full, or some
    }
    model = Model(case)
    while model.room() and len(model.samples) < case["fill"]:
        model.add()
    ops = []
    for _ in range(rng.randrange(1, 5)):
        kind = rng.choice(["shift", "shift", "shift", "drop", "drop", "add", "reload"])
        if kind == "shift":
            times = sorted(t for _, t, _ in model.samples) or [CLOCK_SET_AFTER]
            before = rng.choice([CLOCK_SET_AFTER, times[0], times[-1] + 1, rng.choice(times),
                                 rng.choice(times) + 1])
            delta = rng.choice([1, 59, 1 << 7, 1 << 14, 849_000_000, rng.randrange(1, 1 << 31)])
            delta = max(1, min(delta, (1 << 32) - 1 - times[-1]))  # base_t is a u32 in RTC memory
            ops.append(["shift", delta, before])
            model.shift(delta, before)
        elif kind == "drop":
            first, nxt = model.first_seq(), model.next_seq
            upto = rng.choice([first - 1, first, rng.randrange(first, nxt + 1), nxt - 2, nxt - 1,
                               nxt + rng.randrange(0, 50)])
            ops.append(["drop", upto])
            model.drop(upto)
        elif kind == "add":
            n = rng.randrange(1, 6)
            ops.append(["add", n])
            for _ in range(n):
                if model.room():
                    model.add()
        else:
            ops.append(["reload"])
            model.results.append("L")
    case["ops"] = ops
    return case, model


@pytest.mark.slow
def test_in_place_shift_and_drop_agree_with_the_model_on_generated_stages(run_firmware):
    rng = random.Random(13)
    cases, models = zip(*(_case(rng, i) for i in range(CASES)))
    files = dict(STAGE_FILES)
    files["/cases.json"] = json.dumps(cases).encode()
    rec = run_firmware(DEVICE, files=files)
    assert "Traceback" not in rec.output and rec.exit_reason != "exception", rec.output
    got = {int(line.split()[1]): line.split()[2:] for line in rec.output.splitlines() if line.startswith("R ")}
    assert len(got) == CASES, rec.output[-2000:]
    kinds = set()
    for case, model in zip(cases, models):
        expected = [str(model.payload_len), str(len(model.samples)), str(model.first_seq()), str(model.next_seq),
                    "".join(model.results) or "-", model.digest()]
        assert got[case["id"]] == expected, json.dumps(case)
        kinds |= model.kinds
    # Every path was taken, so that each comparison above could have failed.
    assert kinds >= {"uniform", "straddling, fits", "straddling, does not fit", "runs ahead", "partial drop"}, kinds
    assert {c["nchan"] for c in cases} == set(range(9))


def test_a_full_stage_is_corrected_and_trimmed_at_every_channel_count(run_firmware):
    """The agent's case, at full capacity: every time is before 2020, the clock is
    set (base_t moves, nothing else), then an ack takes all but the newest few."""
    source = GEN + """
from agent import rtcstage
for nchan in range(9):
    st = rtcstage.Stage()
    st.next_seq = 1
    gen = generate(nchan + 7, nchan, 946684800, 0, 10, 20)
    while st.room_for(nchan):
        t, values = next(gen)
        st.add(t, values)
    before = []
    for sample in st.samples():
        before = (before + [sample])[-3:]
    n, size = st.staged, st.payload_len
    ok = st.shift_times(849000000, 1577836800)
    st.drop_upto(n - 3)
    after = list(st.samples())
    print("C", nchan, n, size, ok, st.payload_len <= size,
          after == [(s, t + 849000000, v) for s, t, v in before], st.first_seq, st.next_seq)
"""
    rec = run_firmware(source, files=STAGE_FILES)
    assert "Traceback" not in rec.output, rec.output
    lines = [line.split() for line in rec.output.splitlines() if line.startswith("C ")]
    assert len(lines) == 9, rec.output
    for _, nchan, n, size, ok, shrank, same, first, nxt in lines:
        assert int(n) > 90 and int(size) > CAPACITY - 11 - 10 * (int(nchan) + 1), (nchan, n, size)
        assert (ok, shrank, same) == ("True", "True", "True"), nchan
        assert (int(first), int(nxt)) == (int(n) - 2, int(n) + 1)


def test_a_correction_that_cannot_be_written_in_place_changes_nothing(run_firmware):
    """Interleaved clocks, then pairs a correction brings together: the corrected
    payload is no longer than the old one, but its first half grows by four bytes
    a sample before the second half shrinks back, further than the 2048-byte
    buffer has room ahead of the read position. Refused, the stage stays whole."""
    a, d = 946684800, 849_000_000
    times = [a + (k & 1) for k in range(240)] + [a - 10 + d * (k & 1) for k in range(242)]
    samples = [(k, t, [None]) for k, t in enumerate(times)]
    moved = [(k, t + d if t < a + 1 else t, v) for k, t, v in samples]
    old, new = _fields(samples), _fields(moved)
    run = [sum(new[:i]) - sum(old[:i]) for i in range(len(old))]
    assert sum(new) <= sum(old) and max(run) > RTC_MAX - HEADER - sum(old), "the case is what it says"
    source = """
from agent import rtcstage
st = rtcstage.Stage()
st.next_seq = 0
for t in %r:
    st.add(t, [None])
size = st.payload_len
before = bytes(st.buf[32:32 + size])
print("S", st.shift_times(%d, %d), st.payload_len == size, bytes(st.buf[32:32 + size]) == before)
st.save()
print("L", rtcstage.Stage().load())
""" % (times, d, a + 1)
    rec = run_firmware(source, files=STAGE_FILES)
    assert "S False True True" in rec.output and "L True" in rec.output, rec.output
