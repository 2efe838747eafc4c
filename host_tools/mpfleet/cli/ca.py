"""`mpfleet ca ...` and `mpfleet devices cert ...`: the fleet's certificate authority
(library: mpfleet.fleet.certs)."""

from __future__ import annotations

import base64
import os
import signal

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DB, DEVICE_ID, JSON, KEYS_DIR, open_store
from mpfleet.cli.render import print_json, utc_time
from mpfleet.errors import MpfleetError

console = Console()


def fleet_ca(keys_dir: str | None, store=None):
    """The fleet CA in `keys_dir` (default ~/.mpfleet/keys), recording in `store`."""
    from mpfleet.fleet.certs import FleetCA
    from mpfleet.fleet.keys import default_keys_dir

    return FleetCA(keys_dir or default_keys_dir(), store)


@click.group()
def ca() -> None:
    """The fleet's certificate authority: device, host and broker certificates, the CRL.

    \b
      mpfleet ca init                                  # ca.key (0600) and ca.crt in the keys dir
      mpfleet broker config --out /etc/mpfleet/broker  # a mutual-TLS mosquitto.conf, broker + host certs
      mpfleet deploy --all --broker mqtts://10.0.0.2   # each board gets its own certificate
      mpfleet devices cert revoke pump-7 --reload /etc/mpfleet/broker/mosquitto.pid  # refused from now on
    """


@ca.command("init")
@KEYS_DIR
@JSON
def ca_init(keys_dir: str | None, as_json: bool) -> None:
    """Create the fleet CA (EC P-256, 10 years) in the keys dir. Refused if one exists:
    every device trusts it, so it is never replaced in place."""
    authority = fleet_ca(keys_dir)
    cert = authority.init()
    info = {"ca_cert": str(authority.cert_path), "ca_key": str(authority.key_path), "crl": str(authority.crl_path),
            "not_after": cert.not_valid_after_utc.timestamp(), "subject": cert.subject.rfc4514_string()}
    if as_json:
        print_json(info)
        return
    click.echo(f"created the fleet CA in {authority.dir}: {authority.cert_path.name} (give it to brokers and "
               f"devices), {authority.key_path.name} (mode 0600, keep it), {authority.crl_path.name}; "
               f"valid until {utc_time(info['not_after'])}")


@ca.command("show")
@KEYS_DIR
@JSON
def ca_show(keys_dir: str | None, as_json: bool) -> None:
    """The CA's certificate, the broker's, the host accounts' and the revoked serials."""
    from mpfleet.fleet.certs import cert_info
    from cryptography import x509

    authority = fleet_ca(keys_dir)
    info = {"dir": str(authority.dir), "ca": cert_info(authority.certificate()), "broker": None, "hosts": {},
            "revoked": sorted(authority.revoked())}
    files = authority.broker_files()
    if files:
        info["broker"] = cert_info(x509.load_pem_x509_certificate(files[0].read_bytes()))
    clients = authority.dir / "clients"
    for crt in sorted(clients.glob("*.crt")) if clients.is_dir() else ():
        info["hosts"][crt.stem] = cert_info(x509.load_pem_x509_certificate(crt.read_bytes()))
    if as_json:
        print_json(info)
        return
    click.echo(f"CA       {info['ca']['subject']}  until {utc_time(info['ca']['not_after'])}  ({authority.cert_path})")
    if info["broker"]:
        click.echo(f"broker   {info['broker']['subject']}  until {utc_time(info['broker']['not_after'])}")
    for name, c in info["hosts"].items():
        click.echo(f"host     {name}  serial {c['serial']:x}  until {utc_time(c['not_after'])}")
    click.echo(f"revoked  {len(info['revoked'])} certificate(s)")


@ca.command("host-cert")
@click.argument("account")
@KEYS_DIR
@DB
def ca_host_cert(account: str, keys_dir: str | None, db: str | None) -> None:
    """Issue a client certificate for host ACCOUNT (CN = ACCOUNT), e.g. mpfleet-ingest:
    KEYS_DIR/clients/ACCOUNT.crt and .key. Give the account its ACL entry with
    `mpfleet broker config --host-account ACCOUNT`."""
    with open_store(db) as store:
        crt, key = fleet_ca(keys_dir, store).issue_host(account)
    click.echo(f"wrote {crt} and {key} (mode 0600)")


# ---------------------------------------------------------------- devices cert
@click.group("cert")
def device_cert() -> None:
    """A device's certificates: show, renew over the air, revoke."""


@device_cert.command("show")
@click.argument("device_id", type=DEVICE_ID)
@KEYS_DIR
@DB
@JSON
def cert_show(device_id: str, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Every certificate issued to DEVICE_ID, oldest first, with its state."""
    with open_store(db) as store:
        certs = store.certificates(device_id)
    if not certs:
        raise MpfleetError(f"{device_id}: no certificate issued (provision it with a mqtts:// broker)")
    rows = [{"serial": f"{c['serial']:x}", "kind": c["kind"], "issued": c["issued"], "not_before": c["not_before"],
             "not_after": c["not_after"], "revoked": c["revoked"]} for c in certs]
    if as_json:
        print_json({"device": device_id, "certificates": rows})
        return
    table = Table(title=f"certificates of {device_id}")
    for col in ("serial", "issued", "valid until", "state"):
        table.add_column(col, no_wrap=col == "serial")
    for r in rows:
        state = f"revoked {utc_time(r['revoked'])}" if r["revoked"] else "valid"
        table.add_row(r["serial"], utc_time(r["issued"]), utc_time(r["not_after"]), state)
    console.print(table)


@device_cert.command("renew")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--trial-wakes", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Connection attempts with the new certificate before the device goes back to its old one.")
@KEYS_DIR
@DB
@JSON
def cert_renew(device_id: str, trial_wakes: int, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """A new certificate and key for DEVICE_ID, sent as a signed `cert` job (serve
    dispatches it). The device tries it at its next connection and goes back to its
    old one if the broker refuses it (the job then ends FAILED). The job's envelope
    carries the new key: readable only by the device and the host accounts (TLS and
    the ACL). The old certificate stays valid: revoke it once the job SUCCEEDED."""
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine

    with open_store(db) as store:
        if not store.certificates(device_id):
            raise MpfleetError(f"{device_id}: no certificate issued yet: provision it for TLS first")
        issued = fleet_ca(keys_dir, store).issue_device(device_id)
        engine = RolloutEngine(store, KeyRing(store, keys_dir), Registry(store))
        job_id = engine.create_job("cert", {"identity": base64.b64encode(issued.identity()).decode(),
                                            "trial_wakes": trial_wakes}, {"ids": [device_id]})
    if as_json:
        print_json({"device": device_id, "job": job_id, "serial": f"{issued.serial:x}",
                    "not_after": issued.not_after.timestamp()})
        return
    click.echo(f"job {job_id}: certificate {issued.serial:x} for {device_id} (valid until "
               f"{utc_time(issued.not_after.timestamp())}); `mpfleet job status {job_id}` once serve runs")


@device_cert.command("migrate")
@click.argument("device_ids", nargs=-1, required=True, type=DEVICE_ID)
@click.option("--to", "broker_url", required=True, metavar="mqtts://HOST[:PORT]",
              help="The TLS listener the devices move to (port default 8883).")
@click.option("--tls-hostname", metavar="NAME",
              help="The name the broker's certificate carries, when it is not HOST.")
@click.option("--key-over-plaintext", is_flag=True,
              help="Required: each device's new private key reaches it in a job over its plaintext link.")
@click.option("--trial-wakes", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Connection attempts over TLS before a device goes back to plaintext.")
@KEYS_DIR
@DB
@JSON
def cert_migrate(device_ids: tuple[str, ...], broker_url: str, tls_hostname: str | None, key_over_plaintext: bool,
                 trial_wakes: int, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Move plaintext devices to mutual TLS over the air. Per device, two signed jobs
    (serve dispatches them): a `cert` job that installs the fleet CA and a new
    certificate and key (not used while the device is on plaintext), then a `config`
    job that turns broker.tls on with the new port (and host), on trial: a device that
    cannot connect over TLS in --trial-wakes attempts goes back to plaintext and the
    job ends FAILED. The broker needs both listeners meanwhile
    (`mpfleet broker config --also-plaintext`).

    The new key crosses the plaintext link once, in the cert job: anyone who can read
    that link, or subscribe as a host account, during the migration can copy it. Use
    --key-over-plaintext to accept that (e.g. on a network you trust); otherwise give
    each board its identity over USB (`mpfleet deploy --broker mqtts://...`)."""
    from mpfleet.broker.link import parse_broker_url
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine

    target = parse_broker_url(broker_url)
    if not target.tls:
        raise MpfleetError(f"--to {broker_url}: the devices move to a TLS listener: use mqtts://")
    if target.user or target.password:
        raise MpfleetError(f"--to {broker_url}: over mutual TLS the certificate is the account: no user in the URL")
    if not key_over_plaintext:
        raise MpfleetError("each device's new private key would cross its plaintext link in a job: pass "
                           "--key-over-plaintext to accept that, or provision the boards over USB instead")
    settings = {"broker.tls": True, "broker.host": target.host, "broker.port": target.port}
    if tls_hostname:
        settings["broker.tls_hostname"] = tls_hostname
    jobs = []
    with open_store(db) as store:
        registry = Registry(store)
        for device_id in device_ids:
            registry.get(device_id)  # an unknown id: a clear error before any certificate is issued
        authority = fleet_ca(keys_dir, store)
        ca_b64 = base64.b64encode(authority.ca_der()).decode()
        engine = RolloutEngine(store, KeyRing(store, keys_dir), registry)
        for device_id in device_ids:
            issued = authority.issue_device(device_id)
            cert_job = engine.create_job("cert", {"identity": base64.b64encode(issued.identity()).decode(),
                                                  "ca": ca_b64}, {"ids": [device_id]})
            jobs.append({"device": device_id, "cert_job": cert_job, "serial": f"{issued.serial:x}"})
        config_job = engine.create_job("config", {"set": settings, "unset": ["broker.user", "broker.password"],
                                                  "trial_wakes": trial_wakes}, {"ids": list(device_ids)})
    if as_json:
        print_json({"devices": jobs, "config_job": config_job, "broker": target.url()})
        return
    for j in jobs:
        click.echo(f"{j['device']}: job {j['cert_job']} installs certificate {j['serial']}")
    click.echo(f"job {config_job}: {len(jobs)} device(s) move to {target.url()} on trial; "
               f"`mpfleet job status {config_job}` once serve runs")


def _broker_pid(value: str) -> int:
    """A process id, or the number in the pid file `value` names."""
    text = value
    if not value.isdigit():
        try:
            text = open(value).read().strip()
        except OSError as e:
            raise MpfleetError(f"--reload {value}: not a process id, and the pid file cannot be read: "
                               f"{e.strerror}") from None
    if not text.isdigit() or int(text) < 1:
        raise MpfleetError(f"--reload {value}: {text!r} is not a process id")
    return int(text)


@device_cert.command("revoke")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--reload", "reload_pid", metavar="PID|PIDFILE",
              help="Send the broker a SIGHUP so it reads the new CRL at once: its process id, or its pid file "
                   "(`broker config` writes OUT/mosquitto.pid into its configuration).")
@KEYS_DIR
@DB
@JSON
def cert_revoke(device_id: str, reload_pid: str | None, keys_dir: str | None, db: str | None,
                as_json: bool) -> None:
    """Revoke every certificate of DEVICE_ID: the CRL (KEYS_DIR/crl.pem) is rewritten,
    and the broker refuses the device at its next connect once it has read it
    (SIGHUP it, or --reload PID). Other devices carry on."""
    pid = _broker_pid(reload_pid) if reload_pid is not None else None
    with open_store(db) as store:
        serials = fleet_ca(keys_dir, store).revoke(device_id)
    reload_pid = pid
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as e:
            raise MpfleetError(f"revoked, but the broker (pid {reload_pid}) was not told: {e.strerror}; "
                                       "SIGHUP it yourself") from None
    if as_json:
        print_json({"device": device_id, "revoked": [f"{s:x}" for s in serials], "reloaded": reload_pid})
        return
    told = (f"; broker {reload_pid} told (SIGHUP)" if reload_pid
            else "; SIGHUP the broker so it reads the CRL (--reload PID|PIDFILE)")
    click.echo(f"revoked {len(serials)} certificate(s) of {device_id}{told}")
