"""The device config: schema defaults, bad values fall back, a broken file never bricks."""

import json

from conftest import firmware_files

SHOW_CONFIG = """
import json, sys
sys.path.append("/lib")
from agent import config
cfg, problems = config.load("240ac4000001")
print("CFG", json.dumps(cfg))
print("PROBLEMS", json.dumps(problems))
"""


def _run(run_firmware, new_board, files, vb=None):
    vb = vb or new_board()
    payload = firmware_files(("lib/agent/__init__.py", "lib/agent/config.py", "lib/agent/jsonfile.py"))
    payload.update(files)
    rec = run_firmware(SHOW_CONFIG, board=vb, files=payload)
    cfg = json.loads(rec.output.split("CFG ")[1].splitlines()[0])
    problems = json.loads(rec.output.split("PROBLEMS ")[1].splitlines()[0])
    return vb, cfg, problems


def test_missing_config_gives_defaults_and_the_mac_as_id(run_firmware, new_board):
    _, cfg, problems = _run(run_firmware, new_board, {})
    assert cfg["device_id"] == "240ac4000001"
    assert cfg["sample_interval_s"] == 60 and cfg["broker"]["port"] == 1883
    assert problems == ["/config.json: missing, using defaults"]


def test_valid_config_is_used_but_is_not_last_good_before_the_broker_is_reached(run_firmware, new_board):
    """Last good is the config the device last reached its broker with (issue 12:
    a valid but unreachable SSID was remembered as good and stranded the device)."""
    good = {"device_id": "pump-7", "sample_interval_s": 30, "wifi": {"ssid": "site", "password": "pw"}}
    vb, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps(good).encode()})
    assert cfg["device_id"] == "pump-7" and cfg["sample_interval_s"] == 30 and cfg["wifi"]["ssid"] == "site"
    assert problems == []
    assert vb.fs_get("/config.good.json") is None


def _with_good(good: dict) -> dict:
    return {"/config.good.json": json.dumps(good).encode()}


def test_bad_field_falls_back_to_last_good_value(run_firmware, new_board):
    good = {"device_id": "pump-7", "sample_interval_s": 30}
    bad = {"device_id": "Pump 7!", "sample_interval_s": -5, "broker": {"port": "x"}}
    _, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps(bad).encode(), **_with_good(good)})
    assert cfg["device_id"] == "pump-7" and cfg["sample_interval_s"] == 30 and cfg["broker"]["port"] == 1883
    assert len(problems) == 3 and any("sample_interval_s" in p for p in problems)


def test_a_section_that_is_not_an_object_is_a_problem(run_firmware, new_board):
    _, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps({"wifi": "lab"}).encode()})
    assert cfg["wifi"]["ssid"] == "" and any(p.startswith("wifi: must be an object") for p in problems)


def test_sensors_are_checked_field_by_field(run_firmware, new_board):
    vb = new_board()
    for sensors in ([{"kind": "adc", "name": "a", "pin": "x"}], [{"kind": "adc", "name": "a", "pin": 34, "scale": 9}],
                    [{"kind": "adc", "name": "a", "pin": 34}, {"kind": "adc", "name": "a", "pin": 35}],
                    [{"kind": "battery", "name": "b", "pin": 35, "divider": 0}]):
        _, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps({"sensors": sensors}).encode()},
                                vb=vb)
        assert any(p.startswith("sensors: invalid value") for p in problems), sensors
        assert cfg["sensors"][0]["name"] == "adc0", "the default sensors, not the bad ones"


def test_security_settings_come_from_security_json_once_it_exists(run_firmware, new_board):
    files = {"/config.json": json.dumps({"trusted_keys": {"a" * 16: "k"}, "exec_allowed": True}).encode(),
             "/security.json": json.dumps({"trusted_keys": {"b" * 16: "k"}, "exec_allowed": False}).encode()}
    _, cfg, _ = _run(run_firmware, new_board, files)
    assert cfg["trusted_keys"] == {"b" * 16: "k"} and cfg["exec_allowed"] is False


def test_unparseable_config_keeps_the_last_good_one(run_firmware, new_board):
    good = {"device_id": "pump-7", "upload_every_wakes": 3}
    _, cfg, problems = _run(run_firmware, new_board, {"/config.json": b"{not json", **_with_good(good)})
    assert cfg["device_id"] == "pump-7" and cfg["upload_every_wakes"] == 3
    assert problems == ["/config.json: not valid JSON, using the last good config"]
