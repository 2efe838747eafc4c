"""Signing keys and job envelopes.

Envelope (docs/protocol.md, "Signed jobs")::

    mpf1.<kid>.<payload-b64url>.<sig-b64url>

The Ed25519 signature covers the ASCII bytes ``mpf1.<kid>.<payload-b64url>``, so no
JSON canonicalisation is needed: the device verifies exactly the bytes it got.
base64url is unpadded (RFC 4648 §5). ``kid`` is the first 16 hex digits of the
SHA-256 of the raw 32-byte public key.

Private keys are PEM (PKCS#8) files with mode 0600; a key directory that others
can read is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mpfleet.errors import MpfleetError

PREFIX = "mpf1"
KID_RE = re.compile(r"[0-9a-f]{16}\Z")
JOB_TYPES = ("config", "reboot", "upload", "diag", "sample", "ota", "app", "cancel", "exec", "keys")


class SigningError(MpfleetError):
    """A key could not be read, written or used."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def kid_of(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def public_b64(self) -> str:
        """The form devices list in `trusted_keys`."""
        return b64url(self.public_raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(kid_of(raw), private)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `<kid>.key` (PEM, 0600) into `directory` (created 0700)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / f"{self.kid}.key"
        pem = self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKey":
        path = Path(path)
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as e:
            raise SigningError(f"cannot read key {path}: {e.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SigningError(f"key {path} is readable by others (mode {stat.filemode(mode)}): "
                               f"chmod 600 {path}")
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except ValueError as e:
            raise SigningError(f"{path} is not a PEM private key: {e}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise SigningError(f"{path} is not an Ed25519 key")
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(kid_of(raw), private)

    def sign(self, payload: dict) -> str:
        """The envelope for `payload` (a job dict), signed with this key."""
        body = b64url(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{PREFIX}.{self.kid}.{body}"
        return f"{signed}.{b64url(self.private.sign(signed.encode()))}"


def open_envelope(envelope: str, trusted: dict[str, bytes]) -> dict:
    """Verify an envelope against {kid: raw public key}; the payload, or SigningError."""
    parts = envelope.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise SigningError("not an mpf1 envelope")
    kid = parts[1]
    if kid not in trusted:
        raise SigningError(f"unknown key {kid}")
    try:
        Ed25519PublicKey.from_public_bytes(trusted[kid]).verify(
            b64url_decode(parts[3]), f"{PREFIX}.{kid}.{parts[2]}".encode())
    except (InvalidSignature, ValueError):
        raise SigningError("bad signature") from None
    return json.loads(b64url_decode(parts[2]))
