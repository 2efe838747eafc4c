"""`mpfleet sim ...` tells the truth and is usable: device time is virtual (sleeps take
no real time), `run --hours` runs the hours whatever the host does to the clock and
reports progress, status shows otadata, bad input is one `mpfleet:` line."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from cli_harness import assert_one_line_error, mpfleet_at
from mpfleet.broker.local import free_port
from mpfleet.images.espimage import build_app_image
from mpfleet.sim.board import VirtualBoard, runtime_module

def mpfleet(tmp_path: Path, *args, timeout: float = 120):
    """`mpfleet ARGS` with a HOME, config directory and database of the test's own."""
    return mpfleet_at(tmp_path, *args, timeout=timeout, keep_cache=True)


def board_with_main(tmp_path: Path, source: str, name: str = "dev") -> Path:
    board = tmp_path / name
    assert mpfleet(tmp_path, "sim", "create", board, "--device-id", "dev-1").returncode == 0
    main = tmp_path / f"{name}-main.py"
    main.write_text(source)
    put = mpfleet(tmp_path, "sim", "put", board, main, "/main.py")
    assert put.returncode == 0, put.stderr
    return board


# ------------------------------------------------------------ run: virtual device time

SLEEPY_MAIN = """\
import machine, time
print("awake at", time.time())
time.sleep(300)
machine.lightsleep(300000)
print("after sleeps", time.time())
machine.deepsleep(600000)
"""


def test_run_hours_skips_sleeps_inside_a_wake_and_deep_sleeps_instead_of_waiting(tmp_path):
    board = board_with_main(tmp_path, SLEEPY_MAIN)
    started = time.monotonic()
    proc = mpfleet(tmp_path, "sim", "run", board, "--hours", "2", "--json")
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    # Each wake is 10 min of sleeps inside it and a 10 min deep sleep: six in two hours.
    assert [r["exit_reason"] for r in records] == ["deepsleep"] * 6
    assert all(r["awake_ms"] >= 600000 for r in records)
    assert took < 30, f"two device-hours took {took:.1f} s of real time"


def test_sleeps_inside_a_wake_move_the_device_clock(tmp_path):
    board = board_with_main(tmp_path, SLEEPY_MAIN)
    proc = mpfleet(tmp_path, "sim", "run", board, "--boots", "1")
    assert proc.returncode == 0, proc.stderr
    awake = int(proc.stdout.split("awake at ")[1].split()[0])
    after = int(proc.stdout.split("after sleeps ")[1].split()[0])
    assert after - awake == 600


def test_run_hours_counts_device_time_not_the_clock_a_host_sets(tmp_path):
    # As the host's ack does: the device's RTC is set years ahead at the first wake.
    board = board_with_main(tmp_path, """\
import machine
rtc = machine.RTC()
if rtc.datetime()[0] < 2020:
    rtc.datetime((2026, 6, 1, 0, 12, 0, 0, 0))
machine.deepsleep(600000)
""")
    proc = mpfleet(tmp_path, "sim", "run", board, "--hours", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 6  # an hour of 10-minute sleeps, not one boot


def test_run_reports_progress_per_boot_on_stderr(tmp_path):
    board = board_with_main(tmp_path, "import machine\nmachine.deepsleep(1800000)\n")
    proc = mpfleet(tmp_path, "sim", "run", board, "--hours", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 4, proc.stderr
    assert lines[0].startswith("boot 1: deepsleep") and "of 2.00 h" in lines[0]
    assert "device time 2.00 h of 2.00 h" in lines[-1]


def test_an_unfed_watchdog_still_resets_the_chip_through_a_skipped_sleep(tmp_path):
    board = board_with_main(tmp_path, """\
import machine, time
if machine.reset_cause() == machine.WDT_RESET:
    machine.deepsleep(60000)
machine.WDT(timeout=2000)
time.sleep(10)
machine.deepsleep(60000)
""")
    proc = mpfleet(tmp_path, "sim", "run", board, "--boots", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert records[0]["exit_reason"] == "wdt"
    assert records[1]["reset_cause_name"] == "WDT_RESET"


# ------------------------------------------------------------ status: otadata

def test_status_shows_which_slot_boots_and_each_slots_state_in_text_and_json(tmp_path):
    board = tmp_path / "dev"
    assert mpfleet(tmp_path, "sim", "create", board).returncode == 0
    vb = VirtualBoard(board)
    vb.write_app_image("ota_1", build_app_image(vb.board["chip"], "v1.25.0"))
    flash = vb.flash()  # what esp32.Partition.set_boot() writes: a NEW entry for ota_1
    try:
        runtime_module("_simota").set_boot(flash, vb.partition("otadata")["offset"], 1, 2)
    finally:
        flash.close()
    proc = mpfleet(tmp_path, "sim", "status", board, "--json")
    assert proc.returncode == 0, proc.stderr
    otadata = json.loads(proc.stdout)["otadata"]
    assert otadata["boots"] == "ota_1"
    assert otadata["slots"] == [{"slot": "ota_0", "state": "none"}, {"slot": "ota_1", "state": "NEW"}]
    text = mpfleet(tmp_path, "sim", "status", board)
    assert "otadata: boots ota_1" in text.stdout
    assert "ota_1 (boots)" in text.stdout and "NEW" in text.stdout


# ------------------------------------------------------------ bad input is refused

def assert_usage_error(proc, *words):
    """click's convention for a bad argument: exit 2, the offending value named, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_create_refuses_a_heap_that_is_not_a_size_and_makes_no_board(tmp_path):
    for heap in ("12zz", "0", "-5k", "k"):
        proc = mpfleet(tmp_path, "sim", "create", tmp_path / "dev", "--heap", heap)
        assert_usage_error(proc, f"'{heap}'", "--heap")
        assert not (tmp_path / "dev").exists()


def test_create_refuses_a_device_id_with_spaces_or_capitals(tmp_path):
    for device_id in ("pump 7", "Pump-7"):
        proc = mpfleet(tmp_path, "sim", "create", tmp_path / "dev", "--device-id", device_id)
        assert_usage_error(proc, f"'{device_id}'", "--device-id")
        assert not (tmp_path / "dev").exists()


def test_create_under_a_file_is_one_line(tmp_path):
    (tmp_path / "plain").write_text("")
    assert_one_line_error(mpfleet(tmp_path, "sim", "create", tmp_path / "plain" / "dev"), "plain", "Not a directory")


def test_create_where_nothing_can_be_made_is_one_line(tmp_path):
    assert_one_line_error(mpfleet(tmp_path, "sim", "create", "/proc/no-such-board"), "/proc/no-such-board")


def test_run_status_and_flash_on_a_directory_without_a_board_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in ("run", "status", "flash"):
        assert_one_line_error(mpfleet(tmp_path, "sim", command, tmp_path / "empty"), "not a virtual board")


# ------------------------------------------------------------ sim fleet: a dead broker, --provision-only

def test_fleet_against_a_dead_broker_fails_at_once_in_one_line(tmp_path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    proc = mpfleet(tmp_path, "sim", "fleet", "--devices", "2", "--root", tmp_path / "fleet",
                   "--broker", f"mqtt://127.0.0.1:{port}", "--duration", "30")
    assert_one_line_error(proc, f"no broker at mqtt://127.0.0.1:{port}")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "fleet").exists()  # nothing provisioned for a run that cannot happen


def test_fleet_provision_only_registers_the_boards_and_runs_none(tmp_path, mosquitto):
    proc = mpfleet(tmp_path, "sim", "fleet", "--devices", "3", "--root", tmp_path / "fleet",
                   "--broker", mosquitto.url, "--provision-only")
    assert proc.returncode == 0, proc.stderr
    assert "provisioned 3 devices" in proc.stdout
    listed = mpfleet(tmp_path, "devices", "list", "--json")
    assert sorted(d["id"] for d in json.loads(listed.stdout)) == ["sim-0001", "sim-0002", "sim-0003"]
    assert all(VirtualBoard(p).state["boot_count"] == 0 for p in sorted((tmp_path / "fleet").glob("sim-*")))
    run = mpfleet(tmp_path, "sim", "fleet", "--root", tmp_path / "fleet", "--broker", mosquitto.url,
                  "--duration", "3", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout[run.stdout.index("{"):])["boots"] >= 3


# ------------------------------------------------------------ image add: a refused image leaves nothing

def test_image_add_of_an_image_for_another_chip_refuses_and_leaves_nothing_behind(tmp_path):
    image = tmp_path / "s3.bin"
    image.write_bytes(build_app_image("esp32s3", "v1.25.0"))
    db, images = tmp_path / "fleet.db", tmp_path / "images"
    proc = mpfleet(tmp_path, "image", "add", image, "--chip", "esp32", "--db", db, "--images-dir", images)
    assert_one_line_error(proc, "s3.bin is an image for esp32s3, not for esp32")
    assert not db.exists() and not images.exists()
    # The same file for its own chip goes in: the refusal was the chip, not the file.
    added = mpfleet(tmp_path, "image", "add", image, "--chip", "esp32s3", "--db", db, "--images-dir", images,
                    "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["chip"] == "esp32s3" and len(list(images.iterdir())) == 1


# ------------------------------------------------------------ console: a REPL on a board that reboots fast

def _expect(fd: int, word: bytes, timeout_s: float = 20) -> bytes:
    got, deadline = b"", time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                got += os.read(fd, 4096)
            except OSError:
                break
            if word in got:
                return got
    raise AssertionError(f"no {word!r} in {got!r}")


def test_console_gives_mpremote_a_repl_on_the_agent_waking_many_times_a_second(tmp_path):
    board = tmp_path / "dev"
    assert mpfleet(tmp_path, "sim", "create", board, "--device-id", "pump-9").returncode == 0
    config = tmp_path / "pump-9.json"
    config.write_text(json.dumps({"device_id": "pump-9", "wifi": {"ssid": "sim", "password": "sim"},
                                  "broker": {"host": "127.0.0.1", "port": free_port()}}))
    assert mpfleet(tmp_path, "sim", "deploy", board, "--config", config).returncode == 0
    link = tmp_path / "dev.tty"
    console = subprocess.Popen([sys.executable, "-m", "mpfleet", "sim", "console", board, "--link", link],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while VirtualBoard(board).state["boot_count"] < 10:  # the agent's wakes, back to back
            assert time.monotonic() < deadline and console.poll() is None, "the board did not boot"
            time.sleep(0.1)
        mpremote = str(Path(sys.executable).with_name("mpremote"))
        ran = subprocess.run([mpremote, "connect", str(link), "exec", "print(6*7)"], capture_output=True,
                             text=True, timeout=30)
        assert ran.returncode == 0 and ran.stdout.strip() == "42", ran.stdout + ran.stderr
        master, slave = pty.openpty()
        repl = subprocess.Popen([mpremote, "connect", str(link), "repl"], stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        try:
            _expect(master, b"Connected")
            for _ in range(10):  # as a user would: Ctrl-C until the prompt shows
                os.write(master, b"\x03")
                try:
                    _expect(master, b">>> ", timeout_s=2)
                    break
                except AssertionError:
                    continue
            else:
                raise AssertionError("no REPL prompt after ten Ctrl-C")
            boots = VirtualBoard(board).state["boot_count"]
            os.write(master, b"print(6*7)\r")
            _expect(master, b"42")
            time.sleep(1)
            assert VirtualBoard(board).state["boot_count"] == boots  # it stays at the REPL
            os.write(master, b"\x1d")  # mpremote's exit key
            assert repl.wait(10) == 0
        finally:
            repl.kill()
            repl.wait()
            os.close(master)
    finally:
        console.terminate()
        console.wait(20)


# ------------------------------------------------------------ image build: a test image without writing Python

def test_image_build_writes_an_image_the_store_accepts_and_a_virtual_board_boots(tmp_path):
    image = tmp_path / "test-v1.25.0.app-bin"
    built = mpfleet(tmp_path, "image", "build", "--board", "virtual", "--version", "v1.25.0",
                    "--secure-version", "2", "-o", image)
    assert built.returncode == 0, built.stderr
    added = mpfleet(tmp_path, "image", "add", image, "--chip", "esp32", "--json", "--db", tmp_path / "fleet.db",
                    "--images-dir", tmp_path / "images")
    assert added.returncode == 0, added.stderr
    record = json.loads(added.stdout)
    assert (record["version"], record["secure_version"]) == ("v1.25.0", 2)
    board = board_with_main(tmp_path, "import machine\nmachine.deepsleep(60000)\n")
    VirtualBoard(board).write_app_image("ota_0", image.read_bytes())
    run = mpfleet(tmp_path, "sim", "run", board, "--boots", "1", "--json")
    assert json.loads(run.stdout)[0]["firmware_version"] == "v1.25.0"


def test_image_build_refuses_an_unknown_board_and_a_version_too_long_in_one_line(tmp_path):
    assert_one_line_error(mpfleet(tmp_path, "image", "build", "--board", "nosuch", "--version", "v1",
                                  "-o", tmp_path / "x.bin"), "unknown board 'nosuch'")
    assert_usage_error(mpfleet(tmp_path, "image", "build", "--version", "v" * 40, "-o", tmp_path / "x.bin"),
                       "31-byte version field")
    assert not (tmp_path / "x.bin").exists()


# ------------------------------------------------------------ flashing a virtual board from the CLI

def test_a_virtual_board_in_download_mode_is_flashed_by_mpfleet_flash_and_boots_the_image(tmp_path):
    board = board_with_main(tmp_path, "import machine\nmachine.deepsleep(60000)\n")
    image = tmp_path / "test.app-bin"
    assert mpfleet(tmp_path, "image", "build", "--version", "v1.26.0", "-o", image).returncode == 0
    link = tmp_path / "dev.rom"
    rom = subprocess.Popen([sys.executable, "-m", "mpfleet", "sim", "download-mode", board, "--link", link],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        assert "ROM bootloader on" in rom.stdout.readline()
        flashed = mpfleet(tmp_path, "flash", "--board", "virtual", "--firmware", image, "--port", link,
                          "--no-stub", "--before", "no-reset", "--after", "no-reset", "--baud", "115200", "--json")
        assert flashed.returncode == 0, flashed.stdout + flashed.stderr
    finally:
        rom.terminate()
        assert rom.wait(20) == 0
    assert not link.exists()
    run = mpfleet(tmp_path, "sim", "run", board, "--boots", "1", "--json")
    assert json.loads(run.stdout)[0]["firmware_version"] == "v1.26.0"
