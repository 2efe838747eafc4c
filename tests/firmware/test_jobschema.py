"""The params of each job type (agent/jobschema.py), as units on the MicroPython
unix port: what each type accepts at its edges and the problem it names for
what it refuses. envelope.check_schema asks it once the signature verified
(test_envelope.py checks that the problem reaches the rejection)."""

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MODULES = ("lib/agent/jobschema.py", "lib/agent/envelope.py", "lib/agent/config.py", "lib/agent/jsonfile.py")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _key(seed: int) -> tuple[str, str]:
    raw = Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16], b64url(raw)


KID, KEY = _key(1)
OTHER_KID, OTHER_KEY = _key(2)
NINE_KEYS = dict(_key(s) for s in range(1, 10))

# (case, job type, params, the problem named)
REFUSED = [
    ("config set that is a list", "config", {"set": []}, "set must be an object and unset a list"),
    ("config unset that is an object", "config", {"unset": {}}, "set must be an object and unset a list"),
    ("config with nothing to do", "config", {}, "nothing to set or unset"),
    ("config of an unknown key", "config", {"set": {"colour": "red"}}, "unknown config key colour"),
    ("config of an unknown section key", "config", {"set": {"wifi.channel": 6}}, "unknown config key wifi.channel"),
    ("config unset of an unknown key", "config", {"unset": ["nope"]}, "unknown config key nope"),
    ("config unset of a number", "config", {"unset": [5]}, "config keys must be strings"),
    ("config of the trusted keys", "config", {"set": {"trusted_keys": {}}},
     "trusted_keys is a security setting: keys change through a keys job, exec permission only over USB"),
    ("config unset of exec permission", "config", {"unset": ["exec_allowed"]},
     "exec_allowed is a security setting: keys change through a keys job, exec permission only over USB"),
    ("config trial of 0 wakes", "config", {"set": {"sample_interval_s": 30}, "trial_wakes": 0},
     "trial_wakes must be 1..100"),
    ("config trial of 101 wakes", "config", {"set": {"sample_interval_s": 30}, "trial_wakes": 101},
     "trial_wakes must be 1..100"),
    ("config trial of true", "config", {"set": {"sample_interval_s": 30}, "trial_wakes": True},
     "trial_wakes must be 1..100"),
    ("sample with no sensor", "sample", {"rate_hz": 1, "duration_s": 10}, "sensor must be a sensor name"),
    ("sample of a numbered sensor", "sample", {"sensor": 0, "rate_hz": 1, "duration_s": 10},
     "sensor must be a sensor name"),
    ("sample at 0 Hz", "sample", {"sensor": "adc0", "rate_hz": 0, "duration_s": 10}, "rate_hz must be in (0, 50]"),
    ("sample at 50.5 Hz", "sample", {"sensor": "adc0", "rate_hz": 50.5, "duration_s": 1},
     "rate_hz must be in (0, 50]"),
    ("sample at true Hz", "sample", {"sensor": "adc0", "rate_hz": True, "duration_s": 10},
     "rate_hz must be in (0, 50]"),
    ("sample of 601 readings", "sample", {"sensor": "adc0", "rate_hz": 1, "duration_s": 601},
     "rate_hz * duration_s must be 1..600 readings"),
    ("sample of no duration", "sample", {"sensor": "adc0", "rate_hz": 1, "duration_s": 0},
     "rate_hz * duration_s must be 1..600 readings"),
    ("sample of a duration in text", "sample", {"sensor": "adc0", "rate_hz": 1, "duration_s": "10"},
     "rate_hz * duration_s must be 1..600 readings"),
    ("cancel of nothing", "cancel", {}, "job must be the id of the job to cancel"),
    ("cancel of an empty id", "cancel", {"job": ""}, "job must be the id of the job to cancel"),
    ("cancel of a 65-character id", "cancel", {"job": "j" * 65}, "job must be the id of the job to cancel"),
    ("exec of no code", "exec", {}, "code must be a string"),
    ("exec of code in bytes", "exec", {"code": ["print(1)"]}, "code must be a string"),
    ("exec output past 64 KiB", "exec", {"code": "", "max_output": 65537}, "max_output must be 0..65536"),
    ("exec output below 0", "exec", {"code": "", "max_output": -1}, "max_output must be 0..65536"),
    ("exec output of true", "exec", {"code": "", "max_output": True}, "max_output must be 0..65536"),
    ("keys add that is a list", "keys", {"add": []}, "add must be an object {kid: key} and remove a list of kids"),
    ("keys remove that is a string", "keys", {"remove": KID},
     "add must be an object {kid: key} and remove a list of kids"),
    ("keys with nothing to do", "keys", {}, "nothing to add or remove"),
    ("keys adding nine", "keys", {"add": NINE_KEYS}, "at most 8 keys"),
    ("keys removing nine", "keys", {"remove": [KID] * 9}, "at most 8 keys"),
    ("keys removing a short kid", "keys", {"remove": [KID[:15]]}, "remove must list kids of 16 hex digits"),
    ("keys removing a number", "keys", {"remove": [5]}, "remove must list kids of 16 hex digits"),
    ("keys adding a key under another kid", "keys", {"add": {OTHER_KID: KEY}},
     f"kid {OTHER_KID} does not name its key"),
    ("keys adding a key in standard base64", "keys", {"add": {KID: KEY + "+"}}, f"key {KID} is not base64url"),
    ("keys adding a 31-byte key", "keys", {"add": {KID: b64url(b"\x01" * 31)}}, f"key {KID} is not 32 bytes"),
    ("keys adding a key that is not text", "keys", {"add": {KID: 5}},
     "a key must be a kid and a base64url public key"),
    ("ota size in text", "ota", {"size": "1024"}, "size must be an integer"),
    ("ota chunk of true", "ota", {"chunk": True}, "chunk must be an integer"),
    ("ota window of 1.5", "ota", {"window": 1.5}, "window must be an integer"),
    ("ota sha256 as a number", "ota", {"sha256": 5}, "sha256 must be a string"),
    ("app version as a number", "app", {"version": 2}, "version must be a string"),
    ("app image as a list", "app", {"image": []}, "image must be a string"),
]

# (case, job type, params): accepted
ACCEPTED = [
    ("config set", "config", {"set": {"sample_interval_s": 30}}),
    ("config set of a section key", "config", {"set": {"wifi.ssid": "lab"}}),
    ("config set of a whole section", "config", {"set": {"broker": {"host": "10.0.0.1"}}}),
    ("config unset", "config", {"unset": ["broker.user"]}),
    ("config trial of 1 wake", "config", {"set": {"sample_interval_s": 30}, "trial_wakes": 1}),
    ("config trial of 100 wakes", "config", {"unset": ["groups"], "trial_wakes": 100}),
    ("sample at 50 Hz for 600 readings", "sample", {"sensor": "adc0", "rate_hz": 50, "duration_s": 12}),
    ("sample of one reading", "sample", {"sensor": "adc0", "rate_hz": 0.5, "duration_s": 2}),
    ("cancel", "cancel", {"job": "j" * 64}),
    ("exec with the default output", "exec", {"code": "print(1)"}),
    ("exec of no output", "exec", {"code": "", "max_output": 0}),
    ("exec of 64 KiB output", "exec", {"code": "", "max_output": 65536}),
    ("keys adding one", "keys", {"add": {KID: KEY}}),
    ("keys adding eight", "keys", {"add": dict(list(NINE_KEYS.items())[:8])}),
    ("keys removing one", "keys", {"remove": [OTHER_KID]}),
    ("ota with every typed field", "ota", {"size": 1, "chunk": 4096, "window": 8, "sha256": "ab", "version": "v"}),
    ("app with no params", "app", {}),
    ("reboot with any params", "reboot", {"anything": [1, 2]}),
    ("upload", "upload", {}),
    ("diag", "diag", {}),
]

DEVICE = "from agent import jobschema\n" + "".join(
    f"case({name!r}, lambda: jobschema.problem({kind!r}, {params!r}))\n"
    for name, kind, params, *_ in REFUSED + ACCEPTED)


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


@pytest.mark.parametrize("name, problem", [(r[0], r[3]) for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_params_that_do_not_suit_the_job_type_are_named(device, name, problem):
    assert device.value(name) == problem


@pytest.mark.parametrize("name", [a[0] for a in ACCEPTED])
def test_params_that_suit_the_job_type_pass(device, name):
    assert device.value(name) is None
