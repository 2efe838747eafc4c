"""`mpfleet devices ...`: the device registry (library: mpfleet.fleet.registry)."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.ca import device_cert
from mpfleet.cli.options import DB, DEVICE_ID, GROUP, JSON, Query, open_store
from mpfleet.cli.render import ago, print_json, utc_time

console = Console()


def _registry(db: str | None, create: bool = False):
    """The database and its registry; only `devices add` makes a missing database."""
    from mpfleet.fleet.registry import Registry

    store = open_store(db, create=create)
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
    A device joins the fleet only when provisioned (`devices add`, `deploy`,
    `sim fleet`) or accepted (`devices accept`): one merely seen on the broker is
    pending (`devices pending`), never targeted, stored or answered.
    "last seen" is the device's own time of its last report; "stale" marks one
    older than two of its upload intervals.
    --where selects by reported state, conditions joined by commas, e.g.
      fw<v1.25.0   fw=v1.24.0   board=virtual   group=pumps   backlog>100   last_seen<2h
    """


def _with_liveness(device: dict, now: float) -> dict:
    from mpfleet.fleet.registry import liveness

    live = liveness(device, now)
    return dict(device, stale=live["stale"], expected_interval_s=live["expected_interval_s"])


def _last_seen_cell(device: dict, now: float) -> str:
    from mpfleet.fleet.registry import last_report

    text = ago(last_report(device), now)
    return f"{text} (stale)" if device["stale"] else text


@devices.command("list")
@click.option("--group", type=GROUP, help="Only devices in this group.")
@click.option("--where", type=Query(), help="Only devices matching this query (fw<v1.25.0,backlog>100).")
@DB
@JSON
def devices_list(group: str | None, where, db: str | None, as_json: bool) -> None:
    """List the devices, ordered by id."""
    store, registry = _registry(db)
    now = time.time()
    with store:
        found = [_with_liveness(d, now) for d in registry.list(group=group, where=where)]
        pending = len(registry.pending())
    if as_json:
        print_json(found)
        return
    table = Table(title=f"devices ({len(found)})")
    for col in ("id", "board", "groups", "fw", "slot", "backlog", "dropped", "last seen"):
        table.add_column(col, no_wrap=col != "groups")
    for d in found:
        state = d["state"] or {}
        table.add_row(d["id"], _cell(d["board"]), ", ".join(d["groups"]), _cell(state.get("fw")),
                      _cell(state.get("slot")), _cell(state.get("backlog")), _cell(state.get("dropped")),
                      _last_seen_cell(d, now))
    console.print(table)
    if pending:
        console.print(f"{pending} device(s) seen on the broker are not in the fleet: mpfleet devices pending",
                      highlight=False)


@devices.command("show")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--history", "history_limit", type=click.IntRange(min=0), default=20, show_default=True,
              help="Show this many of its job executions, newest first (0: none; --json lists them all).")
@DB
@JSON
def devices_show(device_id: str, history_limit: int, db: str | None, as_json: bool) -> None:
    """Show one device: registry fields, its full last reported state and its job
    history (every execution of every job on it, with attempts and reasons)."""
    from mpfleet.fleet.history import executions
    from mpfleet.fleet.registry import last_report

    store, registry = _registry(db)
    now = time.time()
    with store:
        d = _with_liveness(registry.get(device_id), now)
        history = executions(store, device_id, limit=None if as_json else history_limit)
        total = store.db.execute("SELECT COUNT(*) FROM executions WHERE device = ?", (device_id,)).fetchone()[0]
    if as_json:
        print_json(dict(d, executions=[e.to_json() for e in history]))
        return
    table = Table(title=f"device {d['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("board", _cell(d["board"]))
    table.add_row("groups", ", ".join(d["groups"]))
    table.add_row("first seen", utc_time(d["first_seen"]))
    reported = last_report(d)
    table.add_row("last seen", f"{utc_time(reported)} ({_last_seen_cell(d, now)}, by the device's clock)"
                  if reported else "never")
    table.add_row("received", f"{utc_time(d['last_seen'])} ({ago(d['last_seen'], now)}, by this host)"
                  if d["last_seen"] else "never live")
    if d["state"] is None:
        table.add_row("state", "(not reported yet)")
    else:
        for key in sorted(d["state"]):
            value = d["state"][key]
            table.add_row(key, value if isinstance(value, str) else json.dumps(value))
    console.print(table)
    if history_limit == 0:
        return
    if not history:
        console.print("no job executions", highlight=False)
        return
    runs = Table(title=f"job history ({len(history)} of {total}, newest first)")
    for col in ("job", "type", "attempt", "status", "when", "reason"):
        runs.add_column(col, no_wrap=col not in ("reason",))
    for e in history:
        runs.add_row(e.job, e.type, str(e.attempt), e.status, ago(e.when, now), e.reason or "")
    console.print(runs)


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
    """Register a device before it first reports (provisioning). Re-adding adds groups.

    A device already seen on the broker (`devices pending`) can be added too:
    `devices accept` does the same and keeps what it reported while pending."""
    from mpfleet.boards import load_board

    board_name = load_board(board).name if board else None
    store, registry = _registry(db, create=True)
    with store:
        _show_change(registry.add(device_id, board=board_name, groups=groups), as_json)


@devices.command("pending")
@DB
@JSON
def devices_pending(db: str | None, as_json: bool) -> None:
    """Devices seen on the broker under this fleet's topic root that are not in it.

    Nothing of theirs is stored, acked, answered or targeted; `devices accept ID`
    makes one a member. At most 1000 ids are kept; messages from further new ones are
    only counted."""
    store, registry = _registry(db)
    now = time.time()
    with store:
        found = registry.pending()
        dropped = store.strangers_dropped()
    if as_json:
        print_json({"pending": found, "uncounted_ids_messages": dropped})
        return
    if not found and not dropped:
        click.echo("no pending devices")
        return
    table = Table(title=f"pending devices ({len(found)}): seen on the broker, not in the fleet")
    for col in ("id", "board", "fw", "messages", "first seen", "last seen"):
        table.add_column(col, no_wrap=True)
    for p in found:
        state = p["state"] if isinstance(p["state"], dict) else {}
        table.add_row(p["id"], _cell(state.get("board")), _cell(state.get("fw")), str(p["times"]),
                      ago(p["first_seen"], now), ago(p["last_seen"], now))
    console.print(table)
    if dropped:
        console.print(f"{dropped} message(s) from further ids were counted but not kept (the list is full)",
                      highlight=False)


@devices.command("accept")
@click.argument("device_ids", nargs=-1, required=True, type=DEVICE_ID)
@click.option("--group", "groups", type=GROUP, multiple=True, help="Group to put them in (repeatable).")
@DB
@JSON
def devices_accept(device_ids: tuple[str, ...], groups: tuple[str, ...], db: str | None, as_json: bool) -> None:
    """Make pending devices (seen on the broker, see `devices pending`) members of the
    fleet: from their next report on they are stored, acked and targetable.

    A device never seen is registered with `devices add` instead. On a broker from
    `mpfleet broker config`, run it again so the new members get accounts."""
    store, registry = _registry(db)
    with store:
        accepted = registry.accept(device_ids, groups=groups)
    if as_json:
        print_json(accepted)
        return
    for d in accepted:
        _show_change(d, False)


devices.add_command(device_cert)
