"""`mpfleet devices ...`: the device registry (library: mpfleet.fleet.registry)."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DB, DEVICE_ID, GROUP, JSON, Query
from mpfleet.cli.render import ago, print_json, utc_time

console = Console()


def _registry(db: str | None):
    from mpfleet.fleet.registry import Registry
    from mpfleet.db.store import Store

    store = Store(db)
    return store, Registry(store)


def _show_change(device: dict, as_json: bool) -> None:
    """A device as `devices add` or `devices tag` left it."""
    if as_json:
        print_json(device)
        return
    click.echo(f"{device['id']}: board {device['board'] or '(unknown)'}, "
               f"groups {', '.join(device['groups']) or '(none)'}")


def _cell(value) -> str:
    return "" if value is None else str(value)


@click.group()
def devices() -> None:
    """The device registry: id, board, groups, last reported state, last seen.

    \b
    Devices appear when provisioned (`devices add`) or when they first report.
    --where selects by reported state, conditions joined by commas, e.g.
      fw<v1.25.0   fw=v1.24.0   board=virtual   group=pumps   backlog>100   last_seen<2h
    """


@devices.command("list")
@click.option("--group", type=GROUP, help="Only devices in this group.")
@click.option("--where", type=Query(), help="Only devices matching this query (fw<v1.25.0,backlog>100).")
@DB
@JSON
def devices_list(group: str | None, where, db: str | None, as_json: bool) -> None:
    """List the devices, ordered by id."""
    store, registry = _registry(db)
    with store:
        found = registry.list(group=group, where=where)
    if as_json:
        print_json(found)
        return
    table = Table(title=f"devices ({len(found)})")
    for col in ("id", "board", "groups", "fw", "slot", "backlog", "dropped", "last seen"):
        table.add_column(col, no_wrap=col != "groups")
    now = time.time()
    for d in found:
        state = d["state"] or {}
        table.add_row(d["id"], _cell(d["board"]), ", ".join(d["groups"]), _cell(state.get("fw")),
                      _cell(state.get("slot")), _cell(state.get("backlog")), _cell(state.get("dropped")),
                      ago(d["last_seen"], now))
    console.print(table)


@devices.command("show")
@click.argument("device_id", type=DEVICE_ID)
@DB
@JSON
def devices_show(device_id: str, db: str | None, as_json: bool) -> None:
    """Show one device: registry fields and its full last reported state."""
    store, registry = _registry(db)
    with store:
        d = registry.get(device_id)
    if as_json:
        print_json(d)
        return
    table = Table(title=f"device {d['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("board", _cell(d["board"]))
    table.add_row("groups", ", ".join(d["groups"]))
    table.add_row("first seen", utc_time(d["first_seen"]))
    table.add_row("last seen", f"{utc_time(d['last_seen'])} ({ago(d['last_seen'])})" if d["last_seen"] else "never")
    if d["state"] is None:
        table.add_row("state", "(not reported yet)")
    else:
        for key in sorted(d["state"]):
            value = d["state"][key]
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    console.print(table)


@devices.command("tag")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--add", "add", type=GROUP, multiple=True, help="Group to add (repeatable).")
@click.option("--remove", "remove", type=GROUP, multiple=True, help="Group to remove (repeatable).")
@DB
@JSON
def devices_tag(device_id: str, add: tuple[str, ...], remove: tuple[str, ...], db: str | None,
                as_json: bool) -> None:
    """Add or remove groups of a device.

    Groups are what jobs target. The device itself learns its new groups from a
    config job: until that has run, it still acts as a member of its old groups.
    """
    if not add and not remove:
        raise click.UsageError("give --add GROUP and/or --remove GROUP")
    store, registry = _registry(db)
    with store:
        _show_change(registry.tag(device_id, add=add, remove=remove), as_json)


@devices.command("add")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--board", help="Board name from `mpfleet boards list` (or a board .json file).")
@click.option("--group", "groups", type=GROUP, multiple=True, help="Group to put it in (repeatable).")
@DB
@JSON
def devices_add(device_id: str, board: str | None, groups: tuple[str, ...], db: str | None,
                as_json: bool) -> None:
    """Register a device before it first reports (provisioning). Re-adding adds groups."""
    from mpfleet.boards import load_board

    board_name = load_board(board).name if board else None
    store, registry = _registry(db)
    with store:
        _show_change(registry.add(device_id, board=board_name, groups=groups), as_json)
