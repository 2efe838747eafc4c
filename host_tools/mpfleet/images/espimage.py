"""ESP32 application images ("app-bin"): build test images, parse and validate any image.

Which room: host library, no I/O. The device side reads the same bytes with a tiny
MicroPython parser, so the layout below is the contract; change it only together with that
parser and ``docs/``.

Layout of an image made by ``build_app_image`` (all integers little-endian)::

    offset  size  field
    ------  ----  -----------------------------------------------------------------------
    0x00    1     magic 0xE9
    0x01    1     segment count (1..16; esptool's padding segments included)
    0x02    1     SPI flash mode (2 = DIO)
    0x03    1     flash size (high nibble, 0x2_ = 4MB) | flash frequency (low nibble, 0 = 40m)
    0x04    4     entry address (start of the IRAM segment)
    --- extended header (16 bytes) ---
    0x08    1     WP pin, 0xEE = disabled
    0x09    3     SPI pin drive strengths (0)
    0x0C    2     chip id: esp32 0, esp32s2 2, esp32c3 5, esp32s3 9, esp32c6 13
    0x0E    1     min chip revision, legacy (0)
    0x0F    2     min chip revision, full (0)
    0x11    2     max chip revision, full (0 = not set, esptool then skips the check)
    0x13    4     reserved (0)
    0x17    1     hash appended: 1
    --- segment 0: DROM, load address DROM_MAP_START + 0x20 ---
    0x18    4     load address (esp32 0x3F400020, s2 0x3F000020, s3/c3 0x3C000020,
                  c6 0x42800020)
    0x1C    4     data length
    0x20    256   esp_app_desc_t:
                    +0x00 u32 magic_word 0xABCD5432    +0x04 u32 secure_version
                    +0x08 8   reserv1                  +0x10 32  version (NUL-terminated)
                    +0x30 32  project_name             +0x50 16  time
                    +0x60 16  date                     +0x70 32  idf_ver
                    +0x90 32  app_elf_sha256           +0xB0 80  reserved (0)
    0x120   4     sim note magic b"MPFS"
    0x124   2     sim note length N (0..1024)
    0x126   N     compact UTF-8 JSON object, e.g. {"crash":"boot"}
    ...           zero padding to a 4-byte boundary, then pseudo-random "rodata"
    --- further segments, each an 8-byte header (load address, length) + data ---
                  DRAM filler, IRAM filler, and for large images esptool's zero padding
                  segment (load address 0) followed by an IROM segment at
                  IROM_MAP_START + 0x20 whose data starts at a file offset = 0x20 mod 64 KiB
    --- footer ---
                  zero padding so that the checksum byte ends a 16-byte block;
                  checksum = 0xEF XOR every byte of every segment's data
                  SHA-256 (32 bytes) of everything before it

The sim note tells the virtual board's bootloader how this build behaves
(``{"crash": "boot"}``: it panics at boot, so the bootloader rolls it back;
``{"wifi": "broken"}``: its radio never finds the network, so an update's self-test
fails). Real firmware has no note; the parser then reports ``{}``.

Images are deterministic: the same arguments give the same bytes (fixed build date and
time, filler derived from the arguments), so a version number identifies one image.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, replace

from esptool.bin_image import ELFSection, LoadFirmwareImage
from esptool.targets import CHIP_DEFS
from esptool.util import FatalError

from mpfleet.errors import MpfleetError

# --- chips ---------------------------------------------------------------------------------

#: Image header chip id per chip (ESP-IDF ``esp_chip_id_t``).
CHIP_IDS: dict[str, int] = {
    "esp32": 0,
    "esp32s2": 2,
    "esp32c3": 5,
    "esp32s3": 9,
    "esp32c6": 13,
}
CHIPS_BY_ID: dict[int, str] = {chip_id: chip for chip, chip_id in CHIP_IDS.items()}

#: Where the second-stage bootloader (and a merged firmware image) starts in flash.
BOOTLOADER_OFFSETS: dict[str, int] = {
    "esp32": 0x1000,
    "esp32s2": 0x1000,
    "esp32c3": 0x0,
    "esp32s3": 0x0,
    "esp32c6": 0x0,
}

#: Start of internal RAM used for the DRAM / IRAM filler segments (from the chips'
#: memory maps as esptool knows them; any address inside the region would do).
_RAM_SEGMENT_ADDRS: dict[str, tuple[int, int]] = {
    "esp32": (0x3FFB0000, 0x40080000),
    "esp32s2": (0x3FFBE000, 0x40024000),
    "esp32c3": (0x3FC8A000, 0x40380000),
    "esp32s3": (0x3FC90000, 0x40374000),
    "esp32c6": (0x40820000, 0x40800000),
}

APP_PARTITION_OFFSET = 0x10000  # first app partition in every stock layout

# --- format constants ------------------------------------------------------------------

IMAGE_MAGIC = 0xE9
IMAGE_HEADER_LEN = 24  # 8-byte common header + 16-byte extended header
SEGMENT_HEADER_LEN = 8  # load address u32, length u32
MAX_SEGMENTS = 16
CHECKSUM_SEED = 0xEF
CHECKSUM_ALIGN = 16
DIGEST_LEN = 32

_OFF_SEGMENT_COUNT = 1
_OFF_CHIP_ID = 12
_OFF_HASH_APPENDED = 23

APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = IMAGE_HEADER_LEN + SEGMENT_HEADER_LEN  # 0x20
APP_DESC_LEN = 256
# magic, secure_version, reserv1[2], version, project_name, time, date, idf_ver,
# app_elf_sha256, then 80 reserved bytes (efuse revisions, mmu page size, reserv2)
_APP_DESC_FMT = "<II8x32s32s16s16s32s32s80x"
_CSTR_FIELD_LEN = 32  # version, project_name, idf_ver: 31 bytes + NUL

SIM_NOTE_MAGIC = b"MPFS"
SIM_NOTE_OFFSET = APP_DESC_OFFSET + APP_DESC_LEN  # 0x120
_SIM_NOTE_HEADER_FMT = "<4sH"
SIM_NOTE_HEADER_LEN = struct.calcsize(_SIM_NOTE_HEADER_FMT)  # 6
MAX_SIM_NOTE_LEN = 1024  # keeps the device-side reader's buffer small

_FLASH_MODE_DIO = 2
_FLASH_SIZE = "4MB"  # what ESP32_GENERIC writes; esptool rewrites it when flashing
_FLASH_FREQ = "40m"
_BUILD_TIME = "00:00:00"  # fixed, so that builds are reproducible
_BUILD_DATE = "Jan  1 2025"
_FLASH_SEGMENT_VADDR_OFFSET = 0x20  # vaddr = file offset mod MMU page, as ESP-IDF links

_HEX_PREVIEW = 16  # hex characters of a digest shown in messages


class ImageError(MpfleetError):
    """An app image is malformed, corrupted, or not the one that was expected."""


@dataclass(frozen=True)
class AppImageInfo:
    """What an app image says about itself (``sim_note`` is a plain dict: don't mutate)."""

    chip: str
    chip_id: int
    version: str
    project_name: str
    secure_version: int
    idf_ver: str
    size: int  # bytes from the magic to the end of the appended SHA-256
    sha256: str  # hex SHA-256 of those ``size`` bytes (the whole file for a plain .bin)
    sim_note: dict
    segments: int


@dataclass(frozen=True)
class _FillerPlan:
    """Bytes of pseudo-random filler per segment; ``irom == 0`` means no IROM segment."""

    rodata: int
    dram: int
    iram: int
    irom: int = 0


_DEFAULT_PLAN = _FillerPlan(rodata=1024, dram=512, iram=2048)  # about 4 KiB in all
_MIN_PLAN = _FillerPlan(rodata=0, dram=256, iram=512)
_MIN_IROM = 4


# --- public API ----------------------------------------------------------------------------


def normalize_chip(chip: str) -> str:
    """Return the canonical chip name ("ESP32-S3" -> "esp32s3"), or raise ImageError."""
    name = chip.lower().replace("-", "").replace("_", "")
    if name not in CHIP_IDS:
        raise ImageError(f"unknown chip {chip!r} (supported: {', '.join(CHIP_IDS)})")
    return name


def chip_for_id(chip_id: int) -> str:
    """Reverse of CHIP_IDS; raises ImageError for chips mpfleet does not support."""
    try:
        return CHIPS_BY_ID[chip_id]
    except KeyError:
        raise ImageError(
            f"image is for chip id {chip_id}, which mpfleet does not support "
            f"(supported: {_supported_ids()})"
        ) from None


def build_app_image(
    chip: str,
    version: str,
    project_name: str = "micropython",
    secure_version: int = 0,
    size: int | None = None,
    sim_note: dict | None = None,
    idf_ver: str = "v5.2.2",
) -> bytes:
    """Build a valid, deterministic ESP app image (see the module docstring for its layout).

    ``size`` asks for an image of about that many bytes (within a few dozen); without it
    the image is about 4 KiB.
    """
    chip = normalize_chip(chip)
    note = {} if sim_note is None else sim_note
    if not 0 <= secure_version <= 0xFFFFFFFF:
        raise ImageError(f"secure_version {secure_version} does not fit in a u32")
    packed_note = _pack_sim_note(note)  # validates the note before it seeds anything
    identity = json.dumps(
        [chip, version, project_name, secure_version, idf_ver, note], sort_keys=True
    ).encode()
    seed = hashlib.sha256(identity).digest()  # also stands in for the ELF file's SHA-256
    desc = _pack_app_desc(version, project_name, secure_version, idf_ver, elf_sha256=seed)
    head = desc + packed_note

    def assemble(plan: _FillerPlan) -> bytes:
        return _assemble(chip, head, plan, seed)

    return assemble(_plan_for_size(chip, assemble, size))


def parse_app_image(data: bytes, expect_chip: str | None = None) -> AppImageInfo:
    """Validate an app image with esptool's parser and return what it says about itself.

    Bytes after the image (a partition read back with its 0xFF tail) are ignored.
    Raises ImageError for a wrong magic, truncation, a bad checksum or SHA-256, a missing
    app descriptor, or a chip other than ``expect_chip``.
    """
    data = bytes(data)
    length = image_length(data)
    chip = chip_for_id(_chip_id(data))
    if expect_chip is not None and chip != normalize_chip(expect_chip):
        raise ImageError(
            f"image is for {chip} (chip id {CHIP_IDS[chip]}), "
            f"not for {normalize_chip(expect_chip)}"
        )
    image_bytes = data[:length]
    image = _load_with_esptool(chip, image_bytes)
    _verify_checksum(image)
    _verify_digest(image)
    first = _first_segment_data(image)
    desc = _unpack_app_desc(first)
    return AppImageInfo(
        chip=chip,
        chip_id=CHIP_IDS[chip],
        version=desc["version"],
        project_name=desc["project_name"],
        secure_version=desc["secure_version"],
        idf_ver=desc["idf_ver"],
        size=length,
        sha256=hashlib.sha256(image_bytes).hexdigest(),
        sim_note=_unpack_sim_note(first[APP_DESC_LEN:]),
        segments=len(image.segments),
    )


def image_length(data: bytes, offset: int = 0) -> int:
    """Length of the image starting at ``offset``: header, segments, checksum, SHA-256.

    Walks only the framing (segment headers), so it also tells how much of a flash
    partition to read or hash. Raises ImageError when the data is not an image or is
    cut short.
    """
    available = len(data) - offset
    if available <= 0:
        raise ImageError("not an ESP app image: no data")
    if data[offset] != IMAGE_MAGIC:
        raise ImageError(
            f"not an ESP app image: first byte {data[offset]:#04x} is not 0x{IMAGE_MAGIC:02X}"
        )
    if available < IMAGE_HEADER_LEN:
        raise ImageError(
            f"truncated image: {available} bytes, shorter than the "
            f"{IMAGE_HEADER_LEN}-byte image header"
        )
    count = data[offset + _OFF_SEGMENT_COUNT]
    if not 1 <= count <= MAX_SEGMENTS:
        raise ImageError(f"bad image header: {count} segments (1..{MAX_SEGMENTS} allowed)")
    hash_appended = data[offset + _OFF_HASH_APPENDED]
    if hash_appended not in (0, 1):
        raise ImageError(
            f"bad image header: hash-appended byte is {hash_appended:#04x}, not 0 or 1"
        )
    end = offset + _segments_length(data, offset, count)
    end = (end | (CHECKSUM_ALIGN - 1)) + 1  # checksum byte closes a 16-byte block
    if hash_appended:
        end += DIGEST_LEN
    if end > len(data):
        raise ImageError(
            f"truncated image: needs {end - offset} bytes (segments, checksum and "
            f"SHA-256) but only {available} are present"
        )
    return end - offset


def extract_app_from_merged(data: bytes, app_offset: int = APP_PARTITION_OFFSET) -> bytes:
    """Return the app image inside a merged flash image (bootloader, partition table, app).

    The returned bytes are exactly the app image (no 0xFF padding) and have been
    validated like ``parse_app_image`` does.
    """
    if app_offset < 0 or app_offset >= len(data):
        raise ImageError(
            f"no app image at {app_offset:#x}: the merged image is only "
            f"{len(data)} ({len(data):#x}) bytes long"
        )
    first_byte = data[app_offset]
    if first_byte == 0xFF:
        raise ImageError(f"no app image at {app_offset:#x}: flash is erased there (0xFF)")
    try:
        length = image_length(data, app_offset)
        app = bytes(data[app_offset : app_offset + length])
        parse_app_image(app)
    except ImageError as exc:
        raise ImageError(f"no valid app image at {app_offset:#x}: {exc}") from None
    return app


# --- building ----------------------------------------------------------------------------


def _cstr(value: str, field: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) >= _CSTR_FIELD_LEN or b"\0" in raw:
        raise ImageError(
            f"{field} {value!r} must be at most {_CSTR_FIELD_LEN - 1} bytes of UTF-8 "
            "without NUL (it is a NUL-terminated char[32] in esp_app_desc_t)"
        )
    return raw


def _pack_app_desc(
    version: str, project_name: str, secure_version: int, idf_ver: str, elf_sha256: bytes
) -> bytes:
    return struct.pack(
        _APP_DESC_FMT,
        APP_DESC_MAGIC,
        secure_version,
        _cstr(version, "version"),
        _cstr(project_name, "project_name"),
        _BUILD_TIME.encode(),
        _BUILD_DATE.encode(),
        _cstr(idf_ver, "idf_ver"),
        elf_sha256,
    )


def _pack_sim_note(note: dict) -> bytes:
    if not isinstance(note, dict):
        raise ImageError(f"sim_note must be a dict, not {type(note).__name__}")
    try:
        body = json.dumps(note, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ImageError(f"sim_note is not JSON-serialisable: {exc}") from None
    if len(body) > MAX_SIM_NOTE_LEN:
        raise ImageError(
            f"sim_note is {len(body)} bytes of JSON; at most {MAX_SIM_NOTE_LEN} allowed"
        )
    packed = struct.pack(_SIM_NOTE_HEADER_FMT, SIM_NOTE_MAGIC, len(body)) + body
    return packed + b"\0" * (-len(packed) % 4)


def _filler(seed: bytes, segment: str, length: int) -> bytes:
    """Deterministic pseudo-random bytes, different per image identity and segment."""
    if length <= 0:
        return b""
    return hashlib.shake_128(seed + segment.encode()).digest(length)


def _assemble(chip: str, head: bytes, plan: _FillerPlan, seed: bytes) -> bytes:
    """Let esptool lay out, checksum and hash the segments (as elf2image would)."""
    rom = CHIP_DEFS[chip]
    image = rom.BOOTLOADER_IMAGE()  # ESP32FirmwareImage subclass, append_digest=True
    dram_addr, iram_addr = _RAM_SEGMENT_ADDRS[chip]
    image.flash_mode = _FLASH_MODE_DIO
    image.flash_size_freq = rom.FLASH_SIZES[_FLASH_SIZE] | rom.FLASH_FREQUENCY[_FLASH_FREQ]
    image.entrypoint = iram_addr
    # Sections named like ESP-IDF's (esptool's save() wants names). esptool keeps
    # ".flash.appdesc" first among the flash segments, so the descriptor stays at offset
    # 0x20 even where IROM sorts below DROM (ESP32-C6).
    image.segments = [
        ELFSection(
            b".flash.appdesc",
            rom.DROM_MAP_START + _FLASH_SEGMENT_VADDR_OFFSET,
            head + _filler(seed, "rodata", plan.rodata),
            0,
        ),
        ELFSection(b".dram0.data", dram_addr, _filler(seed, "dram", plan.dram), 0),
        ELFSection(b".iram0.text", iram_addr, _filler(seed, "iram", plan.iram), 0),
    ]
    if plan.irom:
        irom_addr = rom.IROM_MAP_START + _FLASH_SEGMENT_VADDR_OFFSET
        if irom_addr + plan.irom > rom.IROM_MAP_END:
            raise ImageError(
                f"requested image size is too large for the {chip}'s "
                f"{(rom.IROM_MAP_END - rom.IROM_MAP_START) // 1024} KiB code window"
            )
        code = _filler(seed, "irom", plan.irom)
        image.segments.append(ELFSection(b".flash.text", irom_addr, code, 0))
    try:
        return image.save(None)
    except FatalError as exc:
        raise ImageError(f"esptool could not lay out the image: {exc}") from None


def _round_down4(n: int) -> int:
    return n - n % 4


def _plan_for_size(chip: str, assemble, size: int | None) -> _FillerPlan:
    """Choose filler sizes so that the image is ``size`` bytes give or take alignment.

    Small targets grow the DROM "rodata"; once an IROM segment fits (it must start on a
    64 KiB boundary, like real code), the bulk goes there.
    """
    if size is None:
        return _DEFAULT_PLAN
    smallest = len(assemble(_MIN_PLAN))
    if size < smallest:
        raise ImageError(
            f"size {size} is too small: the smallest {chip} image with this "
            f"descriptor and sim note is {smallest} bytes"
        )
    with_irom = len(assemble(replace(_MIN_PLAN, irom=_MIN_IROM)))
    if with_irom <= size:
        return replace(_MIN_PLAN, irom=_MIN_IROM + _round_down4(size - with_irom))
    return replace(_MIN_PLAN, rodata=_round_down4(size - smallest))


# --- parsing -----------------------------------------------------------------------------


def _supported_ids() -> str:
    return ", ".join(f"{chip_id} {chip}" for chip_id, chip in sorted(CHIPS_BY_ID.items()))


def _chip_id(data: bytes) -> int:
    return struct.unpack_from("<H", data, _OFF_CHIP_ID)[0]


def _segments_length(data: bytes, offset: int, count: int) -> int:
    """Bytes from the image start to the end of its last segment; checks for truncation."""
    pos = offset + IMAGE_HEADER_LEN
    for index in range(count):
        if pos + SEGMENT_HEADER_LEN > len(data):
            raise ImageError(
                f"truncated image: segment {index} of {count} starts at "
                f"{pos - offset:#x}, past the end of the data ({len(data) - offset} bytes)"
            )
        _load_addr, seg_len = struct.unpack_from("<II", data, pos)
        seg_end = pos + SEGMENT_HEADER_LEN + seg_len
        if seg_end > len(data):
            raise ImageError(
                f"truncated image: segment {index} of {count} ({seg_len} bytes at "
                f"{pos - offset:#x}) runs past the end of the data "
                f"({len(data) - offset} bytes)"
            )
        pos = seg_end
    return pos - offset


def _load_with_esptool(chip: str, image_bytes: bytes):
    try:
        return LoadFirmwareImage(chip, image_bytes)
    except (FatalError, RuntimeError, struct.error, TypeError) as exc:
        raise ImageError(f"esptool cannot parse the {chip} image: {exc}") from None


def _verify_checksum(image) -> None:
    calculated = image.calculate_checksum()
    if image.checksum != calculated:
        raise ImageError(
            f"bad checksum: the image stores {image.checksum:#04x} but its segments give "
            f"{calculated:#04x} (the image is corrupted)"
        )


def _verify_digest(image) -> None:
    if not image.append_digest:
        return
    if image.stored_digest != image.calc_digest:
        raise ImageError(
            "bad appended SHA-256: the image stores "
            f"{image.stored_digest.hex()[:_HEX_PREVIEW]}... but its contents hash to "
            f"{image.calc_digest.hex()[:_HEX_PREVIEW]}... (the image is corrupted)"
        )


def _first_segment_data(image) -> bytes:
    """Data of segment 0, which must be a DROM segment starting with esp_app_desc_t."""
    first = image.segments[0]
    if "DROM" not in first.get_memory_type(image):
        raise ImageError(
            f"missing app descriptor: the first segment loads at {first.addr:#010x}, "
            "not in DROM (is this a bootloader rather than an app?)"
        )
    data = bytes(first.data)
    if len(data) < APP_DESC_LEN:
        raise ImageError(
            f"missing app descriptor: the first segment has only {len(data)} bytes"
        )
    magic = struct.unpack_from("<I", data)[0]
    if magic != APP_DESC_MAGIC:
        raise ImageError(
            f"missing app descriptor: magic word is {magic:#010x}, "
            f"not {APP_DESC_MAGIC:#010x}"
        )
    return data


def _decode_cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _unpack_app_desc(segment_data: bytes) -> dict:
    (_magic, secure_version, version, project_name, _time, _date, idf_ver, _elf) = (
        struct.unpack_from(_APP_DESC_FMT, segment_data)
    )
    return {
        "secure_version": secure_version,
        "version": _decode_cstr(version),
        "project_name": _decode_cstr(project_name),
        "idf_ver": _decode_cstr(idf_ver),
    }


def _unpack_sim_note(after_desc: bytes) -> dict:
    if after_desc[: len(SIM_NOTE_MAGIC)] != SIM_NOTE_MAGIC:
        return {}  # real firmware: no note
    if len(after_desc) < SIM_NOTE_HEADER_LEN:
        raise ImageError("bad sim note: header cut off by the end of the first segment")
    _magic, length = struct.unpack_from(_SIM_NOTE_HEADER_FMT, after_desc)
    body = after_desc[SIM_NOTE_HEADER_LEN : SIM_NOTE_HEADER_LEN + length]
    if len(body) < length:
        raise ImageError(
            f"bad sim note: {length} bytes announced but the first segment ends after "
            f"{len(body)}"
        )
    try:
        note = json.loads(body.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ImageError(f"bad sim note: not UTF-8 JSON ({exc})") from None
    if not isinstance(note, dict):
        raise ImageError(f"bad sim note: expected a JSON object, got {type(note).__name__}")
    return note
