"""The `mpfleet` command line: a thin layer that checks arguments and calls the library.

The only room that imports click. One module per command group (`devices.py`, `jobs.py`,
`usb.py`, `sim.py`...), parameter types and shared options in `options.py`, rendering in
`render.py`. A command parses, calls the library, prints; it holds no library logic.
May import every room of the package.

Every expected failure is an `MpfleetError`, printed once as `mpfleet: <message>`
with exit status 1 (or the error's own `exit_code`: 2 for a config file that cannot be
used); usage errors exit with 2 (click's convention). A damaged database
(SQLite's DatabaseError, from any command) is one line naming the file, exit 1.
"""

from __future__ import annotations

import sys

import click

from mpfleet import __version__
from mpfleet.errors import MpfleetError


# Every command group, by name: (module, attribute). A group's module is imported when
# the group is used (or `--help` lists it), so `mpfleet job list` does not pay for
# esptool, the simulator or the USB tools at start-up.
COMMANDS = {
    "app": ("mpfleet.cli.app", "app"),
    "boards": ("mpfleet.cli.boards", "boards"),
    "ca": ("mpfleet.cli.ca", "ca"),
    "broker": ("mpfleet.cli.broker", "broker"),
    "config": ("mpfleet.cli.config", "config"),
    "db": ("mpfleet.cli.db", "db_group"),
    "deploy": ("mpfleet.cli.usb", "deploy"),
    "devices": ("mpfleet.cli.devices", "devices"),
    "flash": ("mpfleet.cli.flash", "flash"),
    "image": ("mpfleet.cli.images", "image"),
    "ingest": ("mpfleet.cli.serve", "ingest"),
    "job": ("mpfleet.cli.jobs", "job"),
    "keys": ("mpfleet.cli.keys", "keys"),
    "ports": ("mpfleet.cli.usb", "ports"),
    "samples": ("mpfleet.cli.samples", "samples"),
    "serve": ("mpfleet.cli.serve", "serve"),
    "sim": ("mpfleet.cli.sim", "sim"),
    "usb": ("mpfleet.cli.usb", "usb"),
}


class _CommandRooms(click.Group):
    """The top-level group: commands come from COMMANDS, imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        import importlib

        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=_CommandRooms, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mpfleet")
@click.option("--profile", envvar="MPFLEET_PROFILE", metavar="NAME",
              help="Use the config file's [profile.NAME] (env MPFLEET_PROFILE; docs/cli.md).")
@click.pass_context
def cli(ctx: click.Context, profile: str | None) -> None:
    """mpfleet: flash, provision and command fleets of MicroPython ESP32 devices.

    Virtual boards (`mpfleet sim ...`) run the same firmware on the real
    MicroPython unix port, so everything can be tried without hardware.
    Defaults come from ~/.config/mpfleet/config.toml (`mpfleet config show`).
    """
    from mpfleet.cli import settings

    source = ctx.get_parameter_source("profile")
    where = settings.FROM_FLAG if source is click.core.ParameterSource.COMMANDLINE else settings.FROM_ENV
    settings.remember(ctx, settings.load_settings(profile, where if profile else None))


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
        sys.exit(getattr(e, "exit_code", 1))  # 1, or 2 for a usage error such as a bad config file
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        # A damaged database reaches any command as SQLite's DatabaseError: say so once,
        # here, rather than in every command (issue 13). So do a database the command may
        # not write and a file the system refused. Anything else is a bug.
        from mpfleet.db.maint import damage_reason, restore_hint

        reason = damage_reason(e)
        if reason is not None:
            path = _database_named_in(argv)
            click.echo(f"mpfleet: the database {path} is damaged ({reason}); {restore_hint(path)}", err=True)
            sys.exit(1)
        message = _storage_refusal(e, argv)
        if message is None:
            raise
        click.echo(f"mpfleet: {message}", err=True)
        sys.exit(1)


def _storage_refusal(e: Exception, argv: list[str] | None) -> str | None:
    """One line for a database SQLite may not write, or a file the system refused; None
    for anything else (a bug, which keeps its traceback)."""
    import sqlite3

    if isinstance(e, sqlite3.OperationalError):
        text = str(e)
        if "readonly" in text or "unable to open" in text or "disk I/O" in text or "locked" in text:
            path = _database_named_in(argv)
            return (f"cannot write the database {path}: {text} (the file and its directory must be writable: "
                    "SQLite keeps its -wal and -shm files beside it)")
        return None
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"cannot use {e.filename}: {e.strerror}"
    return None


def _database_named_in(argv: list[str] | None):
    """The database the failed command used: the last --db given, else $MPFLEET_DB, the
    config file's db, or the default (every command takes its database as --db, cli_options.DB)."""
    import os

    from mpfleet.db.backend import normalized
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
    if given:
        return normalized(given)
    if not os.environ.get("MPFLEET_DB"):
        configured = _configured_db(args)
        if configured:
            return normalized(configured)
    return default_db_path()


def _configured_db(args: list[str]) -> str | None:
    """The config file's db for the profile of `args` (--profile NAME, else $MPFLEET_PROFILE)."""
    from mpfleet.cli.settings import load_settings

    profile = None
    for i, arg in enumerate(args):
        if arg == "--profile" and i + 1 < len(args):
            profile = args[i + 1]
            break
        if arg.startswith("--profile="):
            profile = arg[len("--profile="):]
            break
        if not arg.startswith("-"):
            break  # the command: --profile comes before it
    try:
        return load_settings(profile).lookup("db")[0]
    except MpfleetError:
        return None

