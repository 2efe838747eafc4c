"""Run every benchmark: a table on stdout, JSON in bench/results/.

Each benchmark compares mpfleet with the naive way in the same run (a ratio),
because these machines are too noisy for absolute timings to mean much.

    make bench                      # all
    .venv/bin/python bench/run.py flash_wear agent   # some, by name
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
BENCHMARKS = ("flash_wear", "agent", "tls", "ed25519_verify", "dispatch", "scale", "ota", "usb_flash", "usb_deploy")


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(BENCH_DIR))
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in names:
        started = time.monotonic()
        result = importlib.import_module(name).run()
        result["seconds"] = round(time.monotonic() - started, 1)
        result["machine"] = {"python": platform.python_version(), "cpu": platform.machine(),
                             "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"\n== {name} ({result['seconds']} s) ==")
        for row in result["rows"]:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "detail"))
        if "ratio" in result:
            print(f"  ratio ({result.get('ratio_label', 'naive / mpfleet')}): {result['ratio']}")
    print(f"\nJSON results in {RESULTS}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
