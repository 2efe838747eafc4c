"""The virtual board's console on a pseudo-terminal, driven by the real host tools.

mpremote, ampy and pyserial talk to `SerialConsole.port` exactly as to a USB
board; these tests guard what they check byte for byte (the raw REPL banner,
"soft reboot\\r\\n", "OK...\\x04\\x04>", raw-paste's "R\\x01") and that the
board behind the port behaves like an ESP32 (LittleFS in flash.bin, soft reset
keeping RTC memory, deep sleep and power cuts through the console).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import serial

from mpfleet.sim.board import DEEPSLEEP_RESET, PWRON_RESET, SOFT_RESET, WDT_RESET, VirtualBoard
from mpfleet.sim.serial import RAW_REPL_BANNER, SerialConsole

LOOPING_MAIN = b"""\
import time
with open('ran.txt', 'a') as f:
    f.write('main ran\\n')
print('main started')
while True:
    time.sleep_ms(100)
"""


@pytest.fixture
def board(tmp_path):
    vb = VirtualBoard.create(tmp_path / "dev")
    vb.fs_put({"/main.py": LOOPING_MAIN})
    return vb


def _children() -> list[int]:
    """Processes whose parent is this test process."""
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("PPid:"):
                        if line.split()[1] == me:
                            found.append(int(entry))
                        break
        except OSError:
            continue
    return found


@pytest.fixture
def open_console(tmp_path):
    """Open a console on a board; on teardown check nothing is left running."""
    opened = []

    def open_(vb: VirtualBoard, **kwargs) -> SerialConsole:
        console = SerialConsole(vb, **kwargs)
        opened.append(console)
        return console

    yield open_
    pids = []
    for console in opened:
        pids.append(console.device_pid)
        console.close()
        assert not console.alive
        assert console.device_pid is None
    for pid in filter(None, pids):
        assert not os.path.exists(f"/proc/{pid}"), f"device process {pid} still exists"
    assert _children() == []


def mpremote(port: str, *args: str, timeout: float = 30) -> str:
    proc = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                          capture_output=True, timeout=timeout)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"mpremote {args} failed ({proc.returncode}): {out}{proc.stderr.decode()}"
    return out


def ampy(port: str, *args: str, timeout: float = 30) -> str:
    proc = subprocess.run([sys.executable, "-m", "ampy.cli", "--port", port, *args],
                          capture_output=True, timeout=timeout)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, f"ampy {args} failed ({proc.returncode}): {out}{proc.stderr.decode()}"
    return out


def read_until(port: serial.Serial, ending: bytes, timeout_s: float = 5) -> bytes:
    deadline = time.monotonic() + timeout_s
    data = b""
    while not data.endswith(ending) and time.monotonic() < deadline:
        data += port.read(1)
    assert data.endswith(ending), f"expected {ending!r}, got {data!r}"
    return data


def test_mpremote_fs_cp_puts_the_file_on_the_littlefs_in_flash(board, open_console, tmp_path):
    content = b"line one\nline two\n"
    local = tmp_path / "data.txt"
    local.write_bytes(content)
    link = tmp_path / "ttyVB0"
    console = open_console(board, link=link)
    assert os.readlink(link) == console.port

    mpremote(str(link), "fs", "cp", str(local), ":data.txt")
    assert "data.txt" in mpremote(console.port, "fs", "ls")
    # Output is cooked as on an ESP32: print()'s "\n" arrives as "\r\n".
    assert "line one\r\nline two\r\n" in mpremote(console.port, "exec", "print(open('data.txt').read())")

    console.close()
    assert not link.exists()
    assert board.fs_get("/data.txt") == content


def test_mpremote_soft_reset_is_a_soft_reset_that_keeps_rtc_memory(board, open_console):
    console = open_console(board)
    console.wait_for_output(b"main started")
    # `resume` keeps mpremote from soft-resetting before it executes.
    mpremote(console.port, "resume", "exec", "import machine; machine.RTC().memory(b'abc')")

    mpremote(console.port, "soft-reset")
    out = mpremote(console.port, "resume", "exec",
                   "import machine; print(machine.reset_cause(), machine.RTC().memory())")
    assert out.strip() == f"{SOFT_RESET} b'abc'"

    console.close()
    records = board.boot_records()
    assert [(r["reset_cause"], r["exit_reason"]) for r in records] == [
        (PWRON_RESET, "soft_reset"),
        (SOFT_RESET, "console_closed"),
    ]
    # A soft reset never leaves the running firmware (no bootloader, no otadata).
    assert records[0]["running_slot"] == records[1]["running_slot"] == "ota_0"
    assert board.rtc_memory() == b"abc"


def test_mpremote_interrupts_running_main_and_executes_in_raw_repl(board, open_console):
    console = open_console(board)
    console.wait_for_output(b"main started")

    out = mpremote(console.port, "exec", "print(open('ran.txt').read())")

    # main.py ran once: before the interrupt, and not again after mpremote's
    # soft reset in the raw REPL (a board skips main.py there).
    assert out.replace("\r\n", "\n").strip() == "main ran"
    seen = console.output()
    assert seen.index(b"main started") < seen.index(b"MPY: soft reboot\r\n" + RAW_REPL_BANNER)


def test_pyserial_raw_repl_and_raw_paste_bytes_match_a_board(board, open_console):
    console = open_console(board)
    console.wait_for_output(b"main started")
    with serial.Serial(console.port, timeout=5) as port:
        port.write(b"\r\x03\x03")
        read_until(port, b">>> ")
        port.write(b"\x01")
        assert read_until(port, b"\r\n" + RAW_REPL_BANNER + b">").endswith(b">>> \r\n" + RAW_REPL_BANNER + b">")

        port.write(b"print('hi')\x04")
        assert read_until(port, b"\x04>") == b"OKhi\r\n\x04\x04>"
        port.write(b"1/0\x04")
        assert b"ZeroDivisionError" in read_until(port, b"\x04>")

        port.write(b"\x05A\x01")
        assert port.read(2) == b"R\x01"
        window = int.from_bytes(port.read(2), "little")
        assert window > 0 and port.read(1) == b"\x01"
        port.write(b"print(6 * 7)\x04")
        assert read_until(port, b"\x04>") == b"\x0442\r\n\x04\x04>"

        # Ctrl-D on the empty raw REPL: a soft reset back into the raw REPL.
        port.write(b"\x04")
        assert read_until(port, RAW_REPL_BANNER + b">") == b"OK\r\nMPY: soft reboot\r\n" + RAW_REPL_BANNER + b">"


def test_ctrl_d_in_the_friendly_repl_soft_resets_and_runs_main_again(board, open_console):
    console = open_console(board)
    console.wait_for_output(b"main started")
    with serial.Serial(console.port, timeout=5) as port:
        port.write(b"\x03")
        read_until(port, b">>> ")
        port.write(b"\x04")
        out = read_until(port, b"main started\r\n")
        assert out.startswith(b"\r\nMPY: soft reboot\r\n")
    console.close()
    assert [r["exit_reason"] for r in board.boot_records()] == ["soft_reset", "console_closed"]
    assert board.fs_get("/ran.txt") == b"main ran\nmain ran\n"


def test_ampy_put_ls_and_get(board, open_console, tmp_path):
    local = tmp_path / "conf.json"
    local.write_bytes(b'{"interval_s": 60}\n')
    console = open_console(board)
    console.wait_for_output(b"main started")

    ampy(console.port, "put", str(local), "/conf.json")
    assert "/conf.json" in ampy(console.port, "ls").split()
    ampy(console.port, "get", "/conf.json", str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_bytes() == local.read_bytes()


def test_deep_sleep_wakes_the_board_again_behind_the_console(tmp_path, open_console):
    vb = VirtualBoard.create(tmp_path / "dev")
    vb.fs_put({"/main.py": textwrap.dedent("""\
        import machine, time
        n = (machine.RTC().memory() or b'\\x00')[0] + 1
        machine.RTC().memory(bytes([n]))
        print('boot', n, machine.reset_cause())
        if n < 3:
            machine.deepsleep(10)
        while True:
            time.sleep_ms(100)
        """).encode()})
    console = open_console(vb)
    console.wait_for_output(f"boot 3 {DEEPSLEEP_RESET}".encode())
    assert "3" in mpremote(console.port, "exec", "import machine; print(machine.RTC().memory()[0])")
    assert [(r.reset_cause, r.exit_reason) for r in console.records[:2]] == [
        (PWRON_RESET, "deepsleep"), (DEEPSLEEP_RESET, "deepsleep")]


def test_watchdog_resets_a_board_left_at_the_repl(tmp_path, open_console):
    vb = VirtualBoard.create(tmp_path / "dev")
    vb.fs_put({"/main.py": b"import machine\nprint('cause', machine.reset_cause())\n"
                          b"if machine.reset_cause() == 1:\n    machine.WDT(timeout=200)\n"})
    console = open_console(vb)
    # main.py returns, the REPL does not feed the WDT: the board resets, as an ESP32 does.
    console.wait_for_output(f"cause {WDT_RESET}".encode())
    assert console.records[0].exit_reason == "wdt"


def test_power_cut_leaves_the_board_dark_until_power_on(board, open_console):
    board.power_on()
    board.schedule_power_cut(after_ops=1)  # main.py's first write to ran.txt
    console = open_console(board)
    deadline = time.monotonic() + 10
    while not console.records and time.monotonic() < deadline:
        time.sleep(0.02)
    assert console.records[0].exit_reason == "power_cut"
    dark = len(console.output())
    time.sleep(0.3)
    assert console.device_pid is None and console.output(dark) == b""

    console.power_on()
    console.wait_for_output(b"main started", start=dark)
    console.close()
    assert [(r["reset_cause"], r["exit_reason"]) for r in board.boot_records()] == [
        (PWRON_RESET, "power_cut"), (PWRON_RESET, "console_closed")]
