"""Compile every firmware file with mpy-cross, as deploy does: a file that uses
syntax MicroPython lacks fails here rather than on a device.

    python -m mpfleet.tools.check_firmware [DIR ...]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from mpfleet.paths import FIRMWARE_DIR, SIM_RUNTIME_DIR

DEFAULT_DIRS = (FIRMWARE_DIR, SIM_RUNTIME_DIR)


def mpy_cross_command() -> list[str]:
    return [sys.executable, "-m", "mpy_cross"]


def compile_errors(paths: list[Path]) -> list[str]:
    errors = []
    with tempfile.TemporaryDirectory() as out:
        for path in paths:
            result = subprocess.run(mpy_cross_command() + ["-o", str(Path(out) / "x.mpy"), str(path)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                errors.append(f"{path}: {(result.stderr or result.stdout).strip()}")
    return errors


def main(argv: list[str] | None = None) -> int:
    dirs = [Path(a) for a in (argv if argv is not None else sys.argv[1:])] or list(DEFAULT_DIRS)
    files = sorted(p for d in dirs for p in d.rglob("*.py"))
    errors = compile_errors(files)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(files) - len(errors)}/{len(files)} files compile with mpy-cross")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
