# The params of each job type, checked after the envelope's signature verified
# and before the job runs (agent.envelope.check_schema): a job whose params are
# wrong is REJECTED with the problem and never reaches its handler. Loaded only
# for the check and unloaded right after, so its code is not in the heap while
# signatures are verified.

import binascii

from micropython import const

from agent.envelope import b64url_decode

MAX_KEYS = const(8)  # trusted keys a device holds at most
_KID_LEN = const(16)
_KEY_LEN = const(32)
_MAX_ID = const(64)
_MAX_IDENTITY_B64 = const(4096)


def problem(job_type, params):
    """None when `params` suit `job_type`, else what is wrong."""
    check = _PARAM_CHECKS.get(job_type)
    return None if check is None else check(params)


def _is_int(v):
    return isinstance(v, int) and v is not True and v is not False


def _is_number(v):
    return (isinstance(v, int) or isinstance(v, float)) and v is not True and v is not False


def _is_id(v):
    return isinstance(v, str) and 1 <= len(v) <= _MAX_ID


def _config_params(p):
    from agent import config

    sets = p.get("set", {})
    unsets = p.get("unset", [])
    if not isinstance(sets, dict) or not isinstance(unsets, list):
        return "set must be an object and unset a list"
    if not sets and not unsets:
        return "nothing to set or unset"
    for key in sets:
        problem = config.change_problem(key)
        if problem:
            return problem
    for key in unsets:
        problem = config.change_problem(key)
        if problem:
            return problem
    trial = p.get("trial_wakes")
    if trial is not None and (not _is_int(trial) or not 1 <= trial <= 100):
        return "trial_wakes must be 1..100"
    return None


def _sample_params(p):
    rate = p.get("rate_hz")
    duration = p.get("duration_s")
    if not isinstance(p.get("sensor"), str):
        return "sensor must be a sensor name"
    if not _is_number(rate) or not 0 < rate <= 50:
        return "rate_hz must be in (0, 50]"
    if not _is_number(duration) or not 0 < duration * rate <= 600:
        return "rate_hz * duration_s must be 1..600 readings"
    return None


def _cancel_params(p):
    return None if _is_id(p.get("job")) else "job must be the id of the job to cancel"


def _exec_params(p):
    if not isinstance(p.get("code"), str):
        return "code must be a string"
    out = p.get("max_output", 1024)
    if not _is_int(out) or not 0 <= out <= 65536:
        return "max_output must be 0..65536"
    return None


def _keys_params(p):
    add = p.get("add", {})
    remove = p.get("remove", [])
    if not isinstance(add, dict) or not isinstance(remove, list):
        return "add must be an object {kid: key} and remove a list of kids"
    if not add and not remove:
        return "nothing to add or remove"
    if len(add) > MAX_KEYS or len(remove) > MAX_KEYS:
        return "at most %d keys" % MAX_KEYS
    for kid in remove:
        if not isinstance(kid, str) or len(kid) != _KID_LEN:
            return "remove must list kids of %d hex digits" % _KID_LEN
    for kid in add:
        problem = key_problem(kid, add[kid])
        if problem:
            return problem
    return None


def key_problem(kid, key_b64):
    """Why (kid, public key) cannot be trusted, or None: the kid must be the first
    16 hex digits of the key's SHA-256 (as the host names keys)."""
    import hashlib

    if not isinstance(kid, str) or not isinstance(key_b64, str):
        return "a key must be a kid and a base64url public key"
    try:
        raw = b64url_decode(key_b64)
    except ValueError:
        return "key %s is not base64url" % kid[:_KID_LEN]
    if len(raw) != _KEY_LEN:
        return "key %s is not 32 bytes" % kid[:_KID_LEN]
    if binascii.hexlify(hashlib.sha256(raw).digest()[:8]).decode() != kid:
        return "kid %s does not name its key" % kid[:_KID_LEN]
    return None


def _cert_params(p):
    # The identity's DER is checked by the handler (agent.tlsid.split_identity).
    identity = p.get("identity")
    if not isinstance(identity, str) or not 1 <= len(identity) <= _MAX_IDENTITY_B64:
        return "identity must be the base64 of certificate + key DER, at most %d characters" % _MAX_IDENTITY_B64
    trial = p.get("trial_wakes")
    if trial is not None and (not _is_int(trial) or not 1 <= trial <= 50):
        return "trial_wakes must be 1..50"
    # The fleet CA, for a device that does not use TLS yet (agent.handlers.run_cert).
    ca = p.get("ca")
    if ca is not None and (not isinstance(ca, str) or not 1 <= len(ca) <= _MAX_IDENTITY_B64):
        return "ca must be the base64 of the fleet CA's certificate DER, at most %d characters" % _MAX_IDENTITY_B64
    return None


def _no_params(p):
    return None


def _update_params(p):
    # ota and app check their params against the image they fetch (agent.ota,
    # agent.appupdate); here only the types those modules rely on.
    for key in ("size", "chunk", "window"):
        if key in p and not _is_int(p[key]):
            return "%s must be an integer" % key
    for key in ("sha256", "version", "image"):
        if key in p and not isinstance(p[key], str):
            return "%s must be a string" % key
    return None


_PARAM_CHECKS = {
    "config": _config_params, "sample": _sample_params, "cancel": _cancel_params, "exec": _exec_params,
    "keys": _keys_params, "reboot": _no_params, "upload": _no_params, "diag": _no_params,
    "ota": _update_params, "app": _update_params, "cert": _cert_params,
}
