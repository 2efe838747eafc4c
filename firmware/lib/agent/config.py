# Device configuration: /config.json, checked against a schema with defaults.
#
# A bad or missing config never bricks the device: every field that fails its
# check falls back (to the last good config's value, else the default) and the
# problem is reported in the device's state. "Last good" is the config the
# device last reached its broker with: once connected, the wake copies
# /config.json to /config.good.json (if every field passed at load). A
# config that merely parses is not good: a valid but unreachable SSID parses.
#
# Security settings are not config (docs/security.md): the trusted keys and
# exec permission live in /security.json once a `keys` job has run, and no
# `config` job may name them (change_problem). Until then they come from the
# /config.json written at provisioning over USB.

import json

from agent.jsonfile import read_json, write_json

CONFIG_PATH = "/config.json"
GOOD_PATH = "/config.good.json"
SECURITY_PATH = "/security.json"
SECURITY_KEYS = ("trusted_keys", "exec_allowed")
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-"
_MAX_ID = 64


def _is_device_id(v):
    if not isinstance(v, str) or not 1 <= len(v) <= _MAX_ID:
        return False
    for c in v:
        if c not in _ID_CHARS:
            return False
    return True


def _is_bool(v):
    return v is True or v is False


def _int_in(lo, hi):
    def check(v):
        return isinstance(v, int) and not _is_bool(v) and lo <= v <= hi
    return check


def _is_key_map(v):
    if not isinstance(v, dict) or len(v) > 8:
        return False
    for kid in v:
        if not isinstance(kid, str) or not isinstance(v[kid], str) or len(v[kid]) > 64:
            return False
    return True


_SENSOR_KINDS = ("adc", "internal_temp", "dht22", "battery")


def _is_number_in(v, lo, hi):
    return (isinstance(v, int) or isinstance(v, float)) and not _is_bool(v) and lo <= v <= hi


def _is_sensor(s):
    if not isinstance(s, dict) or s.get("kind") not in _SENSOR_KINDS:
        return False
    name = s.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 16:
        return False
    if s["kind"] != "internal_temp" and not _int_in(0, 48)(s.get("pin")):
        return False
    if "scale" in s and not _int_in(0, 6)(s["scale"]):
        return False
    return "divider" not in s or _is_number_in(s["divider"], 0.01, 100)


def _is_sensor_list(v):
    # At most 8 channels: the RTC stage's missing-channel bitmap is one byte.
    if not isinstance(v, list) or len(v) > 8:
        return False
    names = []
    for s in v:
        if not _is_sensor(s) or s["name"] in names:
            return False
        names.append(s["name"])
    return True


def _str_upto(n):
    def check(v):
        return isinstance(v, str) and len(v) <= n
    return check


def _host_name(v):
    return isinstance(v, str) and 1 <= len(v) <= 253


_ROOT_CHARS = _ID_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _is_topic_root(v):
    # 1 to 8 levels of A-Z, a-z, 0-9, _ and - joined by "/", at most 64 characters
    # (the host's mpfleet.protocol.topics.check_topic_root: one rule on both sides).
    if not isinstance(v, str) or not 1 <= len(v) <= 64:
        return False
    levels = v.split("/")
    if len(levels) > 8:
        return False
    for level in levels:
        if not level:
            return False
        for c in level:
            if c not in _ROOT_CHARS:
                return False
    return True


def _opt_str_upto(n):
    def check(v):
        return v is None or (isinstance(v, str) and len(v) <= n)
    return check


def _is_group_list(v):
    if not isinstance(v, list) or len(v) > 16:
        return False
    for g in v:
        if not _is_device_id(g):
            return False
    return True


# (section, key, check, default). Section None is the top level.
SCHEMA = (
    (None, "device_id", _is_device_id, None),
    (None, "groups", _is_group_list, []),
    (None, "sample_interval_s", _int_in(1, 86400), 60),
    (None, "upload_every_wakes", _int_in(1, 10000), 30),
    (None, "upload_watermark", _int_in(1, 1000000), 500),
    (None, "wake_budget_ms", _int_in(1000, 600000), 20000),
    (None, "wdt_timeout_ms", _int_in(1000, 600000), 30000),
    (None, "sensors", _is_sensor_list, [
        {"name": "adc0", "kind": "adc", "pin": 34, "scale": 3},
        {"name": "mcu_temp", "kind": "internal_temp", "scale": 1},
    ]),
    (None, "trusted_keys", _is_key_map, {}),
    (None, "exec_allowed", _is_bool, False),
    ("wifi", "ssid", _str_upto(32), ""),
    ("wifi", "password", _str_upto(64), ""),
    ("wifi", "connect_timeout_ms", _int_in(100, 60000), 10000),
    ("ntp", "host", _str_upto(253), ""),
    ("ntp", "port", _int_in(1, 65535), 123),
    ("broker", "host", _host_name, "127.0.0.1"),
    ("broker", "port", _int_in(1, 65535), 1883),
    ("broker", "user", _opt_str_upto(128), None),
    ("broker", "password", _opt_str_upto(128), None),
    ("broker", "tls", _is_bool, False),
    # The name the broker's certificate must carry; None: broker.host (agent.tlsid).
    ("broker", "tls_hostname", _opt_str_upto(253), None),
    ("broker", "keepalive_s", _int_in(0, 65535), 60),
    ("broker", "timeout_ms", _int_in(100, 60000), 5000),
    # Where this fleet's topics live (<root>/<device-id>/<leaf>): fleets that share one
    # broker use different roots and never see each other's devices.
    ("broker", "topic_root", _is_topic_root, "mpf/v1"),
    # How long a connected wake waits for its retained job queue after subscribing.
    ("broker", "queue_wait_ms", _int_in(10, 10000), 100),
    ("limits", "log_max_bytes", _int_in(8192, 4 * 1024 * 1024), 256 * 1024),
    ("limits", "job_max_bytes", _int_in(256, 65536), 4096),
    ("limits", "upload_batch", _int_in(1, 1000), 200),
    # Samples staged in RTC memory before they go to flash; 0: as many as fit
    # (fewest flash writes). Lower it to lose fewer samples to a power loss.
    ("limits", "stage_max_samples", _int_in(0, 2000), 0),
)


def _read(path):
    data, error = read_json(path)
    if error is None and not isinstance(data, dict):
        return None, "not a JSON object"
    return data, error


def _get(data, section, key):
    if data is None:
        return False, None
    if section is not None:
        data = data.get(section)
        if not isinstance(data, dict):
            return False, None
    if key not in data:
        return False, None
    return True, data[key]


def validate(data, fallback, default_id):
    """Build a complete config from `data`; returns (config, problems)."""
    cfg = {"wifi": {}, "ntp": {}, "broker": {}, "limits": {}}
    problems = []
    if data is not None:
        for section in cfg:
            if section in data and not isinstance(data[section], dict):
                problems.append("%s: must be an object, not %s" % (section, json.dumps(data[section])[:40]))
    for section, key, check, default in SCHEMA:
        name = key if section is None else section + "." + key
        present, value = _get(data, section, key)
        if present and not check(value):
            problems.append("%s: invalid value %s" % (name, json.dumps(value)[:40]))
            present = False
        if not present:
            ok, value = _get(fallback, section, key)
            if not ok or not check(value):
                value = default
        if key == "device_id" and value is None:
            value = default_id
        target = cfg if section is None else cfg[section]
        target[key] = value
    return cfg, problems


def load(default_id, path=CONFIG_PATH, good_path=GOOD_PATH):
    """Load and check the config; returns (config, problems).

    The device id defaults to `default_id` (the MAC in hex)."""
    data, error = _read(path)
    good, _ = _read(good_path)
    problems = []
    if error is not None:
        problems.append("%s: %s%s" % (path, error, ", using the last good config" if good else ", using defaults"))
    cfg, field_problems = validate(data, good, default_id)
    problems.extend(field_problems)
    security, error = _read(SECURITY_PATH)
    if security is not None:
        sec, sec_problems = validate(security, None, default_id)
        for key in SECURITY_KEYS:
            cfg[key] = sec[key]
        problems.extend(sec_problems)
    return cfg, problems


def restore_good(path=CONFIG_PATH, good_path=GOOD_PATH):
    """Put the last good config back (a connectivity trial failed); False if there is none."""
    good, error = _read(good_path)
    if error is not None:
        return False
    write_json(path, good)
    return True


def is_connectivity(key):
    """Whether changing `key` can cost the device its link to the broker."""
    return key.startswith("wifi") or key.startswith("broker") or key == "device_id"


def change_problem(key):
    """Why a config job may not set (or unset) `key`, or None (checked before it runs)."""
    if not isinstance(key, str):
        return "config keys must be strings"
    head = key.split(".")[0]
    if head in SECURITY_KEYS:
        return ("%s is a security setting: keys change through a keys job, exec permission only over USB"
                % head)
    section = None if "." not in key else head
    name = key if section is None else key[len(head) + 1:]
    for s, k, _check, _default in SCHEMA:
        if section is None and (k == name and s is None or s == name):
            return None
        if section is not None and s == section and k == name:
            return None
    return "unknown config key %s" % key[:40]


def security_settings(cfg):
    return {"trusted_keys": cfg["trusted_keys"], "exec_allowed": cfg["exec_allowed"]}


def write_security(settings):
    write_json(SECURITY_PATH, settings)
