"""`mpfleet broker ...`: broker-side set-up (library: mpfleet.brokerconf)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from mpfleet.cli_options import DB


console = Console()



def _device_id(ctx, param, values):
    from mpfleet.brokerconf import DEVICE_ID_RE

    for v in values:
        if not DEVICE_ID_RE.match(v):
            raise click.BadParameter(f"{v!r} is not a device id (1..64 of a-z, 0-9, _ and -)", ctx, param)
    return values


@click.group()
def broker() -> None:
    """The MQTT broker: per-device credentials and ACLs."""


@broker.command("config")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for passwd, acl and a mosquitto.conf snippet.")
@click.option("--device", "devices", multiple=True, callback=_device_id,
              help="Device id (repeatable); devices in the registry and those with credentials are included too.")
@click.option("--host-user", default="mpfleet-host", show_default=True,
              help="The host account: reads and writes mpf/v1/#.")
@click.option("--rotate", is_flag=True,
              help="New passwords for the --device devices (all devices and the host account when none given).")
@click.option("--no-registry", is_flag=True, help="Leave out registry devices that have no credentials yet.")
@DB
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def broker_config(out_dir: str, devices: tuple[str, ...], host_user: str, rotate: bool, no_registry: bool,
                  db: str | None, as_json: bool) -> None:
    """Write a mosquitto password file and ACL confining device X to mpf/v1/X/...

    \b
    Passwords are stored in the database for provisioning; the password file
    holds only hashes (made by mosquitto_passwd). Add the lines of
    OUT/mosquitto.conf to the broker's configuration and reload it.
    """
    from mpfleet.brokerconf import generate
    from mpfleet.store import Store

    with Store(db) as store:
        result = generate(store, out_dir, list(devices), host_user=host_user, rotate=rotate,
                          registry=not no_registry)
    if as_json:
        click.echo(json.dumps({"out": str(result.out_dir), "passwd": str(result.passwd), "acl": str(result.acl),
                               "conf": str(result.conf), "host_user": result.host_user, "devices": result.devices,
                               "new_credentials": result.new, "skipped": result.skipped,
                               "conf_lines": result.conf_lines()}, indent=2))
        return
    console.print(f"{len(result.devices)} devices + host account {result.host_user}; "
                  f"new credentials: {', '.join(result.new) or 'none'}", highlight=False)
    for name in result.skipped:
        console.print(f"skipped registry id {name!r}: not a valid device id", highlight=False)
    console.print(f"wrote {result.passwd}, {result.acl}, {result.conf}", highlight=False)
