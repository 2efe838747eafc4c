"""The DER walker of the device's TLS identity (agent/tlsid.py), as units on the
MicroPython unix port: certificates and keys made by `cryptography` split and
dated as the host made them (UTCTime and GeneralizedTime, a v1 certificate with
no version field), the clock floor, and every malformed input (truncated at each
byte, oversize, garbage, bad times) refused with ValueError, never a crash."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODULES = ("lib/agent/tlsid.py",)
UTC = dt.timezone.utc


def _cert(not_before: dt.datetime, days: int = 30, cn: str | None = "dev-1", org: str | None = None
          ) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    name = x509.Name(attrs)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(days=days)).sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        head = bytes([tag, n])
    elif n < 0x100:
        head = bytes([tag, 0x81, n])
    else:
        head = bytes([tag, 0x82, n >> 8, n & 0xFF])
    return head + body


def _v1_cert(not_before: bytes, tag: int = 0x17) -> bytes:
    """A minimal v1 certificate shape (no [0] version): serial, algorithm, issuer, validity."""
    validity = _tlv(0x30, _tlv(tag, not_before) + _tlv(tag, not_before))
    tbs = _tlv(0x30, _tlv(0x02, b"\x01") + _tlv(0x30, b"") + _tlv(0x30, b"") + validity)
    return _tlv(0x30, tbs + _tlv(0x30, b"") + _tlv(0x03, b"\x00"))


UTC_DATE = dt.datetime(2026, 11, 30, 8, 15, 42, tzinfo=UTC)      # encoded as UTCTime
GEN_DATE = dt.datetime(2051, 2, 28, 23, 59, 58, tzinfo=UTC)      # from 2050 on: GeneralizedTime
FAR_DATE = dt.datetime(2101, 1, 1, tzinfo=UTC)                   # past the floor's limit
CERT, KEY = _cert(UTC_DATE)
GEN_CERT, GEN_KEY = _cert(GEN_DATE)
FAR_CERT, _ = _cert(FAR_DATE)
ORG_CERT, _ = _cert(UTC_DATE, cn="pump-7", org="Fleet")  # two RDNs, the CN second
NO_CN_CERT, _ = _cert(UTC_DATE, cn=None, org="Fleet")
IDENTITY = CERT + KEY
V1_CERT = _v1_cert(b"270105120000Z")
V1_1999 = _v1_cert(b"990101000000Z")
V1_GEN = _v1_cert(b"20300607080910Z", tag=0x18)

# (name, bytes): inputs split_identity must refuse with ValueError.
BAD_IDENTITIES = [
    ("empty", b""),
    ("one byte", b"\x30"),
    ("certificate only", CERT),
    ("key first", KEY + CERT),
    ("a trailing byte", IDENTITY + b"\x00"),
    ("two keys after the certificate", IDENTITY + KEY),
    ("key is not a SEQUENCE", CERT + b"\x04" + KEY[1:]),
    ("indefinite length", b"\x30\x80" + IDENTITY[2:]),
    ("four length bytes", b"\x30\x84\x00\x00\x01\x00" + b"\x00" * 256),
    ("multi-byte tag", b"\x1f\x81\x01\x00"),
    ("length past the end", b"\x30\x82\xff\xff" + b"\x00" * 16),
    ("long-form length cut off", b"\x30\x82\x01"),
    ("a certificate with no TBSCertificate inside", _tlv(0x30, b"\x02\x01\x01") + KEY),
    ("oversize", _tlv(0x30, _tlv(0x30, b"\x00" * 9000)) + KEY),
]
# (name, bytes): certificates not_before must refuse with ValueError.
BAD_TIMES = [
    ("month 13", _v1_cert(b"271305120000Z")),
    ("hour 24", _v1_cert(b"270105240000Z")),
    ("day 0", _v1_cert(b"270100120000Z")),
    ("a letter in the year", _v1_cert(b"2x0105120000Z")),
    ("no Z", _v1_cert(b"2701051200000")),
    ("no seconds (short UTCTime)", _v1_cert(b"2701051200Z")),
    ("a time zone offset", _v1_cert(b"270105120000+0100")),
    ("GeneralizedTime of UTCTime's length", _v1_cert(b"270105120000Z", tag=0x18)),
    ("fractional GeneralizedTime", _v1_cert(b"20300607080910.5Z", tag=0x18)),
    ("an OCTET STRING for a time", _v1_cert(b"270105120000Z", tag=0x04)),
    ("no validity", _tlv(0x30, _tlv(0x30, _tlv(0x02, b"\x01") + _tlv(0x30, b"") + _tlv(0x30, b"")))),
    ("a key, not a certificate", KEY),
]

rng = random.Random(16)
GARBAGE = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(60)]
# Garbage that starts like an identity: a SEQUENCE header with a plausible length.
GARBAGE += [b"\x30" + bytes([rng.randrange(1, 0x84)]) + bytes(rng.randrange(256) for _ in range(60))
            for _ in range(60)]

DEVICE = f"""
import binascii, time
from agent import tlsid

def h(s):
    return binascii.unhexlify(s)

CERT = h({CERT.hex()!r})
KEY = h({KEY.hex()!r})
GEN_CERT = h({GEN_CERT.hex()!r})
FAR_CERT = h({FAR_CERT.hex()!r})
V1_CERT = h({V1_CERT.hex()!r})
ORG_CERT = h({ORG_CERT.hex()!r})
NO_CN_CERT = h({NO_CN_CERT.hex()!r})
V1_1999 = h({V1_1999.hex()!r})
V1_GEN = h({V1_GEN.hex()!r})
BAD_IDENTITIES = {[(n, b.hex()) for n, b in BAD_IDENTITIES]!r}
BAD_TIMES = {[(n, b.hex()) for n, b in BAD_TIMES]!r}
GARBAGE = {[b.hex() for b in GARBAGE]!r}
""" + """
IDENTITY = CERT + KEY


def split():
    cert, key = tlsid.split_identity(IDENTITY)
    return [bytes(cert) == CERT, bytes(key) == KEY, len(cert), len(key)]


def split_memoryview():
    cert, key = tlsid.split_identity(memoryview(IDENTITY))
    return [bytes(cert) == CERT, bytes(key) == KEY]


def dated(cert):
    date = tlsid.not_before_date(cert)
    secs = tlsid.not_before(cert)
    return [list(date), secs == time.mktime(tuple(date) + (0, 0))]


def lengths():
    out = []
    for buf in (b"\\x04\\x00", b"\\x04\\x05hello", b"\\x04\\x81\\x80" + b"x" * 128,
                b"\\x04\\x82\\x01\\x00" + b"x" * 256, b"\\x04\\x83\\x00\\x00\\x02xy", b"zz\\x04\\x01q"):
        at = 2 if buf[:2] == b"zz" else 0
        out.append(list(tlsid.der_length(buf, at)))
    return out


def each_refused(items, fn):
    # Every input must end in ValueError; anything else (a result, another
    # exception) is listed with its name.
    wrong = []
    for name, data in items:
        try:
            fn(h(data))
            wrong.append([name, "returned"])
        except ValueError:
            pass
        except Exception as e:
            wrong.append([name, type(e).__name__ + ": " + str(e)])
    return wrong


def truncations(whole, fn):
    wrong = []
    for n in range(len(whole)):
        try:
            fn(whole[:n])
            wrong.append([n, "returned"])
        except ValueError:
            pass
        except Exception as e:
            wrong.append([n, type(e).__name__])
    return wrong


def garbage():
    # Random bytes: split_identity and not_before either refuse with ValueError
    # or (split_identity only) return two parts that make up the input.
    wrong = []
    for i, hx in enumerate(GARBAGE):
        data = h(hx)
        for fn in (tlsid.split_identity, tlsid.not_before):
            try:
                out = fn(data)
                if fn is tlsid.not_before or bytes(out[0]) + bytes(out[1]) != data:
                    wrong.append([i, "returned"])
            except ValueError:
                pass
            except Exception as e:
                wrong.append([i, type(e).__name__])
    return wrong


def _only_value_errors(fn, data):
    try:
        fn(data)
    except ValueError:
        pass
    except Exception:
        return False
    return True


def floors():
    built = tlsid.clock_floor()
    return {
        "built": list(time.gmtime(built)[:6]),
        "older_cert": tlsid.clock_floor(V1_1999) == built,
        "newer_cert": tlsid.clock_floor(None, GEN_CERT) == tlsid.not_before(GEN_CERT),
        "latest_wins": tlsid.clock_floor(V1_GEN, GEN_CERT, CERT) == tlsid.not_before(GEN_CERT),
        "far_ignored": tlsid.clock_floor(FAR_CERT) == built,
        "garbage_ignored": tlsid.clock_floor(b"\\x30\\x05abc", KEY) == built,
    }


case("split", split)
case("split_memoryview", split_memoryview)
case("utc_time", lambda: dated(CERT))
case("generalized_time", lambda: dated(GEN_CERT))
case("v1_no_version", lambda: dated(V1_CERT))
case("v1_generalized", lambda: dated(V1_GEN))
case("before_2000_date", lambda: list(tlsid.not_before_date(V1_1999)))
case("before_2000_clamped", lambda: tlsid.not_before(V1_1999) == time.mktime((2000, 1, 1, 0, 0, 0, 0, 0)))
case("lengths", lengths)
case("bad_identities", lambda: each_refused(BAD_IDENTITIES, tlsid.split_identity))
case("bad_times", lambda: each_refused(BAD_TIMES, tlsid.not_before))
case("truncated_identity", lambda: truncations(IDENTITY, tlsid.split_identity))
case("ca_truncated", lambda: truncations(CERT, tlsid.check_certificate))
# Every malformed identity but the one that is a lone certificate, an identity, a key.
case("ca_bad", lambda: each_refused([b for b in BAD_IDENTITIES if b[0] != "certificate only"]
                                    + [["identity", (CERT + KEY).hex()], ["key", KEY.hex()]],
                                    tlsid.check_certificate))
case("ca_garbage", lambda: [i for i, hx in enumerate(GARBAGE)
                            if not _only_value_errors(tlsid.check_certificate, h(hx))])
case("ca_valid", lambda: tlsid.check_certificate(CERT))
case("truncated_certificate", lambda: truncations(CERT, tlsid.not_before))
case("garbage", garbage)
case("floors", floors)
case("cn", lambda: [tlsid.subject_cn(CERT), tlsid.subject_cn(ORG_CERT), tlsid.subject_cn(NO_CN_CERT)])
case("cn_truncated", lambda: truncations(CERT, tlsid.subject_cn))
case("cn_no_subject", lambda: tlsid.subject_cn(V1_CERT))
case("header_past_end", lambda: tlsid.der_length(b"\\x04\\x00", 1))
case("negative_offset", lambda: tlsid.der_length(b"\\x04\\x00", -1))
case("length_past_end", lambda: tlsid.der_length(b"\\x04\\x05abc", 0))
"""


@pytest.fixture(scope="module")
def results(unit_cases):
    return unit_cases(DEVICE, MODULES)


def _date(d: dt.datetime) -> list[int]:
    return [d.year, d.month, d.day, d.hour, d.minute, d.second]


def test_an_identity_splits_into_the_certificate_and_the_key(results):
    assert results.value("split") == [True, True, len(CERT), len(KEY)]
    assert results.value("split_memoryview") == [True, True]


def test_a_utctime_not_before_is_read_as_the_host_wrote_it(results):
    assert CERT.find(b"\x17\x0d261130081542Z") > 0, "the vector holds a UTCTime"
    assert results.value("utc_time") == [_date(UTC_DATE), True]


def test_a_generalized_time_not_before_is_read_as_the_host_wrote_it(results):
    assert GEN_CERT.find(b"\x18\x0f20510228235958Z") > 0, "the vector holds a GeneralizedTime"
    assert results.value("generalized_time") == [_date(GEN_DATE), True]


def test_a_certificate_without_a_version_field_is_dated_too(results):
    assert results.value("v1_no_version") == [[2027, 1, 5, 12, 0, 0], True]
    assert results.value("v1_generalized") == [[2030, 6, 7, 8, 9, 10], True]


def test_utctime_before_2050_means_the_1900s_from_50_and_seconds_clamp_to_2000(results):
    assert results.value("before_2000_date") == [1999, 1, 1, 0, 0, 0]
    assert results.value("before_2000_clamped") is True


def test_short_and_long_form_lengths(results):
    assert results.value("lengths") == [[2, 0], [2, 5], [3, 128], [4, 256], [5, 2], [2, 1]]


def test_malformed_identities_are_refused_with_value_error(results):
    assert results.value("bad_identities") == []


def test_malformed_times_are_refused_with_value_error(results):
    assert results.value("bad_times") == []


def test_an_identity_cut_at_any_byte_is_refused(results):
    assert results.value("truncated_identity") == []


def test_a_certificate_cut_at_any_byte_is_refused(results):
    assert results.value("truncated_certificate") == []


def test_garbage_never_crashes_the_walker(results):
    assert results.value("garbage") == []


def test_offsets_and_lengths_outside_the_buffer_are_value_errors(results):
    for name in ("header_past_end", "negative_offset", "length_past_end"):
        assert results.error(name)[0] == "ValueError", name


def test_the_subject_common_name_is_read_among_other_attributes(results):
    assert results.value("cn") == ["dev-1", "pump-7", None]
    assert results.value("cn_truncated") == []
    assert results.error("cn_no_subject")[0] == "ValueError"


def test_a_fleet_ca_is_one_certificate_and_anything_else_is_refused(results):
    assert results.value("ca_valid") is None
    assert results.value("ca_truncated") == []
    assert results.value("ca_bad") == []
    assert results.value("ca_garbage") == []


def test_the_clock_floor_is_the_build_date_or_a_later_not_before(results):
    floors = results.value("floors")
    assert floors.pop("built") == [2026, 12, 1, 0, 0, 0]
    assert floors == {k: True for k in floors}, floors


# The host refuses a cert job the device would not run (mpfleet.fleet.keys.check_cert_params
# against the agent's jobschema and split_identity): one list, both sides.
_B64 = __import__("base64").b64encode
CERT_PARAMS = [
    ("valid", {"identity": _B64(IDENTITY).decode()}, True),
    ("valid with trial_wakes 50", {"identity": _B64(IDENTITY).decode(), "trial_wakes": 50}, True),
    ("trial_wakes 1", {"identity": _B64(IDENTITY).decode(), "trial_wakes": 1}, True),
    ("trial_wakes 51", {"identity": _B64(IDENTITY).decode(), "trial_wakes": 51}, False),
    ("trial_wakes 0", {"identity": _B64(IDENTITY).decode(), "trial_wakes": 0}, False),
    ("trial_wakes true", {"identity": _B64(IDENTITY).decode(), "trial_wakes": True}, False),
    ("trial_wakes a string", {"identity": _B64(IDENTITY).decode(), "trial_wakes": "3"}, False),
    ("no identity", {}, False),
    ("identity not a string", {"identity": 5}, False),
    ("identity empty", {"identity": ""}, False),
    ("identity over 4096 characters", {"identity": _B64(IDENTITY + b"\x00" * 3000).decode()}, False),
    ("certificate only", {"identity": _B64(CERT).decode()}, False),
    ("a byte after the key", {"identity": _B64(IDENTITY + b"\x00").decode()}, False),
    ("key first", {"identity": _B64(KEY + CERT).decode()}, False),
    ("not base64", {"identity": "!!!!" * 10}, False),
    # The fleet CA sent along to a device that does not use TLS yet (CERT is self-signed: its own CA).
    ("with its ca", {"identity": _B64(IDENTITY).decode(), "ca": _B64(CERT).decode()}, True),
    ("ca not a string", {"identity": _B64(IDENTITY).decode(), "ca": 5}, False),
    ("ca empty", {"identity": _B64(IDENTITY).decode(), "ca": ""}, False),
    ("ca a key", {"identity": _B64(IDENTITY).decode(), "ca": _B64(KEY).decode()}, False),
    ("ca with a byte after it", {"identity": _B64(IDENTITY).decode(), "ca": _B64(CERT + b"\x00").decode()}, False),
    ("ca twice", {"identity": _B64(IDENTITY).decode(), "ca": _B64(CERT + CERT).decode()}, False),
    ("ca cut short", {"identity": _B64(IDENTITY).decode(), "ca": _B64(CERT[:-1]).decode()}, False),
    ("ca over 4096 characters", {"identity": _B64(IDENTITY).decode(), "ca": "A" * 4100}, False),
    ("ca not base64", {"identity": _B64(IDENTITY).decode(), "ca": "!!!!" * 10}, False),
]
# The host checks more than the device can: the key belongs to the certificate.
OTHER_CERT, OTHER_KEY = _cert(UTC_DATE)
HOST_ONLY = [("another certificate's key", {"identity": _B64(CERT + OTHER_KEY).decode()}, "does not belong"),
             ("a ca that did not issue it", {"identity": _B64(IDENTITY).decode(), "ca": _B64(OTHER_CERT).decode()},
              "not issued by the ca")]

AGREEMENT = f"CERT_PARAMS = {[(n, p) for n, p, _ in CERT_PARAMS]!r}\n" + """
import binascii
from agent import jobschema, tlsid


def device_accepts(p):
    if jobschema.problem("cert", p) is not None:
        return False
    try:
        tlsid.split_identity(binascii.a2b_base64(p["identity"]))
        if p.get("ca") is not None:
            tlsid.check_certificate(binascii.a2b_base64(p["ca"]))
    except ValueError:
        return False
    return True


for name, p in CERT_PARAMS:
    case(name, lambda p=p: device_accepts(p))
"""


def test_the_host_and_the_device_accept_the_same_cert_jobs(unit_cases):
    from mpfleet.fleet.keys import KeyringError, check_cert_params

    device = unit_cases(AGREEMENT, ("lib/agent/tlsid.py", "lib/agent/jobschema.py", "lib/agent/envelope.py"))
    for name, params, valid in CERT_PARAMS:
        try:
            check_cert_params(params)
            host = True
        except KeyringError:
            host = False
        assert (host, device.value(name)) == (valid, valid), name
    for _name, params, why in HOST_ONLY:
        with pytest.raises(KeyringError, match=why):
            check_cert_params(params)


def test_the_host_sends_a_cert_job_only_to_the_device_its_certificate_names():
    from mpfleet.fleet.keys import KeyringError, check_cert_params

    params = {"identity": _B64(IDENTITY).decode()}
    spec = {"all": False, "ids": ["dev-1"], "groups": [], "query": None}
    assert check_cert_params(params, spec) == "dev-1"
    for wrong in ({"ids": ["dev-2"]}, {"ids": ["dev-1", "dev-2"]}, {"groups": ["pumps"]}, {"all": True},
                  {"query": "fw<v2"}):
        with pytest.raises(KeyringError, match="names 'dev-1'"):
            check_cert_params(params, {**spec, **wrong})
