"""`mpfleet db ...`: check the database file, back it up (library: mpfleet.db.maint).

docs/dispatch.md ("The database file: check and backup") is the operator's page.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console

from mpfleet.cli.options import DB, JSON
from mpfleet.cli.render import print_json

console = Console(highlight=False, soft_wrap=True)  # a problem per line, unwrapped

# `mpfleet db check` exit codes (docs/dispatch.md): 0 sound, 1 an error, 2 bad usage (click), then:
EXIT_DAMAGED = 3     # the file is damaged, or not an mpfleet database
EXIT_UNREADABLE = 4  # the file is missing or cannot be read: nothing was checked


def _path(db: str | None) -> Path:
    """The SQLite file --db names; PostgreSQL has its own tools for what `db` does here."""
    from mpfleet.cli.options import database_path
    from mpfleet.db.backend import is_url, shown

    path = database_path(db)
    if is_url(path):
        raise click.UsageError(f"{shown(path)} is a PostgreSQL database: check and back it up with PostgreSQL's "
                               "own tools (pg_amcheck, pg_dump); `mpfleet db` works on SQLite files")
    return path


@click.group("db")
def db_group() -> None:
    """The SQLite database file: check it, back it up.

    \b
      mpfleet db check                  # quick: every page of every table
      mpfleet db check --full           # also indexes against tables, every row read back
      mpfleet db backup /backups/mpfleet-$(date +%F).db

    Both are safe while `mpfleet serve` runs."""


@db_group.command("check")
@DB
@click.option("--full", is_flag=True,
              help="PRAGMA integrity_check (indexes too) and every row read back, instead of quick_check.")
@JSON
def db_check(db: str | None, full: bool, as_json: bool) -> None:
    """Check the database file for damage; never changes or creates it.

    \b
    Exit codes:
      0  the database is sound
      1  an error (message on stderr)
      2  bad usage
      3  the database is damaged (the problems are printed), or not an mpfleet database
      4  the file is missing or cannot be read: nothing was checked

    A damaged database: stop `mpfleet serve`, keep the damaged file for inspection, and
    restore the latest backup (`mpfleet db backup` makes them)."""
    from mpfleet.db.maint import examine_database

    report = examine_database(_path(db), quick=not full)
    code = 0 if report.sound else (EXIT_UNREADABLE if not report.checked else EXIT_DAMAGED)
    if as_json:
        print_json({**report.to_json(), "exit_code": code})
        sys.exit(code)
    mode = "full check" if full else "quick check"
    if report.sound:
        console.print(f"[green]sound[/]: {report.path} ({report.pages} pages of {report.page_size} bytes, {mode})")
    elif not report.checked:
        console.print(f"[red]not checked[/]: {report.path}: {report.problems[0]}")
    else:
        console.print(f"[red]DAMAGED[/]: {report.path} ({len(report.problems)} problem(s), {mode})")
        for problem in report.problems:
            console.print(f"  {problem}", markup=False)
        console.print("Stop `mpfleet serve`, keep this file for inspection, and restore the latest backup.")
    sys.exit(code)


@db_group.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
@DB
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
@JSON
def db_backup(dest: str, db: str | None, force: bool, as_json: bool) -> None:
    """Copy the database to DEST while it is in use (SQLite's online backup), then check the copy.

    The copy is written to a temporary file beside DEST and renamed once it passed the
    full check, so a failed backup leaves nothing at DEST. DEST has mode 0600 (the
    database holds the devices' broker passwords). Exit 0 when the backup is made and
    sound, 1 otherwise (an existing DEST without --force, a damaged source...).
    Restore: stop `mpfleet serve`, copy the backup over the database file."""
    from mpfleet.db.maint import backup_database

    result = backup_database(_path(db), dest, force=force)
    if as_json:
        print_json({"source": str(result.source), "dest": str(result.dest), "pages": result.pages,
                    "page_size": result.page_size, "bytes": result.size_bytes,
                    "seconds": round(result.seconds, 3)})
        return
    console.print(f"backed up {result.source} to {result.dest}: {result.size_bytes} bytes, {result.pages} pages "
                  f"of {result.page_size} bytes, checked, in {result.seconds:.2f} s")
