"""`mpfleet broker ...`: broker-side set-up (library: mpfleet.broker.config)."""

from __future__ import annotations

import click
from rich.console import Console

from mpfleet.cli.options import DB, DEVICE_ID, JSON, KEYS_DIR, TOPIC_ROOT
from mpfleet.cli.render import print_json

console = Console()


class _Account(click.ParamType):
    """A broker account name (mpfleet.broker.config.USERNAME_RE)."""

    name = "account"

    def convert(self, value, param, ctx):
        from mpfleet.broker.config import USERNAME_RE

        if not USERNAME_RE.match(value):
            self.fail(f"{value!r} is not an account name (1..64 of A-Z, a-z, 0-9, _ . -)", param, ctx)
        return value


class _Listen(click.ParamType):
    """[HOST:]PORT of a listener, checked by mpfleet.broker.config.parse_listen; kept as text."""

    name = "listen"

    def convert(self, value, param, ctx):
        from mpfleet.broker.config import BrokerConfigError, parse_listen

        try:
            parse_listen(value)
        except BrokerConfigError as e:
            self.fail(str(e), param, ctx)
        return value


@click.group()
def broker() -> None:
    """The MQTT broker: per-device credentials, ACLs, its configuration."""


@broker.command("config")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for passwd, acl and mosquitto.conf.")
@click.option("--device", "devices", type=DEVICE_ID, multiple=True,
              help="Device id (repeatable); devices in the registry and those with credentials are included too.")
@click.option("--host-user", default="mpfleet-host", show_default=True,
              help="The host account serve connects with: reads and writes everything under the topic root.")
@click.option("--host-account", "accounts", type=_Account(), multiple=True,
              help="A further host account (repeatable), e.g. mpfleet-ingest: one per host process that runs "
                   "alongside serve, since each account holds one connection. Kept on later runs.")
@click.option("--listen", type=_Listen(),
              help="[HOST:]PORT of the configuration's listener (a bare PORT: every interface)  "
                   "[default: 127.0.0.1:8883; with --plaintext 127.0.0.1:1883].")
@click.option("--plaintext", is_flag=True,
              help="A plaintext listener with per-device passwords instead of mutual TLS: for a lab only "
                   "(passwords, samples and jobs cross the network readable).")
@click.option("--also-plaintext", metavar="[HOST:]PORT", type=_Listen(),
              help="Keep a plaintext password listener there too, beside the TLS one, while devices move to TLS "
                   "(`mpfleet devices cert migrate`).")
@click.option("--name", "names", multiple=True,
              help="A host name or IP address devices reach the broker by, for its certificate (repeatable) "
                   "[default: the --listen host, localhost, 127.0.0.1].")
@click.option("--data-dir", type=click.Path(file_okay=False),
              help="Where the broker keeps sessions and retained messages  [default: OUT/data].")
@click.option("--rotate", is_flag=True,
              help="New passwords for the --device devices and --host-account accounts "
                   "(every device and host account when none given).")
@click.option("--no-registry", is_flag=True, help="Leave out registry devices that have no credentials yet.")
@TOPIC_ROOT
@KEYS_DIR
@DB
@JSON
def broker_config(out_dir: str, devices: tuple[str, ...], host_user: str, accounts: tuple[str, ...],
                  listen: str | None, plaintext: bool, also_plaintext: str | None, names: tuple[str, ...],
                  data_dir: str | None, rotate: bool,
                  no_registry: bool, topic_root: str, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Write a mosquitto.conf with a mutual-TLS listener, an ACL confining device X
    to ROOT/X/... (ROOT: --topic-root, mpf/v1), and the broker's and host accounts'
    certificates from the fleet CA (`mpfleet ca init` first).

    \b
    Every client presents a certificate from the fleet CA; its CN (the device id,
    or the host account) is its username and client id (use_identity_as_username,
    use_username_as_clientid), revoked ones are refused (crlfile), and the data
    dir keeps sessions and retained messages. Devices get their certificates at
    provisioning (`deploy`, `sim fleet` with a mqtts:// broker), serve and ingest
    find theirs in KEYS_DIR/clients/. With --plaintext: a password file (hashes,
    by mosquitto_passwd; the passwords are in the database for provisioning)
    instead, for a lab. Run mosquitto with OUT/mosquitto.conf, or merge it into
    the broker's configuration (its comments say how), and restart it.
    Accounts go to the fleet's members only (provisioned or accepted), never to
    a device merely seen on the broker (`mpfleet devices pending`).
    """
    from mpfleet.broker.config import DEFAULT_LISTEN, DEFAULT_TLS_LISTEN, generate
    from mpfleet.db.store import Store

    listen = listen or (DEFAULT_LISTEN if plaintext else DEFAULT_TLS_LISTEN)
    if plaintext and also_plaintext:
        raise click.UsageError("--also-plaintext adds a plaintext listener beside the TLS one: not with --plaintext")
    with Store(db) as store:
        authority = None
        if not plaintext:
            from mpfleet.cli.ca import fleet_ca

            authority = fleet_ca(keys_dir, store)
        result = generate(store, out_dir, list(devices), host_user=host_user, rotate=rotate,
                          registry=not no_registry, accounts=list(accounts), listen=listen, data_dir=data_dir,
                          root=topic_root, ca=authority, broker_names=list(names) or None,
                          also_plaintext=also_plaintext)
    if as_json:
        print_json({"topic_root": topic_root, "out": str(result.out_dir), "tls": result.tls,
                    "passwd": str(result.passwd) if result.passwd else None, "acl": str(result.acl),
                    "conf": str(result.conf), "data_dir": str(result.data_dir), "listen": listen,
                    "host_user": result.host_user, "host_accounts": result.host_accounts,
                    "devices": result.devices, "new_credentials": result.new_accounts(), "skipped": result.skipped,
                    "broker_cert": str(result.broker_cert) if result.broker_cert else None,
                    "host_certs": {k: str(v) for k, v in result.host_certs.items()},
                    "also_plaintext": also_plaintext, "conf_lines": result.conf_lines(authority)})
        return
    if result.tls:
        hosts = ", ".join([result.host_user, *result.host_accounts])
        console.print(f"{len(result.devices)} devices + host account(s) {hosts}; "
                      f"new certificates: {', '.join(result.new) or 'none'}", highlight=False)
        for name in result.skipped:
            console.print(f"skipped registry id {name!r}: not a valid device id", highlight=False)
        # click.echo, not rich: the paths and the listener stay on one line at any width
        beside = f", plaintext listener {also_plaintext} with {result.passwd}" if also_plaintext else ""
        click.echo(f"wrote {result.acl}, {result.conf} (mutual-TLS listener {listen}{beside}, data in "
                   f"{result.data_dir}); broker certificate {result.broker_cert}")
        return
    hosts = ", ".join([result.host_user, *result.host_accounts])
    console.print(f"{len(result.devices)} devices + host account(s) {hosts}; "
                  f"new credentials: {', '.join(result.new_accounts()) or 'none'}", highlight=False)
    for name in result.skipped:
        console.print(f"skipped registry id {name!r}: not a valid device id", highlight=False)
    console.print(f"wrote {result.passwd}, {result.acl}, {result.conf} (listener {listen}, "
                  f"data in {result.data_dir})", highlight=False)
