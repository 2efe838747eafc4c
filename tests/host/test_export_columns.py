"""`mpfleet samples export` names its CSV value columns after the devices' sensors
(mpfleet.fleet.export): the channels a device reported, else its board's sensors, else ch0..."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import pytest

from mpfleet.boards import load_board
from mpfleet.db.store import Store

T0 = 1_800_000_000


def add(store: Store, device: str, rows: list[list]) -> None:
    with store.transaction() as db:
        store.add_samples(db, device, [(i + 1, T0 + 60 * i, values) for i, values in enumerate(rows)])


def export(db, *args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPFLEET_")}
    proc = subprocess.run([sys.executable, "-m", "mpfleet", "samples", "export", "--db", str(db), *args],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader(io.StringIO(proc.stdout)))


@pytest.fixture
def db(tmp_path):
    return tmp_path / "m.db"


def test_columns_are_the_channels_the_device_reported(db):
    with Store(db) as store:
        store.touch_device("dev-1", board="esp32-devkitc", state={"channels": ["adc0", "mcu_temp"]})
        add(store, "dev-1", [[1.2, 45.0]])
    rows = export(db)
    assert list(rows[0]) == ["device", "seq", "time", "t", "adc0", "mcu_temp"]
    assert rows[0]["mcu_temp"] == "45.0"


def test_columns_are_the_board_sensors_when_the_device_reported_none(db):
    sensors = [s.name for s in load_board("esp32-devkitc").sensors]
    with Store(db) as store:
        store.touch_device("dev-1", board="esp32-devkitc")
        add(store, "dev-1", [[1.0 + i for i in range(len(sensors))]])
    rows = export(db)
    assert list(rows[0])[4:] == sensors
    assert rows[0][sensors[-1]] == str(float(len(sensors)))


def test_a_board_whose_sensor_count_does_not_fit_is_not_used(db):
    """The device samples its config's sensors, which need not be its board's: names are
    given only when the count fits, never shifted onto the wrong values."""
    with Store(db) as store:
        store.touch_device("dev-1", board="esp32-devkitc")
        add(store, "dev-1", [[1.2, 45.0]])
    assert list(export(db)[0])[4:] == ["ch0", "ch1"]


def test_an_unknown_board_falls_back_to_channel_numbers(db):
    with Store(db) as store:
        store.touch_device("dev-1", board="no-such-board")
        add(store, "dev-1", [[1.2, 45.0, 3.9]])
    assert list(export(db)[0])[4:] == ["ch0", "ch1", "ch2"]


def test_devices_with_different_sensors_share_named_columns(db):
    with Store(db) as store:
        store.touch_device("a", state={"channels": ["adc0", "mcu_temp"]})
        store.touch_device("b", state={"channels": ["mcu_temp", "battery"]})
        add(store, "a", [[1.2, 45.0]])
        add(store, "b", [[44.0, 3.9]])
    rows = export(db)
    assert list(rows[0])[4:] == ["adc0", "mcu_temp", "battery"]
    assert [(r["device"], r["adc0"], r["mcu_temp"], r["battery"]) for r in rows] == [
        ("a", "1.2", "45.0", ""), ("b", "", "44.0", "3.9")]


def test_a_sensor_named_like_a_fixed_column_keeps_its_own_column(db):
    with Store(db) as store:
        store.touch_device("dev-1", state={"channels": ["t", "adc0"]})
        add(store, "dev-1", [[21.5, 1.2]])
    row = export(db)[0]
    assert row["t"] == str(T0) and row["sensor_t"] == "21.5"
