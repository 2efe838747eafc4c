"""Per-device broker credentials and a mosquitto password file + ACL.

Transport security (docs/protocol.md): device X may only use ``mpf/v1/X/...``,
and only in the direction the protocol gives each topic:

    device reads   mpf/v1/X/jobs, mpf/v1/X/samples/ack, mpf/v1/X/ota/data
    device writes  mpf/v1/X/state, mpf/v1/X/jobs/status, mpf/v1/X/samples, mpf/v1/X/ota/get

The host account (default ``mpfleet-host``) reads and writes ``mpf/v1/#``, and
anonymous clients are refused.

ACL form: one explicit ``user X`` block per device with ``topic read|write``
lines, not ``pattern ... %u``. A pattern applies to every user, the host
account included, and silently ties the topic tree to the username; explicit
blocks make the file say exactly who may do what, and review (or a diff after
adding a device) is a read, not an evaluation. The username IS the device id
(``[a-z0-9_-]{1,64}``, so no topic wildcards or spaces can reach the file).
Client ids are not forced to the username (``use_username_as_clientid``) because
several host processes share the host account with different client ids.

Passwords are random (24 characters) and kept in the store's
``device_credentials`` table so provisioning can write them into each device's
config (``credentials_for``). The password file holds only hashes: it is
written as plaintext into a 0600 temporary file and hashed in place by
``mosquitto_passwd -U``, so no password appears on a command line.

The files are written 0600. A mosquitto that runs as its own user (a system
service) must be able to read them: ``chown mosquitto`` them, or point
``password_file``/``acl_file`` at copies it owns.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import string
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.store import Store

DEVICE_ID_RE = re.compile(r"[a-z0-9_-]{1,64}\Z")
USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
DEFAULT_HOST_USER = "mpfleet-host"
HOST_ENTRY = "@host"  # the host account's row in device_credentials ('@' is never in a device id)
PASSWORD_LEN = 24
_ALPHABET = string.ascii_letters + string.digits

DEVICE_READ = ("jobs", "samples/ack", "ota/data")
DEVICE_WRITE = ("state", "jobs/status", "samples", "ota/get")


class BrokerConfigError(MpfleetError):
    """Credentials or broker files could not be made."""


@dataclass
class BrokerFiles:
    """What `generate()` wrote."""

    out_dir: Path
    passwd: Path
    acl: Path
    conf: Path
    host_user: str
    devices: list[str]
    new: list[str] = field(default_factory=list)       # devices (and/or HOST_ENTRY) given fresh passwords
    skipped: list[str] = field(default_factory=list)   # registry ids that are not valid device ids

    def conf_lines(self) -> list[str]:
        return conf_lines(self.passwd, self.acl)


def new_password() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LEN))


def check_device_id(device: str) -> str:
    if not DEVICE_ID_RE.match(device):
        raise BrokerConfigError(f"{device!r} is not a device id (1..64 of a-z, 0-9, _ and -)")
    return device


def find_mosquitto_passwd() -> str:
    """mosquitto_passwd: on PATH, else next to the mosquitto binary, else /usr/bin."""
    from mpfleet.broker import find_mosquitto

    found = shutil.which("mosquitto_passwd")
    if found:
        return found
    candidates = []
    broker = find_mosquitto()
    if broker:
        here = Path(broker).resolve().parent
        candidates += [here / "mosquitto_passwd", here.parent / "bin" / "mosquitto_passwd"]
    candidates.append(Path("/usr/bin/mosquitto_passwd"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise BrokerConfigError("mosquitto_passwd not found (it comes with mosquitto: apt-get install mosquitto, "
                            "brew install mosquitto)")


# ------------------------------------------------------------ credentials
def credentials_for(store: Store, device_id: str) -> dict | None:
    """{"device", "username", "password", "created"} for provisioning, or None if none yet."""
    return store.credentials(device_id)


def host_credentials(store: Store) -> dict | None:
    """The host account's {"username", "password", ...}, or None before the first `generate()`."""
    return store.credentials(HOST_ENTRY)


def ensure_credentials(store: Store, devices: list[str], host_user: str = DEFAULT_HOST_USER,
                       rotate: list[str] | None = None) -> list[str]:
    """Give every device in `devices` (and the host account) credentials if it has none,
    and new ones if it is in `rotate` (HOST_ENTRY there rotates the host's). Returns who got new ones."""
    rotate = set(rotate or ())
    fresh = []
    for device in devices:
        check_device_id(device)
        if device in rotate or store.credentials(device) is None:
            store.put_credentials(device, device, new_password())
            fresh.append(device)
    host = store.credentials(HOST_ENTRY)
    if host is None or HOST_ENTRY in rotate or host["username"] != host_user:
        store.put_credentials(HOST_ENTRY, host_user, new_password())
        fresh.append(HOST_ENTRY)
    if fresh:
        _private(store.path)
    return fresh


def _private(db_path: Path) -> None:
    """The database now holds passwords: keep it (and its WAL files) to the owner."""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        try:
            os.chmod(p, 0o600)
        except OSError:
            pass


# ------------------------------------------------------------ files
def acl_text(devices: list[str], host_user: str = DEFAULT_HOST_USER) -> str:
    lines = ["# mosquitto ACL written by `mpfleet broker config`; regenerate rather than edit.",
             "# Device X (username X) may use only mpf/v1/X/..., in the protocol's directions.",
             "", f"user {host_user}", "topic readwrite mpf/v1/#"]
    for device in sorted(devices):
        check_device_id(device)
        lines += ["", f"user {device}"]
        lines += [f"topic read mpf/v1/{device}/{t}" for t in DEVICE_READ]
        lines += [f"topic write mpf/v1/{device}/{t}" for t in DEVICE_WRITE]
    return "\n".join(lines) + "\n"


def conf_lines(passwd: str | os.PathLike, acl: str | os.PathLike) -> list[str]:
    return ["allow_anonymous false", f"password_file {Path(passwd).resolve()}", f"acl_file {Path(acl).resolve()}"]


def write_passwd(path: str | os.PathLike, entries: list[tuple[str, str]]) -> Path:
    """Write a mosquitto password file (hashed) for [(username, password)], atomically, 0600."""
    path = Path(path)
    tool = find_mosquitto_passwd()
    for user, password in entries:
        if not USERNAME_RE.match(user) or ":" in password or "\n" in password:
            raise BrokerConfigError(f"cannot write a password entry for {user!r}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwd-", suffix=".part")  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{u}:{p}\n" for u, p in entries)
        try:
            done = subprocess.run([tool, "-U", tmp], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BrokerConfigError(f"{tool} failed: {e}") from None
        if done.returncode != 0:
            raise BrokerConfigError(f"{tool} -U failed: {(done.stderr or done.stdout).strip()}")
        hashed = Path(tmp).read_text().splitlines()
        if len(hashed) != len(entries) or any(not line.split(":", 1)[1].startswith("$") for line in hashed):
            raise BrokerConfigError(f"{tool} -U did not hash the password file")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def generate(store: Store, out_dir: str | os.PathLike, devices: list[str] | None = None,
             host_user: str = DEFAULT_HOST_USER, rotate: bool = False, registry: bool = True) -> BrokerFiles:
    """Credentials for every device, then `passwd`, `acl` and `mosquitto.conf` in `out_dir`.

    The devices are those named, those in the registry (`registry=True`) and those
    that already have credentials (so a run for one new device does not lock the
    others out). New devices get credentials; existing ones keep theirs unless
    `rotate`: then the named devices get new ones, or, when none are named,
    every device and the host account.
    """
    if not USERNAME_RE.match(host_user):
        raise BrokerConfigError(f"{host_user!r} cannot be the host account name (1..64 of A-Z, a-z, 0-9, _ . -)")
    named = [check_device_id(d) for d in devices or ()]
    skipped = []
    everyone = set(named)
    if registry:
        for d in store.device_ids():
            (everyone.add if DEVICE_ID_RE.match(d) else skipped.append)(d)
    everyone |= {c["device"] for c in store.all_credentials() if c["device"] != HOST_ENTRY}
    if host_user in everyone:
        raise BrokerConfigError(f"host account {host_user!r} has the same name as a device: use --host-user")
    ordered = sorted(everyone)
    to_rotate = (named if named else ordered + [HOST_ENTRY]) if rotate else []
    with store.transaction():
        fresh = ensure_credentials(store, ordered, host_user, to_rotate)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    host = store.credentials(HOST_ENTRY)
    entries = [(host["username"], host["password"])]
    entries += [(c["username"], c["password"]) for c in (store.credentials(d) for d in ordered)]
    passwd = write_passwd(out / "passwd", entries)
    acl = out / "acl"
    _write_private(acl, acl_text(ordered, host_user))
    conf = out / "mosquitto.conf"
    _write_private(conf, "# mpfleet broker config: include from mosquitto.conf, or append these lines.\n"
                   + "\n".join(conf_lines(passwd, acl)) + "\n")
    return BrokerFiles(out, passwd, acl, conf, host_user, ordered, fresh, skipped)
