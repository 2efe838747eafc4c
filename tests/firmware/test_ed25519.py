"""The device's SHA-512 and strict Ed25519 verify (firmware/lib/agent/sha512.py,
ed25519.py), run as deployed (.mpy) on the real MicroPython unix port at the
128 KiB heap, against RFC 8032 / FIPS 180-4 vectors and cross-checked with
`cryptography` (OpenSSL) on thousands of random keys and messages.

All cases of a kind go through one interpreter run (one line of input per case,
one result character per case), so thousands of checks stay within seconds.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import firmware_files
from mpfleet.sim.board import micropython_executable

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
RANDOM_CASES = 1000
TAMPERED_CASES = 1000

# RFC 8032 section 7.1 (TEST 1, 2, 3, 1024, SHA(abc)): seed, public key, message, signature.
TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1e355f6c505"
    "44e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d658675fc6ea534e0810a"
    "4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4"
    "feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e06203b33890cc9b832f79ef80560ccb9a39ce767"
    "967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed"
    "3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa"
    "3fb2d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a918"
    "7ebb6092cf67bf2b13fd65f27088d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c9"
    "0bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a4"
    "6128bab27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969be3ea"
    "7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb751fb73e666c6c6"
    "55ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004a"
    "a06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b292709"
    "4b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649de6188a7dbdf"
    "191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e488acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd"
    "2dcc5600a32ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2"
    "cb3797aa2a2f256656168e6c496afc5fb93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c"
    "225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb"
    "68606937380db2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8"
    "cac60c905c15fc910840b94c00a0b9d0"
)
RFC_8032 = {
    "TEST 1": ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
               "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
               "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    "TEST 2": ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
               "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
               "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    "TEST 3": ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
               "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
               "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    "TEST 1024": ("f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
                  "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e", TEST_1024_MESSAGE,
                  "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
    "TEST SHA(abc)": ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
                      "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
                      hashlib.sha512(b"abc").hexdigest(),
                      "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
}

# Reads "m<pubkey hex> m<message hex> m<signature hex>" lines (the "m" keeps an
# empty field a field) and prints one character per line: T/F for verify's
# answer, V for ValueError, X for anything else raised.
VERIFY_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from binascii import unhexlify
from agent.ed25519 import verify
out = []
for line in open(sys.argv[2]):
    pk, msg, sig = line.split()
    try:
        out.append("T" if verify(unhexlify(pk[1:]), unhexlify(msg[1:]), unhexlify(sig[1:])) is True else "F")
    except ValueError:
        out.append("V")
    except Exception as e:
        out.append("X")
print("".join(out))
"""

# Reads "<message hex> <chunk size>" lines, prints one hex digest per line (chunk
# size 0: one-shot sha512(), else SHA512().update() in chunks of that size).
SHA_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from binascii import unhexlify, hexlify
from agent.sha512 import sha512, SHA512
for line in open(sys.argv[2]):
    msg, chunk = line.split()
    msg = unhexlify(msg[1:])
    chunk = int(chunk)
    if chunk == 0:
        d = sha512(msg)
    else:
        h = SHA512()
        for i in range(0, len(msg), chunk):
            h.update(msg[i:i + chunk])
        d = h.digest()
    print(hexlify(d).decode())
"""


def run_micropython(mpy_path: Path, script: str, lines: list[str]) -> str:
    """Run script on the unix port at the 128 KiB heap over the given input lines."""
    (mpy_path / "script.py").write_text(script)
    (mpy_path / "input.txt").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [micropython_executable(), "-X", "heapsize=128k", str(mpy_path / "script.py"), str(mpy_path),
         str(mpy_path / "input.txt")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def verify_on_device(mpy_path: Path, cases: list[tuple[bytes, bytes, bytes]]) -> str:
    # Each field gets a leading "m" so that an empty one is still a field.
    lines = [f"m{pk.hex()} m{msg.hex()} m{sig.hex()}" for pk, msg, sig in cases]
    out = run_micropython(mpy_path, VERIFY_SCRIPT, lines).strip()
    assert len(out) == len(cases), out
    return out


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def decode_y(y: int, sign: int) -> int | None:
    """x of the point with this y and sign (RFC 8032 5.1.3, host-side reference), or None."""
    d = -121665 * pow(121666, P - 2, P) % P
    x2 = (y * y - 1) * pow(d * y * y + 1, P - 2, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    if (x * x - x2) % P:
        return None
    if x == 0 and sign:
        return None
    return x if x & 1 == sign else P - x


def small_order_encodings() -> list[bytes]:
    """Canonical encodings of the 8 points of order dividing 8 (the torsion
    subgroup), found on the host as [L]P for random curve points P."""
    d = -121665 * pow(121666, P - 2, P) % P

    def add(p1, p2):  # affine twisted Edwards addition, a = -1 (complete)
        x1, y1 = p1
        x2, y2 = p2
        t = d * x1 * x2 * y1 * y2 % P
        return ((x1 * y2 + x2 * y1) * pow(1 + t, P - 2, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, P - 2, P) % P)

    def mul(n, point):
        acc = (0, 1)
        while n:
            if n & 1:
                acc = add(acc, point)
            point = add(point, point)
            n >>= 1
        return acc

    rng = random.Random(8)
    torsion = {(0, 1)}
    while len(torsion) < 8:
        y = rng.randrange(P)
        x = decode_y(y, 0)
        if x is not None:
            torsion.add(mul(L, (x, y)))
    return [(y | ((x & 1) << 255)).to_bytes(32, "little") for x, y in sorted(torsion)]


# --- SHA-512 -----------------------------------------------------------------


def test_sha512_matches_fips_180_4_vectors_and_hashlib_on_random_inputs(mpy_path):
    rng = random.Random(512)
    messages = [
        b"abc",
        b"",
        b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrst"
        b"nopqrstu",  # the 896-bit two-block message
    ]
    messages += [rng.randbytes(n) for n in range(0, 301)]
    messages += [rng.randbytes(n) for n in (111, 112, 127, 128, 239, 240, 255, 256, 1000)]
    lines, expected = [], []
    for msg in messages:
        for chunk in (0, 1 + rng.randrange(130)):
            lines.append(f"m{msg.hex()} {chunk}")
            expected.append(hashlib.sha512(msg).hexdigest())
    digests = run_micropython(mpy_path, SHA_SCRIPT, lines).split()
    assert digests[0] == ("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                          "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
    assert digests[2] == ("cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
                          "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e")
    assert digests[4] == ("8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
                          "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")
    assert digests == expected


@pytest.mark.slow
def test_sha512_of_a_million_a_fed_in_pieces(mpy_path):
    # FIPS 180-4 long-message vector; fed as 1000 updates of 1000 bytes.
    script = """
import sys
sys.path.insert(0, sys.argv[1])
from binascii import hexlify
from agent.sha512 import SHA512
h = SHA512()
block = b"a" * 1000
for _ in range(1000):
    h.update(block)
print(hexlify(h.digest()).decode())
"""
    out = run_micropython(mpy_path, script, []).strip()
    assert out == ("e718483d0ce769644e2e42c7bc15b4638e1f98b13b2044285632a803afa973eb"
                   "de0ff244877ea60a4cb0432ce577c31beb009c5c2c49aa2e4eadb217ad8cc09b")


# --- Ed25519 -----------------------------------------------------------------


def test_rfc_8032_vectors_verify(mpy_path):
    cases = []
    for name, (seed, public, message, signature) in RFC_8032.items():
        # Ed25519 is deterministic: the host signer reproduces the RFC bytes, which
        # also guards these constants against transcription errors.
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
        assert raw_public(key).hex() == public, name
        assert key.sign(bytes.fromhex(message)).hex() == signature, name
        cases.append((bytes.fromhex(public), bytes.fromhex(message), bytes.fromhex(signature)))
    assert verify_on_device(mpy_path, cases) == "T" * len(cases)


@pytest.fixture(scope="module")
def random_signatures():
    rng = random.Random(25519)
    cases = []
    for _ in range(RANDOM_CASES):
        key = Ed25519PrivateKey.generate()
        msg = rng.randbytes(rng.randrange(513))
        cases.append((raw_public(key), msg, key.sign(msg)))
    return cases


@pytest.mark.slow
def test_signatures_made_by_cryptography_verify(mpy_path, random_signatures):
    out = verify_on_device(mpy_path, random_signatures)
    assert out == "T" * len(random_signatures), [i for i, c in enumerate(out) if c != "T"]


@pytest.mark.slow
def test_tampered_signatures_are_rejected(mpy_path, random_signatures):
    rng = random.Random(8032)
    other = raw_public(Ed25519PrivateKey.generate())
    cases = []
    while len(cases) < TAMPERED_CASES:
        pk, msg, sig = random_signatures[len(cases) % len(random_signatures)]
        kind = len(cases) % 4
        if kind == 0:
            if not msg:
                msg = b"\0"  # a bit can't be flipped in nothing; adding a byte changes it as well
            else:
                msg = bytearray(msg)
                msg[rng.randrange(len(msg))] ^= 1 << rng.randrange(8)
                msg = bytes(msg)
        elif kind in (1, 2):  # flip a bit of R (0..255) or of S (256..511)
            bit = rng.randrange(256) + (256 if kind == 2 else 0)
            sig = bytearray(sig)
            sig[bit // 8] ^= 1 << (bit % 8)
            sig = bytes(sig)
        else:
            pk = other
        cases.append((pk, msg, sig))
    out = verify_on_device(mpy_path, cases)
    assert out == "F" * len(cases), [(i, c) for i, c in enumerate(out) if c != "F"]


@pytest.fixture(scope="module")
def valid():
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC_8032["TEST 2"][0]))
    msg = b"mpf1.k1.payload"
    return raw_public(key), msg, key.sign(msg)


def test_s_plus_l_is_rejected(mpy_path, valid):
    pk, msg, sig = valid
    s = int.from_bytes(sig[32:], "little")
    cases = [(pk, msg, sig)]
    for bad_s in (s + L, L, 2**256 - 1):
        cases.append((pk, msg, sig[:32] + bad_s.to_bytes(32, "little")))
    assert verify_on_device(mpy_path, cases) == "TFFF"


def test_non_canonical_encodings_are_rejected(mpy_path, valid):
    pk, msg, sig = valid
    a_y = int.from_bytes(pk, "little") & (2**255 - 1)
    r_y = int.from_bytes(sig[:32], "little") & (2**255 - 1)
    cases = []
    # y + p for the actual A and R where it still fits 255 bits, else every y >= p form.
    for enc_y in (P, P + 1, 2**255 - 1, P + 2):
        for sign in (0, 1):
            bad = (enc_y | sign << 255).to_bytes(32, "little")
            cases.append((bad, msg, sig))
            cases.append((pk, msg, bad + sig[32:]))
    if a_y + P < 2**255:
        cases.append(((a_y + P | (pk[31] >> 7) << 255).to_bytes(32, "little"), msg, sig))
    if r_y + P < 2**255:
        cases.append((pk, msg, (r_y + P | (sig[31] >> 7) << 255).to_bytes(32, "little") + sig[32:]))
    out = verify_on_device(mpy_path, cases)
    assert out == "F" * len(cases)


def test_a_small_y_alias_of_a_real_key_is_rejected(mpy_path):
    # Only points with y < 19 have a second encoding y + p that fits 255 bits;
    # every such alias of an on-curve point is refused as a key and as R.
    key = Ed25519PrivateKey.generate()
    msg = b"x"
    sig = key.sign(msg)
    cases = []
    for y in range(19):
        for sign in (0, 1):
            if decode_y(y, sign) is None:
                continue
            alias = (y + P | sign << 255).to_bytes(32, "little")
            cases.append((alias, msg, sig))
            cases.append((raw_public(key), msg, alias + sig[32:]))
    assert cases
    assert verify_on_device(mpy_path, cases) == "F" * len(cases)


@pytest.mark.slow
def test_small_order_keys_and_r_are_rejected(mpy_path, valid):
    pk, msg, sig = valid
    small = small_order_encodings()
    assert bytes.fromhex("01" + "00" * 31) in small  # the identity
    cases = []
    for enc in small:
        cases.append((enc, msg, sig))
        cases.append((pk, msg, enc + sig[32:]))
        # The classic forgery against a small-order key: R = A, S = 0 satisfies the
        # cofactorless equation [0]B = R + [k]A only for small-order A, so it must
        # be refused by the small-order check itself.
        cases.append((enc, msg, enc + bytes(32)))
    out = verify_on_device(mpy_path, cases)
    assert out == "F" * len(cases)


def test_x_zero_with_sign_bit_is_rejected(mpy_path, valid):
    pk, msg, sig = valid
    cases = []
    for y in (1, P - 1):  # the two points with x == 0
        bad = (y | 1 << 255).to_bytes(32, "little")
        cases.append((bad, msg, sig))
        cases.append((pk, msg, bad + sig[32:]))
    assert verify_on_device(mpy_path, cases) == "F" * len(cases)


def test_points_off_the_curve_are_rejected(mpy_path, valid):
    pk, msg, sig = valid
    off = [y for y in range(2, 200) if decode_y(y, 0) is None][:5]
    cases = []
    for y in off:
        enc = y.to_bytes(32, "little")
        cases.append((enc, msg, sig))
        cases.append((pk, msg, enc + sig[32:]))
    assert verify_on_device(mpy_path, cases) == "F" * len(cases)


def test_wrong_lengths_raise_value_error(mpy_path, valid):
    pk, msg, sig = valid
    cases = [(pk[:31], msg, sig), (pk + b"\0", msg, sig), (b"", msg, sig),
             (pk, msg, sig[:63]), (pk, msg, sig + b"\0"), (pk, msg, b"")]
    assert verify_on_device(mpy_path, cases) == "V" * len(cases)


def test_verify_fits_well_inside_the_128k_heap(new_board, mpy_path):
    from mpfleet.sim.heap import heap_needed

    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(RFC_8032["TEST 3"][0]))
    msg = bytes(range(256)) * 2
    source = (
        "from agent.ed25519 import verify\n"
        f"ok = verify({raw_public(key)!r}, {msg!r}, {key.sign(msg)!r})\n"
        "print('VERIFIED' if ok else 'REJECTED')\n"
    )
    vb = new_board()
    files = firmware_files(only=("lib/agent/__init__.py", "lib/agent/sha512.py", "lib/agent/ed25519.py"))
    files["/main.py"] = source.encode()
    vb.fs_put(files)
    need = heap_needed(vb, lambda rec: "VERIFIED" in rec.output, low=4 * 1024, high=128 * 1024)
    assert need is not None and need <= 64 * 1024, need
