"""The sample batch frame: the device encoder (real MicroPython) and the host
codec (CPython) agree byte for byte on shared vectors; the host decoder rejects
every kind of bad frame with a precise reason; the format meets its size target."""

import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from mpfleet.protocol.codec import FrameError, decode_frame, encode_frame, to_stored
from mpfleet.errors import MpfleetError
from mpfleet.sim.board import micropython_executable

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests" / "vectors" / "sample_frames.json").read_text())["cases"]

DEVICE_ENCODE = """
import sys, json, binascii
sys.path.insert(0, %r)
from agent.codec import FrameEncoder
with open(%r) as f:
    cases = json.load(f)["cases"]
for c in cases:
    enc = FrameEncoder(c["device_id"], c["scales"], max_frame=1024)
    enc.begin(c["first_seq"], c["t_base"], c.get("oldest_seq"))
    for i, (t, values) in enumerate(c["samples"]):
        if not enc.add(c["first_seq"] + i, t, values):
            raise SystemExit("frame full at sample %%d of %%s" %% (i, c["name"]))
    print(c["name"], binascii.hexlify(enc.finish()).decode())
"""


def _stored(value, scale):
    return None if value is None else to_stored(value, scale)


def _micropython(source: str) -> str:
    proc = subprocess.run([micropython_executable(), "-X", "heapsize=128k", "-c", source],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _mqtt_publish_overhead(topic: str, payload_len: int) -> int:
    """Bytes MQTT 3.1.1 adds to a QoS 1 PUBLISH: fixed header with remaining
    length, topic length + topic, packet id."""
    remaining = 2 + len(topic) + 2 + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + length_bytes + 2 + len(topic) + 2


# ------------------------------------------------------------------ vectors
def test_device_encoder_reproduces_every_vector_on_micropython():
    source = DEVICE_ENCODE % (str(ROOT / "firmware" / "lib"), str(ROOT / "tests" / "vectors" / "sample_frames.json"))
    lines = dict(line.split(" ", 1) for line in _micropython(source).split("\n") if line)
    for case in VECTORS:
        assert lines[case["name"]] == case["hex"], case["name"]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_host_encoder_reproduces_vector(case):
    frame = encode_frame(case["device_id"], case["first_seq"], case["t_base"], case["scales"],
                         [(t, tuple(v)) for t, v in case["samples"]], oldest_seq=case.get("oldest_seq"))
    assert frame.hex() == case["hex"]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_host_decoder_reads_vector(case):
    frame = decode_frame(bytes.fromhex(case["hex"]))
    assert frame.device_id == case["device_id"]
    assert frame.first_seq == case["first_seq"] and frame.t_base == case["t_base"]
    assert frame.oldest_seq == case.get("oldest_seq")
    assert list(frame.scales) == case["scales"]
    assert frame.count == len(case["samples"])
    for i, ((seq, t, values), (t_in, v_in)) in enumerate(zip(frame.samples, case["samples"])):
        assert seq == case["first_seq"] + i and t == t_in
        assert [_stored(v, s) for v, s in zip(values, frame.scales)] == \
               [_stored(v, s) for v, s in zip(v_in, frame.scales)]


def test_device_encoder_ends_the_frame_at_a_seq_gap_and_when_full():
    source = """
import sys
sys.path.insert(0, %r)
from agent.codec import FrameEncoder
enc = FrameEncoder("d", (1,), max_frame=40)
enc.begin(10, 0)
print(enc.add(10, 0, (1.0,)), enc.add(12, 60, (1.0,)), enc.add(11, 60, (1.1,)))
n = 2
while enc.add(10 + n, 60 * n, (1.0 + n,)):
    n += 1
print(n, len(enc.finish()))
""" % str(ROOT / "firmware" / "lib")
    first, second = _micropython(source).split("\n")[:2]
    assert first == "True False True", "a seq gap must not be written into the frame"
    count, size = map(int, second.split())
    assert size <= 40
    hexed = _micropython(source.replace(
        "print(n, len(enc.finish()))", "import binascii; print(binascii.hexlify(enc.finish()).decode())"))
    frame = decode_frame(bytes.fromhex(hexed.split("\n")[1]))
    assert frame.count == count and frame.samples[-1][0] == 10 + count - 1


# ------------------------------------------------------------------ round trip
def test_random_series_round_trip_exactly():
    rng = random.Random(1124)
    for _ in range(200):
        nch = rng.randint(0, 6)
        scales = [rng.randint(-3, 4) for _ in range(nch)]
        t = rng.randint(0, 2**32 - 1)
        first = rng.randint(0, 2**32 - 2000)
        samples = []
        for _ in range(rng.randint(0, 300)):
            t = max(0, min(2**32 - 1, t + rng.choice([60, 60, 61, -5, rng.randint(-10**6, 10**6)])))
            samples.append((t, tuple(round(rng.uniform(-1e5, 1e5), max(s, 0)) if s > 0
                                     else rng.randint(-10**9, 10**9) for s in scales)))
        frame = decode_frame(encode_frame("dev-" + str(nch), first, samples[0][0] if samples else 0, scales, samples))
        assert frame.count == len(samples)
        for i, ((seq, t_out, v_out), (t_in, v_in)) in enumerate(zip(frame.samples, samples)):
            assert seq == first + i and t_out == t_in
            assert [to_stored(v, s) for v, s in zip(v_out, scales)] == [to_stored(v, s) for v, s in zip(v_in, scales)]


def test_reference_series_costs_at_most_8_bytes_per_sample_with_mqtt_framing():
    case = next(c for c in VECTORS if c["name"] == "reference_2ch_60s_100")
    payload = len(case["hex"]) // 2
    topic = "mpf/v1/%s/samples" % case["device_id"]
    per_sample = (payload + _mqtt_publish_overhead(topic, payload)) / len(case["samples"])
    assert per_sample <= 8.0, per_sample
    assert per_sample < 4.5, f"the delta codec regressed: {per_sample:.2f} B/sample"


# ------------------------------------------------------------------ errors
GOOD = bytes.fromhex(VECTORS[0]["hex"])


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _expect(data: bytes, reason: str):
    with pytest.raises(FrameError) as err:
        decode_frame(data)
    assert reason in str(err.value)
    assert isinstance(err.value, MpfleetError)


def test_flipped_bit_is_a_bad_crc():
    bad = bytearray(GOOD)
    bad[40] ^= 0x04
    _expect(bytes(bad), "bad CRC")


def test_truncated_frame_is_reported():
    _expect(GOOD[:-7], "bad CRC")
    _expect(GOOD[:9], "truncated frame")
    _expect(b"", "truncated frame")


def test_truncated_header_with_valid_crc_is_reported():
    _expect(_recrc(GOOD[:3 + 12 + 2]), "truncated frame")


def test_bad_magic_is_reported_before_anything_else():
    _expect(b"\xb2" + GOOD[1:], "bad magic 0xb2")


def test_unknown_flags_are_rejected():
    _expect(_recrc(GOOD[:1] + b"\x04" + GOOD[2:-4]), "unsupported flags 0x04")


def test_missing_bitmap_naming_absent_channels_is_rejected():
    frame = encode_frame("ab", 1, 0, [1], [(0, (None,))])
    body = bytearray(frame[:-4])
    body[-2] = 0x02  # bitmap of the only sample: channel 1 of a 1-channel frame
    _expect(_recrc(bytes(body)), "missing bitmap 0x2 names channels beyond 1")


def test_overlong_varint_is_an_overflow():
    ident = b"ab"
    body = bytes([0xB1, 0, len(ident)]) + ident + b"\xff" * 10 + b"\x01" + b"\x00" * 4 + b"\x00"
    _expect(_recrc(body), "varint overflow")


def test_varint_beyond_64_bits_is_an_overflow():
    ident = b"ab"
    body = bytes([0xB1, 0, len(ident)]) + ident + b"\xff" * 9 + b"\x7f" + b"\x01" + b"\x00" * 4 + b"\x00"
    _expect(_recrc(body), "varint overflow")


def test_more_samples_announced_than_present_is_a_count_mismatch():
    frame = encode_frame("ab", 1, 0, [1], [(0, (1.0,)), (60, (1.1,))])
    body = bytearray(frame[:-4])
    body[6] = 3  # count varint (after magic, flags, len, 'ab', first seq)
    _expect(_recrc(bytes(body)), "count mismatch: header says 3 samples, data holds 2")


def test_fewer_samples_announced_than_present_is_a_count_mismatch():
    frame = encode_frame("ab", 1, 0, [1], [(0, (1.0,)), (60, (1.1,))])
    body = bytearray(frame[:-4])
    body[6] = 1
    _expect(_recrc(bytes(body)), "count mismatch: 2 bytes left")


def test_sample_cut_mid_varint_is_a_count_mismatch():
    frame = encode_frame("ab", 1, 0, [0], [(0, (5000,))])
    _expect(_recrc(frame[:-5]), "count mismatch")


def test_bad_device_id_and_scale_are_rejected():
    _expect(_recrc(bytes([0xB1, 0, 2]) + b"A!" + b"\x01\x00" + b"\x00" * 4 + b"\x00"), "bad device id")
    _expect(_recrc(bytes([0xB1, 0, 2]) + b"ab" + b"\x01\x00" + b"\x00" * 4 + b"\x01\x0c"), "bad scale 12")


def test_seq_beyond_32_bits_is_rejected():
    body = bytes([0xB1, 0, 2]) + b"ab" + b"\x80\x80\x80\x80\x10" + b"\x00" + b"\x00" * 4 + b"\x00"
    _expect(_recrc(body), "seq out of range")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_device_prescaled_values_and_missing_readings_match_the_host():
    source = """
import sys, binascii
sys.path.insert(0, %r)
from agent.codec import FrameEncoder
enc = FrameEncoder("d", (1, 0), max_frame=200, prescaled=True)
enc.begin(5, 100, oldest_seq=3)
print(enc.scales, enc.add(5, 100, (215, 40)), enc.add(6, 160, (None, 41)))
print(binascii.hexlify(enc.finish()).decode())
enc.begin(6, 160)
print(enc.add(6, 160, (None, 41)), enc.add(7, 220, (216, None)))
print(binascii.hexlify(enc.finish()).decode())
""" % str(ROOT / "firmware" / "lib")
    lines = _micropython(source).split("\n")
    assert lines[0] == "(1, 0) True False", "a None mid-frame ends a frame without bitmaps"
    assert lines[1] == encode_frame("d", 5, 100, [1, 0], [(100, (21.5, 40))], oldest_seq=3).hex()
    assert lines[2] == "True True"
    assert lines[3] == encode_frame("d", 6, 160, [1, 0], [(160, (None, 41)), (220, (21.6, None))]).hex()
    frame = decode_frame(bytes.fromhex(lines[3]))
    assert frame.samples == [(6, 160, (None, 41)), (7, 220, (21.6, None))]
