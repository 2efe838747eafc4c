"""Provisioning: what a device needs from the host before its first wake.

Which room: host library, used by `mpfleet sim fleet` (virtual boards) and the USB
field tools. Provisioning a device means, in the host's database and on the device:

- it is registered (`Registry.add`: id, board, groups), so jobs can target it before
  it ever reports;
- it trusts the host's signing keys (`trusted_keys` = every active key);
- with a secured broker (`mpfleet broker config`), it has its own broker account,
  whose username is its id: its config carries that username and password, and the
  broker's ACL lets it use only `mpf/v1/<id>/...`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mpfleet.broker.config import ensure_credentials
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import BrokerConfig
from mpfleet.fleet.registry import Registry
from mpfleet.db.store import Store


def register_devices(store: Store, devices: list[str], board: str | None,
                     groups_of: Callable[[str], list[str]], with_credentials: bool) -> dict[str, tuple[str, str]]:
    """Register `devices` (and give each a broker account when `with_credentials`);
    returns {device: (username, password)} (empty without credentials)."""
    registry = Registry(store)
    for device in devices:
        registry.add(device, board=board, groups=groups_of(device))
    if not with_credentials:
        return {}
    with store.transaction():
        ensure_credentials(store, devices)
    creds = {}
    for device in devices:
        c = store.credentials(device)
        creds[device] = (c["username"], c["password"])
    return creds


def provision_sim_fleet(store: Store, keyring: KeyRing, root: str | os.PathLike, count: int, broker: BrokerConfig,
                        prefix: str = "sim", groups_fn: Callable[[int, str], list[str]] | None = None,
                        with_credentials: bool = True, config_overrides: dict | None = None,
                        workers: int | None = None):
    """A virtual fleet provisioned like real devices: registered, trusting the host's
    keys, each with its own broker account (`with_credentials`). Returns the boards."""
    from mpfleet.sim.fleet import device_ids, provision_fleet  # noqa: PLC0415

    trusted = keyring.trusted_keys()  # none yet: the devices reject every job until a config gives them one
    ids = device_ids(count, prefix)
    index_of = {d: i for i, d in enumerate(ids, 1)}
    groups = (lambda d: groups_fn(index_of[d], d)) if groups_fn else (lambda d: [])
    creds = register_devices(store, ids, "virtual", groups, with_credentials)
    return provision_fleet(Path(root), count, broker.host, broker.port, prefix=prefix,
                           groups_fn=groups_fn, config_overrides=config_overrides, trusted_keys=trusted,
                           credentials_fn=(lambda i, d: creds[d]) if creds else None, workers=workers)
