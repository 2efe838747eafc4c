"""Flash MicroPython onto many attached ESP32 boards at once, with esptool's Python API.

Which room: host library, usb/ (typed, prints nothing); the CLI is cli/flash.py (`mpfleet
flash`), docs/usb.md ("Flashing") explains the behaviour to users. Tests drive it
against virtual boards in download mode (mpfleet.sim.rom), through the real esptool.

The firmware file is checked once, before any port is touched (`load_firmware`):

- an app image (starts with 0xE9 and parses as an app: esp_app_desc_t in its first
  segment) is written at the board's first app partition (0x10000 on every stock
  layout);
- otherwise a merged image (bootloader, partition table, app: MicroPython's
  firmware.bin) is written at the board's `firmware_offset` (0x1000 on ESP32, 0x0 on
  S3/C3) and must hold a valid app where that partition starts;
- the otadata partition, if the board has one, is written with 0xFF (inside the
  merged image, or as a second write after an app image): with otadata erased the
  bootloader boots the first app slot, the one just written. A board that once took
  an OTA update would otherwise keep booting the other slot.

Then every port gets its own thread (usb/ports.each_port), and one port's failure never
stops another:

1. connect at the ROM's 115200 baud and detect the chip (`esptool.cmds.detect_chip`);
2. refuse, before anything is erased, a chip that is not the board definition's or
   the image's;
3. load esptool's flasher stub (unless `no_stub`), switch to `baud`, attach the flash;
4. write with `esptool.cmds.write_flash`, which checks every write against the
   flash's MD5 of the region;
5. reset as `after` says.

A write that fails after the connection was made (a flaky cable at high speed, a
board that vanished) is retried once from step 1 at `retry_baud`. A refusal, a port
where no bootloader answers, and a failed reset are not retried.

esptool reports through one process-wide logger. While `flash_boards` runs, a
routing logger is installed: messages from a flashing thread are dropped (they
belong to that port's result), its progress goes to `on_progress`; other threads
keep the logger that was there before, which is put back at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esp_pylib.logger import EspLog, EspLogBase
from esptool.cmds import attach_flash, detect_chip, reset_chip, run_stub, write_flash
from esptool.loader import ESPLoader
from esptool.util import FatalError
from serial import SerialException

from mpfleet.boards import Board, Partition, load_board
from mpfleet.errors import MpfleetError
from mpfleet.images.espimage import (
    CHIPS_BY_ID,
    IMAGE_MAGIC,
    ImageError,
    extract_app_from_merged,
    normalize_chip,
    parse_app_image,
)
from mpfleet.usb.ports import PortResult, Progress, each_port

ROM_BAUD = 115200  # every ESP32-family ROM loader starts here (esptool's ESP_ROM_BAUD)
DEFAULT_BAUD = 460800
RETRY_BAUD = 115200
BEFORE_MODES = ("default-reset", "usb-reset", "no-reset")
AFTER_MODES = ("hard-reset", "soft-reset", "no-reset")
ERASED = 0xFF

_IMAGE_CHIP_ID_OFFSET = 12  # u16 in an image's extended header

try:
    from termios import error as _TermiosError  # pyserial's flush() calls tcdrain() unwrapped
except ImportError:  # Windows: no termios
    _TermiosError = OSError
# What a port that went away, or a chip that said no, raises in esptool and pyserial.
# termios.error is not an OSError: a board unplugged while esptool flushed its port
# raised it out of the write, and the port failed as "unexpected error" without the retry.
_LINK_ERRORS = (FatalError, SerialException, OSError, _TermiosError)
_TROUBLESHOOTING_LINK = re.compile(r"For troubleshooting steps visit: \S+")


class FlashError(MpfleetError):
    """The flash job cannot start: bad firmware file, unknown board, bad options."""


@dataclass(frozen=True)
class FirmwarePlan:
    """What will be written where, decided once for every port."""

    path: str
    kind: str  # "app" or "merged"
    chip: str  # from the image header
    version: str  # the app's esp_app_desc_t version
    writes: tuple[tuple[int, bytes], ...]  # (flash offset, bytes), in order

    @property
    def size(self) -> int:
        return sum(len(data) for _, data in self.writes)


# --- the firmware file ---------------------------------------------------------------


def load_firmware(path: str | os.PathLike, board: Board) -> FirmwarePlan:
    """Read and check a firmware file for `board`; raises FlashError saying what is wrong."""
    data = _read_firmware(path)
    name = os.fspath(path)
    try:
        info = parse_app_image(data)
    except ImageError as not_app:
        return _merged_plan(name, data, board, not_app)
    app_slot = _first_app_partition(board)
    if len(data) > app_slot.size:
        raise FlashError(f"{name}: the app image ({len(data)} bytes) does not fit {app_slot.name} "
                         f"({app_slot.size} bytes) on board {board.name}")
    writes = _with_otadata_erased([(app_slot.offset, data)], board)
    return FirmwarePlan(name, "app", info.chip, info.version, writes)


def _read_firmware(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FlashError(f"firmware file {os.fspath(path)} does not exist") from None
    except IsADirectoryError:
        raise FlashError(f"firmware file {os.fspath(path)} is a directory") from None
    except OSError as e:
        raise FlashError(f"cannot read firmware file {os.fspath(path)}: {e.strerror}") from None
    if not data:
        raise FlashError(f"firmware file {os.fspath(path)} is empty")
    return data


def _merged_plan(name: str, data: bytes, board: Board, not_app: ImageError) -> FirmwarePlan:
    app_slot = _first_app_partition(board)
    app_at = app_slot.offset - board.firmware_offset
    try:
        app = extract_app_from_merged(data, app_at)
    except ImageError as not_merged:
        raise FlashError(
            f"{name} is neither an app image ({not_app}) nor a merged image for board "
            f"{board.name}, written at {board.firmware_offset:#x} with its app at "
            f"{app_slot.offset:#x} ({not_merged})"
        ) from None
    info = parse_app_image(app)
    _check_bootloader(name, data, board, info.chip)
    if board.firmware_offset + len(data) > board.flash_size:
        raise FlashError(f"{name}: {len(data)} bytes at {board.firmware_offset:#x} run past the end of "
                         f"board {board.name}'s {board.flash_size // (1 << 20)} MiB flash")
    writes = _with_otadata_erased([(board.firmware_offset, data)], board)
    return FirmwarePlan(name, "merged", info.chip, info.version, writes)


def _check_bootloader(name: str, data: bytes, board: Board, app_chip: str) -> None:
    if data[0] != IMAGE_MAGIC:
        raise FlashError(f"{name}: a merged image for board {board.name} must start with the bootloader "
                         f"(magic 0x{IMAGE_MAGIC:02X}) at {board.firmware_offset:#x}, but its first byte is "
                         f"{data[0]:#04x}")
    chip_id = int.from_bytes(data[_IMAGE_CHIP_ID_OFFSET:_IMAGE_CHIP_ID_OFFSET + 2], "little")
    bootloader_chip = CHIPS_BY_ID.get(chip_id, f"chip id {chip_id}")
    if bootloader_chip != app_chip:
        raise FlashError(f"{name}: its bootloader is for {bootloader_chip} but its app is for {app_chip}")


def _first_app_partition(board: Board) -> Partition:
    apps = sorted((p for p in board.partitions if p.type == "app"), key=lambda p: p.offset)
    if not apps:
        raise FlashError(f"board {board.name} has no app partition to write an image to")
    return apps[0]


def _otadata_partition(board: Board) -> Partition | None:
    return next((p for p in board.partitions if p.type == "data" and p.subtype == "ota"), None)


def _with_otadata_erased(writes: list[tuple[int, bytes]], board: Board) -> tuple[tuple[int, bytes], ...]:
    """Make sure otadata ends up 0xFF: inside a write that covers it, or as its own write."""
    otadata = _otadata_partition(board)
    if otadata is None:
        return tuple(writes)
    erased = bytes([ERASED]) * otadata.size
    out = []
    for offset, data in writes:
        if _covers(offset, data, otadata):
            at = otadata.offset - offset
            out.append((offset, data[:at] + erased + data[at + otadata.size:]))
        else:
            out.append((offset, data))
    if not any(_covers(offset, data, otadata) for offset, data in writes):
        out.append((otadata.offset, erased))
    return tuple(out)


def _covers(offset: int, data: bytes, part: Partition) -> bool:
    return offset <= part.offset and part.end <= offset + len(data)


# --- flashing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    baud: int
    retry_baud: int
    no_stub: bool
    before: str
    after: str
    compress: bool | None


def flash_boards(
    ports: Sequence[str],
    board: str | Board,
    firmware: str | os.PathLike | FirmwarePlan,
    *,
    baud: int = DEFAULT_BAUD,
    no_stub: bool = False,
    before: str = "default-reset",
    after: str = "hard-reset",
    compress: bool | None = None,
    retry_baud: int = RETRY_BAUD,
    on_progress: Progress | None = None,
) -> list[PortResult]:
    """Flash `firmware` onto the board on every port in parallel; one result per port, in order.

    `board` is a board definition (name from boards/, or a loaded Board); `compress`
    None keeps esptool's choice (compressed with the stub, plain with --no-stub).
    `on_progress(port, done, total)` (bytes) is called from the flashing threads.
    Raises FlashError before touching any port when the job cannot start.
    """
    definition = board if isinstance(board, Board) else load_board(board)
    plan = firmware if isinstance(firmware, FirmwarePlan) else load_firmware(firmware, definition)
    options = _checked_options(ports, baud, retry_baud, no_stub, before, after, compress)
    with _esptool_output_routed() as router:
        return each_port(ports, lambda port: _flash_port(_PortJob(port, definition, plan, on_progress), options,
                                                         router))


def _checked_options(ports: Sequence[str], baud: int, retry_baud: int, no_stub: bool, before: str,
                     after: str, compress: bool | None) -> _Options:
    if not ports:
        raise FlashError("no serial ports to flash")
    repeated = sorted({p for p in ports if list(ports).count(p) > 1})
    if repeated:
        raise FlashError(f"port given more than once: {', '.join(repeated)}")
    if before not in BEFORE_MODES:
        raise FlashError(f"unknown --before {before!r} (choose from {', '.join(BEFORE_MODES)})")
    if after not in AFTER_MODES:
        raise FlashError(f"unknown --after {after!r} (choose from {', '.join(AFTER_MODES)})")
    if baud <= 0 or retry_baud <= 0:
        raise FlashError(f"baud rates must be positive (got {baud} and {retry_baud})")
    return _Options(baud, retry_baud, no_stub, before, after, compress)


class _PortFailure(Exception):
    """This port is done: the message says why (one line)."""


class _WriteFailed(_PortFailure):
    """The write went wrong after the chip answered: worth one more try, slower."""


class _PortJob:
    """One port's state, shared by its thread and the routing logger."""

    def __init__(self, port: str, board: Board, plan: FirmwarePlan, on_progress: Progress | None):
        self.port = port
        self.board = board
        self.plan = plan
        self.chip: str | None = None
        self.mac: str | None = None
        self.bytes_done = 0
        self._on_progress = on_progress
        self._write_base = 0  # bytes of the plan's earlier writes
        self._write_len = 0

    def start_write(self, index: int) -> None:
        self._write_base = sum(len(data) for _, data in self.plan.writes[:index])
        self._write_len = len(self.plan.writes[index][1])
        self.report(self._write_base)

    def write_progress(self, done: int, total: int) -> None:
        """esptool's progress for the current write (its units: bytes sent, maybe compressed)."""
        if total > 0:
            self.report(self._write_base + self._write_len * min(done, total) // total)

    def report(self, done: int) -> None:
        self.bytes_done = done
        if self._on_progress is not None:
            self._on_progress(self.port, done, self.plan.size)


def _flash_port(job: _PortJob, options: _Options, router: _RoutedLog) -> PortResult:
    started = time.monotonic()
    retried = False
    router.bind(job)
    try:
        try:
            _attempt(job, options, options.baud)
        except _WriteFailed as first:
            retried = True
            try:
                _attempt(job, options, options.retry_baud)
            except _PortFailure as second:
                raise _PortFailure(f"{first}; retried at {options.retry_baud} baud: {second}") from None
        job.report(job.plan.size)
        return _result(job, started, retried)
    except _PortFailure as e:
        return _result(job, started, retried, error=str(e))
    except Exception as e:  # noqa: BLE001 - a bug here or in esptool fails this port only
        return _result(job, started, retried, error=f"unexpected {type(e).__name__}: {_one_line(e)}")
    finally:
        router.unbind()


def _result(job: _PortJob, started: float, retried: bool, error: str | None = None) -> PortResult:
    return PortResult(port=job.port, ok=error is None, chip=job.chip, mac=job.mac,
                      seconds=round(time.monotonic() - started, 2),
                      bytes_written=job.bytes_done if error is None else 0, error=error, retried=retried)


def _attempt(job: _PortJob, options: _Options, baud: int) -> None:
    """Connect, check the chip, write everything, reset: one try."""
    initial_baud = min(ROM_BAUD, baud)
    with _connect(job.port, options.before, initial_baud) as rom:
        _identify(job, rom)
        _refuse_wrong_chip(job, rom.CHIP_NAME)
        try:
            esp = _prepare(rom, options, initial_baud, baud)
            _write(esp, job, options)
        except _LINK_ERRORS as e:
            raise _WriteFailed(_write_failure(e, baud)) from None
        _reset(esp, options.after)


def _connect(port: str, before: str, baud: int) -> ESPLoader:
    try:
        return detect_chip(port, baud=baud, connect_mode=before)
    except _LINK_ERRORS as e:
        raise _PortFailure(f"no ESP bootloader answered on {port}: {_one_line(e)}") from None


def _identify(job: _PortJob, esp: ESPLoader) -> None:
    """The detected chip (mpfleet's name when mpfleet knows it) and its MAC, for the result."""
    try:
        job.chip = normalize_chip(esp.CHIP_NAME)
    except ImageError:
        job.chip = esp.CHIP_NAME
    with contextlib.suppress(*_LINK_ERRORS):
        mac = esp.read_mac()
        if mac:
            job.mac = ":".join(f"{b:02x}" for b in mac)


def _refuse_wrong_chip(job: _PortJob, chip_name: str) -> None:
    """Before anything is erased: the chip must be the board's and the image's."""
    board, plan = job.board, job.plan
    if job.chip != board.chip:
        raise _PortFailure(f"refused before erasing anything: the chip on {job.port} is an {chip_name} "
                           f"but board {board.name} has an {board.chip}")
    if job.chip != plan.chip:
        raise _PortFailure(f"refused before erasing anything: {Path(plan.path).name} is an {plan.chip} "
                           f"image but the chip on {job.port} is an {chip_name}")


def _prepare(rom: ESPLoader, options: _Options, initial_baud: int, baud: int) -> ESPLoader:
    esp = rom if options.no_stub else run_stub(rom)
    if baud > initial_baud:
        esp.change_baud(baud)
    attach_flash(esp)
    return esp


def _write(esp: ESPLoader, job: _PortJob, options: _Options) -> None:
    compression = {} if options.compress is None else (
        {"compress": True} if options.compress else {"no_compress": True})
    for index, (offset, data) in enumerate(job.plan.writes):
        job.start_write(index)
        # write_flash verifies the region's MD5 after writing and raises on a mismatch.
        write_flash(esp, [(offset, data)], **compression)


def _reset(esp: ESPLoader, after: str) -> None:
    # On a port without DTR/RTS (a pty) esptool warns "Chip was NOT reset" and goes on.
    try:
        reset_chip(esp, after)
    except _LINK_ERRORS as e:
        raise _PortFailure(f"written and verified, but the {after} failed: {_one_line(e)}") from None


def _write_failure(error: Exception, baud: int) -> str:
    if isinstance(error, (SerialException, OSError, _TermiosError)):
        return f"lost the connection while writing at {baud} baud (board unplugged?): {_one_line(error)}"
    return f"write at {baud} baud failed: {_one_line(error)}"


def _one_line(error: BaseException) -> str:
    """The error and its cause on one line, without esptool's generic troubleshooting link."""
    text = _TROUBLESHOOTING_LINK.sub("", str(error))
    cause = error.__cause__
    if cause is not None and str(cause) not in text:
        text += f" ({cause})"
    return " ".join(text.split()) or type(error).__name__


# --- esptool's logger -----------------------------------------------------------------------


class _RoutedLog(EspLogBase):
    """esptool's logger while flashing: per-thread routing (see the module docstring)."""

    def __init__(self, previous: EspLogBase | None):
        self.previous = previous
        self._local = threading.local()

    def bind(self, job: _PortJob) -> None:
        self._local.job = job

    def unbind(self) -> None:
        self._local.job = None

    def _job(self) -> _PortJob | None:
        return getattr(self._local, "job", None)

    def _forward(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._job() is None and self.previous is not None:
            getattr(self.previous, method)(*args, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        self._forward("print", *args, **kwargs)

    def err(self, *args: Any, suggestion: str | None = None) -> None:
        self._forward("err", *args, suggestion=suggestion)

    def warn(self, *args: Any, suggestion: str | None = None) -> None:
        self._forward("warn", *args, suggestion=suggestion)

    # esptool's older names for warn and err
    def warning(self, message: str, suggestion: str | None = None) -> None:
        self.warn(message, suggestion=suggestion)

    def error(self, message: str, suggestion: str | None = None) -> None:
        self.err(message, suggestion=suggestion)

    def note(self, *args: Any) -> None:
        self._forward("note", *args)

    def hint(self, *args: Any) -> None:
        self._forward("hint", *args)

    def debug(self, *args: Any) -> None:
        self._forward("debug", *args)

    def stage(self, finish: bool = False) -> None:
        self._forward("stage", finish)

    def set_verbosity(self, mode: int | str) -> None:
        if self.previous is not None:
            self.previous.set_verbosity(mode)

    def progress_bar(self, cur_iter: int, total_iters: int, prefix: str = "", suffix: str = "",
                     bar_length: int = 30) -> None:
        job = self._job()
        if job is not None:
            job.write_progress(cur_iter, total_iters)
        elif self.previous is not None:
            self.previous.progress_bar(cur_iter, total_iters, prefix, suffix, bar_length)


class _LogRouting:
    """Installs one _RoutedLog while any flash_boards call runs (they may overlap)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._router: _RoutedLog | None = None

    @contextlib.contextmanager
    def routed(self) -> Iterator[_RoutedLog]:
        with self._lock:
            if self._users == 0:
                self._router = _RoutedLog(EspLog.instance)
                EspLog.set_logger(self._router)
            self._users += 1
            router = self._router
        try:
            yield router
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    EspLog.instance = router.previous
                    self._router = None


_log_routing = _LogRouting()
_esptool_output_routed = _log_routing.routed
