"""Make tests/vectors/ed25519_strict.json: Ed25519 edge cases on which the host
(mpfleet.protocol.signing.verify_strict) and the device (firmware/lib/agent/ed25519.py)
must give the same answer.

    .venv/bin/python tests/vectors/make_ed25519_strict.py

The output is deterministic (fixed seeds, Ed25519 signing is deterministic), so
re-running it reproduces the file byte for byte. Each vector is
{"name", "public_key", "message", "signature", "valid", "why"} with hex fields;
"valid" is the strict answer (RFC 8032 5.1.7 plus the device's refusals of S >= L,
non-canonical or invalid encodings and small-order A or R; cofactorless equation).

Every message is the signed part of a job envelope, `mpf1.<kid>.<payload-b64url>`
with kid = kid_of(public key), so a vector is also an envelope:
`message + "." + b64url(signature)`.

Signatures that are not made by `cryptography` are built here with plain affine
point arithmetic. The forgeries under small-order keys and with small-order R are
searched (over the payload's seq) until the cofactorless equation holds, and the
script asserts that plain `cryptography` (OpenSSL) accepts each of them: those
are the vectors a non-strict host would wrongly take.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

OUT = Path(__file__).with_name("ed25519_strict.json")

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1)


# --- points ------------------------------------------------------------------


def add(p1, p2):
    """Affine twisted Edwards addition, a = -1 (complete: works for doubling too)."""
    x1, y1 = p1
    x2, y2 = p2
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P)


def neg(pt):
    return (-pt[0] % P, pt[1])


def mul(n, pt):
    acc = IDENTITY
    while n:
        if n & 1:
            acc = add(acc, pt)
        pt = add(pt, pt)
        n >>= 1
    return acc


def recover_x(y, sign):
    """x for y (reduced) and the sign bit, or None if y is not on the curve; x == 0
    with the sign bit set gives x = 0 here (the lenient reading, as OpenSSL's)."""
    y %= P
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x2 = u * pow(v, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if x and x & 1 != sign else x


def lenient_point(enc):
    """The point a non-strict decoder (y mod p, any sign on x == 0) reads from enc."""
    y = int.from_bytes(enc, "little") & ((1 << 255) - 1)
    x = recover_x(y, enc[31] >> 7)
    return None if x is None else (x, y % P)


def encode(pt):
    x, y = pt
    return (y | (x & 1) << 255).to_bytes(32, "little")


def raw(y, sign=0):
    """The 32-byte encoding with this (possibly non-canonical) y and sign bit."""
    return (y | sign << 255).to_bytes(32, "little")


def order(pt):
    """Order of a point of the torsion subgroup (1, 2, 4 or 8)."""
    for n in (1, 2, 4, 8):
        if mul(n, pt) == IDENTITY:
            return n
    raise AssertionError("not a small-order point")


BASE = (recover_x(4 * pow(5, P - 2, P) % P, 0), 4 * pow(5, P - 2, P) % P)

# A generator T8 of the torsion subgroup: [L]Q has order dividing 8 for any curve
# point Q (the group has order 8L); take the first y = 2, 3, ... where it is 8.
T8 = next(t for t in (mul(L, (recover_x(y, 0), y)) for y in range(2, 100) if recover_x(y, 0) is not None)
          if order(t) == 8)
TORSION = [mul(i, T8) for i in range(8)]  # [i]T8: TORSION[0] is the identity


def small_order_encodings():
    """Every 32-byte string a non-strict decoder reads as a torsion point, with the
    point: the 8 canonical encodings, the sign-bit variants of the two points with
    x == 0, and the y + p forms that fit 255 bits (only y < 19 has one: y = 0 for
    the order-4 points and y = 1 for the identity), each with either sign bit
    where it decodes."""
    found = []
    for pt in sorted(TORSION, key=lambda t: (order(t), t[1], t[0])):
        x, y = pt
        variants = [(raw(y, x & 1), "canonical")]
        if x == 0:
            variants.append((raw(y, 1), "x == 0 with the sign bit set"))
        if y + P < 2**255:
            variants.append((raw(y + P, x & 1), "non-canonical y + p"))
            if x == 0:
                variants.append((raw(y + P, 1), "non-canonical y + p, x == 0 with the sign bit set"))
        for enc, form in variants:
            assert lenient_point(enc) == pt
            found.append((enc, pt, form))
    assert sum(1 for _, _, form in found if form == "canonical") == 8
    return found


# --- keys, envelopes, hashes -------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kid_of(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def envelope_message(public: bytes, label: str, seq: int) -> bytes:
    payload = {"id": f"strict-{label}", "seq": seq, "type": "diag", "params": {}, "targets": ["*"],
               "iat": 1700000000}
    body = b64url(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    return f"mpf1.{kid_of(public)}.{body}".encode()


def challenge(r_enc: bytes, a_enc: bytes, message: bytes) -> int:
    return int.from_bytes(hashlib.sha512(r_enc + a_enc + message).digest(), "little") % L


def scalar(label: str) -> int:
    return int.from_bytes(hashlib.sha512(b"mpfleet-strict-" + label.encode()).digest(), "little") % L


class Key:
    """A deterministic honest key: `cryptography` signs with it, and its secret
    scalar a (RFC 8032 5.1.5) is at hand for hand-made signatures."""

    def __init__(self, label: str):
        seed = hashlib.sha256(b"mpfleet-strict-" + label.encode()).digest()
        self.private = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)
        h = bytearray(hashlib.sha512(seed).digest()[:32])
        h[0] &= 248
        h[31] &= 127
        h[31] |= 64
        self.a = int.from_bytes(h, "little")
        self.point = mul(self.a, BASE)
        assert encode(self.point) == self.public


def sign_with(a: int, a_enc: bytes, r: int, message: bytes) -> bytes:
    """R = [r]B, S = r + k a: valid whenever A's point is [a]B (plus torsion killed by k)."""
    r_enc = encode(mul(r, BASE))
    return r_enc + ((r + challenge(r_enc, a_enc, message) * a) % L).to_bytes(32, "little")


def openssl_accepts(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def first_seq(condition, limit=1000):
    """The first seq >= 1 for which condition(seq) holds."""
    for seq in range(1, limit):
        if condition(seq):
            return seq
    raise AssertionError("no seq found")


# --- the vectors ---------------------------------------------------------------


def vectors():
    out = []

    def vec(name, public, message, signature, valid, why, forged=False):
        assert len(public) == 32 and len(signature) == 64
        if forged:
            assert openssl_accepts(public, message, signature), name
        out.append({"name": name, "public_key": public.hex(), "message": message.hex(),
                    "signature": signature.hex(), "valid": valid, "why": why})

    keys = [Key(f"key-{i}") for i in range(3)]

    # Honest signatures made by cryptography.
    for i, key in enumerate(keys):
        msg = envelope_message(key.public, f"honest-{i}", i + 1)
        vec(f"honest-{i}", key.public, msg, key.private.sign(msg), True,
            "an honest signature made by cryptography")
    key = keys[0]
    msg = envelope_message(key.public, "honest-0", 1)
    sig = key.private.sign(msg)

    # A key with a torsion component ([a]B + T8, not small-order) is accepted as
    # any key is: the cofactorless equation holds when [k]T8 is the identity.
    mixed = add(key.point, T8)
    mixed_enc = encode(mixed)
    r = scalar("mixed-key")
    for want, name in ((True, "mixed-order-key-k-multiple-of-8"), (False, "mixed-order-key-k-not-multiple-of-8")):
        seq = first_seq(lambda s: (challenge(encode(mul(r, BASE)), mixed_enc,
                                             envelope_message(mixed_enc, name, s)) % 8 == 0) == want)  # noqa: B023 - first_seq calls it at once
        m = envelope_message(mixed_enc, name, seq)
        vec(name, mixed_enc, m, sign_with(key.a, mixed_enc, r, m), want,
            "A = [a]B + T8 (a torsion component, not small-order); R = [r]B, S = r + k a: "
            + ("the equation holds since 8 | k" if want else "the equation fails since [k]T8 != identity"))

    # Small-order keys: every encoding OpenSSL reads as a torsion point, with two
    # forgeries each that need no secret at all.
    for index, (a_enc, a_pt, form) in enumerate(small_order_encodings()):
        n = order(a_pt)
        tag = f"small-order-key-{index}-order-{n}"
        # (1) R = [r]B, S = r: [S]B = R + [k]A holds once [k]A is the identity (n | k).
        r = scalar(tag)
        r_enc = encode(mul(r, BASE))
        name = f"{tag}-forged-r-times-b"
        seq = first_seq(lambda s: challenge(r_enc, a_enc, envelope_message(a_enc, name, s)) % n == 0)  # noqa: B023 - first_seq calls it at once
        m = envelope_message(a_enc, name, seq)
        vec(name, a_enc, m, r_enc + r.to_bytes(32, "little"), False,
            f"small-order A (order {n}, {form}); R = [r]B, S = r with n | k: OpenSSL accepts, "
            "anyone can sign for this key", forged=True)
        # (2) R = A (canonical), S = 0: [0]B = A + [k]A holds once n | k + 1.
        name = f"{tag}-forged-s-zero"
        seq = first_seq(lambda s: (challenge(encode(a_pt), a_enc, envelope_message(a_enc, name, s)) + 1) % n == 0)  # noqa: B023 - first_seq calls it at once
        m = envelope_message(a_enc, name, seq)
        vec(name, a_enc, m, encode(a_pt) + bytes(32), False,
            f"small-order A (order {n}, {form}); R = A, S = 0 with n | k + 1: OpenSSL accepts", forged=True)

    # Small-order R with an otherwise valid equation. Under an honest key only
    # R = identity fits ([S]B - [k]A has no torsion): S = k a.
    r_enc = encode(IDENTITY)
    m = envelope_message(key.public, "small-order-r-identity-honest-key", 1)
    vec("small-order-r-identity-honest-key", key.public, m,
        r_enc + (challenge(r_enc, key.public, m) * key.a % L).to_bytes(32, "little"), False,
        "R = identity, S = k a: [S]B = R + [k]A holds, OpenSSL accepts, the device refuses a small-order R",
        forged=True)
    # Every small-order R encoding, under the key [a]B + T8: S = k a and the seq
    # chosen so that R + [k]T8 is the identity, so the points satisfy the
    # equation. OpenSSL compares R's bytes with a canonical encoding, so it takes
    # the 8 canonical ones and refuses the variants, as the device refuses all.
    for index, (enc, pt, form) in enumerate(small_order_encodings()):
        name = f"small-order-r-{index}-order-{order(pt)}"
        seq = first_seq(lambda s: add(pt, mul(challenge(enc, mixed_enc, envelope_message(mixed_enc, name, s)), T8))  # noqa: B023 - first_seq calls it at once
                        == IDENTITY)
        m = envelope_message(mixed_enc, name, seq)
        sig_r = enc + (challenge(enc, mixed_enc, m) * key.a % L).to_bytes(32, "little")
        canonical = form == "canonical"
        vec(name, mixed_enc, m, sig_r, False,
            f"small-order R (order {order(pt)}, {form}) under A = [a]B + T8 with R + [k]T8 = identity, S = k a: "
            + ("OpenSSL accepts" if canonical else "the non-canonical or invalid R fails OpenSSL's byte compare too"),
            forged=canonical)
        assert openssl_accepts(mixed_enc, m, sig_r) == canonical

    # A torsion component in R: never satisfies the cofactorless equation.
    r = scalar("mixed-r")
    r_enc = encode(add(mul(r, BASE), T8))
    m = envelope_message(key.public, "mixed-order-r", 1)
    vec("mixed-order-r", key.public, m,
        r_enc + ((r + challenge(r_enc, key.public, m) * key.a) % L).to_bytes(32, "little"), False,
        "R = [r]B + T8, S = r + k a: only a cofactored verify would accept it")

    # S >= L.
    s = int.from_bytes(sig[32:], "little")
    for name, bad_s, why in (("s-plus-l", s + L, "S + L of a valid signature (malleability)"),
                             ("s-equals-l", L, "S = L"),
                             ("s-all-ones", 2**256 - 1, "S = 2^256 - 1")):
        vec(name, key.public, msg, sig[:32] + bad_s.to_bytes(32, "little"), False, why)

    # Non-canonical A and R that are not small-order: y + p fits 255 bits only for
    # y < 19; y = 0 and 1 are torsion (above), the others are on-curve points of
    # unknown logarithm, so a signature can only be tried, with the real R and S.
    on_curve = [y for y in range(2, 19) if recover_x(y, 0) is not None]
    assert on_curve
    for y in on_curve:
        alias = raw(y + P, 0)
        m = envelope_message(alias, f"non-canonical-key-y{y}", 1)
        vec(f"non-canonical-key-y{y}", alias, m, key.private.sign(m), False,
            f"A encoded with y = {y} + p (non-canonical)")
        vec(f"non-canonical-r-y{y}", key.public, msg, alias + sig[32:], False,
            f"R encoded with y = {y} + p (non-canonical)")
    vec("non-canonical-key-all-ones", b"\xff" * 32, envelope_message(b"\xff" * 32, "all-ones", 1), sig, False,
        "A = ff..ff: y = 2^255 - 1 >= p")

    # Encodings that are no point at all: y with no square root for x.
    off_curve = [y for y in range(2, 100) if recover_x(y, 0) is None][:3]
    for y in off_curve:
        enc = raw(y)
        m = envelope_message(enc, f"off-curve-key-y{y}", 1)
        vec(f"off-curve-key-y{y}", enc, m, key.private.sign(m), False, f"A with y = {y}: no x on the curve")
        vec(f"off-curve-r-y{y}", key.public, msg, enc + sig[32:], False, f"R with y = {y}: no x on the curve")

    # Tampering with an honest signature.
    flipped = bytearray(msg)
    at = len(msg) - 8  # a payload character; its flipped form is still base64url
    flipped[at] ^= 1
    assert chr(flipped[at]).isalnum()
    vec("flipped-message-bit", key.public, bytes(flipped), sig, False, f"bit 0 of message byte {at} flipped")
    for name, bit in (("flipped-r-bit", 3), ("flipped-s-bit", 256 + 3)):
        bad = bytearray(sig)
        bad[bit // 8] ^= 1 << (bit % 8)
        vec(name, key.public, msg, bytes(bad), False, f"bit {bit} of the signature flipped")
    vec("wrong-key", keys[1].public, msg, sig, False, "a valid signature checked under another key")

    names = [v["name"] for v in out]
    assert len(names) == len(set(names))
    return out


def main():
    data = {
        "description": "Ed25519 edge cases the host (mpfleet.protocol.signing.verify_strict) and the device "
                       "(firmware/lib/agent/ed25519.py) must agree on; made by make_ed25519_strict.py",
        "vectors": vectors(),
    }
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{OUT}: {len(data['vectors'])} vectors")


if __name__ == "__main__":
    main()
