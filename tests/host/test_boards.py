"""mpfleet.boards: the shipped board files load with the layouts we rely on, and every
mistake in a board file is a BoardError naming the file and the field."""

import copy
import json
import math

import pytest

from mpfleet import boards
from mpfleet.boards import Board, BoardError, Signal, list_boards, load_board
from mpfleet.errors import MpfleetError

SHIPPED = ["esp32-c3-devkitm", "esp32-devkitc", "esp32-s3-devkitc", "virtual"]

# name, type, subtype, offset, size of MicroPython's ESP32_GENERIC-OTA on 4 MiB
ESP32_GENERIC_OTA_4MIB = [
    ("nvs", "data", "nvs", 0x9000, 0x4000),
    ("otadata", "data", "ota", 0xD000, 0x2000),
    ("phy_init", "data", "phy", 0xF000, 0x1000),
    ("ota_0", "app", "ota_0", 0x10000, 0x180000),
    ("ota_1", "app", "ota_1", 0x190000, 0x180000),
    ("vfs", "data", "littlefs", 0x310000, 0x400000 - 0x310000),
]


def _layout(board):
    return [(p.name, p.type, p.subtype, p.offset, p.size) for p in board.partitions]


# --- shipped boards ----------------------------------------------------------------------


def test_all_shipped_boards_are_listed():
    assert list_boards() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_board_loads(name):
    board = load_board(name)
    assert board.name == name
    assert board.is_ota
    assert [p.name for p in board.app_slots] == ["ota_0", "ota_1"]


def test_esp32_devkitc_has_the_esp32_generic_ota_layout():
    board = load_board("esp32-devkitc")
    assert board.chip == "esp32"
    assert board.flash_size == 4 * 1024 * 1024
    assert board.firmware_offset == 0x1000
    assert board.firmware_build == "ESP32_GENERIC-OTA"
    assert _layout(board) == ESP32_GENERIC_OTA_4MIB


def test_virtual_board_is_an_esp32_generic_ota_with_the_sim_sensors():
    board = load_board("virtual")
    assert (board.chip, board.firmware_offset) == ("esp32", 0x1000)
    assert _layout(board) == ESP32_GENERIC_OTA_4MIB
    by_kind = {(s.kind, s.pin) for s in board.sensors}
    assert by_kind == {
        ("adc", 34), ("adc", 35), ("internal_temp", None), ("dht22", 4), ("battery", 36)
    }
    assert board.sensor("battery").divider == 2.0
    assert "mac_prefix" in board.sim


@pytest.mark.parametrize("name", ["esp32-s3-devkitc", "esp32-c3-devkitm"])
def test_s3_and_c3_firmware_starts_at_zero(name):
    assert load_board(name).firmware_offset == 0x0


def test_s3_board_vfs_runs_to_the_end_of_its_8mib_flash():
    board = load_board("esp32-s3-devkitc")
    assert board.partition("vfs").end == board.flash_size == 8 * 1024 * 1024


@pytest.mark.parametrize("name", SHIPPED)
def test_to_json_round_trips(name):
    board = load_board(name)
    again = Board.from_json(json.loads(json.dumps(board.to_json())))
    assert again == board


def test_partition_lookup_and_unknown_partition():
    board = load_board("virtual")
    assert board.partition("otadata").offset == 0xD000
    with pytest.raises(BoardError, match="no partition named 'nope'"):
        board.partition("nope")


def test_load_by_path(tmp_path):
    path = tmp_path / "copy.json"
    data = load_board("virtual").to_json()
    data["name"] = "copy"
    path.write_text(json.dumps(data))
    assert load_board(path).name == "copy"
    assert load_board(str(path)).name == "copy"


def test_unknown_board_name_lists_the_known_ones():
    with pytest.raises(BoardError, match="unknown board 'nope'.*virtual"):
        load_board("nope")


def test_boards_dir_can_be_overridden(monkeypatch, tmp_path):
    data = load_board("virtual").to_json()
    data["name"] = "elsewhere"
    (tmp_path / "elsewhere.json").write_text(json.dumps(data))
    monkeypatch.setenv("MPFLEET_BOARDS_DIR", str(tmp_path))
    assert boards.boards_dir() == tmp_path
    assert list_boards() == ["elsewhere"]
    assert load_board("elsewhere").name == "elsewhere"


def test_board_error_is_an_mpfleet_error():
    assert issubclass(BoardError, MpfleetError)


# --- signals -----------------------------------------------------------------------------


def test_signal_models_give_deterministic_values():
    assert Signal("constant", 3.3).value(123.0) == 3.3
    sine = Signal("sine", 1.0, amplitude=0.5, period_s=100)
    assert sine.value(25) == pytest.approx(1.5)
    assert sine.value(75) == pytest.approx(0.5)
    ramp = Signal("ramp", 4.2, amplitude=-0.6, period_s=10)
    assert ramp.value(5) == pytest.approx(3.9)
    assert ramp.value(15) == pytest.approx(3.9)  # sawtooth repeats
    noise = Signal("noise", 0.8, amplitude=0.05, period_s=1.0, seed=35)
    values = [noise.value(t) for t in range(50)]
    assert values == [noise.value(t) for t in range(50)]
    assert all(0.75 <= v < 0.85 for v in values)
    assert len(set(values)) > 40
    assert noise.value(3.2) == noise.value(3.9)  # holds for one period
    other_seed = Signal("noise", 0.8, amplitude=0.05, period_s=1.0, seed=36)
    assert [other_seed.value(t) for t in range(50)] != values


def test_every_shipped_sensor_signal_is_finite():
    for name in SHIPPED:
        for sensor in load_board(name).sensors:
            assert math.isfinite(sensor.signal.value(1234.5))


# --- bad board files ---------------------------------------------------------------------


@pytest.fixture
def base_board():
    """A valid board (the virtual one) named like the file the tests write."""
    data = copy.deepcopy(load_board("virtual").to_json())
    data["name"] = "bad"
    return data


def _load_bad(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(BoardError) as excinfo:
        load_board(path)
    return str(excinfo.value)


def _set(path, value):
    """A mutation that sets data[...][...] = value (path: tuple of keys/indexes)."""

    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _remove_partition(name):
    def mutate(data):
        data["partitions"] = [p for p in data["partitions"] if p["name"] != name]

    return mutate


def _duplicate_sensor_name(data):
    data["sensors"][1]["name"] = data["sensors"][0]["name"]


BAD_BOARDS = [
    # id, mutation, field named in the message, words the message must contain
    ("data partition misaligned", _set(("partitions", 2, "offset"), 0xF001),
     "partitions[2].offset", "0xf001 is not 4096-aligned"),
    ("app partition misaligned", _set(("partitions", 3, "offset"), 0x11000),
     "partitions[3].offset", "0x11000 is not 65536-aligned"),
    ("unknown chip", _set(("chip",), "esp8266"), "chip", "unknown chip 'esp8266'"),
    ("partitions overlap", _set(("partitions", 2, "offset"), 0xE000),
     "partitions[2].offset", "overlaps 'otadata'"),
    ("partition beyond flash", _set(("partitions", 5, "size"), 0x100000),
     "partitions[5].size", "beyond flash_size 0x400000"),
    ("partition over the partition table", _set(("partitions", 0, "offset"), 0x8000),
     "partitions[0].offset", "below 0x9000"),
    ("missing top-level field", _delete(("flash_size",)), "flash_size", "missing required field"),
    ("missing partition field", _delete(("partitions", 0, "size")),
     "partitions[0].size", "missing required field"),
    ("flash size of wrong type", _set(("flash_size",), "four megabytes"),
     "flash_size", "expected an integer"),
    ("flash size not a power of two", _set(("flash_size",), 3 * 1024 * 1024),
     "flash_size", "power-of-two"),
    ("partitions of wrong type", _set(("partitions",), {}), "partitions", "expected an array"),
    ("description of wrong type", _set(("description",), 5), "description", "expected a string"),
    ("pin of wrong type", _set(("sensors", 0, "pin"), True), "sensors[0].pin", "expected an integer"),
    ("esp32 firmware at 0x0", _set(("firmware_offset",), 0),
     "firmware_offset", "0x0 is wrong for esp32, whose firmware starts at 0x1000"),
    ("s3 firmware at 0x1000", lambda d: d.update(chip="esp32s3"),
     "firmware_offset", "0x1000 is wrong for esp32s3, whose firmware starts at 0x0"),
    ("no otadata", _remove_partition("otadata"), "partitions", "otadata"),
    ("no ota_1", _remove_partition("ota_1"), "partitions", "ota_1"),
    ("otadata of one sector", _set(("partitions", 1, "size"), 0x1000),
     "partitions[1].size", "otadata must be 0x2000"),
    ("duplicate partition names", _set(("partitions", 2, "name"), "nvs"),
     "partitions[2].name", "duplicate partition name 'nvs'"),
    ("duplicate sensor names", _duplicate_sensor_name, "sensors[1].name", "duplicate sensor name"),
    ("unknown sensor kind", _set(("sensors", 0, "kind"), "lidar"),
     "sensors[0].kind", 'unknown kind "lidar"'),
    ("adc without attenuation", _delete(("sensors", 0, "atten")),
     "sensors[0].atten", "missing required field"),
    ("internal_temp with a pin", _set(("sensors", 2, "pin"), 5), "sensors[2].pin", "no pin"),
    ("pin that does not exist", _set(("sensors", 0, "pin"), 40),
     "sensors[0].pin", "GPIO 40 does not exist on esp32"),
    ("pin used twice", _set(("sensors", 1, "pin"), 34), "sensors[1].pin", "already used"),
    ("sine without period", _delete(("sensors", 0, "signal", "period_s")),
     "sensors[0].signal.period_s", "missing required field"),
    ("unknown signal model", _set(("sensors", 0, "signal", "model"), "square"),
     "sensors[0].signal.model", "unknown model 'square'"),
    ("battery divider below one", _set(("sensors", 4, "divider"), 0.5),
     "sensors[4].divider", "1.0 or more"),
    ("misspelt field", lambda d: d.update(partitons=[]), "partitons", "unknown field"),
    ("field of another sensor kind", _set(("sensors", 0, "divider"), 2.0),
     "sensors[0].divider", "unknown field"),
    ("name that is not the file name", _set(("name",), "other"),
     "name", "does not match the file name 'bad'"),
    ("bad mac prefix", _set(("sim", "mac_prefix"), "zz"), "sim.mac_prefix", "hex octets"),
]


@pytest.mark.parametrize(
    "mutate, field, words", [case[1:] for case in BAD_BOARDS], ids=[c[0] for c in BAD_BOARDS]
)
def test_bad_board_names_file_and_field(tmp_path, base_board, mutate, field, words):
    mutate(base_board)
    message = _load_bad(tmp_path, base_board)
    assert f"bad.json: {field}: " in message
    assert words in message


def test_hex_strings_are_accepted_for_integers(tmp_path, base_board):
    base_board["firmware_offset"] = "0x1000"
    base_board["partitions"][3]["offset"] = "0x10000"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(base_board))
    board = load_board(path)
    assert board.firmware_offset == 0x1000
    assert board.partition("ota_0").offset == 0x10000


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "name": "broken",\n  "chip": "esp32",\n}\n')
    with pytest.raises(BoardError, match=r"broken\.json: invalid JSON at line 4 column 1"):
        load_board(path)


def test_top_level_must_be_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[]")
    with pytest.raises(BoardError, match=r"list\.json: \(top level\): expected an object"):
        load_board(path)


def test_unreadable_board_file_is_a_board_error(tmp_path):
    with pytest.raises(BoardError, match="cannot read board file"):
        load_board(tmp_path / "missing.json")
