"""The `mpfleet` command line: a thin layer that checks arguments and calls the library.

The only room that imports click. One module per command group (`devices.py`, `jobs.py`,
`usb.py`, `sim.py`...), parameter types and shared options in `options.py`, rendering in
`render.py`. A command parses, calls the library, prints; it holds no library logic.
May import every room of the package.

Every expected failure is an `MpfleetError`, printed once as `mpfleet: <message>`
with exit status 1; usage errors exit with 2 (click's convention). A damaged database
(SQLite's DatabaseError, from any command) is one line naming the file, exit 1.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from mpfleet import __version__
from mpfleet.boards import list_boards, load_board
from mpfleet.cli.options import DB, DEVICE_ID, POINT_IN_TIME
from mpfleet.cli.render import print_json
from mpfleet.errors import MpfleetError

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpfleet")
def cli() -> None:
    """mpfleet: flash, provision and command fleets of MicroPython ESP32 devices.

    Virtual boards (`mpfleet sim ...`) run the same firmware on the real
    MicroPython unix port, so everything can be tried without hardware.
    """


@cli.group()
def boards() -> None:
    """Board definitions (boards/*.json): chip, flash layout, sensors."""


@boards.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def boards_list(as_json: bool) -> None:
    """List the known boards."""
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
    print_json(load_board(name).to_json())


_DB_OPTION = DB


@cli.group()
def samples() -> None:
    """Sensor samples the devices uploaded."""


@samples.command("export")
@click.option("--device", type=DEVICE_ID, help="Only this device id.")
@click.option("--since", type=POINT_IN_TIME,
              help="From this time: ISO 8601 (2026-11-24T10:00Z), a time ago (90m, 2h, 7d) or Unix seconds.")
@click.option("--until", type=POINT_IN_TIME, help="Up to (not including) this time; same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="File (default stdout).")
@_DB_OPTION
def samples_export(device: str | None, since: float | None, until: float | None, fmt: str, output: str | None,
                   db: str | None) -> None:
    """Export stored samples as CSV or JSON Lines, ordered by device and seq."""
    from mpfleet.fleet.export import export_samples, export_samples_to_file
    from mpfleet.db.store import Store

    with Store(db) as store:
        if output:
            count = export_samples_to_file(store, output, fmt, device, since, until)
            click.echo(f"{count} samples written to {output}", err=True)
        else:
            export_samples(store, sys.stdout, fmt, device, since, until)


@cli.command("ingest")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="Broker URL: mqtt://[user:pass@]host[:port] or mqtts://...")
@_DB_OPTION
@click.option("--client-id", default="mpfleet-ingest", show_default=True,
              help="MQTT client id; the session is persistent, so frames sent while this was down arrive. On a broker from `mpfleet broker config` the client id is the account's username (one "
                   "connection per account: give each process its own, `broker config --host-account`).")
def ingest_cmd(broker: str, db: str | None, client_id: str) -> None:
    """Store the devices' samples in SQLite and ack them, until Ctrl-C."""
    import time

    from mpfleet.fleet.ingest import Ingester
    from mpfleet.broker.link import parse_broker_url
    from pathlib import Path

    from mpfleet.db.store import default_db_path

    cfg = parse_broker_url(broker)
    path = Path(db) if db else default_db_path()  # checked at start, not created before the check
    ingester = Ingester(cfg, path, client_id=client_id)
    ingester.start()
    console.print(f"ingesting from {cfg.url()} into {path} (Ctrl-C stops)")
    try:
        while ingester.running:
            time.sleep(5)
            stats = ingester.stats.as_dict()
            console.print(f"frames {stats['frames']}  new samples {stats['samples_new']}  "
                          f"duplicates {stats['duplicates']}  corrupt {stats['corrupt']}  "
                          f"quarantined {stats['quarantined']}  "
                          f"waiting for the database {ingester.messages.as_dict()['held']}", highlight=False)
    except KeyboardInterrupt:
        pass
    finally:
        ingester.stop()
    if ingester.failure is not None:  # stopped on its own: never end as if all were well
        raise MpfleetError(f"ingest stopped: {ingester.failure}")


def _register_subcommands() -> None:
    from mpfleet.cli.broker import broker
    from mpfleet.cli.db import db_group
    from mpfleet.cli.devices import devices
    from mpfleet.cli.flash import flash
    from mpfleet.cli.app import app
    from mpfleet.cli.images import image
    from mpfleet.cli.jobs import job, serve
    from mpfleet.cli.keys import keys
    from mpfleet.cli.usb import deploy, ports, usb
    from mpfleet.cli.sim import sim

    cli.add_command(sim)
    cli.add_command(keys)
    cli.add_command(broker)
    cli.add_command(devices)
    cli.add_command(job)
    cli.add_command(serve)
    cli.add_command(image)
    cli.add_command(app)
    cli.add_command(flash)
    cli.add_command(ports)
    cli.add_command(deploy)
    cli.add_command(usb)
    cli.add_command(db_group)


_register_subcommands()


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="mpfleet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mpfleet: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MpfleetError as e:
        from mpfleet.db.maint import damage_reason, restore_hint

        message = str(e)
        if damage_reason(e.__cause__ or e.__context__) is not None and "mpfleet db check" not in message:
            message += f"; {restore_hint(_database_named_in(argv))}"
        click.echo(f"mpfleet: {message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        # A damaged database reaches any command as SQLite's DatabaseError: say so once,
        # here, rather than in every command (issue 13). Anything else is a bug.
        from mpfleet.db.maint import damage_reason, restore_hint

        reason = damage_reason(e)
        if reason is None:
            raise
        path = _database_named_in(argv)
        click.echo(f"mpfleet: the database {path} is damaged ({reason}); {restore_hint(path)}", err=True)
        sys.exit(1)


def _database_named_in(argv: list[str] | None):
    """The database the failed command used: the last --db given, else $MPFLEET_DB or the
    default (every command takes its database as --db, cli_options.DB)."""
    from pathlib import Path

    from mpfleet.db.store import default_db_path

    args = sys.argv[1:] if argv is None else argv
    given = None
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--db" and i + 1 < len(args):
            given = args[i + 1]
        elif arg.startswith("--db="):
            given = arg[len("--db="):]
    return Path(given) if given else default_db_path()

