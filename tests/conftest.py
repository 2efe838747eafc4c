"""Shared fixtures: virtual boards at the RAM budget, firmware runs, a real broker."""

from __future__ import annotations

import os
import textwrap

import pytest

from mpfleet.broker.local import LocalBroker, find_mosquitto
from mpfleet.sim import VirtualBoard

# Stress tests run a reduced count in `make test`; MPFLEET_STRESS=1 (make stress) runs them in full.
STRESS = os.environ.get("MPFLEET_STRESS") == "1"


def stress_count(quick: int, full: int) -> int:
    return full if STRESS else quick


@pytest.fixture
def new_board(tmp_path):
    """Factory: a freshly created, powered virtual board (128 KiB firmware heap)."""
    made = []

    def make(name: str = "dev", **kwargs) -> VirtualBoard:
        vb = VirtualBoard.create(tmp_path / name, **kwargs)
        vb.power_on()
        made.append(vb)
        return vb

    return make


@pytest.fixture
def run_firmware(new_board):
    """Run MicroPython source as the board's main.py for one boot; returns the BootRecord.

    The record carries `output`, `exit_reason` and `heap_live`; use
    mpfleet.sim.heap.heap_needed() for the smallest heap a program fits in.
    """

    def run(source: str, board: VirtualBoard | None = None, files: dict | None = None):
        vb = board or new_board()
        payload = {"/main.py": textwrap.dedent(source).encode()}
        payload.update(files or {})
        vb.fs_put(payload)
        return vb.boot()

    return run


@pytest.fixture(scope="module")
def mosquitto():
    """A real mosquitto on a free loopback port for the module's tests, stopped afterwards."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    with LocalBroker() as broker:
        yield broker


def firmware_files(only: tuple[str, ...] | None = None, compiled: bool = True) -> dict[str, bytes]:
    """The firmware tree as {device path: bytes}, for VirtualBoard.fs_put: lib/ as
    .mpy, as a deploy puts it (see mpfleet.images.firmware).

    `only` limits it to paths relative to firmware/ (e.g. ("lib/agent/mqtt.py",)).
    """
    from mpfleet.images.firmware import firmware_tree

    return firmware_tree(compiled=compiled, only=only)


def child_processes() -> dict[int, str]:
    """{pid: command line} of this process's children (zombies included)."""
    me = str(os.getpid())
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip() or "<zombie>"
        except (OSError, StopIteration):
            continue
    return found


@pytest.fixture(autouse=True, scope="module")
def leaves_nothing_running(request):
    """Every test module must stop what it started (brokers, devices, helpers)."""
    before = set(child_processes())
    yield
    import time

    deadline = time.monotonic() + 5
    left = {}
    while time.monotonic() < deadline:
        left = {pid: cmd for pid, cmd in child_processes().items() if pid not in before}
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"{request.module.__name__} left processes running: {left}")
