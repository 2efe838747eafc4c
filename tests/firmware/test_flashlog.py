"""The flash sample log on virtual boards (real MicroPython, LittleFS on the
emulated NOR flash): records come back in order and whole; a torn or corrupt
tail is never handed out; power cuts at random flash operations lose nothing
whose append returned; the capacity bound drops the oldest and counts them;
batched appends cost a fraction of the erases of one-file-append-per-sample."""

import ast
import random
import re

import pytest

from conftest import firmware_files, stress_count

LOG_FILES = firmware_files(("lib/agent/flashlog.py",))


def _run(run_firmware, source, board=None):
    rec = run_firmware(source, board=board, files=LOG_FILES)
    assert rec.exit_reason != "exception", rec.output
    assert "Traceback" not in rec.output, rec.output
    return rec.output


def _stats(output, tag="STATS"):
    return ast.literal_eval(re.search(tag + r" (\{.*\})", output).group(1))


def test_append_read_trim_round_trip_across_reopen(run_firmware, new_board):
    vb = new_board()
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog()
firsts = []
for b in range(7):
    firsts.append(log.append([("rec-%04d" % (b * 150 + i)).encode() for i in range(150)]))
print("FIRSTS", firsts)
n = 0
ok = True
for s, r in log.read(0, 2000):
    ok = ok and s == n + 1 and r == ("rec-%04d" % n).encode()
    n += 1
print("ROUNDTRIP", ok and n == 1050)
part = [s for s, r in log.read(333, 10)]
print("PART", part)
print("STATS", log.stats())
log.trim(700)
print("TRIMMED", log.stats())
""", board=vb)
    assert "FIRSTS [1, 151, 301, 451, 601, 751, 901]" in out
    assert "ROUNDTRIP True" in out
    assert "PART [333, 334, 335, 336, 337, 338, 339, 340, 341, 342]" in out
    before, after = _stats(out), _stats(out, "TRIMMED")
    assert before["first_seq"] == 1 and before["next_seq"] == 1051 and before["backlog"] == 1050
    assert after["first_seq"] == 701 and after["backlog"] == 350 and after["acked"] == 700
    assert after["segments"] < before["segments"], "whole acked segments are deleted"
    # the ack point survives the wake: re-uploads start after it
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog()
print("STATS", log.stats())
print("FIRST", [s for s, r in log.read(0, 3)])
print("APPENDED", log.append([b"new"]))
log.trim(10 ** 6)
print("ALL", log.stats())
""", board=vb)
    st = _stats(out)
    assert st["first_seq"] == 701 and st["next_seq"] == 1051 and st["acked"] == 700
    assert "FIRST [701, 702, 703]" in out
    assert "APPENDED 1051" in out
    everything = _stats(out, "ALL")
    assert everything["backlog"] == 0 and everything["segments"] == 0 and everything["next_seq"] == 1052
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog()
print("STATS", log.stats())
print("APPENDED", log.append([b"after-empty"]))
""", board=vb)
    assert _stats(out)["next_seq"] == 1052, "seqs are never reused after the log was emptied"
    assert "APPENDED 1052" in out


def test_torn_and_corrupt_tails_are_never_handed_out(run_firmware, new_board):
    vb = new_board()
    out = _run(run_firmware, """
import os
from agent.flashlog import FlashLog
log = FlashLog()
log.append([("a%03d" % i).encode() for i in range(40)])
seg = "/log/" + sorted(n for n in os.listdir("/log") if n.endswith(".seg"))[-1]
size = os.stat(seg)[6]
# a chunk cut short: a header that promises more bytes than the file has
with open(seg, "ab") as f:
    f.write(bytes([0xC7, 1, 200, 0, 5, 0, 41, 0, 0, 0, 0, 0, 0, 0]) + b"torn")
print("SIZE", size, os.stat(seg)[6])
""", board=vb)
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog()
print("STATS", log.stats())
print("READ", [bytes(r).decode() for s, r in log.read(0, 100)][-2:], len(list(log.read(0, 100))))
print("NEXT", log.append([b"fresh-1", b"fresh-2"]))
print("AFTER", [(s, bytes(r).decode()) for s, r in log.read(40, 100)])
print("STATS2", log.stats())
""", board=vb)
    st = _stats(out)
    # 18 damaged bytes could have held up to 18 records: their seqs are skipped, never reused
    assert st["next_seq"] == 41 + 18
    assert "READ ['a038', 'a039'] 40" in out
    assert "NEXT 59" in out
    assert "AFTER [(40, 'a039'), (59, 'fresh-1'), (60, 'fresh-2')]" in out
    assert _stats(out, "STATS2")["segments"] == 2, "appends after a torn tail go to a new segment"
    # a flipped bit inside a committed chunk: the chunk is withheld, never returned damaged
    out = _run(run_firmware, """
import os
from agent.flashlog import FlashLog
seg = "/log/0000003b.seg"
with open(seg, "rb") as f:
    data = bytearray(f.read())
data[16] ^= 0x01
with open(seg, "wb") as f:
    f.write(data)
log = FlashLog()
print("AFTER", [(s, bytes(r).decode()) for s, r in log.read(0, 100)][-3:])
print("NEXT", log.append([b"x"]))
""", board=vb)
    assert "AFTER [(38, 'a037'), (39, 'a038'), (40, 'a039')]" in out, "the damaged chunk is withheld"
    assert "NEXT 89" in out, "seqs 59.. of the damaged 30-byte chunk are not reused"


FUZZ_WRITER = """
from agent.flashlog import FlashLog
import gc, os, random
log = FlashLog(max_segments=MAX_SEGMENTS)
st = log.stats()
print("STATS", st)
# read back everything, checking order and content; print runs "first-last@tag"
runs = []
prev = 0
bad = 0
for seq, rec in log.read(0, 100000):
    text = bytes(rec).decode()
    parts = text.split(":")
    if len(parts) != 3 or int(parts[0]) != seq or len(text) != int(parts[2][:3]) or seq <= prev:
        bad += 1
        continue
    tag = int(parts[1])
    if runs and runs[-1][1] == seq - 1 and runs[-1][2] == tag:
        runs[-1][1] = seq
    else:
        runs.append([seq, seq, tag])
    prev = seq
print("RUNS", " ".join("%d-%d@%d" % tuple(r) for r in runs))
print("BAD", bad)
boot = int.from_bytes(os.urandom(3), "little")
random.seed(boot)
n = 0
while True:
    first = log.stats()["next_seq"]
    k = random.choice((1, 5, 40, 120, 230, 300))
    recs = None
    gc.collect()
    recs = [None] * k
    for s in range(first, first + k):
        size = len("%d:%d:" % (s, boot)) + 3 + s % 9
        recs[s - first] = ("%d:%d:%03d" % (s, boot, size) + "." * (s % 9)).encode()
    got = log.append(recs)
    print("DONE %d %d %d" % (got, got + k - 1, boot))
    n += 1
    if TRIM and n % 3 == 0:
        upto = log.stats()["next_seq"] - 1 - random.choice((0, 50, 400))
        print("TRIMMING", upto)
        log.trim(upto)
        print("TRIMMED", upto)
"""


def _power_cut_fuzz(vb, cuts, rng, max_segments, trim):
    writer = "MAX_SEGMENTS = %d\nTRIM = %s\n" % (max_segments, trim) + FUZZ_WRITER
    vb.fs_put(dict(LOG_FILES, **{"/main.py": writer.encode()}))
    committed: dict[int, int] = {}  # seq -> boot tag of an append that returned
    trim_attempted = 0
    last_first = 1
    for i in range(cuts):
        vb.schedule_power_cut(after_ops=rng.randint(1, 90), seed=i)
        rec = vb.boot()
        out = rec.output
        assert "Traceback" not in out, f"cut {i}:\n{out[-3000:]}"
        assert rec.exit_reason == "power_cut", f"cut {i}: {rec.exit_reason} {rec.detail}\n{out[-2000:]}"
        assert "formatting" not in out
        st = _stats(out)
        if trim:
            assert st["dropped"] == 0, "this fuzz never fills the log"
        else:
            assert st["dropped"] == st["first_seq"] - 1, "every seq below the start was dropped and counted"
            trim_attempted = max(trim_attempted, st["first_seq"] - 1)
        assert st["first_seq"] >= last_first, "the log's start went backwards"
        last_first = st["first_seq"]
        assert re.search(r"^BAD 0$", out, re.M), f"cut {i}: a corrupt or out-of-order record was handed out"
        have: dict[int, int] = {}
        runs = re.search(r"^RUNS ?(.*)$", out, re.M).group(1).split()
        for run in runs:
            span, tag = run.split("@")
            a, b = map(int, span.split("-"))
            for s in range(a, b + 1):
                assert s not in have, f"cut {i}: seq {s} handed out twice"
                have[s] = int(tag)
        for s, tag in committed.items():
            if s <= trim_attempted:
                continue  # acked (trim) or dropped and counted (drop-oldest)
            assert have.get(s) == tag, f"cut {i}: committed seq {s} (tag {tag}) read back as {have.get(s)}"
        assert all(s >= st["first_seq"] for s in have)
        for m in re.finditer(r"^DONE (\d+) (\d+) (\d+)$", out, re.M):
            a, b, tag = map(int, m.groups())
            for s in range(a, b + 1):
                committed[s] = tag
        for m in re.finditer(r"^TRIMMING (-?\d+)$", out, re.M):
            trim_attempted = max(trim_attempted, int(m.group(1)))
        committed = {s: t for s, t in committed.items() if s > trim_attempted}
        vb.power_on()
    assert vb.counters()["vfs"]["erases"] > cuts // 4, "the run exercised the flash"
    return st


@pytest.mark.slow
def test_power_cuts_during_append_and_trim_lose_no_committed_record(new_board):
    _power_cut_fuzz(new_board(), stress_count(quick=200, full=1000), random.Random(4242), 64, True)


@pytest.mark.slow
def test_power_cuts_during_drop_oldest_lose_only_counted_records(new_board):
    st = _power_cut_fuzz(new_board(), stress_count(quick=60, full=300), random.Random(77), 3, False)
    assert st["dropped"] > 0, "the log filled up and dropped"


def test_capacity_bound_drops_oldest_and_counts_them(run_firmware, new_board):
    vb = new_board()
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog(max_segments=3)
for b in range(8):
    log.append([("b%d-%03d-xxxxxxxxx" % (b, i)).encode() for i in range(200)])
print("STATS", log.stats())
first = last = None
n = 0
for s, r in log.read(0, 5000):
    last = (s, bytes(r).decode())
    first = first or last
    n += 1
print("FIRST", first, "LAST", last, "N", n)
""", board=vb)
    st = _stats(out)
    assert st["segments"] == 3
    assert st["dropped"] == st["first_seq"] - 1 > 0
    assert st["dropped"] + st["backlog"] == 1600
    assert "LAST (1600, 'b7-199-xxxxxxxxx')" in out
    assert "FIRST (%d, " % st["first_seq"] in out and "N %d" % st["backlog"] in out
    # the counter persists, and acked records are not counted as dropped
    out = _run(run_firmware, """
from agent.flashlog import FlashLog
log = FlashLog(max_segments=3)
before = log.stats()
log.trim(before["first_seq"] + 400)
for b in range(3):
    log.append([b"z" * 17] * 200)
print("BEFORE", before)
print("STATS", log.stats())
""", board=vb)
    before, after = _stats(out, "BEFORE"), _stats(out)
    assert before["dropped"] == st["dropped"], "dropped counter survives the wake"
    assert after["dropped"] > before["dropped"]
    # exact: every seq below first_seq is either acked or counted as dropped
    lost_unacked = max(0, (after["first_seq"] - 1) - after["acked"])
    assert after["dropped"] == before["dropped"] + lost_unacked


WEAR_LOG = """
from agent.flashlog import FlashLog, BATCH_BYTES
log = FlashLog()
k = min(%d, 1000 - log.stats()["next_seq"] + 1)
log.append([b"0123456789abcdef"] * k)
print("STATS", log.stats())
"""

WEAR_NAIVE = """
for i in range(1000):
    with open("/naive.log", "ab") as f:
        f.write(b"0123456789abcdef")
print("NAIVE done")
"""


def _erases(vb):
    return vb.counters()["vfs"]["erases"]


@pytest.mark.slow
def test_batched_appends_cost_at_most_10_erases_per_1000_samples(run_firmware, new_board):
    vb = new_board()
    per_flush = 3840 // 17  # BATCH_BYTES of 16-byte samples (1 length byte each)
    _run(run_firmware, "from agent.flashlog import FlashLog\nFlashLog()\n", board=vb)  # formatted, /log made
    vb.fs_put({"/main.py": (WEAR_LOG % per_flush).encode()})
    start = _erases(vb)
    boots = 0
    while True:  # one flush per wake, as the agent does
        rec = vb.boot()
        assert "Traceback" not in rec.output, rec.output
        boots += 1
        if _stats(rec.output)["next_seq"] > 1000:
            break
    log_erases = _erases(vb) - start
    naive_board = new_board("naive")
    naive_board.fs_put({"/main.py": WEAR_NAIVE.encode()})
    start = _erases(naive_board)
    assert "NAIVE done" in naive_board.boot().output
    naive_erases = _erases(naive_board) - start
    print(f"erases per 1000 samples: flashlog {log_erases} in {boots} flushes, naive {naive_erases}")
    assert log_erases <= 10
    assert naive_erases >= 20 * log_erases, "the naive way costs about one erase per sample"
