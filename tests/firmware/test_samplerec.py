"""One sample as a flash log record (agent/samplerec.py), as units on the
MicroPython unix port: the documented layout byte for byte, round trips at the
value edges, and the ValueError each malformed record gets."""

import struct

import pytest

from mpfleet.protocol.codec import zigzag  # the host's, checked against the shared frame vectors

MODULES = ("lib/agent/samplerec.py", "lib/agent/varint.py")

# (name, t, values): round trips at the edges of time, value and channel count.
SAMPLES = [
    ("no channels", 0, []),
    ("one zero", 0, [0]),
    ("the last u32 second and i32 extremes", 2 ** 32 - 1, [2 ** 31 - 1, -(2 ** 31)]),
    ("eight channels all missing", 1, [None] * 8),
    ("eight channels all present", 1700000000, [1, -2, 3, -4, 5, -6, 7, -8]),
    ("every other channel missing", 1700000060, [None, 0, None, -1, None, 2 ** 40, None, -(2 ** 40)]),
    ("the i64 extremes", 946684800, [2 ** 63 - 1, -(2 ** 63)]),
    ("one-byte and two-byte varint edges", 5, [-64, 63, 64, -65, 8191, -8192]),
]
# (name, record hex, the decode error's message)
MALFORMED = [
    ("empty", "", "sample record too short"),
    ("a header cut short", "000100f153", "sample record too short"),
    ("a present channel with no value", "000100f15365", "truncated or overlong varint"),
    ("a value cut off", "000100f1536580", "truncated or overlong varint"),
    ("a byte after the last value", "000100f153650405", "sample record has trailing bytes"),
    ("a value for a channel the bitmap says is missing", "010100f1536504", "sample record has trailing bytes"),
    ("a value with no channels", "000000f1536504", "sample record has trailing bytes"),
]

DEVICE = f"SAMPLES = {SAMPLES!r}\nMALFORMED = {MALFORMED!r}\n" + """
import binascii
from agent import samplerec

buf = bytearray(96)


def encode(t, values):
    for i in range(len(buf)):
        buf[i] = 0xEE
    n = samplerec.encode(t, values, buf)
    return [n, binascii.hexlify(buf[:n]).decode(), buf[n] == 0xEE]


def round_trip(t, values):
    n = samplerec.encode(t, values, buf)
    return list(samplerec.decode(memoryview(buf)[:n]))


for name, t, values in SAMPLES:
    case("encode " + name, lambda: encode(t, values))
    case("round trip " + name, lambda: round_trip(t, values))
for name, data, _ in MALFORMED:
    case("decode " + name, lambda: samplerec.decode(binascii.unhexlify(data)))
case("decode from bytes", lambda: list(samplerec.decode(binascii.unhexlify("010300f15365" + "01" + "d804"))))
"""


def _uvarint(n):
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def documented_record(t, values):
    """The record as the module's layout table gives it."""
    missing = sum(1 << i for i, v in enumerate(values) if v is None)
    return (bytes([missing, len(values)]) + struct.pack("<I", t)
            + b"".join(_uvarint(zigzag(v)) for v in values if v is not None))


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


def test_a_record_is_bitmap_count_u32_le_time_then_zigzag_values_of_present_channels(device):
    # bitmap 0b001, 3 channels, 1700000000 = 0x6553f100, zigzag(-1) = 1, zigzag(300) = 600 = d8 04
    assert device.value("decode from bytes") == [1700000000, [None, -1, 300]]
    assert documented_record(1700000000, [None, -1, 300]).hex() == "010300f15365" + "01" + "d804"


@pytest.mark.parametrize("name, t, values", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_encode_writes_the_documented_layout_and_returns_its_length(device, name, t, values):
    n, data, untouched = device.value("encode " + name)
    expected = documented_record(t, values)
    assert data == expected.hex()
    assert n == len(expected)
    assert untouched, "nothing is written past the record"


@pytest.mark.parametrize("name, t, values", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_decode_gives_back_what_was_encoded(device, name, t, values):
    assert device.value("round trip " + name) == [t, values]


@pytest.mark.parametrize("name, data, message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_record_is_a_value_error_with_the_reason(device, name, data, message):
    assert device.error("decode " + name) == ("ValueError", message)
