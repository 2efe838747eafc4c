# Checking a signed job envelope: mpf1.<kid>.<payload-b64url>.<sig-b64url>.
#
# The checks run in a fixed order and the first failure is the reason given
# (docs/security.md, "Intake order"):
#
#   size -> format -> trusted kid -> signature over the raw bytes
#        -> payload parsed (bounded depth and size) -> targeting -> replay
#        -> time window -> schema (job type and its params)
#
# Nothing is parsed before its signature verified: the signature covers the
# base64url text, so an unauthenticated envelope costs at most a base64 decode
# of 64 bytes and one verify. Replay and targeting need the device's job
# state, so they are passed in. Every failure is a Rejected with a reason;
# nothing here lets another exception out for anything a sender controls.

import binascii
import json

from micropython import const

PREFIX = "mpf1"
_SIG_LEN = const(64)
_KEY_LEN = const(32)
_KID_LEN = const(16)  # hex digits of a kid (agent.jobschema)
_MAX_TIMEOUT_S = const(86400 * 30)
# JSON nesting a payload may have: the deepest honest one is a config job's
# params.set.sensors[i] (payload > params > set > sensors > item = 5).
MAX_PAYLOAD_DEPTH = const(6)
_MAX_ID = const(64)

JOB_TYPES = ("config", "reboot", "upload", "diag", "sample", "ota", "app", "cancel", "exec", "keys", "cert")


class Rejected(Exception):
    """The envelope failed a check; args: (reason, kid, payload) once the
    signature verified (kid and payload then say who to name), else (reason,)."""


def b64url_decode(text):
    if isinstance(text, str):
        text = text.encode()
    for c in text:
        if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 45 or c == 95):
            raise ValueError("not base64url")
    std = text.replace(b"-", b"+").replace(b"_", b"/")
    return binascii.a2b_base64(std + b"=" * (-len(std) % 4))


def json_depth(data, limit):
    """The nesting depth of JSON text `data` (bytes or str), counting only
    brackets outside strings; stops and returns limit + 1 as soon as it passes
    `limit`. MicroPython's json parser spends memory per level, so text is
    measured before it is parsed: 600 nested lists (1.7 KB) exhaust a 128 KiB
    heap."""
    if isinstance(data, str):
        data = data.encode()
    depth = deepest = 0
    in_string = False
    escaped = False
    for c in data:
        if in_string:
            if escaped:
                escaped = False
            elif c == 92:  # backslash
                escaped = True
            elif c == 34:  # quote
                in_string = False
        elif c == 34:
            in_string = True
        elif c == 91 or c == 123:  # [ {
            depth += 1
            if depth > deepest:
                if depth > limit:
                    return limit + 1
                deepest = depth
        elif c == 93 or c == 125:  # ] }
            depth -= 1
    return deepest


def loads_bounded(data, max_depth):
    """json.loads of text measured first: ValueError for anything too deep or
    not JSON. MemoryError passes through: it is the heap's state, not the
    text's fault, and the caller decides."""
    if json_depth(data, max_depth) > max_depth:
        raise ValueError("nested deeper than %d levels" % max_depth)
    try:
        return json.loads(data)
    except (TypeError, RuntimeError, IndexError):
        raise ValueError("not JSON")


def split(envelope, max_bytes):
    """(kid, signed part, payload b64, signature b64) or Rejected: size and format."""
    if not isinstance(envelope, str):
        raise Rejected("envelope is not a string")
    if len(envelope) > max_bytes:
        raise Rejected("envelope of %d bytes is over the limit of %d" % (len(envelope), max_bytes))
    parts = envelope.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or not parts[1] or not parts[2] or not parts[3]:
        raise Rejected("malformed envelope (expected mpf1.<kid>.<payload>.<sig>)")
    return parts[1], envelope[:len(parts[0]) + len(parts[1]) + len(parts[2]) + 2], parts[2], parts[3]


def check_signature(kid, signed, sig_b64, trusted_keys):
    """Rejected unless `kid` is trusted and the signature verifies."""
    key_b64 = trusted_keys.get(kid)
    if key_b64 is None:
        raise Rejected("unknown signing key %s" % kid[:_KID_LEN])
    try:
        key = b64url_decode(key_b64)
        sig = b64url_decode(sig_b64)
    except ValueError:
        raise Rejected("malformed base64url in signature or trusted key")
    if len(key) != _KEY_LEN or len(sig) != _SIG_LEN:
        raise Rejected("signature or key has the wrong length")
    from agent import ed25519

    if not ed25519.verify(key, signed.encode(), sig):
        raise Rejected("bad signature")


def decode_payload(payload_b64):
    """The authentic payload as a dict (call only after check_signature)."""
    try:
        payload = loads_bounded(b64url_decode(payload_b64), MAX_PAYLOAD_DEPTH)
    except (ValueError, MemoryError) as e:
        # An authentic payload of at most job_max_bytes that does not parse in
        # the heap a verify leaves will never parse: rejected, not retried.
        raise Rejected("payload is not base64url JSON: %s" % e)
    if not isinstance(payload, dict):
        raise Rejected("payload is not a JSON object")
    return payload


def check_targets(payload, device_id, groups):
    targets = payload.get("targets")
    if not isinstance(targets, list):
        raise Rejected("schema: targets must be a list")
    for t in targets:
        if t == "*" or t == device_id or (isinstance(t, str) and t in groups):
            return
    raise Rejected("not for this device")


def check_time(payload, now, clock_known):
    """nbf/exp against `now`, when the device knows the time (the RTC, never
    earlier than the newest signed iat the device verified)."""
    if not clock_known:
        return
    nbf = payload.get("nbf")
    exp = payload.get("exp")
    if _is_int(nbf) and now < nbf:
        raise Rejected("not yet valid (nbf %d, now %d)" % (nbf, now))
    if _is_int(exp) and now >= exp:
        raise Rejected("expired (exp %d, now %d)" % (exp, now))


def _is_int(v):
    return isinstance(v, int) and v is not True and v is not False


def _is_id(v):
    return isinstance(v, str) and 1 <= len(v) <= _MAX_ID


def check_schema(payload):
    """The payload's fields and the params of its job type; Rejected on the first problem."""
    if not _is_id(payload.get("id")):
        raise Rejected("schema: id must be a string of 1..64 characters")
    seq = payload.get("seq")
    if not _is_int(seq) or seq < 1:
        raise Rejected("schema: seq must be a positive integer")
    job_type = payload.get("type")
    if job_type not in JOB_TYPES:
        raise Rejected("unknown job type %s" % json.dumps(job_type)[:40])
    params = payload.get("params", {})
    if not isinstance(params, dict):
        raise Rejected("schema: params must be an object")
    for key in ("iat", "nbf", "exp"):
        if key in payload and not _is_int(payload[key]):
            raise Rejected("schema: %s must be an integer" % key)
    timeout = payload.get("timeout")
    if timeout is not None and (not _is_int(timeout) or not 0 < timeout <= _MAX_TIMEOUT_S):
        raise Rejected("schema: timeout must be 1..%d seconds" % _MAX_TIMEOUT_S)
    # The params checks are loaded only for this, after the signature verified,
    # and unloaded at once: their code is not in the heap during a verify.
    from agent import jobschema
    import agent

    problem = jobschema.problem(job_type, params)
    agent.unload("jobschema", "config")
    if problem:
        raise Rejected("schema: %s params: %s" % (job_type, problem))
