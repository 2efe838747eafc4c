"""Options and output helpers shared by the `mpfleet` command modules."""

from __future__ import annotations

import json

import click

DB = click.option("--db", type=click.Path(dir_okay=False), envvar="MPFLEET_DB",
                  help="SQLite database (default ~/.mpfleet/mpfleet.db; env MPFLEET_DB).")
KEYS_DIR = click.option("--keys-dir", type=click.Path(file_okay=False), envvar="MPFLEET_KEYS",
                        help="Private key directory (default ~/.mpfleet/keys; env MPFLEET_KEYS).")
IMAGES_DIR = click.option("--images-dir", type=click.Path(file_okay=False), envvar="MPFLEET_IMAGES",
                          help="Image store: firmware images and app bundles (default ~/.mpfleet/images; "
                               "env MPFLEET_IMAGES).")
JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
