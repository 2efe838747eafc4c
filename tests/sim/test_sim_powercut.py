"""LittleFS on the emulated flash survives power cuts at random operations:
it always mounts again, and no file that was closed before the cut is lost or
damaged. The writer is ordinary firmware on the real MicroPython port."""

import random
import re

from conftest import stress_count

WRITER = """
import os

def content(n):
    return ("%06d:" % n) * (20 + (n * 37) % 300)

names = sorted(int(x[2:]) for x in os.listdir("/") if x.startswith("f_"))
bad = [n for n in names if open("f_%d" % n).read() != content(n)]
print("HAVE", ",".join(str(n) for n in names))
print("BAD", ",".join(str(n) for n in bad))
try:
    state = open("state").read()
    print("STATE", state)
except OSError:
    print("STATE none")
n = (names[-1] + 1) if names else 0
# Keep the filesystem from filling over long runs: a cut between writing a file
# and deleting an old one leaves that old one behind, so sweep them here.
for old in names:
    if old < n - 24:
        print("DELETING", old)
        os.remove("f_%d" % old)
while True:
    with open("f_%d" % n, "w") as f:
        f.write(content(n))
    print("DONE", n)
    if n % 3 == 0:
        with open("state.tmp", "w") as f:
            f.write("state-%d" % n)
        os.rename("state.tmp", "state")
    if n >= 24:
        print("DELETING", n - 24)
        os.remove("f_%d" % (n - 24))
    n += 1
"""


def _numbers(output, tag):
    out = []
    for line in output.splitlines():
        if line.startswith(tag + " "):
            out += [int(x) for x in line[len(tag) + 1:].split(",") if x]
    return out


def test_littlefs_survives_random_power_cuts(new_board, run_firmware):
    cuts = stress_count(quick=220, full=1000)
    rng = random.Random(20261124)
    vb = new_board()
    vb.fs_put({"/main.py": WRITER.encode()})
    committed: set[int] = set()
    maybe_gone: set[int] = set()
    last_state = None
    for i in range(cuts):
        vb.schedule_power_cut(after_ops=rng.randint(1, 120), seed=i)
        rec = vb.boot()
        out = rec.output
        assert "formatting" not in out, f"cut {i}: filesystem did not mount and was reformatted"
        assert rec.exit_reason == "power_cut", f"cut {i}: {rec.exit_reason} {rec.detail}\n{out}"
        have = set(_numbers(out, "HAVE"))
        # A file open for writing at the cut may hold part of its data (LittleFS
        # creates it at open); a file that was closed must be whole.
        damaged = set(_numbers(out, "BAD")) & committed
        assert not damaged, f"cut {i}: closed files damaged: {sorted(damaged)}"
        missing = committed - maybe_gone - have
        assert not missing, f"cut {i}: files closed before the cut are gone: {sorted(missing)}"
        state = re.search(r"STATE (\S+)", out).group(1)
        if last_state is not None and state != "none":
            assert int(state.split("-")[1]) >= last_state, "state went backwards"
        if state != "none":
            last_state = int(state.split("-")[1])
        committed |= set(_numbers(out, "DONE"))
        committed -= set(_numbers(out, "DELETING"))
        maybe_gone = set()
        for n in _numbers(out, "DELETING"):
            maybe_gone.add(n)
        vb.power_on()
    counters = vb.counters()
    assert counters["vfs"]["erases"] > cuts, "the run exercised the flash"
