"""How every many-board command ends (`flash`, `deploy`, `usb run`, `usb collect`).

Which room: cli/. One rendering for all of them: a table with a row per board (its
port, the command's own columns, and the result: `ok`, `ok (retried)`, or why it
failed), one summary line, or with --json the results as a list. Then, when any board
failed, BoardsFailed (an MpfleetError): `main()` prints `mpfleet: N of M board(s)
failed: PORT...` and exits 1. The boards that did not fail are done all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import print_json
from mpfleet.usb.ports import PortResult, check_boards


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
