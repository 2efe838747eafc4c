"""The host's signing keys: a key directory plus a per-key seq in the store.

Private keys are files in the key directory (default ``~/.mpfleet/keys``, or
``$MPFLEET_KEYS``, or ``--keys-dir``), one PEM per key, mode 0600 in a 0700
directory; anything group- or world-readable is refused. The store's ``keys``
table holds each key's public half, its state (active, or retired and when) and
``last_seq``: every job a key signs gets the next seq, taken in one IMMEDIATE
transaction, so seqs are strictly increasing and never reused, across restarts
and across processes signing at the same time. (Devices reject a job whose seq
is not above the last one they ran for that kid; losing the database means
losing the seq, so back it up with the keys.)

Which key signs: rollouts sign with `fleet_key()`, the OLDEST active key, the one
every provisioned device trusts. A newer active key is one being rolled out.

Rotation without reflashing (`mpfleet keys rotate`, RolloutEngine.create_rotation_job):
a new key, and a rollout of a ``keys`` job ``{"add": {new_kid: public}}`` signed by
the old key; once every target device SUCCEEDED, `serve` retires the old key and
rolls out the ``keys`` job ``{"remove": [old_kid]}`` signed by the new key. The
trusted key set changes this way only: devices refuse a ``config`` job that touches
``trusted_keys`` (or ``exec_allowed``, which only USB provisioning sets), and the
host refuses to create one (check_config_params).

By hand (`--envelope-only`): ``rotate()`` makes the key and returns the signed
``keys`` job that adds it; ``retire(old_kid)``, once the fleet has applied it,
marks the old key retired and returns the job, signed by the newer key, that
removes it. Dispatching those envelopes is then up to the caller.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.protocol.signing import JOB_TYPES, KID_RE, SigningKey, b64url_decode, kid_of
from mpfleet.db.store import Store

# What a device accepts (firmware/lib/agent): an envelope of at most its config
# `limits.job_max_bytes` (default below), and a trusted key set of 1..MAX_TRUSTED_KEYS.
JOB_MAX_BYTES_DEFAULT = 4096
MAX_TRUSTED_KEYS = 8
# The largest seq and iat a signed payload is measured with (envelope_bytes): the
# worst case, whatever the key's counter and the clock say when it is really signed.
_WORST_SEQ = 2**63 - 1
_WORST_IAT = 9_999_999_999
# Config keys a `config` job may not set or unset (docs/dispatch.md, "Keys and rotation").
PROTECTED_CONFIG_KEYS = {
    "trusted_keys": "the trusted key set changes through key rotation only: use `mpfleet keys rotate`",
    "exec_allowed": "exec permission is set over USB only (`mpfleet deploy` writes the device's /security.json)",
}


class KeyringError(MpfleetError):
    """A key operation was refused (no key yet, last active key, unknown kid...)."""


def envelope_bytes(payload: dict) -> int:
    """The length of `payload`'s envelope as it will be signed, in the worst case: the
    payload signed (by a throwaway key: every key's kid and signature have the same
    length) with the largest seq, and an iat no smaller than any real one."""
    trial = dict(payload)
    trial["seq"] = _WORST_SEQ
    trial["iat"] = max(_WORST_IAT, trial.get("iat") or 0)
    return len(SigningKey.generate().sign(trial))


def check_config_params(params: dict) -> None:
    """KeyringError unless a `config` job's params are well formed and leave the trusted
    key set and exec permission alone (the device refuses such a job too)."""
    sets, unsets = params.get("set", {}), params.get("unset", [])
    if not isinstance(sets, dict) or not isinstance(unsets, list):
        raise KeyringError("config params need set (an object of dotted keys) and/or unset (a list of dotted keys)")
    for key in [*sets, *unsets]:
        if not isinstance(key, str) or not key or "" in key.split("."):
            raise KeyringError(f"config: {key!r} is not a dotted config key such as 'wifi.ssid'")
        root = key.split(".", 1)[0]
        if root in PROTECTED_CONFIG_KEYS:
            raise KeyringError(f"config jobs cannot change {key!r}: {PROTECTED_CONFIG_KEYS[root]}")


def check_keys_params(params: dict, active: Iterable[str] = ()) -> None:
    """KeyringError unless `params` is a `keys` job the device would accept:
    ``{"add": {kid: public b64url}, "remove": [kid, ...]}``, either may be absent, not
    both empty; each added kid is kid_of() its 32-byte key. `active`: the kids the host
    knows as trusted; a job that would leave none of them (nor add any) is refused, and
    so is one that would leave more than MAX_TRUSTED_KEYS."""
    unknown = sorted(set(params) - {"add", "remove"})
    if unknown:
        raise KeyringError(f"keys params take add and remove only, not {unknown[0]!r}")
    add, remove = params.get("add", {}), params.get("remove", [])
    if not isinstance(add, dict) or not isinstance(remove, list):
        raise KeyringError("keys params: add must be {kid: public key (base64url)}, remove a list of kids")
    if not add and not remove:
        raise KeyringError("a keys job must add or remove at least one key")
    if len(add) > MAX_TRUSTED_KEYS:
        raise KeyringError(f"a keys job adds at most {MAX_TRUSTED_KEYS} keys (a device trusts at most that many), "
                           f"not {len(add)}")
    for kid, public in add.items():
        if not isinstance(kid, str) or not KID_RE.match(kid):
            raise KeyringError(f"keys add: {kid!r} is not a key id (16 hex digits)")
        try:
            raw = b64url_decode(public) if isinstance(public, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise KeyringError(f"keys add: the key of {kid} is not a 32-byte Ed25519 public key in base64url")
        if kid_of(raw) != kid:
            raise KeyringError(f"keys add: {kid} is not the id of its key (that is {kid_of(raw)})")
    for kid in remove:
        if not isinstance(kid, str) or not KID_RE.match(kid):
            raise KeyringError(f"keys remove: {kid!r} is not a key id (16 hex digits)")
        if kid in add:
            raise KeyringError(f"keys: {kid} is both added and removed")
    after = (set(active) | set(add)) - set(remove)
    if not after:
        raise KeyringError("this keys job would remove every trusted key: devices would accept no job ever again "
                           "(add the new key first: `mpfleet keys rotate`)")
    if len(after) > MAX_TRUSTED_KEYS:
        raise KeyringError(f"this keys job would leave {len(after)} trusted keys; a device trusts at most "
                           f"{MAX_TRUSTED_KEYS}: retire some first (`mpfleet keys retire`)")


CERT_IDENTITY_MAX = 4096  # base64 characters of a `cert` job's identity (the agent's jobschema)


def check_cert_params(params: dict, targets: dict | None = None) -> str:
    """KeyringError unless `params` is a `cert` job the device would accept:
    ``{"identity": base64 of certificate DER + key DER, "trial_wakes": 1..50}``
    (trial_wakes optional): a certificate followed by its own private key. With
    `targets` (a rollout's normalized target spec) the job must target exactly the one
    device the certificate names: the device refuses a certificate for another id.
    Returns that device id (the subject CN)."""
    import base64
    import binascii

    unknown = sorted(set(params) - {"identity", "trial_wakes", "ca"})
    if unknown:
        raise KeyringError(f"cert params take identity, trial_wakes and ca only, not {unknown[0]!r}")
    identity = params.get("identity")
    if not isinstance(identity, str) or not 1 <= len(identity) <= CERT_IDENTITY_MAX:
        raise KeyringError(f"cert: identity must be the base64 of certificate + key DER, at most "
                           f"{CERT_IDENTITY_MAX} characters")
    try:
        raw = base64.b64decode(identity, validate=True)
    except (ValueError, binascii.Error):
        raise KeyringError("cert: identity is not standard base64") from None
    end = _der_end(raw, 0)
    if end is None or _der_end(raw, end) != len(raw):
        raise KeyringError("cert: identity must be a certificate DER followed by its key DER, nothing else")
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    try:
        cert = x509.load_der_x509_certificate(raw[:end])
        key = load_der_private_key(raw[end:], None)
    except (ValueError, TypeError) as e:
        raise KeyringError(f"cert: identity is not a certificate followed by its private key: {e}") from None
    if key.public_key() != cert.public_key():
        raise KeyringError("cert: the identity's private key does not belong to its certificate")
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if targets is not None and (targets.get("all") or targets.get("groups") or targets.get("query")
                                or list(targets.get("ids") or []) != [cn]):
        raise KeyringError(f"cert: a certificate is for one device: this one names {cn!r}, so the job "
                           f"must target that device id only")
    trial = params.get("trial_wakes")
    if trial is not None and (not isinstance(trial, int) or isinstance(trial, bool) or not 1 <= trial <= 50):
        raise KeyringError(f"cert: trial_wakes must be 1..50, not {trial!r}")
    ca = params.get("ca")
    if ca is not None:
        # The fleet CA for a device that does not use TLS yet (it refuses one while it does).
        try:
            ca_der = base64.b64decode(ca, validate=True) if isinstance(ca, str) and len(ca) <= CERT_IDENTITY_MAX \
                else None
        except (ValueError, binascii.Error):
            ca_der = None
        if ca_der is None or _der_end(ca_der, 0) != len(ca_der):
            raise KeyringError(f"cert: ca must be the base64 of one certificate DER, at most {CERT_IDENTITY_MAX} "
                               f"characters")
        try:
            issuer = x509.load_der_x509_certificate(ca_der)
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise KeyringError(f"cert: the certificate was not issued by the ca sent with it: {e or 'bad signature'}") \
                from None
    return cn


def _der_end(buf: bytes, at: int) -> int | None:
    """Where the DER SEQUENCE at `at` ends, or None (the device's agent.tlsid walk)."""
    if at + 2 > len(buf) or buf[at] != 0x30:
        return None
    first = buf[at + 1]
    head, body = 2, first
    if first >= 0x80:
        k = first & 0x7F
        if not 1 <= k <= 3 or at + 2 + k > len(buf):
            return None
        body, head = int.from_bytes(buf[at + 2:at + 2 + k], "big"), 2 + k
    end = at + head + body
    return end if end <= len(buf) else None


def default_keys_dir() -> Path:
    env = os.environ.get("MPFLEET_KEYS")
    if env:
        return Path(env)
    return Path(os.environ.get("MPFLEET_HOME", Path.home() / ".mpfleet")) / "keys"


@dataclass(frozen=True)
class KeyInfo:
    kid: str
    public_b64: str
    created: float
    retired: float | None
    active: bool
    last_seq: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KeyJob:
    """A signed key-management job: what `rotate()` and `retire()` return."""

    kid: str            # the key added (rotate) or removed (retire)
    public_b64: str     # that key's public half
    signed_by: str      # the kid that signed the envelope
    payload: dict
    envelope: str


class KeyRing:
    """The signing keys of one host: files in `keys_dir`, state and seqs in `store`."""

    def __init__(self, store: Store, keys_dir: str | os.PathLike | None = None):
        self.store = store
        self.keys_dir = Path(keys_dir) if keys_dir else default_keys_dir()

    # ------------------------------------------------------------ queries
    def list(self) -> list[KeyInfo]:
        """Every key, oldest first."""
        return [KeyInfo(r["kid"], r["public_b64"], r["created"], r["retired"], bool(r["active"]), r["last_seq"])
                for r in self.store.keys()]

    def get(self, kid: str) -> KeyInfo:
        for info in self.list():
            if info.kid == kid:
                return info
        raise KeyringError(f"unknown key {kid} (see `mpfleet keys list`)")

    def active(self) -> KeyInfo:
        """The signing key: the newest key that is not retired."""
        live = [k for k in self.list() if k.active]
        if not live:
            raise KeyringError("no signing key yet: run `mpfleet keys init`")
        return live[-1]

    def fleet_key(self) -> KeyInfo:
        """The key rollouts sign with: the oldest active key, the one every provisioned
        device trusts. A rotation adds a newer key; it takes over when the old one is
        retired (`mpfleet serve` does that once every device has applied the rotation)."""
        live = [k for k in self.list() if k.active]
        if not live:
            raise KeyringError("no signing key yet: run `mpfleet keys init`")
        return live[0]

    def trusted_keys(self) -> dict[str, str]:
        """{kid: public b64url} of every active key: the devices' `trusted_keys` config."""
        return {k.kid: k.public_b64 for k in self.list() if k.active}

    # ------------------------------------------------------------ key files
    def _check_dir(self) -> None:
        try:
            mode = self.keys_dir.stat().st_mode
        except FileNotFoundError:
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyringError(f"key directory {self.keys_dir} is open to others (mode {stat.filemode(mode)}): "
                               f"chmod 700 {self.keys_dir}")

    def _ensure_dir(self) -> None:
        if not self.keys_dir.exists():
            self.keys_dir.mkdir(parents=True, mode=0o700)
            os.chmod(self.keys_dir, 0o700)  # mkdir's mode is masked by the umask
        self._check_dir()

    def load(self, kid: str) -> SigningKey:
        """The private key `kid` from the key directory (mode checks included)."""
        if not KID_RE.match(kid):
            raise KeyringError(f"{kid!r} is not a key id (16 hex digits)")
        self._check_dir()
        key = SigningKey.load(self.keys_dir / f"{kid}.key")
        if key.kid != kid:
            raise KeyringError(f"{self.keys_dir / (kid + '.key')} holds key {key.kid}, not {kid}")
        return key

    def add_key(self) -> KeyInfo:
        """A new active key (it signs only once older keys are retired, see fleet_key())."""
        return self._create()

    def _create(self) -> KeyInfo:
        self._ensure_dir()
        key = SigningKey.generate()
        key.save(self.keys_dir)
        self.store.add_key(key.kid, key.public_b64)
        return self.get(key.kid)

    # ------------------------------------------------------------ operations
    def init(self, force: bool = False) -> KeyInfo:
        """Create the first signing key. Refused while an active key exists, unless `force`
        (then the new key becomes the signing key and the others stay until retired)."""
        live = [k for k in self.list() if k.active]
        if live and not force:
            raise KeyringError(f"an active signing key exists ({live[-1].kid}): use `mpfleet keys rotate` to "
                               f"replace it, or --force to create another")
        return self._create()

    def sign(self, payload: dict, kid: str | None = None) -> tuple[dict, str]:
        """Sign a job with `kid` (default: the active key).

        `payload` is the job without `seq`: it gets the key's next seq and, unless
        given, `iat` (now, Unix seconds). Returns (the payload as signed, envelope).
        """
        if "seq" in payload:
            raise KeyringError("the payload must not carry a seq: sign() assigns it")
        job_id = payload.get("id")
        if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64:
            raise KeyringError("the payload needs an id of 1..64 characters")
        if payload.get("type") not in JOB_TYPES:
            raise KeyringError(f"unknown job type {payload.get('type')!r} (one of {', '.join(JOB_TYPES)})")
        if not isinstance(payload.get("targets"), list) or not payload["targets"]:
            raise KeyringError("the payload needs targets: a list of device ids, groups or '*'")
        info = self.get(kid) if kid else self.active()
        if not info.active:
            raise KeyringError(f"key {info.kid} is retired: sign with an active key")
        key = self.load(info.kid)  # before taking a seq: a broken key file wastes none
        signed = dict(payload)
        signed.setdefault("iat", int(time.time()))
        signed["seq"] = self.store.next_seq(info.kid)
        return signed, key.sign(signed)

    def rotate(self, targets: list[str] | None = None) -> KeyJob:
        """Make a new key; return the job, signed by the current key, that makes devices trust it.

        Dispatching the job is left to the caller; the old key stays the fleet key
        (the one rollouts sign with) until it is retired.
        """
        old = self.active()
        self.load(old.kid)  # the old key must be usable before a new one is made
        targets = list(targets or ["*"])
        # checked before the key is made: a probe key has the same sizes as the new one
        probe = SigningKey.generate()
        check_keys_params({"add": {probe.kid: probe.public_b64}}, [k.kid for k in self.list() if k.active])
        self._check_size({"id": f"key-add-{probe.kid}-000000", "type": "keys", "targets": targets,
                          "params": {"add": {probe.kid: probe.public_b64}}})
        new = self._create()
        payload = {"id": f"key-add-{new.kid}-{secrets.token_hex(3)}", "type": "keys", "targets": targets,
                   "params": {"add": {new.kid: new.public_b64}}}
        signed, envelope = self.sign(payload, kid=old.kid)
        return KeyJob(new.kid, new.public_b64, old.kid, signed, envelope)

    @staticmethod
    def _check_size(payload: dict) -> None:
        n = envelope_bytes(payload)
        if n > JOB_MAX_BYTES_DEFAULT:
            raise KeyringError(f"the {payload['type']} job's signed envelope would be {n} bytes, over the device "
                               f"limit of {JOB_MAX_BYTES_DEFAULT} (limits.job_max_bytes): target fewer names")

    def retire(self, kid: str, targets: list[str] | None = None) -> KeyJob:
        """Retire `kid`; return the job, signed by the newest other active key, that makes
        devices forget it. The only active key cannot be retired."""
        info = self.get(kid)
        if not info.active:
            raise KeyringError(f"key {kid} is already retired")
        others = [k for k in self.list() if k.active and k.kid != kid]
        if not others:
            raise KeyringError(f"key {kid} is the only active key: run `mpfleet keys rotate` first")
        signer = others[-1]
        payload = {"id": f"key-retire-{kid}-{secrets.token_hex(3)}", "type": "keys",
                   "targets": list(targets or ["*"]), "params": {"remove": [kid]}}
        check_keys_params(payload["params"], [k.kid for k in self.list() if k.active])
        self._check_size(payload)
        signed, envelope = self.sign(payload, kid=signer.kid)
        self.store.retire_key(kid)
        return KeyJob(kid, info.public_b64, signer.kid, signed, envelope)
