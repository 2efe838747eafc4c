"""Board definitions: one JSON file per board in the repository's ``boards/`` directory.

Which room: host library. The CLI, the flasher and the virtual board all read boards
through ``load_board``; nothing else parses these files.

A board file, ``boards/<name>.json`` (integers are JSON numbers; strings such as
``"0x1000"`` are accepted too)::

    {
      "name": "esp32-devkitc",             same as the file name without ".json"
      "description": "...",
      "chip": "esp32",                     esp32 | esp32s2 | esp32s3 | esp32c3 | esp32c6
      "flash_size": 4194304,               bytes, a power of two, 1 MiB or more
      "firmware_offset": 4096,             where the merged firmware is flashed: 0x1000 on
                                           esp32/esp32s2, 0x0 on esp32s3/c3/c6
      "firmware_build": "ESP32_GENERIC-OTA",   MicroPython board[-variant] to flash
      "partitions": [                      the layout the firmware's partition table gives
        {"name": "nvs", "type": "data", "subtype": "nvs", "offset": 36864, "size": 16384},
        ...
      ],
      "sensors": [                         what the device samples (may be empty)
        {"name": "adc0", "kind": "adc", "pin": 34, "atten": "11dB",
         "signal": {"model": "sine", "base": 1.2, "amplitude": 0.4, "period_s": 600}},
        ...
      ],
      "pins": {"led": 2},                  optional: other GPIOs the firmware uses
      "sim": {"mac_prefix": "02:6d:70"}    optional: settings for the virtual board only
    }

Partitions follow ESP-IDF rules: offsets and sizes are multiples of 4096 bytes, app
partitions start on a 64 KiB boundary, nothing sits below 0x9000 (bootloader and the
partition table at 0x8000), nothing overlaps or runs past ``flash_size``. An OTA board
(``firmware_build`` ending in "-OTA", or any ``ota_N`` app partition) needs an
``otadata`` partition (data/ota, 0x2000 bytes) and the ``ota_0`` and ``ota_1`` slots.

The ``vfs`` partition (data/littlefs) holds the LittleFS filesystem. Since MicroPython
1.26 it is not in the flashed partition table: the firmware creates it at run time from the
end of the last partition (0x310000 in ESP32_GENERIC-OTA) to the end of flash. Boards list
it so that host tools and the simulator know where the filesystem lives.

Sensor kinds, their extra fields, and the unit of the simulated value:

    kind           pin   extra fields                               value is
    adc            yes   "atten": "0dB"|"2.5dB"|"6dB"|"11dB"       volts at the pin
    battery        yes   "divider": ratio >= 1, "atten" (11dB)      volts at the battery;
                                                                    the pin sees value/divider
    dht22          yes   "humidity": a signal (%RH), optional       degrees Celsius
    internal_temp  no    -                                          degrees Celsius

Every sensor has a ``signal`` that the virtual board evaluates at simulated time t
(seconds): ``{"model", "base", "amplitude", "period_s", "seed"}``, see ``Signal.value``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from mpfleet.errors import MpfleetError
from mpfleet.images.espimage import BOOTLOADER_OFFSETS, CHIP_IDS
from mpfleet.paths import BOARDS_DIR

BOARDS_DIR_ENV = "MPFLEET_BOARDS_DIR"

FLASH_SECTOR = 0x1000  # erase unit and partition alignment
APP_PARTITION_ALIGN = 0x10000  # MMU page: app partitions must start on it
PARTITION_TABLE_OFFSET = 0x8000
PARTITION_TABLE_SIZE = 0x1000
FIRST_PARTITION_OFFSET = PARTITION_TABLE_OFFSET + PARTITION_TABLE_SIZE
OTADATA_SIZE = 0x2000  # two sectors, one per otadata copy
MIN_FLASH_SIZE = 1 << 20
MAX_PARTITION_NAME_LEN = 16  # label[16] in esp_partition_info_t

PARTITION_SUBTYPES: dict[str, frozenset[str]] = {
    "app": frozenset({"factory", "test"} | {f"ota_{n}" for n in range(16)}),
    "data": frozenset(
        {"ota", "phy", "nvs", "coredump", "nvs_keys", "efuse", "undefined", "fat",
         "spiffs", "littlefs"}
    ),
}

#: Highest GPIO number per chip (datasheets); pins above it do not exist.
MAX_GPIO: dict[str, int] = {
    "esp32": 39,
    "esp32s2": 46,
    "esp32s3": 48,
    "esp32c3": 21,
    "esp32c6": 30,
}

SENSOR_KINDS = ("adc", "battery", "dht22", "internal_temp")
ADC_ATTENUATIONS = ("0dB", "2.5dB", "6dB", "11dB")
DEFAULT_BATTERY_ATTEN = "11dB"
SIGNAL_MODELS = ("constant", "sine", "ramp", "noise")
DEFAULT_NOISE_STEP_S = 1.0

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MAC_PREFIX_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){0,4}$")

_TOP_FIELDS = (
    "name", "description", "chip", "flash_size", "firmware_offset", "firmware_build",
    "partitions", "sensors", "pins", "sim",
)
_PARTITION_FIELDS = ("name", "type", "subtype", "offset", "size")
_SENSOR_COMMON_FIELDS = ("name", "kind", "pin", "signal")
_SENSOR_EXTRA_FIELDS = {
    "adc": ("atten",),
    "battery": ("divider", "atten"),
    "dht22": ("humidity",),
    "internal_temp": (),
}
_SIGNAL_FIELDS = ("model", "base", "amplitude", "period_s", "seed")


class BoardError(MpfleetError):
    """A board definition is missing, unreadable or invalid."""


# --- data ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    name: str
    type: str
    subtype: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.type, "subtype": self.subtype,
                "offset": self.offset, "size": self.size}


@dataclass(frozen=True)
class Signal:
    """A deterministic simulated sensor value as a function of time."""

    model: str
    base: float
    amplitude: float = 0.0
    period_s: float | None = None
    seed: int = 0

    def value(self, t_s: float) -> float:
        """The value at simulated time ``t_s`` (seconds).

        constant: base.  sine: base + amplitude * sin(2 pi t / period_s).
        ramp: base + amplitude * (t mod period_s) / period_s (a sawtooth).
        noise: base + amplitude * u, u in [-1, 1) drawn from (seed, t // period_s), so
        the value holds for one period_s (default 1 s) and repeats run to run.
        """
        if self.model == "constant":
            return self.base
        if self.model == "sine":
            return self.base + self.amplitude * math.sin(2 * math.pi * t_s / self.period_s)
        if self.model == "ramp":
            return self.base + self.amplitude * (t_s % self.period_s) / self.period_s
        step = math.floor(t_s / (self.period_s or DEFAULT_NOISE_STEP_S))
        return self.base + self.amplitude * _unit_noise(self.seed, step)

    def to_json(self) -> dict:
        out = {"model": self.model, "base": self.base, "amplitude": self.amplitude}
        if self.period_s is not None:
            out["period_s"] = self.period_s
        out["seed"] = self.seed
        return out


@dataclass(frozen=True)
class Sensor:
    name: str
    kind: str
    pin: int | None  # None only for internal_temp
    signal: Signal
    atten: str | None = None  # adc, battery
    divider: float | None = None  # battery
    humidity: Signal | None = None  # dht22

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "kind": self.kind}
        if self.pin is not None:
            out["pin"] = self.pin
        for key in ("atten", "divider"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["signal"] = self.signal.to_json()
        if self.humidity is not None:
            out["humidity"] = self.humidity.to_json()
        return out


@dataclass(frozen=True)
class Board:
    """A validated board definition (``pins`` and ``sim`` are plain dicts: don't mutate)."""

    name: str
    description: str
    chip: str
    flash_size: int
    firmware_offset: int
    firmware_build: str
    partitions: tuple[Partition, ...]
    sensors: tuple[Sensor, ...]
    pins: dict = field(default_factory=dict)
    sim: dict = field(default_factory=dict)
    source: str = field(default="<board>", compare=False)

    @classmethod
    def from_json(cls, obj: object, source: str = "<board>") -> Board:
        """Validate a decoded board file; errors name ``source`` and the field."""
        return _parse_board(obj, source, file_stem=None)

    def to_json(self) -> dict:
        out: dict = {
            "name": self.name,
            "description": self.description,
            "chip": self.chip,
            "flash_size": self.flash_size,
            "firmware_offset": self.firmware_offset,
            "firmware_build": self.firmware_build,
            "partitions": [p.to_json() for p in self.partitions],
            "sensors": [s.to_json() for s in self.sensors],
        }
        if self.pins:
            out["pins"] = dict(self.pins)
        if self.sim:
            out["sim"] = json.loads(json.dumps(self.sim))  # deep copy
        return out

    @property
    def is_ota(self) -> bool:
        return _is_ota(self.firmware_build, self.partitions)

    @property
    def app_slots(self) -> tuple[Partition, ...]:
        """The OTA app partitions in slot order (ota_0, ota_1, ...)."""
        slots = [p for p in self.partitions if p.type == "app" and p.subtype.startswith("ota_")]
        return tuple(sorted(slots, key=lambda p: int(p.subtype[len("ota_"):])))

    def partition(self, name: str) -> Partition:
        for part in self.partitions:
            if part.name == name:
                return part
        known = ", ".join(p.name for p in self.partitions)
        raise BoardError(f"{self.source}: no partition named {name!r} (partitions: {known})")

    def sensor(self, name: str) -> Sensor:
        for sensor in self.sensors:
            if sensor.name == name:
                return sensor
        known = ", ".join(s.name for s in self.sensors) or "none"
        raise BoardError(f"{self.source}: no sensor named {name!r} (sensors: {known})")


# --- finding and loading -----------------------------------------------------------------


def boards_dir() -> Path:
    """``$MPFLEET_BOARDS_DIR`` if set, else ``boards/`` at the repository root."""
    override = os.environ.get(BOARDS_DIR_ENV)
    if override:
        return Path(override)
    return BOARDS_DIR


def list_boards() -> list[str]:
    """Names of the board files in ``boards_dir()``, sorted."""
    directory = boards_dir()
    if not directory.is_dir():
        return []
    return sorted(path.stem for path in directory.glob("*.json"))


def load_board(name_or_path: str | os.PathLike) -> Board:
    """Load a board by name ("esp32-devkitc") or by path to its JSON file."""
    path = _board_path(name_or_path)
    source = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BoardError(f"{source}: cannot read board file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise BoardError(f"{source}: not UTF-8 text ({exc.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BoardError(
            f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return _parse_board(obj, source, file_stem=path.stem)


def _board_path(name_or_path: str | os.PathLike) -> Path:
    text = os.fspath(name_or_path)
    if text.endswith(".json") or "/" in text or os.sep in text:
        return Path(text)
    path = boards_dir() / f"{text}.json"
    if not path.is_file():
        known = ", ".join(list_boards()) or "none"
        raise BoardError(
            f"unknown board {text!r}: there is no {_display(path)} (known boards: {known})"
        )
    return path


def _display(path: Path) -> str:
    """The path relative to the working directory when it is below it (shorter errors)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- validation ------------------------------------------------------------------------


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Object:
    """One JSON object under validation; every error names the file and the field path."""

    def __init__(self, source: str, where: str, value: object, known: tuple[str, ...]):
        self.source = source
        self.where = where
        if not isinstance(value, dict):
            got = _json_type(value)
            raise self._error(where or "(top level)", f"expected an object, got {got}")
        self.value = value
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise self.error(unknown[0], f"unknown field (allowed: {', '.join(known)})")

    def _error(self, path: str, message: str) -> BoardError:
        return BoardError(f"{self.source}: {path}: {message}")

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def error(self, key: str, message: str) -> BoardError:
        return self._error(self.path(key), message)

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str) -> object:
        if key not in self.value:
            raise self.error(key, "missing required field")
        return self.value[key]

    def string(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_json_type(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def integer(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise self.error(
            key, f"expected an integer (e.g. 4096 or \"0x1000\"), got {json.dumps(value)}"
        )

    def number(self, key: str) -> float:
        value = self.raw(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise self.error(key, f"expected a number, got {_json_type(value)}")

    def array(self, key: str) -> list:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.error(key, f"expected an array, got {_json_type(value)}")
        return value

    def child(self, key: str, known: tuple[str, ...]) -> _Object:
        return _Object(self.source, self.path(key), self.raw(key), known)

    def choice(self, key: str, allowed) -> str:
        value = self.string(key)
        if value not in allowed:
            raise self.error(key, f"unknown {key} {value!r} (allowed: {', '.join(allowed)})")
        return value


def _parse_board(obj: object, source: str, file_stem: str | None) -> Board:
    top = _Object(source, "", obj, _TOP_FIELDS)
    name = top.string("name")
    if not _NAME_RE.match(name):
        raise top.error("name", f"{name!r} must be lower-case letters, digits, '-' or '_'")
    if file_stem is not None and name != file_stem:
        raise top.error("name", f"{name!r} does not match the file name {file_stem!r}")
    chip = top.choice("chip", tuple(CHIP_IDS))
    flash_size = _flash_size(top)
    firmware_offset = top.integer("firmware_offset")
    if firmware_offset != BOOTLOADER_OFFSETS[chip]:
        raise top.error(
            "firmware_offset",
            f"{firmware_offset:#x} is wrong for {chip}, whose firmware starts at "
            f"{BOOTLOADER_OFFSETS[chip]:#x}",
        )
    firmware_build = top.string("firmware_build")
    partitions = _partitions(top, flash_size)
    _check_ota_layout(top, firmware_build, partitions)
    pins = _pins(top, chip)
    sensors = _sensors(top, chip, pins)
    return Board(
        name=name,
        description=top.string("description"),
        chip=chip,
        flash_size=flash_size,
        firmware_offset=firmware_offset,
        firmware_build=firmware_build,
        partitions=partitions,
        sensors=sensors,
        pins=pins,
        sim=_sim(top),
        source=source,
    )


def _flash_size(top: _Object) -> int:
    size = top.integer("flash_size")
    if size < MIN_FLASH_SIZE or size & (size - 1):
        raise top.error(
            "flash_size", f"{size} is not a power-of-two size of 1 MiB (1048576) or more"
        )
    return size


def _partitions(top: _Object, flash_size: int) -> tuple[Partition, ...]:
    items = top.array("partitions")
    if not items:
        raise top.error("partitions", "must list at least one partition")
    parts: list[Partition] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        entry = _Object(top.source, f"partitions[{index}]", item, _PARTITION_FIELDS)
        part = _partition(entry, flash_size)
        if part.name in seen:
            raise entry.error(
                "name",
                f"duplicate partition name {part.name!r} (also partitions[{seen[part.name]}])",
            )
        seen[part.name] = index
        parts.append(part)
    _check_overlaps(top, parts)
    return tuple(parts)


def _partition(entry: _Object, flash_size: int) -> Partition:
    name = entry.string("name")
    if len(name.encode()) > MAX_PARTITION_NAME_LEN:
        raise entry.error("name", f"{name!r} is longer than {MAX_PARTITION_NAME_LEN} bytes")
    ptype = entry.choice("type", tuple(PARTITION_SUBTYPES))
    subtype = entry.choice("subtype", tuple(sorted(PARTITION_SUBTYPES[ptype])))
    offset = entry.integer("offset")
    size = entry.integer("size")
    align = APP_PARTITION_ALIGN if ptype == "app" else FLASH_SECTOR
    if offset % align:
        why = " (app partitions start on a 64 KiB MMU page)" if ptype == "app" else ""
        raise entry.error("offset", f"{offset:#x} is not {align}-aligned{why}")
    if offset < FIRST_PARTITION_OFFSET:
        raise entry.error(
            "offset",
            f"{offset:#x} is below {FIRST_PARTITION_OFFSET:#x}: the bootloader and the "
            f"partition table ({PARTITION_TABLE_OFFSET:#x}) live there",
        )
    if size <= 0 or size % FLASH_SECTOR:
        raise entry.error("size", f"{size:#x} is not a positive multiple of {FLASH_SECTOR}")
    if offset + size > flash_size:
        raise entry.error(
            "size",
            f"{name!r} ends at {offset + size:#x}, beyond flash_size {flash_size:#x}",
        )
    return Partition(name=name, type=ptype, subtype=subtype, offset=offset, size=size)


def _check_overlaps(top: _Object, parts: list[Partition]) -> None:
    order = sorted(range(len(parts)), key=lambda i: parts[i].offset)
    for before, after in zip(order, order[1:]):
        first, second = parts[before], parts[after]
        if second.offset < first.end:
            raise BoardError(
                f"{top.source}: partitions[{after}].offset: {second.name!r} "
                f"({second.offset:#x}..{second.end:#x}) overlaps {first.name!r} "
                f"({first.offset:#x}..{first.end:#x}, partitions[{before}])"
            )


def _is_ota(firmware_build: str, partitions) -> bool:
    return firmware_build.upper().endswith("-OTA") or any(
        p.type == "app" and p.subtype.startswith("ota_") for p in partitions
    )


def _check_ota_layout(top: _Object, firmware_build: str, parts: tuple[Partition, ...]) -> None:
    if not _is_ota(firmware_build, parts):
        return
    otadata = [i for i, p in enumerate(parts) if p.type == "data" and p.subtype == "ota"]
    if not otadata:
        raise top.error(
            "partitions", "an OTA board needs an otadata partition (type data, subtype ota)"
        )
    index = otadata[0]
    if parts[index].size != OTADATA_SIZE:
        raise top.error(
            f"partitions[{index}].size",
            f"otadata must be {OTADATA_SIZE:#x} bytes (two sectors), not {parts[index].size:#x}",
        )
    app_subtypes = {p.subtype for p in parts if p.type == "app"}
    for slot in ("ota_0", "ota_1"):
        if slot not in app_subtypes:
            raise top.error(
                "partitions", f"an OTA board needs an app partition with subtype {slot}"
            )


def _check_gpio(entry: _Object, key: str, pin: int, chip: str) -> None:
    if not 0 <= pin <= MAX_GPIO[chip]:
        raise entry.error(key, f"GPIO {pin} does not exist on {chip} (0..{MAX_GPIO[chip]})")


def _pins(top: _Object, chip: str) -> dict:
    if not top.has("pins"):
        return {}
    pins_obj = top.raw("pins")
    if not isinstance(pins_obj, dict):
        raise top.error("pins", f"expected an object, got {_json_type(pins_obj)}")
    entry = _Object(top.source, "pins", pins_obj, tuple(pins_obj))
    pins = {}
    for key in pins_obj:
        pins[key] = entry.integer(key)
        _check_gpio(entry, key, pins[key], chip)
    return pins


def _sensors(top: _Object, chip: str, pins: dict) -> tuple[Sensor, ...]:
    items = top.array("sensors")
    sensors: list[Sensor] = []
    names: dict[str, int] = {}
    gpio_users = {pin: f"pins.{key}" for key, pin in pins.items()}
    for index, item in enumerate(items):
        where = f"sensors[{index}]"
        kind = _sensor_kind(top.source, where, item)
        known = _SENSOR_COMMON_FIELDS + _SENSOR_EXTRA_FIELDS[kind]
        entry = _Object(top.source, where, item, known)
        sensor = _sensor(entry, kind, chip)
        if sensor.name in names:
            raise entry.error(
                "name",
                f"duplicate sensor name {sensor.name!r} (also sensors[{names[sensor.name]}])",
            )
        names[sensor.name] = index
        if sensor.pin is not None:
            if sensor.pin in gpio_users:
                raise entry.error(
                    "pin", f"GPIO {sensor.pin} is already used by {gpio_users[sensor.pin]}"
                )
            gpio_users[sensor.pin] = where
        sensors.append(sensor)
    return tuple(sensors)


def _sensor_kind(source: str, where: str, item: object) -> str:
    """Read "kind" first: it decides which other fields are allowed."""
    if not isinstance(item, dict):
        raise BoardError(f"{source}: {where}: expected an object, got {_json_type(item)}")
    if "kind" not in item:
        raise BoardError(f"{source}: {where}.kind: missing required field")
    kind = item["kind"]
    if kind not in SENSOR_KINDS:
        raise BoardError(
            f"{source}: {where}.kind: unknown kind {json.dumps(kind)} "
            f"(allowed: {', '.join(SENSOR_KINDS)})"
        )
    return kind


def _sensor(entry: _Object, kind: str, chip: str) -> Sensor:
    name = entry.string("name")
    pin = None
    if kind == "internal_temp":
        if entry.has("pin"):
            raise entry.error("pin", "internal_temp is inside the chip and has no pin")
    else:
        pin = entry.integer("pin")
        _check_gpio(entry, "pin", pin, chip)
    atten = divider = humidity = None
    if kind == "adc":
        atten = entry.choice("atten", ADC_ATTENUATIONS)
    elif kind == "battery":
        divider = entry.number("divider")
        if divider < 1.0:
            raise entry.error("divider", f"{divider} must be 1.0 or more (input/output ratio)")
        atten = DEFAULT_BATTERY_ATTEN
        if entry.has("atten"):
            atten = entry.choice("atten", ADC_ATTENUATIONS)
    elif kind == "dht22" and entry.has("humidity"):
        humidity = _signal(entry.child("humidity", _SIGNAL_FIELDS))
    signal = _signal(entry.child("signal", _SIGNAL_FIELDS))
    return Sensor(name=name, kind=kind, pin=pin, signal=signal, atten=atten,
                  divider=divider, humidity=humidity)


def _signal(entry: _Object) -> Signal:
    model = entry.choice("model", SIGNAL_MODELS)
    base = entry.number("base")
    amplitude = entry.number("amplitude") if entry.has("amplitude") else 0.0
    period_s = None
    if entry.has("period_s"):
        period_s = entry.number("period_s")
        if period_s <= 0:
            raise entry.error("period_s", f"{period_s} must be greater than 0")
    elif model in ("sine", "ramp"):
        raise entry.error("period_s", f"missing required field (the {model} model needs it)")
    seed = entry.integer("seed") if entry.has("seed") else 0
    return Signal(model=model, base=base, amplitude=amplitude, period_s=period_s, seed=seed)


def _sim(top: _Object) -> dict:
    if not top.has("sim"):
        return {}
    sim = top.raw("sim")
    if not isinstance(sim, dict):
        raise top.error("sim", f"expected an object, got {_json_type(sim)}")
    prefix = sim.get("mac_prefix")
    if prefix is not None and not (isinstance(prefix, str) and _MAC_PREFIX_RE.match(prefix)):
        raise top.error(
            "sim.mac_prefix",
            f"{json.dumps(prefix)} is not 1-5 lower-case hex octets like \"02:6d:70\"",
        )
    return sim


def _unit_noise(seed: int, step: int) -> float:
    """A repeatable pseudo-random number in [-1, 1) for (seed, step)."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**63 - 1.0
