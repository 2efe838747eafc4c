"""The varints every sample format shares (agent/varint.py), as units on the
MicroPython unix port: LEB128 bytes at the width edges, zigzag's mapping of
signed to unsigned, and the errors for a varint cut off or past 64 bits."""

import pytest

MODULES = ("lib/agent/varint.py",)

# (value, its LEB128 bytes): every width edge, 1 to 10 bytes.
UVARINTS = [
    (0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"), (16383, "ff7f"), (16384, "808001"),
    (2 ** 21 - 1, "ffff7f"), (2 ** 21, "80808001"), (2 ** 28 - 1, "ffffff7f"), (2 ** 28, "8080808001"),
    (2 ** 31 - 1, "ffffffff07"), (2 ** 32 - 1, "ffffffff0f"), (2 ** 35, "808080808001"),
    (2 ** 63 - 1, "ffffffffffffffff7f"), (2 ** 63, "80808080808080808001"), (2 ** 64 - 1, "ffffffffffffffffff01"),
]
# (signed, zigzag): the documented mapping n >= 0 -> 2n, n < 0 -> -2n - 1.
ZIGZAGS = [
    (0, 0), (-1, 1), (1, 2), (-2, 3), (2, 4), (63, 126), (-64, 127), (64, 128),
    (2 ** 31 - 1, 2 ** 32 - 2), (-(2 ** 31), 2 ** 32 - 1), (2 ** 63 - 1, 2 ** 64 - 2), (-(2 ** 63), 2 ** 64 - 1),
]
# (name, bytes, end): varints get_uvarint must refuse.
MALFORMED = [
    ("nothing to read", "", 0),
    ("cut off after a continuation byte", "80", 1),
    ("cut off by end although the buffer goes on", "ff7f", 1),
    ("eleven bytes", "ffffffffffffffffffff01", 11),
    ("ten bytes worth 2^64", "80808080808080808002", 10),
    ("ten bytes worth 2^70 - 1", "ffffffffffffffffff7f", 10),
]

DEVICE = f"UVARINTS = {UVARINTS!r}\nZIGZAGS = {ZIGZAGS!r}\nMALFORMED = {MALFORMED!r}\n" + """
import binascii
from agent.varint import get_uvarint, put_uvarint, unzigzag, uvlen, zigzag


def put(n, pos):
    buf = bytearray(b"\\xee" * 16)
    end = put_uvarint(buf, pos, n)
    return [end, binascii.hexlify(buf).decode()]


def get(hexdata, pos, end):
    return list(get_uvarint(binascii.unhexlify(hexdata), pos, end))


def round_trips():
    # Every power of two and its neighbours, both signs, through zigzag and the
    # uvarint and back: the values that do not come back whole.
    wrong = []
    buf = bytearray(12)
    for k in range(64):
        for n in (2 ** k - 1, 2 ** k, 2 ** k + 1, -(2 ** k) - 1, -(2 ** k), -(2 ** k) + 1):
            if n >= 2 ** 63 or n < -(2 ** 63):
                continue
            end = put_uvarint(buf, 1, zigzag(n))
            z, pos = get_uvarint(buf, 1, end)
            if unzigzag(z) != n or pos != end or end - 1 != uvlen(zigzag(n)):
                wrong.append(n)
    return wrong


for n, encoded in UVARINTS:
    case("put %d" % n, lambda: put(n, 0))
    case("uvlen %d" % n, lambda: uvlen(n))
    # followed by another varint, which must not be read
    case("get %d" % n, lambda: get(encoded + "05", 0, len(encoded) // 2 + 1))
for n, z in ZIGZAGS:
    case("zigzag %d" % n, lambda: zigzag(n))
    case("unzigzag %d" % z, lambda: unzigzag(z))
for name, data, end in MALFORMED:
    case(name, lambda: get(data, 0, end))
case("put at an offset", lambda: put(300, 5))
case("get at an offset", lambda: get("eeeeac02", 2, 4))
case("get from a memoryview", lambda: list(get_uvarint(memoryview(b"\\x00\\xac\\x02")[1:], 0, 2)))
case("round trips", round_trips)
"""


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


@pytest.mark.parametrize("n, encoded", UVARINTS, ids=[str(n) for n, _ in UVARINTS])
def test_put_writes_leb128_and_returns_the_position_after_it(device, n, encoded):
    end, buf = device.value(f"put {n}")
    assert end == len(encoded) // 2
    assert buf == encoded + "ee" * (16 - end), "bytes after the varint are left alone"


@pytest.mark.parametrize("n, encoded", UVARINTS, ids=[str(n) for n, _ in UVARINTS])
def test_uvlen_is_the_encoded_width(device, n, encoded):
    assert device.value(f"uvlen {n}") == len(encoded) // 2


@pytest.mark.parametrize("n, encoded", UVARINTS, ids=[str(n) for n, _ in UVARINTS])
def test_get_reads_one_varint_and_returns_the_position_after_it(device, n, encoded):
    assert device.value(f"get {n}") == [n, len(encoded) // 2]


@pytest.mark.parametrize("n, z", ZIGZAGS, ids=[str(n) for n, _ in ZIGZAGS])
def test_zigzag_maps_signed_to_unsigned_small_magnitudes_small(device, n, z):
    assert device.value(f"zigzag {n}") == z
    assert device.value(f"unzigzag {z}") == n


@pytest.mark.parametrize("name", [m[0] for m in MALFORMED])
def test_a_cut_off_or_overlong_varint_is_a_value_error(device, name):
    assert device.error(name) == ("ValueError", "truncated or overlong varint")


def test_put_writes_at_the_given_offset(device):
    assert device.value("put at an offset") == [7, "ee" * 5 + "ac02" + "ee" * 9]


def test_get_reads_from_the_given_offset(device):
    assert device.value("get at an offset") == [300, 4]


def test_get_reads_a_memoryview(device):
    assert device.value("get from a memoryview") == [300, 2]


def test_every_power_of_two_and_its_neighbours_round_trip_through_zigzag(device):
    assert device.value("round trips") == []
