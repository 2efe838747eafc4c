"""The `mpfleet` command line: sim commands work end to end; bad input gives one clear line."""

import json
import subprocess
import sys

import pytest
from cli_harness import mpfleet


@pytest.mark.slow
def test_sim_create_put_run_and_counters(tmp_path):
    dev = tmp_path / "dev1"
    main = tmp_path / "main.py"
    main.write_text("import machine\nprint('awake')\nmachine.deepsleep(60000)\n")
    mpfleet("sim", "create", dev, "--device-id", "dev-1")
    mpfleet("sim", "put", dev, main, "/main.py")
    assert "main.py" in mpfleet("sim", "ls", dev).stdout
    runs = json.loads(mpfleet("sim", "run", dev, "--boots", "3", "--json").stdout)
    assert [r["exit_reason"] for r in runs] == ["deepsleep"] * 3
    assert [r["reset_cause_name"] for r in runs] == ["PWRON_RESET", "DEEPSLEEP_RESET", "DEEPSLEEP_RESET"]
    counters = json.loads(mpfleet("sim", "flash", dev, "--json").stdout)
    assert counters["vfs"]["erases"] > 0 and counters["ota_0"]["bytes_programmed"] > 0
    status = json.loads(mpfleet("sim", "status", dev, "--json").stdout)
    assert status["device_id"] == "dev-1" and status["boot_count"] == 3


@pytest.mark.slow
def test_sim_run_hours_of_device_time(tmp_path):
    dev = tmp_path / "dev"
    main = tmp_path / "main.py"
    main.write_text("import machine\nmachine.deepsleep(600000)\n")
    mpfleet("sim", "create", dev)
    mpfleet("sim", "put", dev, main, "/main.py")
    runs = json.loads(mpfleet("sim", "run", dev, "--hours", "1", "--json").stdout)
    assert len(runs) == 6  # wakes at 0, 10, ..., 50 minutes; the last sleep reaches the hour


def test_not_a_board_is_one_clear_error(tmp_path):
    proc = mpfleet("sim", "run", tmp_path / "nothing", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("mpfleet: ") and "not a virtual board" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_board_names_the_known_ones(tmp_path):
    proc = mpfleet("sim", "create", tmp_path / "x", "--board", "esp99", check=False)
    assert proc.returncode == 1 and "esp32-devkitc" in proc.stderr


def test_boards_list_json_has_the_four_boards():
    names = {b["name"] for b in json.loads(mpfleet("boards", "list", "--json").stdout)}
    assert names == {"esp32-devkitc", "esp32-s3-devkitc", "esp32-c3-devkitm", "virtual"}


@pytest.mark.slow
def test_power_cut_then_power_on_resets_rtc(tmp_path):
    dev = tmp_path / "dev"
    main = tmp_path / "main.py"
    main.write_text("import machine\nr = machine.RTC()\nprint('rtc', r.memory())\nr.memory(b'x')\n"
                    "machine.deepsleep(1000)\n")
    mpfleet("sim", "create", dev)
    mpfleet("sim", "put", dev, main, "/main.py")
    mpfleet("sim", "run", dev, "--boots", "2")
    mpfleet("sim", "power-cut", dev)
    out = mpfleet("sim", "run", dev, "--boots", "1").stdout
    assert "rtc b''" in out and "PWRON_RESET" in out


def test_board_demo_shows_a_rollback_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "mpfleet.demo.board"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rolled back" in proc.stdout


def test_every_command_group_resolves_to_its_module_and_is_named_as_listed():
    import click

    from mpfleet.cli import COMMANDS, cli

    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        command = cli.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name, name
    assert cli.get_command(ctx, "no-such-command") is None
    assert sorted(COMMANDS) == cli.list_commands(ctx)


def test_a_command_imports_only_its_own_group():
    code = ("import sys; from mpfleet.cli import main\n"
            "try:\n    main(['devices', 'list', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith(('mpfleet.cli.', 'esptool', 'mpfleet.sim'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = proc.stdout.strip().splitlines()[-1]
    assert "esptool" not in loaded and "mpfleet.sim" not in loaded and "mpfleet.cli.usb" not in loaded, loaded
