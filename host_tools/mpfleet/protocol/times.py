"""Durations and points in time as an operator writes them: the one grammar of every
option that takes one (`job create --timeout/--start/--end`, `samples export
--since/--until`) and of the registry's query ages (`last_seen<2h`).

    duration       NUMBER [UNIT]    90, 90s, 10m, 1.5h, 2d, 1w; UNIT one of s m h d w;
                                    no unit: seconds (a query's ages need the unit)
    point in time  +DURATION        that long from now: +10m
                   NUMBER UNIT      that long ago: 90m, 7d
                   UNIX SECONDS     9 or more digits: 1796112000
                   ISO 8601         2026-12-01, 2026-12-01T08:00Z; no zone: UTC

A bare number is never "ago": a short one is refused rather than read as a moment in
1970 (it is a duration missing its unit or its "+"), and 8 digits are the ISO basic
date (20261201). Functions return seconds (durations) or seconds since 1970
(points in time) as floats, and raise TimeFormatError quoting the text they could not read.
"""

from __future__ import annotations

import datetime
import re
import time

from mpfleet.errors import MpfleetError

UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])?\Z")
_UNIX_S_RE = re.compile(r"\d{9,}(?:\.\d+)?\Z")  # 9 digits: 1973-03-03 and later


class TimeFormatError(MpfleetError):
    """A duration or a point in time that cannot be read; the message quotes it."""


def parse_duration(text: str, unit_required: bool = False) -> float:
    """'90' (seconds, unless `unit_required`), '90s', '10m', '1.5h', '2d', '1w' -> seconds (0 or more)."""
    m = _DURATION_RE.match(text.strip())
    if m is None or (unit_required and m.group(2) is None):
        unit = " with a unit" if unit_required else ""
        raise TimeFormatError(f"{text!r} is not a duration{unit} such as 90s, 10m, 2h or 7d")
    return float(m.group(1)) * UNIT_S[m.group(2) or "s"]


def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since 1970 from '+10m' (from now), '90m' (ago), Unix seconds or ISO 8601."""
    t = text.strip()
    now = time.time() if now is None else now
    if _UNIX_S_RE.match(t):
        return float(t)
    ago = _DURATION_RE.match(t)
    try:
        if t.startswith("+"):
            return now + parse_duration(t[1:])
        if ago and ago.group(2):
            return now - parse_duration(t)
        stamp = datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except (TimeFormatError, ValueError):
        raise TimeFormatError(f"cannot read the time {text!r}: use ISO 8601 (2026-12-01T08:00Z), "
                              "a time from now (+10m), a time ago (90m, 2h, 7d) or Unix seconds") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()
