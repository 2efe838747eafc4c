"""Exporting stored samples as CSV or JSON Lines."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import time
from typing import TextIO

from mpfleet.errors import MpfleetError
from mpfleet.db.store import Store

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ExportError(MpfleetError):
    """Nothing to export, or an argument that cannot be understood."""


def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since 1970 from '2026-11-24', '2026-11-24T10:00:00Z', '90m' / '2h' / '7d' ago, or a number."""
    text = text.strip()
    m = _RELATIVE.match(text)
    if m:
        return (time.time() if now is None else now) - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ExportError(f"cannot read the time {text!r}: use ISO 8601 (2026-11-24T10:00Z), "
                          "a relative time (90m, 2h, 7d) or seconds since 1970") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.timestamp()


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


def _chain(first, rest):
    yield first
    yield from rest
