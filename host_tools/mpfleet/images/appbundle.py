"""App bundles: the agent's own code (`lib/`), compiled, for an app update.

Which room: host library (CLI: mpfleet.cli.app). An app update replaces the agent's code
without touching the MicroPython firmware; its payload is a bundle:

    offset  size  field
    0       4     magic b"MPFA"
    4       1     format version (1)
    5       4     manifest length M (u32, little-endian)
    9       M     manifest: UTF-8 JSON, below
    9+M     ...   the files' bytes, one after another, in manifest order

    manifest = {"version": "...",                  the app version the bundle installs
                "mpy": {"version": 6, "arch": 0, "sub": 0},   what every .mpy in it needs
                "files": [{"path": "/lib/agent/wake.mpy", "size": N, "sha256": "..."}, ...]}

A device reads the small manifest first, refuses a bundle whose .mpy version its
firmware cannot load (`sys.implementation._mpy`) before writing anything, then
streams each file into the inactive app slot and checks its SHA-256. The bundle is
deterministic (no timestamps): the same sources give the same bytes and SHA-256.
`boot.py` and `main.py` are never in a bundle: the tiny `boot.py` is what switches
app slots, and app updates never replace it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.images.firmware import FIRMWARE_DIR, compile_mpy

MAGIC = b"MPFA"
FORMAT = 1
_HEAD = struct.Struct("<4sBI")
MAX_MANIFEST = 64 * 1024


class BundleError(MpfleetError):
    """A bundle could not be built, or one that was read is malformed or corrupted."""


@dataclass(frozen=True)
class Bundle:
    manifest: dict
    files: dict[str, bytes]
    sha256: str  # of the whole bundle: what the signed `app` job names
    size: int


def mpy_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(mpy version, native arch, sub-version) of a .mpy file's header (arch 0: bytecode only)."""
    if len(data) < 4 or data[0:1] != b"M":
        raise BundleError(f"{name}: not a .mpy file (no 'M' header)")
    return data[1], data[2] >> 2, data[2] & 3


def is_bundle_file(path) -> bool:
    """Does the file start like an app bundle? (False for a file that cannot be read:
    whoever reads it next says why.)"""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def build_bundle(version: str, root: Path = FIRMWARE_DIR) -> bytes:
    """Compile every .py under `root`/lib with mpy-cross and pack them with the manifest."""
    if not version or len(version) > 32:
        raise BundleError("the bundle needs a version of 1..32 characters")
    lib = Path(root) / "lib"
    sources = sorted(lib.rglob("*.py"))
    if not sources:
        raise BundleError(f"no .py files under {lib}")
    files: list[tuple[str, bytes]] = []
    mpy = None
    for src in sources:
        rel = src.relative_to(root).as_posix()
        data = compile_mpy(src.read_bytes(), rel)
        header = mpy_header(data, rel)
        if mpy is None:
            mpy = header
        elif header != mpy:
            raise BundleError(f"{rel}: compiled for .mpy {header}, the others for {mpy}")
        files.append(("/" + rel[:-3] + ".mpy", data))
    manifest = {"version": version, "mpy": {"version": mpy[0], "arch": mpy[1], "sub": mpy[2]},
                "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in files]}
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return _HEAD.pack(MAGIC, FORMAT, len(raw)) + raw + b"".join(d for _, d in files)


def write_bundle(version: str, path: Path, root: Path = FIRMWARE_DIR) -> Bundle:
    """build_bundle() into the file `path`, which appears whole or not at all (written
    beside it as `path`.part, then renamed); returns the bundle as read back."""
    data = build_bundle(version, root)
    bundle = read_bundle(data)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return bundle


def read_bundle(data: bytes) -> Bundle:
    """Parse and check a bundle: magic, format, manifest, every file's size and SHA-256."""
    if len(data) < _HEAD.size:
        raise BundleError(f"not an app bundle: {len(data)} bytes, shorter than its {_HEAD.size}-byte header")
    magic, fmt, mlen = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"not an app bundle: magic {magic!r}, not {MAGIC!r}")
    if fmt != FORMAT:
        raise BundleError(f"app bundle format {fmt} is not supported (this mpfleet reads format {FORMAT})")
    if mlen > MAX_MANIFEST or _HEAD.size + mlen > len(data):
        raise BundleError(f"truncated app bundle: the manifest needs {mlen} bytes")
    try:
        manifest = json.loads(data[_HEAD.size:_HEAD.size + mlen])
        entries = manifest["files"]
        mpy = (int(manifest["mpy"]["version"]), int(manifest["mpy"]["arch"]), int(manifest["mpy"]["sub"]))
        if not isinstance(manifest["version"], str) or not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"app bundle manifest is malformed: {e}") from None
    offset = _HEAD.size + mlen
    files: dict[str, bytes] = {}
    for entry in entries:
        path, size = entry.get("path"), entry.get("size")
        if not (isinstance(path, str) and path.startswith("/lib/") and ".." not in path
                and isinstance(size, int) and size >= 0):
            raise BundleError(f"app bundle manifest: bad file entry {entry!r}")
        blob = data[offset:offset + size]
        if len(blob) != size:
            raise BundleError(f"truncated app bundle: {path} needs {size} bytes, {len(blob)} are left")
        if hashlib.sha256(blob).hexdigest() != entry.get("sha256"):
            raise BundleError(f"app bundle corrupted: {path} does not match its SHA-256")
        if mpy_header(blob, path) != mpy:
            raise BundleError(f"{path}: its .mpy header does not say {mpy}, as the manifest does")
        files[path] = blob
        offset += size
    if offset != len(data):
        raise BundleError(f"app bundle has {len(data) - offset} bytes after its last file")
    return Bundle(manifest, files, hashlib.sha256(data).hexdigest(), len(data))


def loadable(manifest: dict, device_mpy: int) -> bool:
    """Can firmware whose `sys.implementation._mpy` is `device_mpy` load this bundle?

    `_mpy` holds the .mpy version in its low byte, the sub-version in bits 8..9 and the
    native architecture from bit 10. Bytecode-only files (arch 0) need only the same
    version; native code also the same architecture and sub-version (MicroPython's
    persistentcode.c checks the same)."""
    mpy = manifest["mpy"]
    if (device_mpy & 0xFF) != mpy["version"]:
        return False
    return mpy["arch"] == 0 or (mpy["arch"] == device_mpy >> 10 and mpy["sub"] == (device_mpy >> 8) & 3)
