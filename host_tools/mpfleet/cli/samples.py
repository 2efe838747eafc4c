"""`mpfleet samples ...`: the sensor samples the devices uploaded (library: mpfleet.fleet.export)."""

from __future__ import annotations

import sys

import click

from mpfleet.cli.options import DB, DEVICE_ID, POINT_IN_TIME, open_store


@click.group()
def samples() -> None:
    """Sensor samples the devices uploaded."""


@samples.command("export")
@click.option("--device", type=DEVICE_ID, help="Only this device id.")
@click.option("--since", type=POINT_IN_TIME,
              help="From this time: ISO 8601 (2026-11-24T10:00Z), a time ago (90m, 2h, 7d) or Unix seconds.")
@click.option("--until", type=POINT_IN_TIME, help="Up to (not including) this time; same forms as --since.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="File (default stdout).")
@DB
def samples_export(device: str | None, since: float | None, until: float | None, fmt: str, output: str | None,
                   db: str | None) -> None:
    """Export stored samples as CSV or JSON Lines, ordered by device and seq."""
    from mpfleet.fleet.export import export_samples, export_samples_to_file

    with open_store(db) as store:
        if output:
            count = export_samples_to_file(store, output, fmt, device, since, until)
            click.echo(f"{count} samples written to {output}", err=True)
        else:
            export_samples(store, sys.stdout, fmt, device, since, until)
