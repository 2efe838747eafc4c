"""`mpfleet job ...`, `mpfleet keys rotate` and `mpfleet sim fleet` provisioning from the
command line: the records they make, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import click
import pytest

from mpfleet.cli.jobs import parse_fraction, parse_params, parse_targets
from mpfleet.cli.options import DURATION, POINT_IN_TIME
from mpfleet.fleet.keys import KeyRing
from mpfleet.db.store import Store


def run(tmp_path, *args, check=True):
    env = dict(os.environ, MPFLEET_DB=str(tmp_path / "m.db"), MPFLEET_KEYS=str(tmp_path / "keys"))
    proc = subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpfleet {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def fleet_db(tmp_path):
    """A database with a key and five registered devices (two in group pumps), made
    through the library: `keys init` and `devices add` have their own CLI tests."""
    from mpfleet.fleet.registry import Registry

    with Store(tmp_path / "m.db") as store:
        KeyRing(store, tmp_path / "keys").init()
        registry = Registry(store)
        for i in range(1, 6):
            registry.add(f"dev-{i}", groups=["pumps"] if i <= 2 else [])
    return tmp_path


# Durations and times themselves: tests/host/test_times.py (mpfleet.protocol.times).
def test_duration_option_reads_the_duration_grammar():
    assert DURATION.convert("90", None, None) == 90 and DURATION.convert("10m", None, None) == 600


def test_duration_option_refuses_a_word_quoting_it():
    with pytest.raises(click.BadParameter, match="'soon' is not a duration"):
        DURATION.convert("soon", None, None)


def test_duration_option_refuses_zero():
    with pytest.raises(click.BadParameter, match="'0s' is not a duration more than zero"):
        DURATION.convert("0s", None, None)


def test_time_option_reads_the_time_grammar():
    assert POINT_IN_TIME.convert("2026-12-01T08:00Z", None, None) == 1796112000.0


def test_time_option_refuses_a_word_quoting_it():
    with pytest.raises(click.BadParameter, match="cannot read the time 'tomorrow'"):
        POINT_IN_TIME.convert("tomorrow", None, None)


def test_fraction_is_a_percentage_or_a_fraction():
    assert parse_fraction("5%", "s") == 0.05 and parse_fraction("0.25", "s") == 0.25


def test_fraction_above_one_without_percent_sign_is_refused():
    with pytest.raises(click.BadParameter):
        parse_fraction("25", "s")


def test_params_merge_json_with_set_and_unset():
    assert parse_params('{"set": {"a": 1}}', ("b.c=2", "name=pump"), ("d",)) == \
        {"set": {"a": 1, "b.c": 2, "name": "pump"}, "unset": ["d"]}


def test_params_that_are_not_an_object_are_refused():
    with pytest.raises(click.BadParameter):
        parse_params("[1]", (), ())


def test_set_without_a_value_is_refused():
    with pytest.raises(click.BadParameter):
        parse_params(None, ("novalue",), ())


def test_targets_split_comma_separated_names():
    assert parse_targets(("dev-1,pumps",), None, False) == ["dev-1", "pumps"]


def test_targets_with_a_query_and_all_are_a_spec():
    assert parse_targets((), "fw<v1.2", True) == {"query": "fw<v1.2", "all": True}


def test_no_targets_at_all_is_a_usage_error():
    with pytest.raises(click.UsageError, match="say which devices"):
        parse_targets((), None, False)


@pytest.fixture
def interval_30(fleet_db):
    """`job create --json` of a staged config job to the pumps (not rolled out: no serve)."""
    return json.loads(run(fleet_db, "job", "create", "config", "--set", "sample_interval_s=30", "--targets", "pumps",
                          "--stages", "50%,100%", "--abort-threshold", "20%", "--timeout", "10m", "--retries", "2",
                          "--rate", "60", "--id", "interval-30", "--json").stdout)


def test_create_records_the_job_with_its_params_targets_and_options(interval_30):
    made = interval_30
    assert made["id"] == "interval-30" and made["status"] == "ACTIVE"
    assert made["params"] == {"set": {"sample_interval_s": 30}}
    assert made["targets"]["groups"] == ["pumps"]
    o = made["options"]
    assert (o["stages"], o["abort_threshold"], o["timeout_s"], o["retries"], o["rate_per_min"]) == \
        ([0.5, 1.0], 0.2, 600.0, 2, 60)


def test_list_shows_the_job_as_json_and_as_a_table(fleet_db, interval_30):
    listed = json.loads(run(fleet_db, "job", "list", "--json").stdout)
    assert [j["id"] for j in listed] == ["interval-30"]
    table = run(fleet_db, "job", "list").stdout
    assert "interval-30" in table and "ACTIVE" in table


def test_status_shows_an_active_job_and_its_stage_and_exits_6_while_it_runs(fleet_db, interval_30):
    shown = run(fleet_db, "job", "status", "interval-30", check=False)
    assert shown.returncode == 6 and "interval-30" in shown.stdout and "stage 1/2" in shown.stdout


def test_cancel_ends_the_job_and_status_then_exits_3(fleet_db, interval_30):
    canceled = run(fleet_db, "job", "cancel", "interval-30")
    assert "canceled job interval-30" in canceled.stdout
    after = run(fleet_db, "job", "status", "interval-30", "--json", check=False)
    assert after.returncode == 3 and json.loads(after.stdout)["status"] == "CANCELED"  # not ACTIVE/COMPLETED


def test_cancelling_a_canceled_job_is_refused_in_one_line(fleet_db, interval_30):
    run(fleet_db, "job", "cancel", "interval-30")
    again = run(fleet_db, "job", "cancel", "interval-30", check=False)
    assert again.returncode == 1 and again.stderr.startswith("mpfleet: ") and "only an ACTIVE job" in again.stderr


@pytest.mark.parametrize("args, message", [
    (("reboot", "--targets", "dev-1", "--stages", "50%,40%,100%"), "stages must increase"),
    (("reboot", "--targets", "dev-1", "--stages", "50%"), "must end at 1.0"),
    (("warp", "--targets", "dev-1"), "unknown job type"),
    (("config", "--params", "{nope", "--targets", "dev-1"), "not JSON"),
    (("config", "--params", "@/nonexistent.json", "--targets", "dev-1"), "cannot read"),
    (("reboot",), "say which devices"),
    (("reboot", "--query", "fw<<1", "--targets", "dev-1"), "targets.query"),
    (("reboot", "--targets", "dev-1", "--timeout", "later"), "not a duration"),
    (("reboot", "--targets", "dev-1", "--start", "+1h", "--end", "+30m"), "must be after start_at"),
])
def test_create_refuses_bad_input_in_one_line(fleet_db, args, message):
    proc = run(fleet_db, "job", "create", *args, check=False)
    assert proc.returncode in (1, 2), proc
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(run(fleet_db, "job", "list", "--json").stdout) == []  # nothing recorded


def test_create_without_a_key_says_how_to_make_one(tmp_path):
    run(tmp_path, "devices", "add", "dev-1")
    proc = run(tmp_path, "job", "create", "reboot", "--targets", "dev-1", check=False)
    assert proc.returncode == 1 and "mpfleet keys init" in proc.stderr


def test_status_of_an_unknown_job(fleet_db):
    proc = run(fleet_db, "job", "status", "nope", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "mpfleet: no job nope"


def test_keys_rotate_records_a_rollout_signed_by_the_old_key(fleet_db):
    old = json.loads(run(fleet_db, "keys", "list", "--json").stdout)[0]["kid"]
    made = json.loads(run(fleet_db, "keys", "rotate", "--targets", "pumps", "--json").stdout)
    assert made["signed_by"] == old
    shown = run(fleet_db, "job", "status", made["job"], "--json", check=False)
    assert shown.returncode == 6  # ACTIVE: still running
    status = json.loads(shown.stdout)
    assert status["type"] == "keys" and status["params"] == {"add": {made["new_kid"]: made["public_b64"]}}
    assert status["options"]["sign_kid"] == old
    assert status["options"]["rotation"] == {"old": old, "new": made["new_kid"]}
    keys = {k["kid"]: k for k in json.loads(run(fleet_db, "keys", "list", "--json").stdout)}
    assert keys[old]["active"] and keys[made["new_kid"]]["active"]  # the old key stays until every device has the new
    assert "active, signing" in run(fleet_db, "keys", "list").stdout


def test_job_create_refuses_what_the_device_would_drop_or_must_refuse(fleet_db, tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"code": "x = 1\n" * 3_500}))  # a 21 KB exec job
    proc = run(fleet_db, "job", "create", "exec", "--params", f"@{big}", "--targets", "dev-1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("mpfleet: job too large: its signed envelope would be ")
    assert "over the limit of 4096 bytes" in proc.stderr
    for setting, hint in (("trusted_keys.0123456789abcdef=AAAA", "mpfleet keys rotate"), ("exec_allowed=true", "USB")):
        proc = run(fleet_db, "job", "create", "config", "--set", setting, "--targets", "dev-1", check=False)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and hint in proc.stderr
    assert json.loads(run(fleet_db, "job", "list", "--json").stdout) == []


@pytest.mark.slow
def test_sim_fleet_provisions_like_a_real_device(tmp_path):
    run(tmp_path, "keys", "init")
    proc = subprocess.run([sys.executable, "-m", "mpfleet", "sim", "fleet", "--devices", "2", "--root",
                           str(tmp_path / "fleet"), "--group", "lab", "--credentials", "--duration", "0.1",
                           "--prefix", "lab", "--json", "--db", str(tmp_path / "m.db"),
                           "--keys-dir", str(tmp_path / "keys")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Store(tmp_path / "m.db") as store:
        devices = {d["id"]: d for d in store.devices()}
        assert set(devices) == {"lab-0001", "lab-0002"} and devices["lab-0001"]["groups"] == ["lab"]
        creds = store.credentials("lab-0002")
        trusted = KeyRing(store, tmp_path / "keys").trusted_keys()
    from mpfleet.sim import VirtualBoard

    cfg = json.loads(VirtualBoard(tmp_path / "fleet" / "lab-0002").fs_get("/config.json"))
    assert cfg["device_id"] == "lab-0002" and cfg["groups"] == ["lab"] and cfg["trusted_keys"] == trusted
    assert (cfg["broker"]["user"], cfg["broker"]["password"]) == (creds["username"], creds["password"])


def test_serve_says_when_the_broker_cannot_be_reached(tmp_path):
    from mpfleet.broker.local import free_port

    proc = run(tmp_path, "serve", "--broker", f"mqtt://127.0.0.1:{free_port()}", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("mpfleet: cannot reach the broker at mqtt://127.0.0.1:")


def test_serve_refuses_a_broker_url_that_is_not_mqtt_as_bad_usage(tmp_path):
    bad = run(tmp_path, "serve", "--broker", "http://example", check=False)
    assert bad.returncode == 2 and "scheme must be mqtt:// or mqtts://" in bad.stderr
