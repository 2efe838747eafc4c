"""Provisioning: what a device needs from the host before its first wake.

Which room: host library, used by the USB field tools and by the simulator's
`mpfleet.sim.fleet.provision_sim_fleet` (virtual boards; the library never imports
the simulator). Provisioning a device means, in the host's database and on the device:

- it is registered (`Registry.add`: id, board, groups), so jobs can target it before
  it ever reports;
- it trusts the host's signing keys (`trusted_keys` = every active key);
- with a secured broker (`mpfleet broker config`), it has its own broker account,
  whose username is its id: its config carries that username and password, and the
  broker's ACL lets it use only `mpf/v1/<id>/...`.
"""

from __future__ import annotations

from collections.abc import Callable

from mpfleet.broker.config import ensure_credentials
from mpfleet.db.store import Store
from mpfleet.fleet.registry import Registry


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


TLS_CA_PATH = "/tls/ca.der"
TLS_IDENTITY_PATH = "/tls/id.der"


def tls_files(ca, device_id: str) -> dict[str, bytes]:
    """A new certificate for `device_id` from the fleet CA `ca` (mpfleet.fleet.certs.FleetCA)
    as the files the device keeps: {"/tls/ca.der": CA DER, "/tls/id.der": certificate DER
    then key DER}. The key exists only in the returned bytes: the host keeps the certificate."""
    issued = ca.issue_device(device_id)
    return {TLS_CA_PATH: ca.ca_der(), TLS_IDENTITY_PATH: issued.identity()}

