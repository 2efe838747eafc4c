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
    payload = firmware_files(("lib/agent/__init__.py", "lib/agent/config.py"))
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


def test_valid_config_is_used_and_remembered_as_good(run_firmware, new_board):
    good = {"device_id": "pump-7", "sample_interval_s": 30, "wifi": {"ssid": "site", "password": "pw"}}
    vb, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps(good).encode()})
    assert cfg["device_id"] == "pump-7" and cfg["sample_interval_s"] == 30 and cfg["wifi"]["ssid"] == "site"
    assert problems == []
    assert json.loads(vb.fs_get("/config.good.json")) == good


def test_bad_field_falls_back_to_last_good_value(run_firmware, new_board):
    good = {"device_id": "pump-7", "sample_interval_s": 30}
    vb, _, _ = _run(run_firmware, new_board, {"/config.json": json.dumps(good).encode()})
    bad = {"device_id": "Pump 7!", "sample_interval_s": -5, "broker": {"port": "x"}}
    _, cfg, problems = _run(run_firmware, new_board, {"/config.json": json.dumps(bad).encode()}, vb=vb)
    assert cfg["device_id"] == "pump-7" and cfg["sample_interval_s"] == 30 and cfg["broker"]["port"] == 1883
    assert len(problems) == 3 and any("sample_interval_s" in p for p in problems)


def test_unparseable_config_keeps_the_last_good_one(run_firmware, new_board):
    good = {"device_id": "pump-7", "upload_every_wakes": 3}
    vb, _, _ = _run(run_firmware, new_board, {"/config.json": json.dumps(good).encode()})
    _, cfg, problems = _run(run_firmware, new_board, {"/config.json": b"{not json"}, vb=vb)
    assert cfg["device_id"] == "pump-7" and cfg["upload_every_wakes"] == 3
    assert problems == ["/config.json: not valid JSON, using the last good config"]
