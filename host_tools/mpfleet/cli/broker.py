"""`mpfleet broker ...`: broker-side set-up (library: mpfleet.broker.config)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from mpfleet.cli.options import DB


console = Console()



def _device_id(ctx, param, values):
    from mpfleet.broker.config import DEVICE_ID_RE

    for v in values:
        if not DEVICE_ID_RE.match(v):
            raise click.BadParameter(f"{v!r} is not a device id (1..64 of a-z, 0-9, _ and -)", ctx, param)
    return values


def _account(ctx, param, values):
    from mpfleet.broker.config import USERNAME_RE

    for v in values:
        if not USERNAME_RE.match(v):
            raise click.BadParameter(f"{v!r} is not an account name (1..64 of A-Z, a-z, 0-9, _ . -)", ctx, param)
    return values


def _listen(ctx, param, value):
    from mpfleet.broker.config import BrokerConfigError, parse_listen

    try:
        parse_listen(value)
    except BrokerConfigError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


@click.group()
def broker() -> None:
    """The MQTT broker: per-device credentials, ACLs, its configuration."""


@broker.command("config")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for passwd, acl and mosquitto.conf.")
@click.option("--device", "devices", multiple=True, callback=_device_id,
              help="Device id (repeatable); devices in the registry and those with credentials are included too.")
@click.option("--host-user", default="mpfleet-host", show_default=True,
              help="The host account serve connects with: reads and writes mpf/v1/#.")
@click.option("--host-account", "accounts", multiple=True, callback=_account,
              help="A further host account (repeatable), e.g. mpfleet-ingest: one per host process that runs "
                   "alongside serve, since each account holds one connection. Kept on later runs.")
@click.option("--listen", default="127.0.0.1:1883", show_default=True, callback=_listen,
              help="[HOST:]PORT of the configuration's listener (a bare PORT: every interface).")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the broker keeps sessions and retained messages  [default: OUT/data].")
@click.option("--rotate", is_flag=True,
              help="New passwords for the --device devices and --host-account accounts "
                   "(every device and host account when none given).")
@click.option("--no-registry", is_flag=True, help="Leave out registry devices that have no credentials yet.")
@DB
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def broker_config(out_dir: str, devices: tuple[str, ...], host_user: str, accounts: tuple[str, ...], listen: str,
                  data_dir: str | None, rotate: bool, no_registry: bool, db: str | None, as_json: bool) -> None:
    """Write a mosquitto password file, an ACL confining device X to mpf/v1/X/...,
    and a mosquitto.conf that uses them.

    \b
    Passwords are stored in the database for provisioning; the password file
    holds only hashes (made by mosquitto_passwd). OUT/mosquitto.conf binds each
    client id to its account (use_username_as_clientid) and persists sessions
    and retained messages in the data dir: run mosquitto with it, or merge it
    into the broker's configuration (its comments say how), and restart it.
    """
    from mpfleet.broker.config import generate
    from mpfleet.db.store import Store

    with Store(db) as store:
        result = generate(store, out_dir, list(devices), host_user=host_user, rotate=rotate,
                          registry=not no_registry, accounts=list(accounts), listen=listen, data_dir=data_dir)
    if as_json:
        click.echo(json.dumps({"out": str(result.out_dir), "passwd": str(result.passwd), "acl": str(result.acl),
                               "conf": str(result.conf), "data_dir": str(result.data_dir), "listen": listen,
                               "host_user": result.host_user, "host_accounts": result.host_accounts,
                               "devices": result.devices, "new_credentials": result.new, "skipped": result.skipped,
                               "conf_lines": result.conf_lines()}, indent=2))
        return
    hosts = ", ".join([result.host_user, *result.host_accounts])
    console.print(f"{len(result.devices)} devices + host account(s) {hosts}; "
                  f"new credentials: {', '.join(result.new) or 'none'}", highlight=False)
    for name in result.skipped:
        console.print(f"skipped registry id {name!r}: not a valid device id", highlight=False)
    console.print(f"wrote {result.passwd}, {result.acl}, {result.conf} (listener {listen}, "
                  f"data in {result.data_dir})", highlight=False)
