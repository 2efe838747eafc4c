"""`mpfleet flash` end to end: the real esptool against virtual boards in download mode.

Every board here is a VirtualBoard whose ROM loader (mpfleet.sim.rom.RomBootloader)
answers on a pseudo-terminal, so esptool's own code paths run: chip detection, the
ROM's flash commands, the MD5 check after writing. The ROM charges wire time for
every byte, so "in parallel" is a real claim. Ptys have no DTR/RTS, hence
--before/--after no-reset; esptool's flasher stub cannot run on the emulator,
hence --no-stub (real boards get both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpfleet.boards import load_board
from mpfleet.images.espimage import build_app_image
from mpfleet.sim.board import runtime_module
from mpfleet.sim.rom import RomBootloader
from mpfleet.usb.flash import FlashError, flash_boards, load_firmware

NEW_VERSION = "v1.26.0"
OTA_VERSION = "v1.25.0-ota"
APP_SIZE = 64 * 1024
BAUD = 921600
EMULATOR_OPTIONS = {"baud": BAUD, "no_stub": True, "before": "no-reset", "after": "no-reset"}
FLASH_BEGIN = 0x02
FLASH_DATA = 0x03
FLASH_DEFL_DATA = 0x11


@pytest.fixture(autouse=True)
def leaves_no_threads_or_ptys():
    """Every ROM relay thread and flashing thread ends, every pty is closed."""
    threads_before, ptys_before = set(threading.enumerate()), _open_ptys()
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and set(threading.enumerate()) - threads_before:
        time.sleep(0.05)
    assert set(threading.enumerate()) - threads_before == set()
    assert _open_ptys() == ptys_before


def _open_ptys() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
            found.add(f"{fd}->{target}")
    return found


def merged_image(app: bytes, chip: str, firmware_offset: int) -> bytes:
    """A merged flash image as the file holds it from `firmware_offset`: bootloader,
    partition table, 0xFF up to the app at 0x10000 (MicroPython's firmware.bin)."""
    flash = bytearray(b"\xff" * (0x10000 + len(app)))
    bootloader = build_app_image(chip, "bootloader")[:0x400]  # starts with 0xE9 and the chip id
    flash[firmware_offset:firmware_offset + len(bootloader)] = bootloader
    flash[0x8000:0x8020] = b"\xaa\x50" + bytes(30)
    flash[0x10000:] = app
    return bytes(flash[firmware_offset:])


@pytest.fixture
def firmware(tmp_path) -> Path:
    path = tmp_path / "firmware.bin"
    path.write_bytes(merged_image(build_app_image("esp32", NEW_VERSION, size=APP_SIZE), "esp32", 0x1000))
    return path


def took_an_ota_update(vb) -> None:
    """ota_1 holds an update and otadata says to boot it, as after a field update."""
    vb.write_app_image("ota_1", build_app_image("esp32", OTA_VERSION))
    _simota = runtime_module("_simota")  # the board's own otadata rules
    flash = vb.flash()
    try:
        otadata = vb.partition("otadata")["offset"]
        _simota.set_boot(flash, otadata, 1, 2)
        _simota.set_state_of_active(flash, otadata, _simota.STATE_VALID)
    finally:
        flash.close()


def flash_bytes(vb, offset: int, length: int) -> bytes:
    flash = vb.flash()
    try:
        return bytes(flash.read_bytes(offset, length))
    finally:
        flash.close()


def mac_of(vb) -> str:
    return ":".join(f"{b:02x}" for b in vb.settings["mac"])


def test_four_boards_are_flashed_in_parallel_and_boot_the_new_firmware(new_board, firmware):
    boards = [new_board(f"dev{i}") for i in range(4)]
    for vb in boards:
        took_an_ota_update(vb)
        assert [e.seq for e in vb.ota_entries() if e.valid] == [2]  # ota_1 would boot
    with RomBootloader(boards[0]) as r0, RomBootloader(boards[1]) as r1, \
            RomBootloader(boards[2]) as r2, RomBootloader(boards[3]) as r3:
        roms = [r0, r1, r2, r3]
        progress: dict[str, list[int]] = {}
        started = time.monotonic()
        results = flash_boards([r.port for r in roms], "virtual", firmware,
                               on_progress=lambda port, done, total: progress.setdefault(port, []).append(done),
                               **EMULATOR_OPTIONS)
        elapsed = time.monotonic() - started
    data = firmware.read_bytes()
    for vb, rom, result in zip(boards, roms, results):
        assert (result.port, result.ok, result.error, result.retried) == (rom.port, True, None, False)
        assert (result.chip, result.mac, result.bytes_written) == ("esp32", mac_of(vb), len(data))
        assert progress[rom.port][-1] == len(data) and progress[rom.port] == sorted(progress[rom.port])
        assert flash_bytes(vb, 0x1000, len(data)) == data
        assert vb.ota_entries() and not any(e.valid for e in vb.ota_entries())
        assert vb.boot().firmware_version == NEW_VERSION  # not OTA_VERSION: otadata was erased
    # Each board spends its own wire time; one after another would take the sum.
    assert elapsed < 0.6 * sum(r.seconds for r in results)


def test_an_app_image_after_an_ota_update_boots_because_otadata_is_erased(new_board, tmp_path):
    vb = new_board()
    took_an_ota_update(vb)
    app = build_app_image("esp32", NEW_VERSION, size=16 * 1024)
    (tmp_path / "app.bin").write_bytes(app)
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "virtual", tmp_path / "app.bin", **EMULATOR_OPTIONS)
    assert result.ok, result.error
    assert result.bytes_written == len(app) + 0x2000  # the app, then otadata
    assert flash_bytes(vb, 0x10000, len(app)) == app
    assert flash_bytes(vb, 0xD000, 0x2000) == b"\xff" * 0x2000
    assert vb.boot().firmware_version == NEW_VERSION  # with otadata kept: OTA_VERSION from ota_1


def test_cli_flashes_every_port_and_prints_a_summary(new_board, firmware):
    boards = [new_board(f"dev{i}") for i in range(4)]
    with RomBootloader(boards[0]) as r0, RomBootloader(boards[1]) as r1, \
            RomBootloader(boards[2]) as r2, RomBootloader(boards[3]) as r3:
        ports = [arg for r in (r0, r1, r2, r3) for arg in ("--port", r.port)]
        proc = subprocess.run(
            [sys.executable, "-m", "mpfleet", "flash", "--board", "virtual", "--firmware", str(firmware), *ports,
             "--baud", str(BAUD), "--no-stub", "--before", "no-reset", "--after", "no-reset"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"version {NEW_VERSION}" in proc.stdout and "4 of 4 board(s) flashed and verified" in proc.stdout
    data = firmware.read_bytes()
    for vb in boards:
        assert mac_of(vb) in proc.stdout
        assert flash_bytes(vb, 0x1000, len(data)) == data


def test_an_image_for_another_chip_is_refused_before_any_erase(new_board, tmp_path):
    vb = new_board()
    s3_app = tmp_path / "s3.bin"
    s3_app.write_bytes(build_app_image("esp32s3", NEW_VERSION))
    before = vb.counters()
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "virtual", s3_app, **EMULATOR_OPTIONS)
        assert rom.stats.commands[FLASH_BEGIN] == 0
    assert not result.ok and result.chip == "esp32"
    assert result.error == (f"refused before erasing anything: s3.bin is an esp32s3 image "
                            f"but the chip on {rom.port} is an ESP32")
    assert vb.counters() == before
    assert vb.boot().firmware_version == "v1.24.0"


def test_a_board_definition_for_another_chip_is_refused_before_any_erase(new_board, tmp_path):
    vb = new_board()
    s3_app = tmp_path / "s3.bin"
    s3_app.write_bytes(build_app_image("esp32s3", NEW_VERSION))
    before = vb.counters()
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "esp32-s3-devkitc", s3_app, **EMULATOR_OPTIONS)
        assert rom.stats.commands[FLASH_BEGIN] == 0
    assert not result.ok and not result.retried
    assert result.error == (f"refused before erasing anything: the chip on {rom.port} is an ESP32 "
                            "but board esp32-s3-devkitc has an esp32s3")
    assert vb.counters() == before


def test_an_unplugged_board_fails_with_its_reason_while_the_others_finish(new_board, firmware):
    boards = [new_board(f"dev{i}") for i in range(4)]
    with RomBootloader(boards[0]) as r0, RomBootloader(boards[1]) as r1, \
            RomBootloader(boards[2], fail_after_bytes=40_000) as unplugged, RomBootloader(boards[3]) as r3:
        results = flash_boards([r.port for r in (r0, r1, unplugged, r3)], "virtual", firmware, **EMULATOR_OPTIONS)
        assert unplugged.unplugged and unplugged.stats.bytes_received == 40_000
    lost = results[2]
    assert not lost.ok and lost.retried and lost.bytes_written == 0
    assert lost.error.startswith(f"lost the connection while writing at {BAUD} baud (board unplugged?)")
    assert f"retried at 115200 baud: no ESP bootloader answered on {lost.port}" in lost.error
    data = firmware.read_bytes()
    for vb, result in zip(boards[:2] + boards[3:], results[:2] + results[3:]):
        assert result.ok and not result.retried
        assert flash_bytes(vb, 0x1000, len(data)) == data


def test_a_write_that_fails_at_high_speed_is_retried_once_at_115200(new_board, tmp_path):
    vb = new_board()
    app = build_app_image("esp32", NEW_VERSION, size=16 * 1024)
    (tmp_path / "app.bin").write_bytes(app)
    with RomBootloader(vb, unreliable_above_baud=460800) as rom:
        [result] = flash_boards([rom.port], "virtual", tmp_path / "app.bin", **EMULATOR_OPTIONS)
        assert rom.stats.errors[FLASH_DATA] >= 1 and rom.baud == 115200
    assert result.ok and result.retried and result.error is None
    assert flash_bytes(vb, 0x10000, len(app)) == app
    assert vb.boot().firmware_version == NEW_VERSION


def test_compressed_data_is_inflated_by_the_rom(new_board, firmware):
    vb = new_board()
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "virtual", firmware, compress=True, **EMULATOR_OPTIONS)
        assert rom.stats.commands[FLASH_DEFL_DATA] > 0 and rom.stats.commands[FLASH_DATA] == 0
    assert result.ok, result.error
    data = firmware.read_bytes()
    assert flash_bytes(vb, 0x1000, len(data)) == data


def test_an_esp32s3_board_is_detected_by_its_chip_id_and_flashed_at_0x0(new_board, tmp_path):
    vb = new_board(board="esp32-s3-devkitc")
    path = tmp_path / "firmware-s3.bin"
    path.write_bytes(merged_image(build_app_image("esp32s3", NEW_VERSION, size=APP_SIZE), "esp32s3", 0x0))
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "esp32-s3-devkitc", path, **EMULATOR_OPTIONS)
    assert result.ok, result.error
    assert (result.chip, result.mac) == ("esp32s3", mac_of(vb))
    assert flash_bytes(vb, 0x0, path.stat().st_size) == path.read_bytes()


def test_the_flasher_stub_cannot_run_on_the_emulator_and_says_so(new_board, firmware):
    vb = new_board()
    with RomBootloader(vb) as rom:
        [result] = flash_boards([rom.port], "virtual", firmware, **{**EMULATOR_OPTIONS, "no_stub": False})
        assert rom.stats.ram_code_crashes == 2 and rom.stats.commands[FLASH_BEGIN] == 0
    assert not result.ok and result.retried
    assert "Failed to start stub flasher" in result.error and "Guru Meditation" in result.error


@pytest.mark.parametrize("make, reason", [
    (lambda app: b"", "is empty"),
    (lambda app: b"\x7fELF" + app, "is neither an app image"),
    (lambda app: app[: len(app) // 2], "is neither an app image"),
    (lambda app: merged_image(app, "esp32s3", 0x1000), "its bootloader is for esp32s3 but its app is for esp32"),
    (lambda app: merged_image(app, "esp32", 0x0), "is neither an app image"),  # app not at 0x10000 - 0x1000
])
def test_a_bad_firmware_file_is_refused_before_any_port_is_opened(tmp_path, make, reason):
    path = tmp_path / "bad.bin"
    path.write_bytes(make(build_app_image("esp32", NEW_VERSION)))
    with pytest.raises(FlashError, match=reason):
        flash_boards(["/dev/does-not-exist"], "virtual", path, **EMULATOR_OPTIONS)


def test_an_app_image_goes_to_the_first_app_slot_and_otadata_is_erased_after_it(tmp_path):
    path = tmp_path / "app.bin"
    app = build_app_image("esp32", NEW_VERSION)
    path.write_bytes(app)
    plan = load_firmware(path, load_board("virtual"))
    assert (plan.kind, plan.chip, plan.version) == ("app", "esp32", NEW_VERSION)
    assert plan.writes == ((0x10000, app), (0xD000, b"\xff" * 0x2000))


def test_missing_file_and_repeated_ports_are_clear_errors(tmp_path, firmware):
    with pytest.raises(FlashError, match="does not exist"):
        flash_boards(["/dev/ttyUSB0"], "virtual", tmp_path / "nope.bin")
    with pytest.raises(FlashError, match="port given more than once: /dev/ttyUSB0"):
        flash_boards(["/dev/ttyUSB0", "/dev/ttyUSB0"], "virtual", firmware)


@pytest.mark.parametrize("args, status, message", [
    (["--board", "virtual", "--firmware", "{firmware}"], 2,
     "no boards to flash: give --port PORT (repeatable) or --all"),
    (["--board", "esp99", "--firmware", "{firmware}", "--port", "/dev/ttyUSB0"], 1,
     "mpfleet: unknown board 'esp99'"),
    (["--board", "virtual", "--firmware", "{missing}", "--port", "/dev/ttyUSB0"], 1,
     "mpfleet: firmware file {missing} does not exist"),
])
def test_cli_input_errors_are_one_clear_line(tmp_path, firmware, args, status, message):
    paths = {"firmware": firmware, "missing": tmp_path / "nope.bin"}
    args = [a.format(**paths) for a in args]
    proc = subprocess.run([sys.executable, "-m", "mpfleet", "flash", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == status and message.format(**paths) in proc.stderr
    assert "Traceback" not in proc.stderr


def table_row(stdout: str, port: str) -> str:
    """The per-board table's row for `port` (its first line)."""
    return next(line for line in stdout.splitlines() if line.startswith(f"│ {port} "))


def test_cli_with_one_board_failing_exits_1_with_the_table_and_flashes_the_others(new_board, firmware):
    boards = [new_board(f"dev{i}") for i in range(3)]
    with RomBootloader(boards[0]) as r0, RomBootloader(boards[1], fail_after_bytes=40_000) as unplugged, \
            RomBootloader(boards[2]) as r2:
        ports = [arg for r in (r0, unplugged, r2) for arg in ("--port", r.port)]
        proc = subprocess.run(
            [sys.executable, "-m", "mpfleet", "flash", "--board", "virtual", "--firmware", str(firmware), *ports,
             "--baud", str(BAUD), "--no-stub", "--before", "no-reset", "--after", "no-reset"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = {r.port: table_row(proc.stdout, r.port) for r in (r0, unplugged, r2)}
    assert row[r0.port].rstrip(" │").endswith("ok") and row[r2.port].rstrip(" │").endswith("ok")
    assert f"lost the connection while writing at {BAUD} baud" in row[unplugged.port]
    assert "2 of 3 board(s) flashed and verified" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == f"mpfleet: 1 of 3 board(s) failed: {unplugged.port}"
    data = firmware.read_bytes()
    for vb in (boards[0], boards[2]):
        assert flash_bytes(vb, 0x1000, len(data)) == data
