"""`mpfleet boards ...`: the board definitions in boards/*.json (library: mpfleet.boards)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import JSON
from mpfleet.cli.render import print_json

console = Console()


@click.group()
def boards() -> None:
    """Board definitions (boards/*.json): chip, flash layout, sensors."""


@boards.command("list")
@JSON
def boards_list(as_json: bool) -> None:
    """List the known boards."""
    from mpfleet.boards import list_boards, load_board

    loaded = [load_board(name) for name in list_boards()]
    if as_json:
        print_json([b.to_json() for b in loaded])
        return
    table = Table(title="boards")
    for col in ("name", "chip", "flash", "firmware offset", "sensors"):
        table.add_column(col)
    for b in loaded:
        table.add_row(b.name, b.chip, f"{b.flash_size // (1024 * 1024)} MiB", hex(b.firmware_offset),
                      ", ".join(s.name for s in b.sensors))
    console.print(table)


@boards.command("show")
@click.argument("name")
def boards_show(name: str) -> None:
    """Show one board's definition (a name from `boards list` or a path to a .json file)."""
    from mpfleet.boards import load_board

    print_json(load_board(name).to_json())
