"""The signed job envelope's checks (agent/envelope.py), as units on the
MicroPython unix port: size and format, base64url, the signature over the raw
text, the bounded JSON parse, targeting, the time window and the schema, each
rejection with its reason. The params of each job type are test_jobschema.py's."""

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MODULES = ("lib/agent/envelope.py", "lib/agent/jobschema.py", "lib/agent/config.py", "lib/agent/jsonfile.py",
           "lib/agent/ed25519.py", "lib/agent/sha512.py")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = PRIVATE.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
KID = hashlib.sha256(PUBLIC).hexdigest()[:16]
TRUSTED = {KID: b64url(PUBLIC)}
PAYLOAD = b64url(json.dumps({"id": "j1", "seq": 1, "type": "reboot", "targets": ["*"]}).encode())
SIGNED = f"mpf1.{KID}.{PAYLOAD}"
SIG = b64url(PRIVATE.sign(SIGNED.encode()))
ENVELOPE = f"{SIGNED}.{SIG}"
OTHER_SIG = b64url(PRIVATE.sign(b"another message"))  # a good signature, of something else
TAMPERED = SIGNED[:-1] + ("B" if SIGNED[-1] == "A" else "A")  # one character of the payload changed
GOOD_JOB = {"id": "j1", "seq": 1, "type": "reboot"}


def job(**fields):
    """GOOD_JOB with `fields` changed (None: removed), as a device-side literal."""
    out = dict(GOOD_JOB)
    for key, value in fields.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return repr(out)


def b64(obj) -> str:
    return b64url(json.dumps(obj).encode())


def decoding(payload_b64: str) -> str:
    """The device call that decodes this payload."""
    return f"envelope.decode_payload({payload_b64!r})"


# (case, the call on the device, the reason its Rejected gives)
REJECTIONS = [
    # size and format
    ("an envelope that is not a string", "envelope.split(ENVELOPE.encode(), 4096)", "envelope is not a string"),
    ("an envelope one character over the limit", "envelope.split(ENVELOPE, len(ENVELOPE) - 1)",
     f"envelope of {len(ENVELOPE)} bytes is over the limit of {len(ENVELOPE) - 1}"),
    ("another prefix", "envelope.split('mpf2' + ENVELOPE[4:], 4096)",
     "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    ("three parts", "envelope.split(SIGNED, 4096)", "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    ("five parts", "envelope.split(ENVELOPE + '.x', 4096)",
     "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    ("an empty kid", "envelope.split('mpf1..' + PAYLOAD + '.' + SIG, 4096)",
     "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    ("an empty payload", "envelope.split('mpf1.' + KID + '..' + SIG, 4096)",
     "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    ("an empty signature", "envelope.split(SIGNED + '.', 4096)",
     "malformed envelope (expected mpf1.<kid>.<payload>.<sig>)"),
    # the signature
    ("an unknown kid", "envelope.check_signature('0123456789abcdef0123', SIGNED, SIG, TRUSTED)",
     "unknown signing key 0123456789abcdef"),
    ("a signature in standard base64", "envelope.check_signature(KID, SIGNED, SIG.replace('-', '+') + '+', TRUSTED)",
     "malformed base64url in signature or trusted key"),
    ("a padded signature", "envelope.check_signature(KID, SIGNED, SIG + '==', TRUSTED)",
     "malformed base64url in signature or trusted key"),
    ("a signature of a length no base64 has", "envelope.check_signature(KID, SIGNED, SIG + 'AAA', TRUSTED)",
     "malformed base64url in signature or trusted key"),
    ("a trusted key that is not base64url", "envelope.check_signature(KID, SIGNED, SIG, {KID: 'not base64!'})",
     "malformed base64url in signature or trusted key"),
    ("a 63-byte signature", "envelope.check_signature(KID, SIGNED, b64url(SIG_RAW[:63]), TRUSTED)",
     "signature or key has the wrong length"),
    ("a 31-byte trusted key", "envelope.check_signature(KID, SIGNED, SIG, {KID: b64url(KEY_RAW[:31])})",
     "signature or key has the wrong length"),
    ("a signature of another message", "envelope.check_signature(KID, SIGNED, OTHER_SIG, TRUSTED)", "bad signature"),
    ("a payload changed after signing", "envelope.check_signature(KID, TAMPERED, SIG, TRUSTED)",
     "bad signature"),
    # the payload
    ("a payload that is not base64url", "envelope.decode_payload('e30=')",
     "payload is not base64url JSON: not base64url"),
    ("a payload nested seven deep", decoding(b64({"a": [[[[[{}]]]]]})),
     "payload is not base64url JSON: nested deeper than 6 levels"),
    ("a payload of 600 nested lists", decoding(b64url(b"[" * 600 + b"]" * 600)),
     "payload is not base64url JSON: nested deeper than 6 levels"),
    ("a payload that is not JSON", decoding(b64url(b'{"id": ')),
     "payload is not base64url JSON: syntax error in JSON"),
    ("a payload that is a list", decoding(b64([])), "payload is not a JSON object"),
    ("a payload that is a string", decoding(b64("job")), "payload is not a JSON object"),
    # targeting
    ("no targets", "envelope.check_targets({}, 'dev1', ['lab'])", "schema: targets must be a list"),
    ("targets that are a string", "envelope.check_targets({'targets': 'dev1'}, 'dev1', [])",
     "schema: targets must be a list"),
    ("another device and another group",
     "envelope.check_targets({'targets': ['dev2', 'field', 5, ['lab']]}, 'dev1', ['lab'])", "not for this device"),
    # the time window
    ("before nbf", "envelope.check_time({'nbf': 200}, 199, True)", "not yet valid (nbf 200, now 199)"),
    ("at exp", "envelope.check_time({'exp': 200}, 200, True)", "expired (exp 200, now 200)"),
    ("after exp", "envelope.check_time({'nbf': 100, 'exp': 200}, 300, True)", "expired (exp 200, now 300)"),
    # the schema
    ("no id", f"envelope.check_schema({job(id=None)})", "schema: id must be a string of 1..64 characters"),
    ("an empty id", f"envelope.check_schema({job(id='')})", "schema: id must be a string of 1..64 characters"),
    ("a 65-character id", f"envelope.check_schema({job(id='j' * 65)})",
     "schema: id must be a string of 1..64 characters"),
    ("a numeric id", f"envelope.check_schema({job(id=7)})", "schema: id must be a string of 1..64 characters"),
    ("no seq", f"envelope.check_schema({job(seq=None)})", "schema: seq must be a positive integer"),
    ("seq 0", f"envelope.check_schema({job(seq=0)})", "schema: seq must be a positive integer"),
    ("seq true", f"envelope.check_schema({job(seq=True)})", "schema: seq must be a positive integer"),
    ("seq 1.0", f"envelope.check_schema({job(seq=1.0)})", "schema: seq must be a positive integer"),
    ("seq as text", f"envelope.check_schema({job(seq='1')})", "schema: seq must be a positive integer"),
    ("an unknown type", f"envelope.check_schema({job(type='frobnicate')})", 'unknown job type "frobnicate"'),
    ("no type", f"envelope.check_schema({job(type=None)})", "unknown job type null"),
    ("a long unknown type", f"envelope.check_schema({job(type='x' * 100)})", "unknown job type " + '"' + "x" * 39),
    ("params that are a list", f"envelope.check_schema({job(params=[])})", "schema: params must be an object"),
    ("iat as text", f"envelope.check_schema({job(iat='now')})", "schema: iat must be an integer"),
    ("nbf 1.5", f"envelope.check_schema({job(nbf=1.5)})", "schema: nbf must be an integer"),
    ("exp true", f"envelope.check_schema({job(exp=True)})", "schema: exp must be an integer"),
    ("timeout 0", f"envelope.check_schema({job(timeout=0)})", "schema: timeout must be 1..2592000 seconds"),
    ("timeout past 30 days", f"envelope.check_schema({job(timeout=2592001)})",
     "schema: timeout must be 1..2592000 seconds"),
    ("timeout as text", f"envelope.check_schema({job(timeout='5')})", "schema: timeout must be 1..2592000 seconds"),
    ("params wrong for the type", f"envelope.check_schema({job(type='cancel', params={})})",
     "schema: cancel params: job must be the id of the job to cancel"),
]

# (case, the call on the device, what it returns)
ACCEPTED = [
    ("a good envelope", "list(envelope.split(ENVELOPE, 4096))", [KID, SIGNED, PAYLOAD, SIG]),
    ("an envelope at the limit", "envelope.split(ENVELOPE, len(ENVELOPE))[0]", KID),
    ("a good signature", "envelope.check_signature(KID, SIGNED, SIG, TRUSTED)", None),
    ("a good payload", "envelope.decode_payload(PAYLOAD)", {"id": "j1", "seq": 1, "type": "reboot", "targets": ["*"]}),
    ("a payload nested six deep", decoding(b64({"a": [[[[{}]]]]})), {"a": [[[[{}]]]]}),
    ("every device", "envelope.check_targets({'targets': ['*']}, 'dev1', [])", None),
    ("this device", "envelope.check_targets({'targets': ['dev2', 'dev1']}, 'dev1', [])", None),
    ("one of its groups", "envelope.check_targets({'targets': ['lab']}, 'dev1', ['field', 'lab'])", None),
    ("at nbf", "envelope.check_time({'nbf': 200}, 200, True)", None),
    ("just before exp", "envelope.check_time({'exp': 200}, 199, True)", None),
    ("an expired job on an unknown clock", "envelope.check_time({'exp': 200}, 300, False)", None),
    ("a window of booleans", "envelope.check_time({'nbf': True, 'exp': False}, 100, True)", None),
    ("a good job", f"envelope.check_schema({job()})", None),
    ("a 64-character id", f"envelope.check_schema({job(id='j' * 64)})", None),
    ("every field", f"envelope.check_schema({job(iat=1, nbf=2, exp=3, timeout=2592000, params={})})", None),
]

DEVICE = f"""
import binascii, sys
from agent import envelope

ENVELOPE = {ENVELOPE!r}
SIGNED = {SIGNED!r}
PAYLOAD = {PAYLOAD!r}
SIG = {SIG!r}
OTHER_SIG = {OTHER_SIG!r}
TAMPERED = {TAMPERED!r}
KID = {KID!r}
TRUSTED = {TRUSTED!r}
SIG_RAW = envelope.b64url_decode(SIG)
KEY_RAW = envelope.b64url_decode(TRUSTED[KID])


def b64url(raw):
    return binascii.b2a_base64(raw).decode().strip().replace("+", "-").replace("/", "_").rstrip("=")


def hx(raw):
    return binascii.hexlify(raw).decode()


def unloaded_after_check():
    envelope.check_schema({job(type="config", params={"set": {"sample_interval_s": 30}})})
    return [name for name in ("agent.jobschema", "agent.config") if name in sys.modules]


def depth(text, limit):
    return [envelope.json_depth(text, limit), envelope.json_depth(text.encode(), limit)]
""" + "".join(f"case({name!r}, lambda: {call})\n" for name, call, _ in REJECTIONS + ACCEPTED) + r"""
case("b64url of every alphabet edge", lambda: hx(envelope.b64url_decode("AZaz09-_")))
case("b64url of bytes", lambda: hx(envelope.b64url_decode(b"AQID")))
case("b64url without padding", lambda: [hx(envelope.b64url_decode(t)) for t in ("AQ", "AQI", "AQID")])
case("b64url of nothing", lambda: hx(envelope.b64url_decode("")))
for name, text in (("+", "ab+c"), ("/", "ab/c"), ("=", "AQ=="), ("a space", "AQ ID"), ("a newline", "AQID\n"),
                   ("non-ASCII", "AQ\u00e9")):
    case("b64url with " + name, lambda: envelope.b64url_decode(text))
case("depth of a flat object", lambda: depth('{"a": 1}', 6))
case("depth of nothing nested", lambda: depth('"text"', 6))
case("depth of nested lists and objects", lambda: depth('{"a": [{"b": []}, []]}', 6))
case("depth ignores brackets in strings", lambda: depth('["[[[{{{", "]]]"]', 6))
case("depth ignores an escaped quote", lambda: depth('["\\"[[[", []]', 6))
case("depth stops past the limit", lambda: depth("[" * 600 + "]" * 600, 6))
case("depth of unbalanced closers", lambda: depth("]]]", 6))
case("loads_bounded too deep", lambda: envelope.loads_bounded("[[[]]]", 2))
case("loads_bounded at the limit", lambda: envelope.loads_bounded("[[1]]", 2))
case("loads_bounded not JSON", lambda: envelope.loads_bounded("{", 6))
case("unloaded after the check", unloaded_after_check)
"""


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


@pytest.mark.parametrize("name, reason", [(n, r) for n, _, r in REJECTIONS], ids=[n for n, _, _ in REJECTIONS])
def test_a_bad_envelope_is_rejected_with_its_reason(device, name, reason):
    assert device.error(name) == ("Rejected", reason)


@pytest.mark.parametrize("name, expected", [(n, e) for n, _, e in ACCEPTED], ids=[n for n, _, _ in ACCEPTED])
def test_a_good_envelope_passes(device, name, expected):
    assert device.value(name) == expected


def test_the_signed_part_is_the_envelope_up_to_the_last_dot(device):
    assert device.value("a good envelope")[1] == ENVELOPE.rsplit(".", 1)[0]


def test_b64url_decodes_its_whole_alphabet(device):
    assert device.value("b64url of every alphabet edge") == base64.urlsafe_b64decode("AZaz09-_").hex()


def test_b64url_decodes_bytes_as_text(device):
    assert device.value("b64url of bytes") == "010203"


def test_b64url_needs_no_padding(device):
    assert device.value("b64url without padding") == ["01", "0102", "010203"]


def test_b64url_of_nothing_is_nothing(device):
    assert device.value("b64url of nothing") == ""


@pytest.mark.parametrize("name", ["+", "/", "=", "a space", "a newline", "non-ASCII"])
def test_b64url_refuses_what_is_not_in_its_alphabet(device, name):
    assert device.error("b64url with " + name) == ("ValueError", "not base64url")


@pytest.mark.parametrize("name, expected", [
    ("depth of a flat object", 1),
    ("depth of nothing nested", 0),
    ("depth of nested lists and objects", 4),
    ("depth ignores brackets in strings", 1),
    ("depth ignores an escaped quote", 2),
    ("depth of unbalanced closers", 0),
])
def test_json_depth_counts_brackets_outside_strings_in_text_and_bytes(device, name, expected):
    assert device.value(name) == [expected, expected]


def test_json_depth_stops_one_past_the_limit(device):
    assert device.value("depth stops past the limit") == [7, 7]


def test_loads_bounded_refuses_text_nested_past_the_limit(device):
    assert device.error("loads_bounded too deep") == ("ValueError", "nested deeper than 2 levels")


def test_loads_bounded_parses_text_at_the_limit(device):
    assert device.value("loads_bounded at the limit") == [[1]]


def test_loads_bounded_refuses_what_is_not_json_with_a_value_error(device):
    assert device.error("loads_bounded not JSON")[0] == "ValueError"


def test_the_params_checks_are_unloaded_after_the_schema_check(device):
    assert device.value("unloaded after the check") == []
