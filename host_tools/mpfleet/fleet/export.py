"""Exporting stored samples as CSV or JSON Lines, to a stream or to a file.

Times are seconds since 1970 (the CLI reads them with mpfleet.protocol.times).

A sample's values are its device's channels in order, one per configured sensor
(firmware/lib/agent/sensors.py). The CSV names its value columns after the sensors
(`adc0`, `mcu_temp`...), found per device, first that fits the device's channel count:

1. the `channels` the device last reported in its state (its config's sensors now);
2. the sensors of its board definition (boards/<board>.json), in their order;
3. `ch0`, `ch1`... when neither is known or fits.

With several devices the columns are every device's names in order of first
appearance; a row leaves the columns of other devices' sensors empty. JSON Lines
keeps the `values` list as stored.
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
            raise ExportError(f"no samples: {what} is not known to this database ({store.shown})")
        window = ""
        if since is not None:
            window += f" since {_iso(int(since))}"
        if until is not None:
            window += f" until {_iso(int(until))}"
        raise ExportError(f"no samples from {what}{window} in {store.shown}")
    count = 0
    if fmt == "csv":
        names = {dev: channel_names(store, dev, width) for dev, width in _widths(store, device, since, until)}
        columns = list(dict.fromkeys(name for dev_names in names.values() for name in dev_names))
        where = {name: i for i, name in enumerate(columns)}
        writer = csv.writer(out)
        writer.writerow(_FIXED_COLUMNS + columns)
        for dev, seq, t, values in _chain(first, rows):
            cells = [""] * len(columns)
            for name, v in zip(names[dev], values):
                cells[where[name]] = "" if v is None else v
            writer.writerow([dev, seq, _iso(t), t] + cells)
            count += 1
    else:
        for dev, seq, t, values in _chain(first, rows):
            out.write(json.dumps({"device": dev, "seq": seq, "time": _iso(t), "t": t, "values": values}) + "\n")
            count += 1
    return count


_FIXED_COLUMNS = ["device", "seq", "time", "t"]


def channel_names(store: Store, device: str, width: int) -> list[str]:
    """The names of `device`'s `width` channels (the module docstring says where from)."""
    record = store.device(device) or {}
    reported = (record.get("state") or {}).get("channels")
    names = None
    if isinstance(reported, list) and len(reported) == width and all(isinstance(n, str) and n for n in reported):
        names = list(reported)
    elif record.get("board"):
        names = _board_sensor_names(record["board"], width)
    if names is None or len(set(names)) != width:
        return [f"ch{i}" for i in range(width)]
    # A sensor named like a fixed column keeps its own column.
    return [f"sensor_{n}" if n in _FIXED_COLUMNS else n for n in names]


def _board_sensor_names(board: str, width: int) -> list[str] | None:
    from mpfleet.boards import BoardError, load_board

    try:
        sensors = load_board(board).sensors
    except BoardError:
        return None  # a board this host has no definition of
    return [s.name for s in sensors] if len(sensors) == width else None


def _widths(store: Store, device: str | None, since: float | None, until: float | None):
    """(device, most channels in one of its samples) for every device the export covers."""
    return store.sample_widths(device, since, until)


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
