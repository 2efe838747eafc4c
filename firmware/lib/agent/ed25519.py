# Ed25519 signature verification (RFC 8032 section 5.1.7), strict, in pure
# MicroPython: the device's check of signed jobs (stock ESP32 firmware has no
# public-key API). Verify only; signing happens on the host with `cryptography`.
#
# Strictness (what is rejected, on top of a wrong signature):
#   - S >= L (malleable signatures, RFC 8032 5.1.7 step 1);
#   - non-canonical encodings of A or R (y >= p) and invalid ones (no square
#     root for x, or x == 0 with the sign bit set), RFC 8032 5.1.3;
#   - small-order A and small-order R ([8]P is the identity): a small-order key
#     lets anyone forge signatures that verify for it, and no honest signer
#     produces a small-order R (R = [r]B for a random r), so refusing both
#     costs nothing and matches libsodium's strict verify.
# Equation: cofactorless, [S]B == R + [k]A, k = SHA-512(R || A || M) mod L.
# That is what OpenSSL (under `cryptography`, the host signer) and libsodium
# check, so the device accepts exactly what the host's own verify accepts; the
# cofactored [8][S]B == [8]R + [8][k]A would only differ for keys with a
# torsion component, which an honest key never has. The comparison is done in
# projective coordinates against the decoded R: equal to comparing encodings
# because R was decoded strictly (canonical, valid) and saves an inversion.
#
# Arithmetic: points in extended twisted Edwards coordinates (X:Y:Z:T), x = X/Z,
# y = Y/Z, T = XY/Z (Hisil-Wong-Carter-Dawson 2008, a = -1). [S]B - [k]A is one
# interleaved (Straus) double-scalar multiplication with width-5 NAF digits for
# both scalars and tables of the odd multiples 1P..15P built per call in the
# "cached" form (Y+X, Y-X, 2dT, 2Z): 253 doublings and about 2 x 253/6
# additions. Nothing is kept between calls (no module-level state); building
# both tables costs about 2% of a verify. Field elements are Python ints
# reduced mod p after each multiplication (additions are reduced lazily by the
# next multiplication).
#
# Nothing here is secret (public key, message, signature), so the code is not
# constant-time and need not be.

from agent.sha512 import SHA512

# p = 2**255 - 19, the group order L, d = -121665/121666, sqrt(-1) mod p, and
# the base point B (RFC 8032 section 5.1).
_P = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFED
_L = 0x1000000000000000000000000000000014DEF9DEA2F79CD65812631A5CF5D3ED
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_Y_MASK = (1 << 255) - 1

_KEY_LEN = const(32)
_SIG_LEN = const(64)
_WINDOW = const(5)  # NAF width: digits are odd and in -15..15
_TABLE = const(8)  # odd multiples 1P, 3P, ..., 15P
_NAF_LEN = const(256)  # digits of a scalar < 2**253, with room to spare
_NAF_BIAS = const(16)  # a NAF digit d (-15..15) is stored as the byte d + 16


def _decode_point(s):
    """Affine (x, y) of a 32-byte encoding, or None if non-canonical or invalid."""
    p = _P
    y = int.from_bytes(s, "little") & _Y_MASK
    if y >= p:
        return None
    sign = s[31] >> 7
    yy = y * y % p
    u = yy - 1
    v = (_D * yy + 1) % p
    # x = u v^3 (u v^7)^((p-5)/8): a square root of u/v if one exists (5.1.3 step 2).
    v3 = v * v % p * v % p
    x = u * v3 % p * pow(u * v3 % p * v3 % p * v % p, (p - 5) >> 3, p) % p
    vxx = v * x % p * x % p
    if vxx != u % p:
        if vxx != (-u) % p:
            return None
        x = x * _SQRT_M1 % p
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = p - x
    return x, y


def _double(X, Y, Z):
    """Doubling (dbl-2008-hwcd) of (X:Y:Z): the doubled X, Y, Z, and e, h whose product
    is the doubled T, for the caller to compute only when an addition follows."""
    p = _P
    a = X * X % p
    b = Y * Y % p
    h = a + b
    e = h - (X + Y) * (X + Y) % p
    g = a - b
    f = 2 * Z * Z % p + g
    return e * f % p, g * h % p, f * g % p, e, h


def _add_cached(X, Y, Z, T, q):
    """(X:Y:Z:T) + Q (add-2008-hwcd-3), Q cached as (Y+X, Y-X, 2dT, 2Z)."""
    p = _P
    ypx, ymx, t2d, z2 = q
    a = (Y - X) * ymx % p
    b = (Y + X) * ypx % p
    c = T * t2d % p
    dd = Z * z2 % p
    e = b - a
    f = dd - c
    g = dd + c
    h = b + a
    return e * f % p, g * h % p, f * g % p, e * h % p


def _small_order(x, y):
    """True if [8](x, y) is the identity (three doublings, projective)."""
    X, Y, Z = x, y, 1
    for _ in range(3):
        X, Y, Z, _e, _h = _double(X, Y, Z)
    return X % _P == 0


def _naf(k, out):
    """Width-5 NAF digits of k into the bytearray out (least significant first), each
    stored as digit + _NAF_BIAS (a byte, where a list of ints would cost 8 bytes a
    digit on a 64-bit port); returns the length."""
    i = 0
    while k:
        if k & 1:
            digit = k & 31
            if digit > 15:
                digit -= 32
            k -= digit
        else:
            digit = 0
        out[i] = digit + _NAF_BIAS
        k >>= 1
        i += 1
    for j in range(i, _NAF_LEN):
        out[j] = _NAF_BIAS
    return i


def _odd_multiples(x, y):
    """[1P, 3P, ..., 15P] of affine P, each cached as (Y+X, Y-X, 2dT, 2Z)."""
    p = _P
    X2, Y2, Z2, e, h = _double(x, y, 1)
    two_p = ((Y2 + X2) % p, (Y2 - X2) % p, _D2 * (e * h % p) % p, (Z2 + Z2) % p)
    table = [None] * _TABLE
    X = x
    Y = y
    Z = 1
    T = x * y % p
    i = 0
    while True:
        table[i] = ((Y + X) % p, (Y - X) % p, _D2 * T % p, (Z + Z) % p)
        i += 1
        if i == _TABLE:
            return table
        X, Y, Z, T = _add_cached(X, Y, Z, T, two_p)  # += 2P


def verify(public_key, message, signature):
    """True iff signature (64 bytes) is a valid strict Ed25519 signature of message
    under public_key (32 bytes). Malformed keys/signatures give False; wrong
    lengths raise ValueError."""
    if len(public_key) != _KEY_LEN:
        raise ValueError("ed25519 public key must be 32 bytes")
    if len(signature) != _SIG_LEN:
        raise ValueError("ed25519 signature must be 64 bytes")
    p = _P
    r_enc = bytes(signature[:32])
    s = int.from_bytes(bytes(signature[32:]), "little")
    if s >= _L:
        return False
    a_enc = bytes(public_key)
    a_pt = _decode_point(a_enc)
    if a_pt is None or _small_order(a_pt[0], a_pt[1]):
        return False
    r_pt = _decode_point(r_enc)
    if r_pt is None or _small_order(r_pt[0], r_pt[1]):
        return False
    h = SHA512(r_enc)
    h.update(a_enc)
    h.update(message)
    k = int.from_bytes(h.digest(), "little") % _L

    # Q = [s]B + [k](-A), checked against R.
    naf_s = bytearray(_NAF_LEN)
    naf_k = bytearray(_NAF_LEN)
    top = max(_naf(s, naf_s), _naf(k, naf_k))
    tab_b = _odd_multiples(_BX, _BY)
    tab_a = _odd_multiples(p - a_pt[0], a_pt[1])
    X = 0
    Y = 1
    Z = 1
    T = 0
    i = top - 1
    while i >= 0:
        X, Y, Z, e, hh = _double(X, Y, Z)  # T = e * hh, needed only when an addition follows
        ds = naf_s[i] - _NAF_BIAS
        dk = naf_k[i] - _NAF_BIAS
        if ds or dk:
            T = e * hh % p
            for digit, table in ((ds, tab_b), (dk, tab_a)):
                if digit == 0:
                    continue
                if digit > 0:
                    X, Y, Z, T = _add_cached(X, Y, Z, T, table[digit >> 1])
                else:
                    # Adding -Q: swap Y+X with Y-X and negate T.
                    ypx, ymx, t2d, z2 = table[(-digit) >> 1]
                    X, Y, Z, T = _add_cached(X, Y, Z, T, (ymx, ypx, -t2d, z2))
        i -= 1
    rx, ry = r_pt
    return (X - rx * Z) % p == 0 and (Y - ry * Z) % p == 0
