"""Which boards a many-board command works on, the per-port runner, and what each port did.

Which room: host library, usb/. Every command that takes boards (`mpfleet flash`,
`deploy`, `usb run`, `usb collect`, and `ports` for what it lists) enumerates them
with `list_usb_ports` and turns its `--port`/`--all` into a list with
`resolve_ports`, so the rule below holds everywhere. Prints nothing.

The rule (docs/usb.md, "Which boards"):

1. `--port PORT` names a board; repeat it for more. A board named twice (the same
   name, or two names of one device, such as a /dev/serial/by-path link and the
   /dev/ttyUSB* it points to) is a usage error: the list was not what was meant.
2. `--all` adds every attached USB serial port, in `list_usb_ports` order, that was
   not named already.
3. Both together: the named ports first, in the order given, then the rest of --all.
4. Neither is a usage error; `--all` finding nothing, with no --port, is an error.

Attached USB serial ports are pyserial's ports with a USB vendor and product id (a
board's USB-serial bridge or USB-Serial/JTAG), sorted by USB location in hub order
(1-1.2 before 1-1.10: the location is the stable key, the board on hub port 3 keeps
it whatever /dev name it gets), then those without a location by device name, both
compared with numbers as numbers.

Work on the chosen ports runs in one thread per port (`each_port`); one board's
failure is its `PortResult`, never the others' end. A command with any failed board
ends in `BoardsFailed`, which carries every result.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mpfleet.errors import MpfleetError

Progress = Callable[[str, int, int], None]
"""on_progress(port, done, total): called from the per-port threads; the unit is the
command's (bytes for flashing, steps for field work)."""


class BadPortChoice(MpfleetError):
    """--port/--all named no board, or one board twice (the CLI exits 2: a usage error)."""


class NoUsbPorts(MpfleetError):
    """--all found no attached USB serial port, and no --port was given."""


class BoardsFailed(MpfleetError):
    """At least one board of a many-board command failed; `results` holds every port's."""

    def __init__(self, results: Sequence[PortResult]):
        self.results = list(results)
        self.failed = [r for r in self.results if not r.ok]
        super().__init__(f"{len(self.failed)} of {len(self.results)} board(s) failed: "
                         f"{', '.join(r.port for r in self.failed)}")


# ---------------------------------------------------------------- enumeration
@dataclass(frozen=True)
class UsbPort:
    """A serial port with a USB vendor/product id, as pyserial reports it."""

    port: str  # the device name: /dev/ttyUSB0, COM3
    vid: int
    pid: int
    serial: str | None = None  # the USB serial number, when the bridge has one
    location: str | None = None  # USB bus and hub ports, "1-1.3"
    description: str | None = None

    @property
    def vid_pid(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"

    @property
    def key(self) -> str:
        """What names this board across replugs: its USB location, else its serial number."""
        return self.location or self.serial or self.port


def _natural(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: 1-1.2 < 1-1.10, ttyUSB2 < ttyUSB10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _attached_order(p: UsbPort) -> tuple:
    return (p.location is None, _natural(p.location or ""), _natural(p.port))


def sort_ports(ports: Iterable[UsbPort]) -> list[UsbPort]:
    """USB location in hub order, then the ports without a location by name."""
    return sorted(ports, key=_attached_order)


def list_usb_ports() -> list[UsbPort]:
    """The attached USB serial ports, in the order every command uses (module docstring)."""
    from serial.tools import list_ports  # only commands that enumerate need it

    return sort_ports(UsbPort(p.device, p.vid, p.pid, p.serial_number, p.location, p.description)
                      for p in list_ports.comports() if p.vid is not None and p.pid is not None)


def resolve_ports(named: Sequence[str], all_attached: bool, *, action: str = "work on",
                  attached: Callable[[], Iterable[UsbPort]] = list_usb_ports) -> list[str]:
    """The ports a command works on, by the rule in the module docstring.

    `action` completes the message when no board is given ("no boards to flash").
    Raises BadPortChoice (neither given, or a board named twice) or NoUsbPorts.
    """
    if not named and not all_attached:
        raise BadPortChoice(f"no boards to {action}: give --port PORT (repeatable) or --all")
    chosen: dict[str, str] = {}  # the device a name resolves to -> the name given
    for port in named:
        device = os.path.realpath(port)
        if device in chosen:
            first = chosen[device]
            raise BadPortChoice(f"{port} is given twice" if first == port else
                                f"{first} and {port} are the same board ({device})")
        chosen[device] = port
    if all_attached:
        found = list(attached())
        if not found and not chosen:
            raise NoUsbPorts("--all found no USB serial port (none with a USB vendor/product id): is a board "
                             "plugged in, its USB-serial driver loaded? `mpfleet ports` lists what is attached")
        for p in found:
            chosen.setdefault(os.path.realpath(p.port), p.port)
    return list(chosen.values())


# ---------------------------------------------------------------- results and the runner
@dataclass
class PortResult:
    """What one command did on one port. Every command sets port, ok and (when not ok) error,
    one line saying why; flashing fills chip, mac, seconds, bytes_written and retried;
    field work fills device and detail (the command's own figures, JSON-ready)."""

    port: str
    ok: bool = False
    device: str | None = None  # the device id, when the board has one
    error: str | None = None
    detail: dict = field(default_factory=dict)
    chip: str | None = None  # detected: mpfleet's name ("esp32s3") or esptool's if unknown
    mac: str | None = None
    seconds: float = 0.0
    bytes_written: int = 0
    retried: bool = False  # the write was retried at the lower baud rate

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def one_line(reason: str) -> str:
    """A failed board's reason as one line of the table (a tool's message may hold newlines)."""
    return " ".join(reason.split())


def each_port(ports: Iterable[str], work: Callable[[str], PortResult]) -> list[PortResult]:
    """work(port) on every port at once, one thread each; results in the ports' order.
    An exception is that port's failed result: one board never stops the others."""
    ports = list(ports)

    def guarded(port: str) -> PortResult:
        try:
            result = work(port)
        except MpfleetError as e:
            return PortResult(port, error=one_line(str(e)))
        except Exception as e:  # noqa: BLE001 - one board must never stop the others
            return PortResult(port, error=one_line(f"{type(e).__name__}: {e}"))
        if result.error is not None:
            result.error = one_line(result.error)
        return result

    if not ports:
        return []
    with ThreadPoolExecutor(max_workers=len(ports), thread_name_prefix="mpfleet-usb") as pool:
        return list(pool.map(guarded, ports))


def check_boards(results: Sequence[PortResult]) -> list[PortResult]:
    """`results` when every board is ok; otherwise BoardsFailed carrying them all."""
    if any(not r.ok for r in results):
        raise BoardsFailed(results)
    return list(results)
