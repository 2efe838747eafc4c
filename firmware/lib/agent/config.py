# Device configuration: /config.json, checked against a schema with defaults.
#
# A bad or missing config never bricks the device: every field that fails its
# check falls back (to the last good config's value, else the default) and the
# problem is reported in the device's state; a config that parses and passes is
# copied to /config.good.json so that a later broken write can be survived.

import json

CONFIG_PATH = "/config.json"
GOOD_PATH = "/config.good.json"
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_-"
_MAX_ID = 64


def _is_device_id(v):
    if not isinstance(v, str) or not 1 <= len(v) <= _MAX_ID:
        return False
    for c in v:
        if c not in _ID_CHARS:
            return False
    return True


def _is_str(v):
    return isinstance(v, str)


def _is_opt_str(v):
    return v is None or isinstance(v, str)


def _is_bool(v):
    return v is True or v is False


def _int_in(lo, hi):
    def check(v):
        return isinstance(v, int) and not _is_bool(v) and lo <= v <= hi
    return check


def _is_str_list(v):
    if not isinstance(v, list):
        return False
    for x in v:
        if not _is_str(x):
            return False
    return True


def _is_key_map(v):
    if not isinstance(v, dict):
        return False
    for kid in v:
        if not isinstance(kid, str) or not isinstance(v[kid], str):
            return False
    return True


_SENSOR_KINDS = ("adc", "internal_temp", "dht22", "battery")


def _is_sensor_list(v):
    if not isinstance(v, list) or len(v) > 8:
        return False
    for s in v:
        if not isinstance(s, dict) or s.get("kind") not in _SENSOR_KINDS or not _is_str(s.get("name")):
            return False
        if s["kind"] != "internal_temp" and not _int_in(0, 48)(s.get("pin")):
            return False
    return True


# (section, key, check, default). Section None is the top level.
SCHEMA = (
    (None, "device_id", _is_device_id, None),
    (None, "groups", _is_str_list, []),
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
    ("wifi", "ssid", _is_str, ""),
    ("wifi", "password", _is_str, ""),
    ("wifi", "connect_timeout_ms", _int_in(100, 60000), 10000),
    ("ntp", "host", _is_str, ""),
    ("ntp", "port", _int_in(1, 65535), 123),
    ("broker", "host", _is_str, "127.0.0.1"),
    ("broker", "port", _int_in(1, 65535), 1883),
    ("broker", "user", _is_opt_str, None),
    ("broker", "password", _is_opt_str, None),
    ("broker", "tls", _is_bool, False),
    ("broker", "keepalive_s", _int_in(0, 65535), 60),
    ("broker", "timeout_ms", _int_in(100, 60000), 5000),
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
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        return None, "missing"
    except ValueError:
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return data, None


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

    The device id defaults to `default_id` (the MAC in hex).
    """
    data, error = _read(path)
    good, _ = _read(good_path)
    problems = []
    if error is not None:
        problems.append("%s: %s%s" % (path, error, ", using the last good config" if good else ", using defaults"))
    cfg, field_problems = validate(data, good, default_id)
    problems.extend(field_problems)
    if data is not None and not field_problems:
        _save_if_changed(good_path, data, good)
    return cfg, problems


def _save_if_changed(path, data, current):
    if current == data:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    import os

    os.rename(tmp, path)
