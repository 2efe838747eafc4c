# Checking a signed job envelope: mpf1.<kid>.<payload-b64url>.<sig-b64url>.
#
# The checks run in a fixed order and the first failure is the reason given;
# nothing about a job is trusted before its signature is (docs/protocol.md):
#   size, format, trusted kid, signature, targeting, replay, time window, schema.
# Replay and targeting need the device's job state, so they are passed in.

import binascii
import json

from micropython import const

PREFIX = "mpf1"
_SIG_LEN = const(64)
_KEY_LEN = const(32)
_MAX_TIMEOUT_S = const(86400 * 30)

JOB_TYPES = ("config", "reboot", "upload", "diag", "sample", "ota", "app", "cancel", "exec")


class Rejected(Exception):
    """The envelope failed a check; args[0] is the reason."""


def b64url_decode(text):
    if isinstance(text, str):
        text = text.encode()
    for c in text:
        if not (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or c == 45 or c == 95):
            raise ValueError("not base64url")
    std = text.replace(b"-", b"+").replace(b"_", b"/")
    return binascii.a2b_base64(std + b"=" * (-len(std) % 4))


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


def peek_payload(payload_b64):
    """The payload before its signature is checked: only to skip jobs already done."""
    try:
        payload = json.loads(b64url_decode(payload_b64))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


def check_signature(kid, signed, sig_b64, trusted_keys):
    """Rejected unless `kid` is trusted and the signature verifies."""
    key_b64 = trusted_keys.get(kid)
    if key_b64 is None:
        raise Rejected("unknown signing key %s" % kid)
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
    try:
        payload = json.loads(b64url_decode(payload_b64))
    except (ValueError, TypeError):
        raise Rejected("payload is not base64url JSON")
    if not isinstance(payload, dict):
        raise Rejected("payload is not a JSON object")
    return payload


def check_targets(payload, device_id, groups):
    targets = payload.get("targets")
    if not isinstance(targets, list):
        raise Rejected("schema: targets must be a list")
    for t in targets:
        if t == "*" or t == device_id or t in groups:
            return
    raise Rejected("not for this device (targets %s)" % json.dumps(targets)[:80])


def check_time(payload, now, clock_known):
    """nbf/exp, when the device knows the time."""
    if not clock_known:
        return
    nbf = payload.get("nbf")
    exp = payload.get("exp")
    if isinstance(nbf, int) and now < nbf:
        raise Rejected("not yet valid (nbf %d, now %d)" % (nbf, now))
    if isinstance(exp, int) and now >= exp:
        raise Rejected("expired (exp %d, now %d)" % (exp, now))


def check_schema(payload):
    job_id = payload.get("id")
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 64:
        raise Rejected("schema: id must be a string of 1..64 characters")
    seq = payload.get("seq")
    if not isinstance(seq, int) or seq < 1:
        raise Rejected("schema: seq must be a positive integer")
    if payload.get("type") not in JOB_TYPES:
        raise Rejected("unknown job type %s" % json.dumps(payload.get("type"))[:40])
    if not isinstance(payload.get("params", {}), dict):
        raise Rejected("schema: params must be an object")
    for key in ("iat", "nbf", "exp"):
        if key in payload and not isinstance(payload[key], int):
            raise Rejected("schema: %s must be an integer" % key)
    timeout = payload.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or not 0 < timeout <= _MAX_TIMEOUT_S):
        raise Rejected("schema: timeout must be 1..%d seconds" % _MAX_TIMEOUT_S)
