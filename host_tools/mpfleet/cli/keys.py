"""`mpfleet keys ...`: the host's job-signing keys (library: mpfleet.fleet.keys)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DB, JSON, KEYS_DIR, open_store
from mpfleet.cli.render import print_json, utc_time
from mpfleet.fleet.registry import split_names

console = Console()


def _ring(db: str | None, keys_dir: str | None, *, create: bool = False):
    """The database and the key ring; only `keys init` may make a new database."""
    from mpfleet.fleet.keys import KeyRing

    store = open_store(db, create=create)
    return store, KeyRing(store, keys_dir)


@click.group()
def keys() -> None:
    """Job-signing keys: create, list, rotate and retire.

    \b
    Devices trust the keys in their config `trusted_keys` ({kid: public key}).
    Rollouts sign with the oldest active key, the one every device trusts.
    The set changes by `keys` jobs only (a config job may not touch it):
      mpfleet keys rotate   # a new key, and a rollout of {"add": {new: key}} signed by the
                            # old key; when every device has it, serve retires the old key
                            # and rolls out {"remove": [old]}, signed by the new one
    Offline, by hand: `keys rotate --envelope-only`, then `keys retire OLDKID`.
    """


@keys.command("init")
@click.option("--force", is_flag=True, help="Create a key even though an active one exists.")
@KEYS_DIR
@DB
@JSON
def keys_init(force: bool, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Create the first signing key and print it in the devices' `trusted_keys` form."""
    store, ring = _ring(db, keys_dir, create=True)
    with store:
        info = ring.init(force=force)
    trusted = {info.kid: info.public_b64}
    if as_json:
        print_json({"kid": info.kid, "public_b64": info.public_b64, "trusted_keys": trusted})
        return
    click.echo(f"created key {info.kid} in {ring.keys_dir}; devices trust it with this config entry:", err=True)
    click.echo(json.dumps({"trusted_keys": trusted}))


@keys.command("list")
@KEYS_DIR
@DB
@JSON
def keys_list(keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """List the keys: kid, created, active or retired, last seq used."""
    store, ring = _ring(db, keys_dir)
    with store:
        infos = ring.list()
    if as_json:
        print_json([i.to_json() for i in infos])
        return
    signing = next((i.kid for i in infos if i.active), None)  # KeyRing.fleet_key()
    table = Table(title="signing keys")
    for col in ("kid", "created", "state", "last seq"):
        table.add_column(col, no_wrap=True)
    for i in infos:
        state = f"retired {utc_time(i.retired)}" if not i.active else ("active, signing" if i.kid == signing
                                                                    else "active, newer")
        table.add_row(i.kid, utc_time(i.created), state, str(i.last_seq))
    console.print(table)


def _show_job(job, verb: str, as_json: bool, key_field: str) -> None:
    if as_json:
        print_json({key_field: job.kid, "public_b64": job.public_b64, "signed_by": job.signed_by,
                     "envelope": job.envelope, "payload": job.payload})
        return
    click.echo(f"{verb} key {job.kid}; keys job {job.payload['id']} (seq {job.payload['seq']}) "
               f"signed by {job.signed_by}:", err=True)
    click.echo(job.envelope)


@keys.command("rotate")
@click.option("--targets", default="*", show_default=True,
              help="Devices to carry the new key to: '*', or ids and groups, comma separated.")
@click.option("--envelope-only", is_flag=True,
              help="Only create the key and print the signed keys job; dispatch it and `keys retire` by hand.")
@KEYS_DIR
@DB
@JSON
def keys_rotate(targets: str, envelope_only: bool, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Create a new signing key and roll it out to the devices.

    The rollout is a `keys` job {"add": {new kid: public key}} signed by the current
    key; `mpfleet serve` delivers it. When every target device has applied it, serve
    rolls out the `keys` job {"remove": [old kid]}, signed by the new key, and retires
    the old key. Until then the old key keeps signing."""
    names = split_names([targets])
    if envelope_only:
        store, ring = _ring(db, keys_dir)
        with store:
            job = ring.rotate(targets=names)
        _show_job(job, "new", as_json, "new_kid")
        return
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine

    store, ring = _ring(db, keys_dir)
    with store:
        old = ring.fleet_key()
        engine = RolloutEngine(store, ring, Registry(store))
        job_id, new_kid = engine.create_rotation_job(names)
        public = ring.get(new_kid).public_b64
    if as_json:
        print_json({"new_kid": new_kid, "public_b64": public, "signed_by": old.kid, "job": job_id})
        return
    console.print(f"new key {new_kid}; rollout job {job_id} (signed by {old.kid}) adds it to the devices. "
                  f"`mpfleet serve` delivers it, then retires {old.kid}. Watch: mpfleet job status {job_id} --watch",
                  highlight=False)


@keys.command("retire")
@click.argument("kid")
@KEYS_DIR
@DB
@JSON
def keys_retire(kid: str, keys_dir: str | None, db: str | None, as_json: bool) -> None:
    """Retire KID and print the keys job (signed by the newest other key) that removes it on devices."""
    store, ring = _ring(db, keys_dir)
    with store:
        job = ring.retire(kid)
    _show_job(job, "retired", as_json, "retired_kid")
