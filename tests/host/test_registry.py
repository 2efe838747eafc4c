"""The device registry: devices appear when provisioned or when they first report; groups can be
changed; a query language selects devices by reported state (for `devices list --where` and job targets)."""

import json
import time

import pytest
from cli_harness import mpfleet

from mpfleet.fleet.ingest import handle_state
from mpfleet.fleet.registry import QueryError, Registry, RegistryError, UnknownDeviceError, parse_query, version_key
from mpfleet.db.store import Store

NOW = 1_790_000_000.0

# What the agent publishes on mpf/v1/<id>/state (firmware/lib/agent/wake.py, Wake.state).
AGENT_STATE = {
    "device": "a1b2c3", "fw": "v1.24.0", "app": "0.3.0", "slot": "ota_1", "reset_cause": 4, "wakes": 12,
    "rtc_lost": False, "heap_free": 61234, "fs_free": 1900544, "backlog": 240, "staged": 3, "dropped": 7,
    "sensor_failures": [], "channels": ["adc0", "temp"], "scales": [1000, 10], "config_problems": [],
    "rssi": -67, "time": 1790000000, "last_error": None,
}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "db.sqlite") as s:
        yield s


@pytest.fixture
def registry(store):
    return Registry(store)


def report_state(store, device, **changes):
    """Deliver a retained state message the way `mpfleet serve` and `mpfleet ingest` do."""
    state = dict(AGENT_STATE, device=device, **changes)
    handle_state(store, device, json.dumps(state).encode(), publish=lambda *a, **k: None)
    return state


def record(id="d1", board=None, groups=(), last_seen=None, **state):
    return {"id": id, "board": board, "groups": list(groups), "first_seen": NOW - 86400, "last_seen": last_seen,
            "state": state or None}


# ---------------------------------------------------------------- library

def test_a_provisioned_device_is_listed_before_it_ever_reports(registry):
    registry.add("pump-1", board="virtual", groups=["pumps", "north"])
    d = registry.get("pump-1")
    assert (d["board"], d["groups"], d["last_seen"], d["state"]) == ("virtual", ["north", "pumps"], None, None)
    assert [x["id"] for x in registry.list()] == ["pump-1"]


def test_adding_a_known_device_again_adds_groups_and_keeps_its_state(store, registry):
    registry.add("pump-1", board="esp32-devkitc", groups=["pumps"])
    report_state(store, "pump-1")
    registry.add("pump-1", groups=["north"])
    d = registry.get("pump-1")
    assert d["groups"] == ["north", "pumps"] and d["board"] == "esp32-devkitc"
    assert d["state"]["fw"] == "v1.24.0" and d["last_seen"] is not None


def test_a_state_from_a_device_nobody_provisioned_makes_it_pending_not_a_member(store, registry):
    report_state(store, "a1b2c3")
    report_state(store, "a1b2c3", backlog=241)
    assert registry.list() == [] and not store.is_member("a1b2c3")
    (p,) = registry.pending()
    assert p["id"] == "a1b2c3" and p["times"] == 2 and p["state"]["backlog"] == 241


def test_accepting_a_pending_device_keeps_what_it_reported_and_ends_its_pending(store, registry):
    report_state(store, "a1b2c3", board="virtual")
    (d,) = registry.accept(["a1b2c3"], groups=["pumps"])
    assert d["id"] == "a1b2c3" and d["groups"] == ["pumps"] and d["board"] == "virtual"
    assert (d["state"]["fw"], d["state"]["slot"], d["state"]["backlog"], d["state"]["dropped"]) == \
        ("v1.24.0", "ota_1", 240, 7)
    assert d["last_seen"] is None and registry.pending() == []
    report_state(store, "a1b2c3", backlog=3)
    assert registry.get("a1b2c3")["state"]["backlog"] == 3 and registry.get("a1b2c3")["last_seen"] is not None


def test_accept_is_all_or_nothing_and_only_for_pending_devices(store, registry):
    report_state(store, "a1")
    registry.add("m1")
    with pytest.raises(UnknownDeviceError, match="no pending device never-seen .*nothing was accepted"):
        registry.accept(["a1", "never-seen"])
    with pytest.raises(RegistryError, match="m1 is already in the fleet"):
        registry.accept(["a1", "m1"])
    assert [p["id"] for p in registry.pending()] == ["a1"] and not store.is_member("a1")


def test_provisioning_a_pending_device_makes_it_a_member(store, registry):
    report_state(store, "a1")
    registry.add("a1", groups=["pumps"])
    assert registry.pending() == [] and store.is_member("a1")


def test_tag_adds_and_removes_groups(registry):
    registry.add("d1", groups=["pumps", "canary"])
    d = registry.tag("d1", add=["north"], remove=["canary", "not-a-member"])
    assert d["groups"] == ["north", "pumps"]
    assert registry.get("d1")["groups"] == ["north", "pumps"]


def test_tag_refuses_to_add_and_remove_the_same_group(registry):
    registry.add("d1")
    with pytest.raises(RegistryError, match="both add and remove pumps"):
        registry.tag("d1", add=["pumps"], remove=["pumps"])


def test_an_unknown_device_is_named_with_the_database_and_the_known_ids(store, registry):
    registry.add("d1")
    registry.add("d2")
    with pytest.raises(UnknownDeviceError) as e:
        registry.get("d9")
    assert str(e.value) == f"no device d9 in {store.path} (known: d1, d2)"
    with pytest.raises(UnknownDeviceError):
        registry.tag("d9", add=["x"])


@pytest.mark.parametrize("bad", ["Dev1", "", "a" * 65, "d 1", "d/1", "d+"])
def test_ids_and_group_names_must_be_topic_safe(registry, bad):
    with pytest.raises(RegistryError, match="not a valid device id"):
        registry.add(bad)
    with pytest.raises(RegistryError, match="not a valid group name"):
        registry.add("ok", groups=[bad])


def test_list_filters_by_group_and_by_query(store, registry):
    registry.add("d1", groups=["pumps"])
    registry.add("d2", groups=["pumps"])
    registry.add("d3")
    report_state(store, "d1", fw="v1.25.0")
    report_state(store, "d2", fw="v1.9.0")
    assert [d["id"] for d in registry.list(group="pumps")] == ["d1", "d2"]
    assert [d["id"] for d in registry.list(where="fw<v1.10.0")] == ["d2"]
    assert [d["id"] for d in registry.list(group="pumps", where="fw>=v1.25")] == ["d1"]


# ---------------------------------------------------------------- query language

@pytest.mark.parametrize("lower, higher", [
    ("v1.9.0", "v1.10.0"), ("v1.24.1", "v1.25.0"), ("1.2", "v1.2.1"), ("v1.26.0-preview", "v1.26.0"),
    ("v1.26.0-preview.1", "v1.26.0-preview.2"), ("v2", "v10"),
])
def test_versions_compare_numerically_per_dotted_part(lower, higher):
    assert version_key(lower) < version_key(higher)


def test_a_missing_zero_part_and_the_v_prefix_do_not_change_a_version():
    assert version_key("v1.25") == version_key("1.25.0") == version_key("v1.25.0.0")
    assert parse_query("fw=v1.24.0")(record(fw="1.24"))


def test_fw_query_orders_versions_numerically():
    older = parse_query("fw<v1.10.0")
    assert older(record(fw="v1.9.0")) and not older(record(fw="v1.10.0")) and not older(record(fw="v1.11.0"))
    exact = parse_query("fw=v1.24.0")
    assert exact(record(fw="v1.24.0")) and not exact(record(fw="v1.24.0-preview"))
    assert parse_query("app>=0.3")(record(app="0.3.0"))


def test_text_group_and_number_fields():
    d = record(id="d1", board="virtual", groups=["pumps"], slot="ota_0", backlog=150, dropped=0, rssi=-85)
    for true in ["board=virtual", "id=d1", "id!=d2", "slot=ota_0", "group=pumps", "group!=canary",
                 "backlog>100", "backlog<=150", "dropped=0", "rssi<-80"]:
        assert parse_query(true)(d), true
    for false in ["board=esp32-devkitc", "group=canary", "group!=pumps", "backlog>150", "dropped>0"]:
        assert not parse_query(false)(d), false


def test_last_seen_is_an_age():
    def clock():
        return NOW

    recent, stale = record(last_seen=NOW - 90 * 60), record(last_seen=NOW - 3 * 3600)
    within_2h = parse_query("last_seen<2h", now=clock)
    assert within_2h(recent) and not within_2h(stale)
    assert parse_query("last_seen>=1d", now=clock)(record(last_seen=NOW - 86400))
    assert parse_query("last_seen>90s", now=clock)(recent)
    assert not within_2h(record(last_seen=None)), "a device never seen is not recent"


def test_commas_join_conditions_that_must_all_hold():
    q = parse_query(" fw<v1.25.0 , board=virtual,backlog>100 ")
    assert q(record(board="virtual", fw="v1.24.0", backlog=101))
    assert not q(record(board="virtual", fw="v1.24.0", backlog=100))
    assert not q(record(board="esp32-devkitc", fw="v1.24.0", backlog=101))


def test_a_device_that_has_not_reported_matches_no_state_condition():
    silent = record(board="virtual")
    for expr in ["fw<v9", "fw!=v1.0.0", "backlog>=0", "slot!=ota_0"]:
        assert not parse_query(expr)(silent), expr
    assert parse_query("board=virtual")(silent)


@pytest.mark.parametrize("text, message", [
    ("fw<vX", "bad query expression 'fw<vX': 'vX' is not a version"),
    ("board=virtual,colour=red", "bad query expression 'colour=red': unknown field 'colour'"),
    ("backlog>lots", "'lots' is not a number"),
    ("last_seen<2 hours", "'2 hours' is not a duration"),
    ("last_seen<2", "'2' is not a duration"),
    ("board>virtual", "board is compared with = or != only"),
    ("fw", "bad query expression 'fw': expected FIELD OP VALUE"),
    ("fw<", "bad query expression 'fw<': expected FIELD OP VALUE"),
    ("fw<v1,,board=x", "bad query expression '': empty condition"),
    ("  ", "empty query"),
])
def test_a_bad_query_names_the_bad_expression(text, message):
    with pytest.raises(QueryError) as e:
        parse_query(text)
    assert message in str(e.value)


# ---------------------------------------------------------------- CLI

def test_cli_add_tag_list_show_round_trip(tmp_path):
    db = tmp_path / "fleet.db"
    mpfleet("devices", "add", "pump-1", "--board", "virtual", "--group", "pumps", "--db", db)
    mpfleet("devices", "add", "pump-2", "--group", "pumps", "--db", db)
    tagged = json.loads(mpfleet("devices", "tag", "pump-1", "--add", "canary", "--remove", "pumps",
                                "--db", db, "--json").stdout)
    assert tagged["groups"] == ["canary"]
    listed = json.loads(mpfleet("devices", "list", "--db", db, "--json").stdout)
    assert [(d["id"], d["board"], d["groups"]) for d in listed] == \
        [("pump-1", "virtual", ["canary"]), ("pump-2", None, ["pumps"])]
    assert [d["id"] for d in json.loads(mpfleet("devices", "list", "--group", "pumps", "--db", db,
                                                 "--json").stdout)] == ["pump-2"]
    shown = json.loads(mpfleet("devices", "show", "pump-1", "--db", db, "--json").stdout)
    assert shown.pop("executions") == [] and shown == listed[0]


def test_cli_shows_the_state_a_device_reported(tmp_path):
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        Registry(store).add("a1b2c3")
        Registry(store).add("d2")
        report_state(store, "a1b2c3", fw="v1.24.0", backlog=240, time=int(time.time()) - 5)
        report_state(store, "d2", fw="v1.25.0", backlog=3, time=int(time.time()) - 5)
    table = mpfleet("devices", "list", "--db", db).stdout
    row = next(line for line in table.splitlines() if "a1b2c3" in line)
    for cell in ("v1.24.0", "ota_1", "240", "7", "s ago"):
        assert cell in row, (cell, row)
    where = json.loads(mpfleet("devices", "list", "--where", "fw<v1.25.0,backlog>100", "--db", db,
                               "--json").stdout)
    assert [d["id"] for d in where] == ["a1b2c3"]
    shown = json.loads(mpfleet("devices", "show", "a1b2c3", "--db", db, "--json").stdout)
    assert shown["state"] == dict(AGENT_STATE, device="a1b2c3", time=shown["state"]["time"])
    assert "heap_free" in mpfleet("devices", "show", "a1b2c3", "--db", db).stdout
    shown_d2 = json.loads(mpfleet("devices", "show", "d2", "--db", db, "--json").stdout)
    assert shown_d2["stale"] is False and shown_d2["reported_at"] == pytest.approx(time.time() - 5, abs=60)


def test_cli_marks_a_device_whose_last_report_is_older_than_two_upload_intervals_stale(tmp_path):
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        for device in ("fresh", "late", "never"):
            Registry(store).add(device)
        # every 60 s x 10 wakes = 10 min between reports: stale after 20 min
        cadence = {"sample_interval_s": 60, "upload_every_wakes": 10}
        report_state(store, "fresh", time=int(time.time()) - 19 * 60, **cadence)
        report_state(store, "late", time=int(time.time()) - 21 * 60, **cadence)
    listed = {d["id"]: d for d in json.loads(mpfleet("devices", "list", "--db", db, "--json").stdout)}
    assert (listed["fresh"]["stale"], listed["late"]["stale"], listed["never"]["stale"]) == (False, True, None)
    assert listed["late"]["expected_interval_s"] == 600
    table = mpfleet("devices", "list", "--db", db).stdout
    assert "(stale)" in next(line for line in table.splitlines() if "late" in line)
    assert "(stale)" not in next(line for line in table.splitlines() if "fresh" in line)


def test_a_retained_state_replayed_after_a_restart_does_not_make_a_dead_device_look_alive(store, registry):
    registry.add("d1")
    old = int(time.time()) - 3 * 86400  # the device died three days ago; its retained state stays on the broker
    state = dict(AGENT_STATE, device="d1", time=old)
    handle_state(store, "d1", json.dumps(state).encode(), publish=lambda *a, **k: None, live=False)
    d = registry.get("d1")
    assert d["last_seen"] is None and d["reported_at"] == old
    assert [x["id"] for x in registry.list(where="last_seen>2d")] == ["d1"]
    assert registry.list(where="received<1h") == []


def test_a_device_clock_ahead_of_the_host_never_makes_its_report_newer_than_now(store, registry):
    registry.add("d1")
    state = dict(AGENT_STATE, device="d1", time=int(time.time()) + 10 * 86400)
    handle_state(store, "d1", json.dumps(state).encode(), publish=lambda *a, **k: None)
    assert registry.get("d1")["reported_at"] <= time.time()


def test_cli_pending_and_accept(tmp_path):
    db = tmp_path / "fleet.db"
    with Store(db) as store:
        report_state(store, "other-1", board="virtual")
    assert "no pending devices" not in mpfleet("devices", "list", "--db", db).stdout
    assert "1 device(s) seen on the broker are not in the fleet" in mpfleet("devices", "list", "--db", db).stdout
    pending = json.loads(mpfleet("devices", "pending", "--db", db, "--json").stdout)
    assert [p["id"] for p in pending["pending"]] == ["other-1"]
    bad = mpfleet("devices", "accept", "nobody", "--db", db, check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("mpfleet: no pending device nobody (pending: other-1")
    mpfleet("devices", "accept", "other-1", "--group", "lab", "--db", db)
    assert mpfleet("devices", "pending", "--db", db).stdout == "no pending devices\n"
    (d,) = json.loads(mpfleet("devices", "list", "--db", db, "--json").stdout)
    assert (d["id"], d["groups"], d["board"]) == ("other-1", ["lab"], "virtual")


def test_cli_json_output_is_stable(tmp_path):
    db = tmp_path / "fleet.db"
    mpfleet("devices", "add", "d1", "--board", "virtual", "--group", "b", "--group", "a", "--db", db)
    first = mpfleet("devices", "list", "--db", db, "--json").stdout
    assert first == mpfleet("devices", "list", "--db", db, "--json").stdout
    (d,) = json.loads(first)
    assert list(d) == sorted(d) == ["board", "expected_interval_s", "first_seen", "groups", "id", "last_seen",
                                    "reported_at", "stale", "state"]
    assert d["groups"] == ["a", "b"] and d["last_seen"] is None and d["state"] is None


@pytest.mark.sqlite_only("the message names the database file")
def test_cli_unknown_device_is_one_line_and_exit_1(tmp_path):
    db = tmp_path / "fleet.db"
    mpfleet("devices", "add", "d1", "--db", db)
    for args in (["show", "d9"], ["tag", "d9", "--add", "x"]):
        proc = mpfleet("devices", *args, "--db", db, check=False)
        assert proc.returncode == 1
        assert proc.stderr == f"mpfleet: no device d9 in {db} (known: d1)\n"


def test_cli_rejects_bad_input_at_the_boundary(tmp_path):
    db = tmp_path / "fleet.db"
    bad_board = mpfleet("devices", "add", "d1", "--board", "nosuch", "--db", db, check=False)
    assert bad_board.returncode == 1 and "unknown board 'nosuch'" in bad_board.stderr
    bad_id = mpfleet("devices", "add", "D1", "--db", db, check=False)
    assert bad_id.returncode == 2 and "'D1' is not a valid device id" in bad_id.stderr
    bad_where = mpfleet("devices", "list", "--where", "fw<soon", "--db", db, check=False)
    assert bad_where.returncode == 2 and "bad query expression 'fw<soon'" in bad_where.stderr
    nothing = mpfleet("devices", "tag", "d1", "--db", db, check=False)
    assert nothing.returncode == 2 and "--add GROUP" in nothing.stderr
