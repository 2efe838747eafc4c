"""The firmware tree as it goes onto a device: boot.py and main.py as source,
everything under lib/ compiled to .mpy with mpy-cross.

Compiling on the host matters on a 128 KiB heap: importing a few hundred
lines of source makes the device's compiler allocate far more than the
module's bytecode, and can fail with MemoryError where the .mpy loads fine.
Compiled files are cached by content hash.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.paths import FIRMWARE_DIR
_SOURCE_AT_ROOT = ("boot.py", "main.py")


class FirmwareBuildError(MpfleetError):
    """A firmware file failed to compile with mpy-cross."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "mpfleet" / "mpy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def mpy_cross_version() -> str:
    out = subprocess.run([sys.executable, "-m", "mpy_cross", "--version"], capture_output=True, text=True)
    return out.stdout.strip()


def compile_mpy(source: bytes, name: str, mpy_cross_args: tuple[str, ...] = ()) -> bytes:
    """The .mpy for one module's source (`name` appears in tracebacks)."""
    key = hashlib.sha256(source + name.encode() + repr(mpy_cross_args).encode() + b"\0v1").hexdigest()
    cached = _cache_dir() / f"{key}.mpy"
    if cached.exists():
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / Path(name).name
        src.write_bytes(source)
        out = Path(tmp) / "out.mpy"
        result = subprocess.run(
            [sys.executable, "-m", "mpy_cross", *mpy_cross_args, "-s", name, "-o", str(out), str(src)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise FirmwareBuildError(f"{name}: {(result.stderr or result.stdout).strip()}")
        data = out.read_bytes()
    tmp_cache = cached.with_suffix(".tmp")
    tmp_cache.write_bytes(data)
    os.replace(tmp_cache, cached)
    return data


def firmware_tree(root: Path = FIRMWARE_DIR, compiled: bool = True,
                  only: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """{device path: bytes} for every firmware file (lib/ as .mpy unless compiled=False).

    `only` limits it to paths relative to the firmware root, e.g. ("lib/agent/mqtt.py",).
    """
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if only is not None and rel not in only:
            continue
        data = path.read_bytes()
        if compiled and rel not in _SOURCE_AT_ROOT:
            out["/" + rel[:-3] + ".mpy"] = compile_mpy(data, rel)
        else:
            out["/" + rel] = data
    return out
