"""Per-device broker credentials, a mosquitto password file + ACL, and the
mosquitto configuration that binds client ids to them and persists sessions.

Transport security (docs/protocol.md): device X may only use ``mpf/v1/X/...``
(``<root>/X/...`` with another topic root), and only in the direction the protocol
gives each topic:

    device reads   mpf/v1/X/jobs, mpf/v1/X/samples/ack, mpf/v1/X/ota/data
    device writes  mpf/v1/X/state, mpf/v1/X/jobs/status, mpf/v1/X/samples, mpf/v1/X/ota/get

The host account (default ``mpfleet-host``, the one ``serve`` connects with) and
any further host accounts (``host_accounts``, e.g. ``mpfleet-ingest`` for a
separate ``mpfleet ingest``) read and write ``mpf/v1/#``, and anonymous clients
are refused.

ACL form: one explicit ``user X`` block per device with ``topic read|write``
lines, not ``pattern ... %u``. A pattern applies to every user, the host
account included, and silently ties the topic tree to the username; explicit
blocks make the file say exactly who may do what, and review (or a diff after
adding a device) is a read, not an evaluation. The username IS the device id
(``[a-z0-9_-]{1,64}``, so no topic wildcards or spaces can reach the file).

Client ids are bound to accounts: ``use_username_as_clientid true`` makes
mosquitto replace the client id a client sends with its username before the
password check, and look for a session (to resume, or to take over) only once
the check passed (mosquitto 2.0 src/handle_connect.c).
With free client ids, device A's credentials connecting as ``mpfleet-serve`` with
a clean session wiped serve's persistent session (issue 13), and connecting as
``dev-b`` kicked dev-b off. Bound, A can only ever be session ``dev-a``. The
device sends its device id as client id, which is its username, so nothing
changes for it; serve's session is named by its account (``mpfleet-host``), the
same after every restart. The cost: one connection per account at a time, so
each host process that runs alongside another needs its own host account.
Rejected: mosquitto's dynamic-security plugin (a client id per client, but
its own JSON credential store and ACL model, replacing this file pair) and
``clientid_prefixes`` (one prefix for everyone, bound to no account).

mosquitto applies ``use_username_as_clientid`` to the listener declared before
it in the same file (in an included file with no listener line: to its default
listener, a new one on port 1883). So ``conf_lines()`` go after the listener
line they are for, with no other listener between (LocalBroker appends them),
and the generated ``mosquitto.conf`` declares its own listener. It also
persists sessions and retained messages in its data dir
(broker.persistence_lines), saved every ``FLEET_AUTOSAVE_S`` seconds.

Passwords are random (24 characters) and kept in the store's
``device_credentials`` table so provisioning can write them into each device's
config (``credentials_for``); the host account's row is ``HOST_ENTRY``, a further
host account's ``HOST_ACCOUNT_ENTRY`` + its name ('@' is never in a device id).
The password file holds only hashes: it is
written as plaintext into a 0600 temporary file and hashed in place by
``mosquitto_passwd -U``, so no password appears on a command line.

The files are written 0600 and the data dir 0700. A mosquitto that runs as its
own user (a system service) must be able to read them and write there:
``chown mosquitto`` them, or point the configuration at copies it owns.
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

from mpfleet.files import write_atomic
from mpfleet.broker.local import TUNING_LINES, find_mosquitto, persistence_lines
from mpfleet.errors import MpfleetError
from mpfleet.db.store import Store
from mpfleet.protocol.ids import DEVICE_ID_RULE, is_device_id
from mpfleet.protocol.topics import DEVICE_READS, DEVICE_WRITES, TOPIC_ROOT, check_topic_root, everything, topic

USERNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
DEFAULT_HOST_USER = "mpfleet-host"
HOST_ENTRY = "@host"  # the host account's row in device_credentials ('@' is never in a device id)
HOST_ACCOUNT_ENTRY = "@host:"  # + name: a further host account's row
DEFAULT_LISTEN = "127.0.0.1:1883"  # plaintext: loopback unless the operator says otherwise
DEFAULT_TLS_LISTEN = "127.0.0.1:8883"
# Seconds between saves of a fleet broker's database: a kill -9 loses at most about
# this much (docs/security.md). Every save writes the whole database (every retained
# queue and session) and fsyncs it in mosquitto's only thread, so not every second.
FLEET_AUTOSAVE_S = 5
PASSWORD_LEN = 24
_ALPHABET = string.ascii_letters + string.digits


class BrokerConfigError(MpfleetError):
    """Credentials or broker files could not be made."""


@dataclass
class BrokerFiles:
    """What `generate()` wrote."""

    out_dir: Path
    passwd: Path | None  # None for a TLS listener
    acl: Path
    conf: Path
    host_user: str
    devices: list[str]
    new: list[str] = field(default_factory=list)       # devices, HOST_ENTRY, HOST_ACCOUNT_ENTRY+name: fresh passwords
    skipped: list[str] = field(default_factory=list)   # registry ids that are not valid device ids
    host_accounts: list[str] = field(default_factory=list)  # further host accounts (usernames)
    data_dir: Path | None = None                       # the generated configuration's persistence_location
    tls: bool = False                                  # a mutual-TLS listener (no password file)
    broker_cert: Path | None = None
    host_certs: dict[str, Path] = field(default_factory=dict)  # host account -> its client certificate

    def new_accounts(self) -> list[str]:
        """The usernames that got fresh passwords (`new` with the host rows named by their
        accounts: HOST_ENTRY is host_user, HOST_ACCOUNT_ENTRY+name is name)."""
        return [self.host_user if e == HOST_ENTRY else e.removeprefix(HOST_ACCOUNT_ENTRY) for e in self.new]

    def conf_lines(self, ca=None) -> list[str]:
        """The lines to append after a listener line (LocalBroker's extra_config); a TLS
        configuration's need the fleet CA `ca`."""
        if self.tls:
            return tls_listener_lines(ca, self.acl)
        return conf_lines(self.passwd, self.acl)


def new_password() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(PASSWORD_LEN))


def check_device_id(device: str) -> str:
    if not is_device_id(device):
        raise BrokerConfigError(f"{device!r} is not a valid device id ({DEVICE_ID_RULE})")
    return device


def check_username(name: str, what: str = "account name") -> str:
    if not USERNAME_RE.match(name):
        raise BrokerConfigError(f"{name!r} cannot be a host {what} (1..64 of A-Z, a-z, 0-9, _ . -)")
    return name


def parse_listen(value: str) -> tuple[str | None, int]:
    """`[HOST:]PORT` (HOST may be `[v6]`) -> (host or None for every interface, port)."""
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BrokerConfigError(f"listen address {value!r}: expected [HOST:]PORT with a port of 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise BrokerConfigError(f"listen address {value!r}: write an IPv6 address in brackets, [::1]:1883")
    if not re.fullmatch(r"[A-Za-z0-9_.:%-]*", host):
        raise BrokerConfigError(f"listen address {value!r}: bad host")
    return host or None, int(port)


def find_mosquitto_passwd() -> str:
    """mosquitto_passwd: on PATH, else next to the mosquitto binary, else /usr/bin."""
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


def host_credentials(store: Store, account: str | None = None) -> dict | None:
    """The host account's {"username", "password", ...} (or that of the further host
    `account`), or None before `generate()` made it."""
    return store.credentials(HOST_ENTRY if account is None else HOST_ACCOUNT_ENTRY + account)


def host_accounts(store: Store) -> list[str]:
    """The further host accounts that have credentials (usernames)."""
    return [c["username"] for c in store.all_credentials() if c["device"].startswith(HOST_ACCOUNT_ENTRY)]


def ensure_credentials(store: Store, devices: list[str], host_user: str = DEFAULT_HOST_USER,
                       rotate: list[str] | None = None, accounts: list[str] | None = None) -> list[str]:
    """Give every device in `devices`, the host account and each further host account in
    `accounts` credentials if it has none, and new ones if it is in `rotate` (HOST_ENTRY
    there rotates the host's, HOST_ACCOUNT_ENTRY + name a further one's). Returns who got new ones."""
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
    for account in accounts or ():
        entry = HOST_ACCOUNT_ENTRY + check_username(account)
        if entry in rotate or store.credentials(entry) is None:
            store.put_credentials(entry, account, new_password())
            fresh.append(entry)
    if fresh and store.dialect == "sqlite":  # a server's database: its owner grants who reads it
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
def acl_text(devices: list[str], host_user: str = DEFAULT_HOST_USER, accounts: list[str] | None = None,
             root: str = TOPIC_ROOT) -> str:
    check_topic_root(root)
    lines = ["# mosquitto ACL written by `mpfleet broker config`; regenerate rather than edit.",
             f"# Device X (username X) may use only {topic('X', '...', root)}, in the protocol's directions."]
    for host in [host_user, *sorted(accounts or ())]:
        lines += ["", f"user {host}", f"topic readwrite {everything(root)}"]
    for device in sorted(devices):
        check_device_id(device)
        lines += ["", f"user {device}"]
        lines += [f"topic read {topic(device, leaf, root)}" for leaf in DEVICE_READS]
        lines += [f"topic write {topic(device, leaf, root)}" for leaf in DEVICE_WRITES]
    return "\n".join(lines) + "\n"


def conf_lines(passwd: str | os.PathLike, acl: str | os.PathLike) -> list[str]:
    """Accounts, ACL and client ids bound to accounts: lines that go after the listener
    line they are for, with no other listener between (use_username_as_clientid is a
    listener option)."""
    return ["use_username_as_clientid true", "allow_anonymous false", f"password_file {Path(passwd).resolve()}",
            f"acl_file {Path(acl).resolve()}"]


def tls_listener_lines(ca, acl: str | os.PathLike | None = None) -> list[str]:
    """A TLS listener's options for the fleet CA `ca` (mpfleet.fleet.certs.FleetCA): the
    broker's certificate, client certificates required and checked against the CA and
    its CRL, the certificate's CN as username (and so as client id), no anonymous
    clients, and the ACL when given. Lines that go after the listener line they are for."""
    files = ca.broker_files()
    if files is None:
        raise BrokerConfigError(f"no broker certificate in {ca.dir}: `mpfleet broker config` issues one")
    crt, key = files
    lines = [f"cafile {ca.cert_path.resolve()}", f"certfile {crt.resolve()}", f"keyfile {key.resolve()}",
             f"crlfile {ca.crl_path.resolve()}", "require_certificate true", "use_identity_as_username true",
             "use_username_as_clientid true", "allow_anonymous false"]
    if acl is not None:
        lines.append(f"acl_file {Path(acl).resolve()}")
    return lines


def conf_text(passwd: str | os.PathLike | None, acl: str | os.PathLike, data_dir: str | os.PathLike,
              listen: str = DEFAULT_LISTEN, ca=None, also_plaintext: str | None = None) -> str:
    """A whole mosquitto configuration: the listener with `conf_lines()` (with the fleet
    CA `ca`: `tls_listener_lines()`, no password file; and with `also_plaintext` a
    password listener there too, for devices still to move to TLS), persistence in
    `data_dir`, the queue limits serve needs."""
    host, port = parse_listen(listen)
    if ca is not None:
        pid = Path(acl).resolve().parent / "mosquitto.pid"
        access = ["# Mutual TLS: every client presents a certificate from the fleet CA (ca.crt), not revoked",
                  "# in crl.pem (SIGHUP the broker after `mpfleet devices cert revoke`: it re-reads the",
                  "# certificates and the CRL). The certificate's CN is the username, and so the client id:",
                  "# an account holds one session, and no account can take over or wipe another's.",
                  *tls_listener_lines(ca, acl),
                  "# `mpfleet devices cert revoke ID --reload THIS_DIR/mosquitto.pid` signals the broker here.",
                  f"pid_file {pid}"]
        if also_plaintext is not None:
            p_host, p_port = parse_listen(also_plaintext)
            # The ACL and allow_anonymous above are global (per_listener_settings is off), so
            # they hold here too; a TLS client's certificate is its account, and the password
            # file is checked only for this listener's clients.
            access += ["",
                       "# Plaintext with passwords, while devices move to TLS (`mpfleet devices cert migrate`):",
                       "# drop it, and regenerate without --also-plaintext, once every device is over.",
                       f"listener {p_port}" + (f" {p_host}" if p_host else ""), "use_username_as_clientid true",
                       f"password_file {Path(passwd).resolve()}"]
    else:
        access = ["# Plaintext with passwords: for a lab only (`mpfleet broker config` without --plaintext",
                  "# writes a mutual-TLS listener). Each client's id is its username: an account holds one",
                  "# session, and no account can take over or wipe another's (a device's, serve's).",
                  *conf_lines(passwd, acl)]
    return "\n".join([
        "# mosquitto configuration written by `mpfleet broker config`; regenerate rather than edit.",
        "# Run a broker with it (mosquitto -c THIS_FILE), or include it from a configuration that has",
        "# no listener on the same port and no persistence_location of its own (Debian's default",
        "# /etc/mosquitto/mosquitto.conf sets one: drop that line there). Restart mosquitto after a",
        "# change: use_username_as_clientid is not reloaded.",
        "",
        "# A listener option applies to the listener declared before it in the same file: a listener",
        "# added elsewhere needs its own use_username_as_clientid line, or its clients choose their ids.",
        f"listener {port}" + (f" {host}" if host else ""),
        *access,
        "",
        f"# Sessions and retained messages survive a restart; saved every {FLEET_AUTOSAVE_S} s, so a kill -9",
        "# loses at most the last seconds (docs/security.md: what that is, and how it is made good).",
        *persistence_lines(data_dir, FLEET_AUTOSAVE_S),
        "",
        "# What devices report while serve is down waits in its session: room for a fleet's worth.",
        *TUNING_LINES,
    ]) + "\n"


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


def generate(store: Store, out_dir: str | os.PathLike, devices: list[str] | None = None,
             host_user: str = DEFAULT_HOST_USER, rotate: bool = False, registry: bool = True,
             accounts: list[str] | None = None, listen: str = DEFAULT_LISTEN,
             data_dir: str | os.PathLike | None = None, root: str = TOPIC_ROOT, ca=None,
             broker_names: list[str] | None = None, also_plaintext: str | None = None) -> BrokerFiles:
    """Credentials for every device and host account, then `passwd`, `acl` and
    `mosquitto.conf` (listening on `listen`, persisting in `data_dir`, default
    `out_dir`/data) in `out_dir`.

    The ACL confines every account to the topic root `root`. The devices are those
    named, those in the registry (`registry=True`: members only, never a stranger
    merely seen on the broker) and those that already have credentials (so a run for one new device does not lock the
    others out); likewise the further host accounts are those in `accounts` and
    those made before. New ones get credentials; existing ones keep theirs unless
    `rotate`: then the named devices and accounts get new ones, or, when none are
    named, every device and every host account.

    With the fleet CA `ca` (mpfleet.fleet.certs.FleetCA) the listener is mutual TLS
    instead: no passwords and no password file; the broker gets a certificate for
    `broker_names` (default: the listen host, localhost, 127.0.0.1) when it has none
    (or with `rotate`), every host account a client certificate when it has none (or
    with `rotate`), and the CRL is written if missing. Devices get certificates at
    provisioning (`mpfleet deploy`, `sim fleet`), not here. With `also_plaintext`
    ([HOST:]PORT) a second, password listener stays open beside the TLS one for the
    devices that have not moved yet (`mpfleet devices cert migrate`): the password file
    is written as without `ca`, and the one ACL holds for both.
    """
    check_username(host_user)
    named = [check_device_id(d) for d in devices or ()]
    named_accounts = [check_username(a) for a in accounts or ()]
    parse_listen(listen)
    check_topic_root(root)
    skipped = []
    everyone = set(named)
    if registry:
        for d in store.device_ids():
            (everyone.add if is_device_id(d) else skipped.append)(d)
    everyone |= {c["device"] for c in store.all_credentials() if not c["device"].startswith("@")}
    extra = sorted((set(named_accounts) | set(host_accounts(store))) - {host_user})
    if host_user in everyone:
        raise BrokerConfigError(f"host account {host_user!r} has the same name as a device: use --host-user")
    clash = sorted(everyone.intersection(extra))
    if clash:
        raise BrokerConfigError(f"host account {clash[0]!r} has the same name as a device")
    ordered = sorted(everyone)
    if also_plaintext is not None:
        if ca is None:
            raise BrokerConfigError("a second, plaintext listener goes beside a TLS one: it needs the fleet CA")
        if parse_listen(also_plaintext)[1] == parse_listen(listen)[1]:
            raise BrokerConfigError(f"the plaintext listener {also_plaintext} needs a port of its own")
    passwd = None
    fresh = []
    if ca is None or also_plaintext is not None:
        passwd, fresh = _passwords(store, out_dir, ordered, host_user, extra, named, named_accounts, rotate)
    if ca is not None:
        result = _generate_tls(ca, out_dir, ordered, host_user, extra, listen, data_dir, root, rotate, skipped,
                               broker_names, passwd, also_plaintext)
        result.new = list(dict.fromkeys(result.new + fresh))  # certificates, then passwords
        return result
    out = Path(out_dir)
    data = Path(data_dir) if data_dir is not None else out / "data"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    acl = out / "acl"
    write_atomic(acl, acl_text(ordered, host_user, extra, root).encode())
    conf = out / "mosquitto.conf"
    write_atomic(conf, conf_text(passwd, acl, data, listen).encode())
    return BrokerFiles(out, passwd, acl, conf, host_user, ordered, fresh, skipped, extra, data.resolve())


def _passwords(store: Store, out_dir, ordered: list[str], host_user: str, extra: list[str], named: list[str],
               named_accounts: list[str], rotate: bool) -> tuple[Path, list[str]]:
    """Credentials for every device and host account (new ones made; with `rotate` the
    named ones, or all, get new ones), and `out_dir`/passwd with their hashes."""
    if not rotate:
        to_rotate = []
    elif named or named_accounts:
        to_rotate = named + [HOST_ACCOUNT_ENTRY + a for a in named_accounts]
    else:
        to_rotate = ordered + [HOST_ENTRY] + [HOST_ACCOUNT_ENTRY + a for a in extra]
    with store.transaction():
        fresh = ensure_credentials(store, ordered, host_user, to_rotate, extra)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hosts = [store.credentials(HOST_ENTRY)] + [store.credentials(HOST_ACCOUNT_ENTRY + a) for a in extra]
    entries = [(c["username"], c["password"]) for c in hosts]
    entries += [(c["username"], c["password"]) for c in (store.credentials(d) for d in ordered)]
    return write_passwd(out / "passwd", entries), fresh


def _generate_tls(ca, out_dir, devices: list[str], host_user: str, extra: list[str], listen: str,
                  data_dir, root: str, rotate: bool, skipped: list[str],
                  broker_names: list[str] | None, passwd: Path | None = None,
                  also_plaintext: str | None = None) -> BrokerFiles:
    """generate() with the fleet CA: certificates instead of passwords (and beside
    them, with `also_plaintext`, the password listener with `passwd`)."""
    ca.certificate()  # no CA: CertError, before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir is not None else out / "data"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    host, _ = parse_listen(listen)
    names = list(dict.fromkeys(broker_names or [n for n in (host, "localhost", "127.0.0.1") if n]))
    fresh = []
    if rotate or ca.broker_files() is None:
        ca.issue_broker(names)
        fresh.append("broker")
    host_certs = {}
    for account in [host_user, *extra]:
        files = ca.host_files(account)
        if rotate or files is None:
            files = ca.issue_host(account)
            fresh.append(account)
        host_certs[account] = files[0]
    if not ca.crl_path.exists():
        ca.write_crl()
    acl = out / "acl"
    write_atomic(acl, acl_text(devices, host_user, extra, root).encode())
    conf = out / "mosquitto.conf"
    write_atomic(conf, conf_text(passwd, acl, data, listen, ca=ca, also_plaintext=also_plaintext).encode())
    result = BrokerFiles(out, passwd, acl, conf, host_user, devices, [], skipped, extra, data.resolve(), tls=True,
                         broker_cert=ca.broker_files()[0], host_certs=host_certs)
    result.new = fresh
    return result
