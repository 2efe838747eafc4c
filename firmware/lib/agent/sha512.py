# SHA-512 (FIPS 180-4) in pure MicroPython, for Ed25519 signature checks.
#
# Stock ESP32 MicroPython offers md5/sha1/sha256 only, so the job verifier
# (ed25519.py) carries its own SHA-512. It streams: SHA512().update() any
# number of times, then digest(). Each hasher allocates its 128-byte block
# buffer and its 80-word message schedule once and reuses them for every block.
#
# Word representation: every 64-bit word is a pair of 32-bit halves (hi, lo),
# with explicit carries, not one int masked to 64 bits. Measured on the 64-bit
# unix port (MicroPython 1.29, same compression function written both ways;
# bench/ed25519_verify.py reports the halves): ~150-180 us per block with
# halves vs ~510-550 us with 64-bit ints, because a 64-bit word does not fit a
# small int (62 bits there) so every operation on it allocates a bigint, while
# halves stay small ints although they need ~2.5x the bytecodes.
# On the ESP32 small ints are 31-bit: halves >= 2**30 become 2-digit bigints,
# 64-bit words are 4/5-digit bigints on every operation. Halves keep the
# values < 2**30 (about a quarter, and every carry/shift of a small value)
# allocation-free and their bigints half the size, so we expect them to be at
# least as fast there; this part is not measured on hardware. A job envelope
# is a few blocks, so SHA-512 is a small share of a verify either way.

import struct

_BLOCK = const(128)
_ROUNDS = const(80)
_M32 = const(0xFFFFFFFF)

# FIPS 180-4 section 4.2.3: the first 64 bits of the fractional parts of the
# cube roots of the first 80 primes, split into high and low 32-bit halves
# (generated with integer cube roots, checked against the standard's table).
_KH = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1,
    0x923F82A4, 0xAB1C5ED5, 0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3,
    0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174, 0xE49B69C1, 0xEFBE4786,
    0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147,
    0x06CA6351, 0x14292967, 0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13,
    0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85, 0xA2BFE8A1, 0xA81A664B,
    0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A,
    0x5B9CCA4F, 0x682E6FF3, 0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208,
    0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2, 0xCA273ECE, 0xD186B8C7,
    0xEADA7DD6, 0xF57D4F7F, 0x06F067AA, 0x0A637DC5, 0x113F9804, 0x1B710B35,
    0x28DB77F5, 0x32CAAB7B, 0x3C9EBE0A, 0x431D67C4, 0x4CC5D4BE, 0x597F299C,
    0x5FCB6FAB, 0x6C44198C,
)
_KL = (
    0xD728AE22, 0x23EF65CD, 0xEC4D3B2F, 0x8189DBBC, 0xF348B538, 0xB605D019,
    0xAF194F9B, 0xDA6D8118, 0xA3030242, 0x45706FBE, 0x4EE4B28C, 0xD5FFB4E2,
    0xF27B896F, 0x3B1696B1, 0x25C71235, 0xCF692694, 0x9EF14AD2, 0x384F25E3,
    0x8B8CD5B5, 0x77AC9C65, 0x592B0275, 0x6EA6E483, 0xBD41FBD4, 0x831153B5,
    0xEE66DFAB, 0x2DB43210, 0x98FB213F, 0xBEEF0EE4, 0x3DA88FC2, 0x930AA725,
    0xE003826F, 0x0A0E6E70, 0x46D22FFC, 0x5C26C926, 0x5AC42AED, 0x9D95B3DF,
    0x8BAF63DE, 0x3C77B2A8, 0x47EDAEE6, 0x1482353B, 0x4CF10364, 0xBC423001,
    0xD0F89791, 0x0654BE30, 0xD6EF5218, 0x5565A910, 0x5771202A, 0x32BBD1B8,
    0xB8D2D0C8, 0x5141AB53, 0xDF8EEB99, 0xE19B48A8, 0xC5C95A63, 0xE3418ACB,
    0x7763E373, 0xD6B2B8A3, 0x5DEFB2FC, 0x43172F60, 0xA1F0AB72, 0x1A6439EC,
    0x23631E28, 0xDE82BDE9, 0xB2C67915, 0xE372532B, 0xEA26619C, 0x21C0C207,
    0xCDE0EB1E, 0xEE6ED178, 0x72176FBA, 0xA2C898A6, 0xBEF90DAE, 0x131C471B,
    0x23047D84, 0x40C72493, 0x15C9BEBC, 0x9C100D4C, 0xCB3E42B6, 0xFC657E2A,
    0x3AD6FAEC, 0x4A475817,
)

# FIPS 180-4 section 5.3.5: the initial hash value H(0), as hi, lo pairs.
_H0 = (
    0x6A09E667, 0xF3BCC908, 0xBB67AE85, 0x84CAA73B,
    0x3C6EF372, 0xFE94F82B, 0xA54FF53A, 0x5F1D36F1,
    0x510E527F, 0xADE682D1, 0x9B05688C, 0x2B3E6C1F,
    0x1F83D9AB, 0xFB41BD6B, 0x5BE0CD19, 0x137E2179,
)


def _compress(h, wh, wl, block):
    """Fold one 128-byte block into the 16-half state list h.

    wh/wl are the caller's preallocated 80-entry schedule lists (high/low
    halves). Rotates of a (hi, lo) word by n < 32 move bits between halves;
    by n >= 32 they swap the halves and rotate by n - 32.
    """
    M = _M32
    KH = _KH
    KL = _KL
    words = struct.unpack(">32I", block)
    for t in range(16):
        wh[t] = words[2 * t]
        wl[t] = words[2 * t + 1]
    for t in range(16, _ROUNDS):
        xh = wh[t - 15]
        xl = wl[t - 15]
        # sigma0 = ROTR1 ^ ROTR8 ^ SHR7
        s0h = ((xh >> 1) | (xl << 31)) ^ ((xh >> 8) | (xl << 24)) ^ (xh >> 7)
        s0l = ((xl >> 1) | (xh << 31)) ^ ((xl >> 8) | (xh << 24)) ^ ((xl >> 7) | (xh << 25))
        yh = wh[t - 2]
        yl = wl[t - 2]
        # sigma1 = ROTR19 ^ ROTR61 ^ SHR6
        s1h = ((yh >> 19) | (yl << 13)) ^ ((yl >> 29) | (yh << 3)) ^ (yh >> 6)
        s1l = ((yl >> 19) | (yh << 13)) ^ ((yh >> 29) | (yl << 3)) ^ ((yl >> 6) | (yh << 26))
        lo = wl[t - 16] + (s0l & M) + wl[t - 7] + (s1l & M)
        wl[t] = lo & M
        wh[t] = (wh[t - 16] + (s0h & M) + wh[t - 7] + (s1h & M) + (lo >> 32)) & M
    ah = h[0]
    al = h[1]
    bh = h[2]
    bl = h[3]
    ch = h[4]
    cl = h[5]
    dh = h[6]
    dl = h[7]
    eh = h[8]
    el = h[9]
    fh = h[10]
    fl = h[11]
    gh = h[12]
    gl = h[13]
    hh = h[14]
    hl = h[15]
    for t in range(_ROUNDS):
        # Sigma1(e) = ROTR14 ^ ROTR18 ^ ROTR41; Ch(e, f, g)
        lo = (hl + ((((el >> 14) | (eh << 18)) ^ ((el >> 18) | (eh << 14)) ^ ((eh >> 9) | (el << 23))) & M)
              + ((el & fl) ^ (~el & gl)) + KL[t] + wl[t])
        t1h = (hh + ((((eh >> 14) | (el << 18)) ^ ((eh >> 18) | (el << 14)) ^ ((el >> 9) | (eh << 23))) & M)
               + ((eh & fh) ^ (~eh & gh)) + KH[t] + wh[t] + (lo >> 32))
        t1l = lo & M
        hh = gh
        hl = gl
        gh = fh
        gl = fl
        fh = eh
        fl = el
        lo = dl + t1l
        el = lo & M
        eh = (dh + t1h + (lo >> 32)) & M
        dh = ch
        dl = cl
        # Sigma0(a) = ROTR28 ^ ROTR34 ^ ROTR39; Maj(a, b, c)
        lo = (t1l + ((((al >> 28) | (ah << 4)) ^ ((ah >> 2) | (al << 30)) ^ ((ah >> 7) | (al << 25))) & M)
              + ((al & bl) ^ (al & cl) ^ (bl & cl)))
        t1h += ((((ah >> 28) | (al << 4)) ^ ((al >> 2) | (ah << 30)) ^ ((al >> 7) | (ah << 25))) & M) \
            + ((ah & bh) ^ (ah & ch) ^ (bh & ch)) + (lo >> 32)
        ch = bh
        cl = bl
        bh = ah
        bl = al
        ah = t1h & M
        al = lo & M
    _add(h, 0, ah, al)
    _add(h, 2, bh, bl)
    _add(h, 4, ch, cl)
    _add(h, 6, dh, dl)
    _add(h, 8, eh, el)
    _add(h, 10, fh, fl)
    _add(h, 12, gh, gl)
    _add(h, 14, hh, hl)


def _add(h, i, vh, vl):
    lo = h[i + 1] + vl
    h[i + 1] = lo & _M32
    h[i] = (h[i] + vh + (lo >> 32)) & _M32


class SHA512:
    """Streaming SHA-512: update(data) any number of times, then digest()."""

    def __init__(self, data=None):
        self._h = list(_H0)
        self._wh = [0] * _ROUNDS
        self._wl = [0] * _ROUNDS
        self._buf = bytearray(_BLOCK)
        self._fill = 0
        self._length = 0
        if data is not None:
            self.update(data)

    def update(self, data):
        data = memoryview(data)
        n = len(data)
        self._length += n
        buf = self._buf
        fill = self._fill
        pos = 0
        if fill:
            pos = min(_BLOCK - fill, n)
            buf[fill:fill + pos] = data[:pos]
            fill += pos
            if fill < _BLOCK:
                self._fill = fill
                return
            _compress(self._h, self._wh, self._wl, buf)
        while n - pos >= _BLOCK:
            _compress(self._h, self._wh, self._wl, data[pos:pos + _BLOCK])
            pos += _BLOCK
        fill = n - pos
        if fill:
            buf[:fill] = data[pos:]
        self._fill = fill

    def digest(self):
        """The 64-byte digest of everything fed so far; the hasher stays usable."""
        h = list(self._h)
        buf = bytearray(self._buf)
        fill = self._fill
        buf[fill] = 0x80
        for i in range(fill + 1, _BLOCK):
            buf[i] = 0
        if fill >= _BLOCK - 16:
            # No room for the 128-bit length: pad out this block, then one more.
            _compress(h, self._wh, self._wl, buf)
            for i in range(_BLOCK):
                buf[i] = 0
        # Message length in bits, 128-bit big-endian (lengths here are < 2**61 bytes).
        bits = self._length << 3
        struct.pack_into(">II", buf, _BLOCK - 8, (bits >> 32) & _M32, bits & _M32)
        _compress(h, self._wh, self._wl, buf)
        return struct.pack(">16I", *h)


def sha512(data=b""):
    """One-shot SHA-512 of a bytes-like object."""
    return SHA512(data).digest()
