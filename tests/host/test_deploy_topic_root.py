"""What deploy and sim fleet write of the topic root. Deploy (usb/field.py, _merge_config): --topic-root sets
the board's broker.topic_root; without it a redeploy keeps the one the board has."""

from __future__ import annotations

from mpfleet.broker.link import parse_broker_url
from mpfleet.usb.field import DeploySettings, _merge_config

BOARD = {"device_id": "pump-1", "broker": {"host": "10.0.0.2", "port": 1883, "topic_root": "site-a/mpf"},
         "wifi": {"ssid": "site", "password": "pw"}}


def test_a_redeploy_without_topic_root_keeps_the_boards_own():
    cfg = _merge_config(BOARD, "pump-1", DeploySettings(board="virtual"), {}, None)
    assert cfg["broker"]["topic_root"] == "site-a/mpf"
    moved = _merge_config(BOARD, "pump-1", DeploySettings(board="virtual", broker=parse_broker_url("mqtt://10.0.0.9")),
                          {}, None)
    assert moved["broker"]["topic_root"] == "site-a/mpf" and moved["broker"]["host"] == "10.0.0.9"


def test_topic_root_given_is_written_and_a_board_without_one_gets_none():
    cfg = _merge_config(BOARD, "pump-1", DeploySettings(board="virtual", topic_root="site-b"), {}, None)
    assert cfg["broker"]["topic_root"] == "site-b"
    bare = {"device_id": "pump-2", "broker": {"host": "10.0.0.2"}}
    assert "topic_root" not in _merge_config(bare, "pump-2", DeploySettings(board="virtual"), {}, None)["broker"]


def test_sim_fleet_writes_its_topic_root_into_the_boards_config(tmp_path):
    """`sim fleet --topic-root` provisions boards that publish under that root."""
    import json
    import subprocess
    import sys

    db, keys, root = tmp_path / "m.db", tmp_path / "keys", tmp_path / "fleet"
    run = [sys.executable, "-m", "mpfleet"]
    subprocess.run([*run, "keys", "init", "--db", db, "--keys-dir", keys], check=True, capture_output=True)
    subprocess.run([*run, "sim", "fleet", "--devices", "2", "--root", root, "--provision-only", "--topic-root",
                    "site-b/mpf", "--db", db, "--keys-dir", keys], check=True, capture_output=True)
    from mpfleet.sim.fleet import load_fleet

    for board in load_fleet(root):
        assert json.loads(board.fs_get("/config.json"))["broker"]["topic_root"] == "site-b/mpf"
