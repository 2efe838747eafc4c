"""Exporting stored samples as CSV or JSON Lines, to a stream or to a file.

Times are seconds since 1970 (the CLI reads them with mpfleet.protocol.times).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import TextIO

from mpfleet.errors import MpfleetError
from mpfleet.db.store import Store


class ExportError(MpfleetError):
    """Nothing to export, or an argument that cannot be understood."""


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def export_samples(store: Store, out: TextIO, fmt: str, device: str | None = None,
                   since: float | None = None, until: float | None = None) -> int:
    """Write matching samples to `out`; returns the count. Raises ExportError when none match."""
    if fmt not in ("csv", "jsonl"):
        raise ExportError(f"unknown format {fmt!r}: use csv or jsonl")
    rows = store.samples(device=device, since=since, until=until)
    first = next(rows, None)
    if first is None:
        what = f"device {device!r}" if device else "any device"
        if device and store.device(device) is None and store.sample_count(device) == 0:
            raise ExportError(f"no samples: {what} is not known to this database ({store.path})")
        window = ""
        if since is not None:
            window += f" since {_iso(int(since))}"
        if until is not None:
            window += f" until {_iso(int(until))}"
        raise ExportError(f"no samples from {what}{window} in {store.path}")
    count = 0
    if fmt == "csv":
        width = len(first[3])
        writer = csv.writer(out)
        writer.writerow(["device", "seq", "time", "t"] + [f"ch{i}" for i in range(width)])
        for dev, seq, t, values in _chain(first, rows):
            writer.writerow([dev, seq, _iso(t), t] + ["" if v is None else v for v in values])
            count += 1
    else:
        for dev, seq, t, values in _chain(first, rows):
            out.write(json.dumps({"device": dev, "seq": seq, "time": _iso(t), "t": t, "values": values}) + "\n")
            count += 1
    return count


def export_samples_to_file(store: Store, path: str | os.PathLike, fmt: str, device: str | None = None,
                           since: float | None = None, until: float | None = None) -> int:
    """export_samples() into the file `path`; returns the count. The file appears whole or
    not at all: written beside it as a temporary file, renamed over it once complete, so
    an export that fails (ExportError: none match) leaves `path` as it was."""
    target = Path(path)
    folder = target.resolve().parent
    if not folder.is_dir():
        raise ExportError(f"cannot write {target}: there is no directory {folder}")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise ExportError(f"cannot write {target}: {e.strerror} (in {folder})") from None
    try:
        with os.fdopen(fd, "w", newline="") as out:
            count = export_samples(store, out, fmt, device, since, until)
        os.replace(tmp, target)
    except OSError as e:  # a full disk, or `path` an existing directory
        raise ExportError(f"cannot write {target}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count


def _chain(first, rest):
    yield first
    yield from rest
