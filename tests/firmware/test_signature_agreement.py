"""Host and device accept exactly the same Ed25519 signatures.

tests/vectors/ed25519_strict.json (made by tests/vectors/make_ed25519_strict.py)
holds edge cases: honest signatures, forgeries under every small-order key
encoding, small-order and mixed-order R, S >= L, non-canonical and invalid
encodings, tampering. Each goes through the host's mpfleet.protocol.signing.verify_strict
and through the device's agent/ed25519.py as deployed (.mpy) on the real
MicroPython unix port, all vectors in one interpreter run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mpfleet.protocol.signing import SigningError, b64url, kid_of, open_envelope, verify_strict
from test_ed25519 import verify_on_device

VECTORS_PATH = Path(__file__).resolve().parents[1] / "vectors" / "ed25519_strict.json"
VECTORS = json.loads(VECTORS_PATH.read_text())["vectors"]


def fields(vector) -> tuple[bytes, bytes, bytes]:
    return (bytes.fromhex(vector["public_key"]), bytes.fromhex(vector["message"]),
            bytes.fromhex(vector["signature"]))


def openssl_accepts(public: bytes, message: bytes, signature: bytes) -> bool:
    """Plain `cryptography` verify, as open_envelope did before the strict checks."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def as_envelope(vector) -> tuple[str, dict[str, bytes]]:
    """The vector as an envelope (its message is `mpf1.<kid>.<payload>`) and the trust map."""
    public, message, signature = fields(vector)
    kid = message.decode().split(".")[1]
    return f"{message.decode()}.{b64url(signature)}", {kid: public}


WRONGLY_ACCEPTED = [v for v in VECTORS if not v["valid"] and openssl_accepts(*fields(v))]


def test_the_vectors_cover_the_cases():
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    assert sum(v["valid"] for v in VECTORS) >= 3
    for prefix in ("small-order-key-", "small-order-r-", "s-plus-l", "non-canonical-key-", "non-canonical-r-",
                   "off-curve-", "flipped-message-bit", "mixed-order-"):
        assert any(n.startswith(prefix) for n in names), prefix
    # 8 torsion points: 8 canonical encodings, 2 sign-bit variants of x == 0,
    # 4 non-canonical y + p forms; two forgeries for each.
    assert sum(n.startswith("small-order-key-") for n in names) == 2 * 14


def test_host_and_device_agree_with_every_vector(mpy_path):
    expected = "".join("T" if v["valid"] else "F" for v in VECTORS)
    host = "".join("T" if verify_strict(*fields(v)) else "F" for v in VECTORS)
    device = verify_on_device(mpy_path, [fields(v) for v in VECTORS])
    assert [v["name"] for v, got, want in zip(VECTORS, host, expected) if got != want] == []
    assert [v["name"] for v, got, want in zip(VECTORS, device, expected) if got != want] == []


def test_signatures_openssl_alone_accepts_are_refused():
    # Forgeries under small-order keys and with small-order R: the old
    # open_envelope (cryptography's verify only) took every one of these.
    assert len(WRONGLY_ACCEPTED) >= 2 * 14 + 8
    for vector in WRONGLY_ACCEPTED:
        assert not verify_strict(*fields(vector)), vector["name"]
        envelope, trusted = as_envelope(vector)
        with pytest.raises(SigningError, match="bad signature"):
            open_envelope(envelope, trusted)


def test_open_envelope_follows_the_vectors():
    for vector in VECTORS:
        envelope, trusted = as_envelope(vector)
        if vector["valid"]:
            assert open_envelope(envelope, trusted)["id"].startswith("strict-"), vector["name"]
        else:
            with pytest.raises(SigningError, match="bad signature"):
                open_envelope(envelope, trusted)


def test_an_envelope_under_a_small_order_trusted_key_is_refused():
    # The identity as a trusted key: R = [1]B, S = 1 satisfies [S]B = R + [k]A for
    # any message, so anyone could sign any job for it.
    identity = bytes([1]) + bytes(31)
    kid = kid_of(identity)
    base = bytes.fromhex("5866666666666666666666666666666666666666666666666666666666666666")
    signature = base + (1).to_bytes(32, "little")
    body = b64url(json.dumps({"id": "forged", "seq": 1, "type": "reboot", "params": {}, "targets": ["*"],
                              "iat": 1}, separators=(",", ":"), sort_keys=True).encode())
    signed = f"mpf1.{kid}.{body}"
    assert openssl_accepts(identity, signed.encode(), signature)
    with pytest.raises(SigningError, match="bad signature"):
        open_envelope(f"{signed}.{b64url(signature)}", {kid: identity})


def test_wrong_lengths_are_refused():
    vector = next(v for v in VECTORS if v["valid"])
    public, message, signature = fields(vector)
    assert verify_strict(public, message, signature)
    for pk, sig in ((public[:31], signature), (public + b"\0", signature), (public, signature[:63]),
                    (public, signature + b"\0"), (b"", b"")):
        assert not verify_strict(pk, message, sig)
