"""Flash wear of the sample log against the naive way, on the same emulated flash.

Every variant stores the same samples (16-byte records) on a fresh virtual
board (LittleFS on the emulated 4 MiB NOR flash, real MicroPython), and the
board's vfs counters say what it cost:

  flashlog, full batches   one append of BATCH_BYTES per wake (the default)
  flashlog, half batches   one append of ~1.8 KB per wake (an agent that can
                           stage only half a block in RTC memory)
  flashlog, long run       full batches for 20,000 samples with a trim (the
                           host's ack) every third wake: metadata compaction
                           and segment deletion included
  naive                    open / append / close of one file per sample

    .venv/bin/python bench/flash_wear.py         # prints a table
    run() -> {"name": "flash_wear", "rows": [...], "ratio": naive/flashlog erases}
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from mpfleet.sim import VirtualBoard

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 2000
RECORD = b"0123456789abcdef"  # 16 bytes, like an encoded (t, 2 channels) sample
FLASHLOG = (ROOT / "firmware" / "lib" / "agent" / "flashlog.py").read_bytes()

LOG_WAKE = """
from agent.flashlog import FlashLog
log = FlashLog(max_segments=200)
k = min(%d, %d - log.stats()["next_seq"] + 1)
log.append([%r] * k)
print("NEXT", log.stats()["next_seq"])
"""

LOG_WAKE_TRIM = """
from agent.flashlog import FlashLog
log = FlashLog()
st = log.stats()
log.append([%r] * %d)
if st["next_seq"] // %d %% 3 == 0:
    log.trim(st["next_seq"] - 1)
print("NEXT", log.stats()["next_seq"])
"""

NAIVE = """
for i in range(%d):
    with open("/naive.log", "ab") as f:
        f.write(%r)
print("NEXT", %d + 1)
"""


def _board(tmp: Path, name: str, main: str) -> VirtualBoard:
    vb = VirtualBoard.create(tmp / name)
    vb.power_on()
    vb.fs_put({"/lib/agent/__init__.py": b"", "/lib/agent/flashlog.py": FLASHLOG})
    vb.fs_put({"/main.py": b"import os\ntry:\n    os.mkdir('/log')\nexcept OSError:\n    pass\n"})
    vb.boot()
    vb.fs_put({"/main.py": main.encode()})
    return vb


def _measure(tmp: Path, name: str, main: str, samples: int) -> dict:
    vb = _board(tmp, name, main)
    before = vb.counters()["vfs"]
    wakes = 0
    started = time.monotonic()
    while True:
        out = vb.boot().output
        wakes += 1
        if "NEXT" not in out:
            raise RuntimeError(f"{name}: the device failed:\n{out}")
        if int(out.split("NEXT", 1)[1].split()[0]) > samples:
            break
    after = vb.counters()["vfs"]
    erases = after["erases"] - before["erases"]
    programmed = after["bytes_programmed"] - before["bytes_programmed"]
    return {
        "variant": name,
        "samples": samples,
        "wakes": wakes,
        "erases": erases,
        "erases_per_1000": round(erases * 1000 / samples, 2),
        "bytes_programmed": programmed,
        "programmed_per_sample_byte": round(programmed / (samples * len(RECORD)), 2),
        "real_s": round(time.monotonic() - started, 2),
    }


def run(samples: int = SAMPLES, long_samples: int = 20000) -> dict:
    full = 3840 // (1 + len(RECORD))  # flashlog.BATCH_BYTES worth of records
    half = 1800 // (1 + len(RECORD))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows = [
            _measure(tmp, "flashlog, full batches", LOG_WAKE % (full, samples, RECORD), samples),
            _measure(tmp, "flashlog, half batches", LOG_WAKE % (half, samples, RECORD), samples),
            _measure(tmp, "naive, file append per sample", NAIVE % (samples, RECORD, samples), samples),
        ]
        if long_samples:
            rows.append(_measure(tmp, "flashlog, long run with trims", LOG_WAKE_TRIM % (RECORD, full, full),
                                 long_samples))
    ratio = rows[2]["erases"] / max(1, rows[0]["erases"])
    return {"name": "flash_wear", "rows": rows, "ratio": round(ratio, 1)}


def _table(result: dict) -> str:
    cols = ("variant", "samples", "wakes", "erases", "erases_per_1000", "programmed_per_sample_byte")
    heads = ("variant", "samples", "wakes", "erases", "erases/1000 samples", "programmed B / sample B")
    rows = [[str(r[c]) for c in cols] for r in result["rows"]]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(heads), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"naive / flashlog erases: {result['ratio']}x  (records of {len(RECORD)} B, "
               f"4 KiB LittleFS blocks, one append per simulated wake)")
    return "\n".join(out)


if __name__ == "__main__":
    print(_table(run(int(sys.argv[1]) if len(sys.argv) > 1 else SAMPLES)))
