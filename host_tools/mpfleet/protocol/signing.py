"""Signing keys and job envelopes.

Envelope (docs/protocol.md, "Signed jobs")::

    mpf1.<kid>.<payload-b64url>.<sig-b64url>

The Ed25519 signature covers the ASCII bytes ``mpf1.<kid>.<payload-b64url>``, so no
JSON canonicalisation is needed: the device verifies exactly the bytes it got.
base64url is unpadded (RFC 4648 §5). ``kid`` is the first 16 hex digits of the
SHA-256 of the raw 32-byte public key.

Private keys are PEM (PKCS#8) files with mode 0600; a key directory that others
can read is refused.

Verification is strict (`verify_strict`) and accepts exactly what the device's
verify (firmware/lib/agent/ed25519.py) accepts; tests/vectors/ed25519_strict.json
holds the edge cases both are checked against.
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
JOB_TYPES = ("config", "reboot", "upload", "diag", "sample", "ota", "app", "cancel", "exec", "keys", "cert")


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


# Strict Ed25519 (RFC 8032 section 5.1.7), the rules of firmware/lib/agent/ed25519.py.
# `cryptography` (OpenSSL) checks S < L and the cofactorless equation, but it
# reduces y mod p, ignores a sign bit on x == 0 and takes small-order keys, so a
# key such as the identity verifies signatures anyone can make. The checks below
# refuse those encodings first; the equation is left to OpenSSL.
_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(enc: bytes) -> tuple[int, int] | None:
    """Affine (x, y) of a 32-byte point encoding (RFC 8032 5.1.3), or None if it is
    non-canonical (y >= p), has no square root for x, or has x == 0 with the sign
    bit set."""
    y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
    sign = enc[31] >> 7
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    if v * x * x % _P != u:
        if v * x * x % _P != -u % _P:
            return None
        x = x * _SQRT_M1 % _P
    if x == 0 and sign:
        return None
    return (_P - x if x & 1 != sign else x), y


def _small_order(point: tuple[int, int]) -> bool:
    """True if [8]point is the identity (three doublings, affine; the addition law
    is complete for a = -1 and non-square d, so no denominator vanishes)."""
    x, y = point
    for _ in range(3):
        t = _D * x * x * y * y % _P
        x, y = (2 * x * y * pow(1 + t, _P - 2, _P) % _P,
                (y * y + x * x) * pow(1 - t, _P - 2, _P) % _P)
    return x == 0 and y == 1


def verify_strict(public_raw: bytes, message: bytes, signature: bytes) -> bool:
    """True iff `signature` is a strict Ed25519 signature of `message` under
    `public_raw` (RFC 8032 section 5.1.7, cofactorless equation).

    Mirrors the device's verify (firmware/lib/agent/ed25519.py) rule for rule:
    S >= L, a non-canonical (y >= p) or invalid encoding of A or R (no square
    root, x == 0 with the sign bit set) and a small-order A or R ([8]P is the
    identity) are refused; `cryptography` then checks [S]B == R + [k]A. With A
    and R canonical and valid, OpenSSL's comparison of R's encoding is the
    device's comparison of points, so both accept the same signatures.
    Wrong lengths give False (the device raises ValueError for them).
    """
    if len(public_raw) != 32 or len(signature) != 64:
        return False
    if int.from_bytes(signature[32:], "little") >= _L:
        return False
    for enc in (public_raw, signature[:32]):
        point = _decode_point(enc)
        if point is None or _small_order(point):
            return False
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def open_envelope(envelope: str, trusted: dict[str, bytes]) -> dict:
    """Verify an envelope against {kid: raw public key} with `verify_strict`; the
    payload, or SigningError."""
    parts = envelope.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise SigningError("not an mpf1 envelope")
    kid = parts[1]
    if kid not in trusted:
        raise SigningError(f"unknown key {kid}")
    try:
        signature = b64url_decode(parts[3])
    except ValueError:
        raise SigningError("bad signature") from None
    if not verify_strict(trusted[kid], f"{PREFIX}.{kid}.{parts[2]}".encode(), signature):
        raise SigningError("bad signature")
    return json.loads(b64url_decode(parts[2]))
