"""Output helpers shared by the `mpfleet` command modules: JSON, and times for people
("3m ago", "2026-12-01 08:00:00Z"). Tables are built with rich where they are shown.

Options and parameter types live in `mpfleet.cli.options`; this module only writes.
"""

from __future__ import annotations

import datetime
import json
import time

import click


def print_json(data) -> None:
    """`data` as indented JSON with sorted keys on stdout (anything else JSON lacks as str)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def ago(ts: float | None, now: float | None = None) -> str:
    """'never', '45s ago', '3m ago', '5h ago', '2d ago'."""
    if ts is None:
        return "never"
    age = max(0, int((time.time() if now is None else now) - ts))
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= seconds:
            return f"{age // seconds}{unit} ago"
    return f"{age}s ago"


def utc_time(ts: float | None) -> str:
    """'2026-12-01 08:00:00Z' (UTC), or 'never'."""
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
