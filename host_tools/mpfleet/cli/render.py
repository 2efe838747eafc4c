"""Output helpers shared by the `mpfleet` command modules: JSON, and times for people
("3m ago", "2026-12-01 08:00:00Z"). Tables are built with rich where they are shown,
except the per-board table every many-board command ends with (`report_boards`).

Options and parameter types live in `mpfleet.cli.options`; this module only writes.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mpfleet.usb.ports import PortResult, check_boards


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


# ---------------------------------------------------------------- how a many-board command ends
# `flash`, `deploy`, `usb run`, `usb collect`: a row per board (its port, the command's
# own columns, and the result: `ok`, `ok (retried)`, or why it failed), one summary line,
# or with --json the results as a list. Then, when any board failed, BoardsFailed (an
# MpfleetError): main() prints `mpfleet: N of M board(s) failed: PORT...`, exit 1.
@dataclass(frozen=True)
class Column:
    """One of a command's own columns: `value(result)`, None for an empty cell."""

    header: str
    value: Callable[[PortResult], object]
    right: bool = False  # numbers


def boards_table(title: str, results: Sequence[PortResult], columns: Sequence[Column]) -> Table:
    table = Table(title=title)
    table.add_column("port", no_wrap=True)
    for c in columns:
        table.add_column(c.header, justify="right" if c.right else "left")
    table.add_column("result")
    for r in results:
        if r.ok:
            outcome = Text("ok (retried)" if r.retried else "ok", style="green")
        else:
            outcome = Text(r.error or "failed", style="red")
        cells = [Text("" if (v := c.value(r)) is None else str(v)) for c in columns]
        table.add_row(Text(r.port), *cells, outcome)
    return table


def report_boards(console: Console, results: Sequence[PortResult], *, title: str, columns: Sequence[Column],
                  done: str, as_json: bool) -> None:
    """The table and "K of N board(s) <done>" (or JSON); BoardsFailed if any board failed."""
    if as_json:
        print_json([r.to_json() for r in results])
    else:
        console.print(boards_table(title, results, columns))
        ok = sum(r.ok for r in results)
        console.print(f"{ok} of {len(results)} board(s) {done}", highlight=False, markup=False)
    check_boards(results)
