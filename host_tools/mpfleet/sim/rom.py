"""The ESP32 ROM serial bootloader ("download mode") of a virtual board, on a pseudo-terminal.

`RomBootloader(vb)` is a virtual board reset with GPIO0 held low: its ROM loader
answers on `rom.port`, a tty that esptool opens like /dev/ttyUSB0, and what esptool
writes lands in the board's emulated NOR flash (flash.bin, through `NorFlash`, so
erases and programmed bytes are counted like the device's own writes)::

    esptool (client)       relay thread (this module)                 virtual board
    pty slave <-> pty master <-> UART pacing <-> SLIP <-> _DownloadMode -> NorFlash

Which room: the simulator. Nothing here is used on real hardware; the host library
(`mpfleet.usb.flash`) cannot tell this port from a USB board, which is the point.

The protocol is the one esptool's "Serial Protocol" documentation describes for the
ESP32-family ROM loaders (not the flasher stub): SLIP frames; a request header
(direction 0, command, size, checksum) and a response header (direction 1, command,
size, value); responses end in four status bytes (status, error, 2 reserved), the
ROM's error codes are 0x05 invalid message, 0x06 failed to act, 0x07 bad checksum,
0x08 flash write error, 0x0a flash read length error, 0x0b deflate error.

What the emulated ROM does:

- SYNC (07 07 12 20 + 32 x 55): eight identical answers whose value field is
  non-zero (esptool tells the ROM from its stub by that); the UART takes the host's
  baud rate, as the ROM's auto-baud does.
- READ_REG / WRITE_REG on a register file: the chip-detect word at 0x40001000
  (ESP32: 0x00F01D83), the eFuse words esptool decodes for the chip description,
  revision and MAC (the MAC is the board's `settings["mac"]`), the UART clock divider
  (40 MHz crystal / current baud rate) and the RTC calibration esptool uses for its
  crystal check, and the SPI0 controller's user-command registers: a command
  started through them reaches an emulated SPI NOR chip that answers RDID
  (Winbond, capacity = the board's flash size), SFDP and the status registers.
  Read-only words (ROM, eFuse) ignore writes; other addresses read back what was
  written (0 if never written).
- GET_SECURITY_INFO: the original ESP32 ROM does not have it and answers with the
  "invalid message" error, so esptool falls back to the chip-detect word; the
  ESP32-S3 and ESP32-C3 ROMs answer with their chip id (9, 5).
- SPI_ATTACH (required before flash commands), SPI_SET_PARAMS.
- FLASH_BEGIN erases the announced range in 4 KiB sectors up front, as the ROM
  does; FLASH_DATA checks the length, sequence number and checksum, programs the
  block and reads it back (0x08 if flash did not take it, e.g. not erased);
  FLASH_DEFL_BEGIN/DATA inflate the zlib stream block by block; FLASH_END and
  FLASH_DEFL_END with "reboot" or "run user code" make the chip leave the loader
  (it answers, then stays silent: the app would run now).
- SPI_FLASH_MD5 answers with 32 lower-case hex characters (the ROM's format; the
  stub sends 16 raw bytes), READ_FLASH_SLOW with 64 bytes, CHANGE_BAUDRATE switches
  the UART after answering at the old rate.
- MEM_BEGIN/DATA/END are accepted and checked, but code loaded to RAM cannot run
  here: after MEM_END with an entry point the chip prints a panic (esptool reports
  "Guru Meditation Error") and restarts in download mode, as a chip whose GPIO0 is
  still held low does. So esptool's flasher stub fails: use --no-stub.
- Unknown commands: the same "invalid message" error response.

Where the documentation leaves the ROM's behaviour open, the emulator takes the strict
reading, so a client bug shows up here rather than on a board: flash commands before
SPI_ATTACH, a FLASH_BEGIN at an offset that is not sector aligned or past the end of
flash, and an encrypted write fail with 0x06; a _DATA block out of sequence or longer
than announced fails with 0x05.

Timing: every byte costs 10 bit times at the ROM UART's current baud rate (8N1), in
both directions, so a transfer takes the wall time it takes on a wire; flash erase
and program times are not modelled (`pace_uart=False` turns the wire time off).

Faults for tests: `fail_after_bytes` unplugs the board after that many bytes from
the host (both ends of the pty are closed: the client's next read or write fails
and the device node disappears, as /dev/ttyUSB0 does); `unreliable_above_baud`
makes long frames arrive with one flipped bit while the UART runs faster than that
(a marginal cable), so a write fails at high speed and succeeds at a lower one.

Not emulated: DTR/RTS (a pty has no modem lines: esptool warns "Chip was NOT
reset" and goes on, so tell it --before no-reset --after no-reset), running the
flasher stub (see MEM_END), flash erase/program times, secure download mode, flash
encryption, the boot log of a reset. Linux only (ptys, termios), like
mpfleet.sim.serial.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import operator
import os
import select
import struct
import sys
import termios
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mpfleet.sim.board import SimError, VirtualBoard
from mpfleet.sim.serial import open_raw_pty

# --- SLIP (RFC 1055) ---------------------------------------------------------------
_SLIP_END = b"\xc0"
_SLIP_ESC = b"\xdb"
_SLIP_ESC_END = b"\xdb\xdc"
_SLIP_ESC_ESC = b"\xdb\xdd"

# --- packets -----------------------------------------------------------------------
_HEADER = struct.Struct("<BBHI")  # direction, command, size, checksum (request) / value
_DATA_HEADER = struct.Struct("<IIII")  # _DATA commands: length, sequence, 0, 0
_DIRECTION_REQUEST = 0x00
_DIRECTION_RESPONSE = 0x01
_CHECKSUM_SEED = 0xEF

# Commands (esptool "Serial Protocol", ESP32-family ROM loader).
_FLASH_BEGIN = 0x02
_FLASH_DATA = 0x03
_FLASH_END = 0x04
_MEM_BEGIN = 0x05
_MEM_END = 0x06
_MEM_DATA = 0x07
_SYNC = 0x08
_WRITE_REG = 0x09
_READ_REG = 0x0A
_SPI_SET_PARAMS = 0x0B
_SPI_ATTACH = 0x0D
_READ_FLASH_SLOW = 0x0E
_CHANGE_BAUDRATE = 0x0F
_FLASH_DEFL_BEGIN = 0x10
_FLASH_DEFL_DATA = 0x11
_FLASH_DEFL_END = 0x12
_SPI_FLASH_MD5 = 0x13
_GET_SECURITY_INFO = 0x14

# ROM loader error codes (the byte after a status of 1).
_ERR_INVALID_MESSAGE = 0x05
_ERR_FAILED_TO_ACT = 0x06
_ERR_BAD_CHECKSUM = 0x07
_ERR_FLASH_WRITE = 0x08
_ERR_FLASH_READ_LENGTH = 0x0A
_ERR_DEFLATE = 0x0B

_STATUS_OK = b"\x00\x00\x00\x00"  # ROM loaders send 4 status bytes, the stub 2

_SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
_SYNC_ANSWERS = 8
# The value field of the ROM's SYNC answers (as in traces of ESP32 ROMs in esptool's
# issue tracker); the stub answers 0, which is how esptool tells them apart.
_SYNC_VALUE = 0x20120707

_END_RUN_USER_CODE = 1  # FLASH_END / FLASH_DEFL_END argument; 0 reboots

# What a chip prints when code it jumped to crashes, then its ROM after the reset with
# GPIO0 still low (esptool's reader recognises the panic line).
_RAM_CODE_PANIC = (b"Guru Meditation Error: Core 0 panic'ed (IllegalInstruction). "
                   b"Code loaded to RAM cannot run on mpfleet's ROM emulator (use --no-stub).\r\n")
_DOWNLOAD_BOOT_LOG = (b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0xc (SW_CPU_RESET),boot:0x3 "
                      b"(DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download\r\n")

_SECTOR = 0x1000
_READ_SLOW_BLOCK = 64  # READ_FLASH_SLOW always answers with a 64-byte buffer

# --- UART ----------------------------------------------------------------------------
_ROM_BAUD = 115200  # the ROM's UART before auto-baud
_BITS_PER_BYTE = 10  # 8N1: start bit, 8 data bits, stop bit
_XTAL_HZ = 40_000_000
_CORRUPTIBLE_FRAME = 64  # frames longer than this suffer on an unreliable link
_SLIP_BYTES_AND_NEIGHBOURS = frozenset({0xC0, 0xC1, 0xDB, 0xDA})  # x ^ 1 must not make framing
_READ_SIZE = 65536

# --- SPI0 user commands (TRM "SPI Controller", the bits esptool drives) ---------------
_SPI_CMD_USR = 1 << 18  # SPI_CMD_REG: start a user command; cleared when done
_SPI_USR_ADDR = 1 << 30  # SPI_USER_REG phases
_SPI_USR_MISO = 1 << 28
_SPI_USR_ADDR_BITLEN_SHIFT = 26  # SPI_USER1_REG
_SPI_ADDR_REG = 0x04

# --- SPI NOR chip answers -------------------------------------------------------------
_RDID = 0x9F
_RDSFDP = 0x5A
_READ_STATUS_COMMANDS = (0x05, 0x35, 0x15)
_WINBOND = 0xEF
_W25Q_MEMORY_TYPE = 0x40
# SFDP header ("SFDP", rev 1.6, 2 parameter headers), the JEDEC basic table header
# and a vendor table header whose first byte is the manufacturer id (esptool reads
# offset 0x10 to spot XMC chips).
_SFDP_TABLE = (b"SFDP\x06\x01\x01\xff"
               + b"\x00\x06\x01\x10\x80\x00\x00\xff"
               + bytes([_WINBOND]) + b"\x00\x01\x03\x90\x00\x00\xff")

# --- chips ---------------------------------------------------------------------------
_CHIP_DETECT_MAGIC_REG = 0x40001000


@dataclass(frozen=True)
class _SpiRegisters:
    """Where a chip's SPI0 controller keeps the user-command registers."""

    base: int
    user: int
    user1: int
    user2: int
    miso_dlen: int
    w0: int
    addr_in_high_bits: bool  # ESP32: an n-bit address sits in the top n bits


@dataclass(frozen=True)
class ChipProfile:
    """What one chip's ROM loader looks like from the serial port."""

    chip: str  # mpfleet's name (boards/*.json "chip")
    security_info_chip_id: int | None  # None: the ROM has no GET_SECURITY_INFO
    spi: _SpiRegisters
    uart_clkdiv_reg: int
    begin_takes_encrypt_word: bool  # FLASH_BEGIN has a 5th word (not on ESP32)
    fixed_registers: Callable[[bytes], dict[int, int]]  # MAC -> read-only words (0x40001000 too)


def _mac_crc8(mac: bytes) -> int:
    """CRC-8 the ESP32 eFuse keeps next to the MAC (reflected polynomial 0x8C, init 0)."""
    crc = 0
    for byte in mac:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8C if crc & 1 else crc >> 1
    return crc


# ESP32 (TRM "eFuse Controller", esptool's decoding of BLK0): package D0WD, chip
# revision v3.0 (bit 15 of word 3, bit 20 of word 5 and bit 31 of APB_CTL_DATE),
# rated 240 MHz, no secure boot, no flash encryption, coding scheme None.
_ESP32_EFUSE = 0x3FF5A000
_ESP32_APB_CTL_DATE = 0x3FF6607C
_ESP32_RTCCALICFG1 = 0x3FF5F06C
_ESP32_CK8M_FREQ = 80  # eFuse word 4 bits 0-7; with the calibration below the
_ESP32_RTC_CALI = 1280  # ROM's crystal estimate is 1280 * 15625 * 80 / 40 = 40 MHz


def _esp32_registers(mac: bytes) -> dict[int, int]:
    def word(n: int) -> int:
        return _ESP32_EFUSE + 4 * n

    return {
        _CHIP_DETECT_MAGIC_REG: 0x00F01D83,
        word(0): 0,
        word(1): int.from_bytes(mac[2:6], "big"),
        word(2): (_mac_crc8(mac) << 16) | int.from_bytes(mac[0:2], "big"),
        word(3): (1 << 15) | (1 << 13) | (1 << 9),  # rev bit 0, 240 MHz rated, pkg D0WD
        word(4): _ESP32_CK8M_FREQ,
        word(5): 1 << 20,  # rev bit 1; SPI pads 0 = the default flash pins
        word(6): 0,
        _ESP32_APB_CTL_DATE: 1 << 31,  # rev bit 2
        _ESP32_RTCCALICFG1: _ESP32_RTC_CALI << 7,
    }


def _newer_chip_registers(efuse_base: int, magic: int) -> Callable[[bytes], dict[int, int]]:
    """ESP32-S3 / -C3: the MAC in BLOCK1 words 0-1 (eFuse base + 0x44), versions 0."""

    def registers(mac: bytes) -> dict[int, int]:
        return {
            _CHIP_DETECT_MAGIC_REG: magic,
            efuse_base + 0x44: int.from_bytes(mac[2:6], "big"),
            efuse_base + 0x48: int.from_bytes(mac[0:2], "big"),
        }

    return registers


_NEWER_SPI = _SpiRegisters(base=0x60002000, user=0x18, user1=0x1C, user2=0x20, miso_dlen=0x28,
                           w0=0x58, addr_in_high_bits=False)

CHIP_PROFILES: dict[str, ChipProfile] = {
    "esp32": ChipProfile(
        chip="esp32", security_info_chip_id=None,
        spi=_SpiRegisters(base=0x3FF42000, user=0x1C, user1=0x20, user2=0x24, miso_dlen=0x2C,
                          w0=0x80, addr_in_high_bits=True),
        uart_clkdiv_reg=0x3FF40014, begin_takes_encrypt_word=False,
        fixed_registers=_esp32_registers,
    ),
    "esp32s3": ChipProfile(
        chip="esp32s3", security_info_chip_id=9, spi=_NEWER_SPI,
        uart_clkdiv_reg=0x60000014, begin_takes_encrypt_word=True,
        fixed_registers=_newer_chip_registers(0x60007000, 0x00000009),
    ),
    "esp32c3": ChipProfile(
        chip="esp32c3", security_info_chip_id=5, spi=_NEWER_SPI,
        uart_clkdiv_reg=0x60000014, begin_takes_encrypt_word=True,
        fixed_registers=_newer_chip_registers(0x60008800, 0x1B31506F),
    ),
}

_FALLBACK_MAC = bytes([0x24, 0x0A, 0xC4, 0x00, 0x00, 0x01])


# --- framing ---------------------------------------------------------------------------


def slip_encode(packet: bytes) -> bytes:
    return _SLIP_END + packet.replace(_SLIP_ESC, _SLIP_ESC_ESC).replace(_SLIP_END, _SLIP_ESC_END) + _SLIP_END


class _SlipDecoder:
    """Bytes in, whole frames out; bytes outside frames and broken escapes are dropped."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while True:
            start = self._buffer.find(_SLIP_END)
            if start < 0:
                self._buffer.clear()  # noise between frames
                return frames
            end = self._buffer.find(_SLIP_END, start + 1)
            if end < 0:
                del self._buffer[:start]
                return frames
            body = bytes(self._buffer[start + 1:end])
            # The closing END may open the next frame (C0 A C0 C0 B C0 and C0 A C0 B C0).
            del self._buffer[:end]
            frame = _unescape(body)
            if frame:
                frames.append(frame)


def _unescape(body: bytes) -> bytes | None:
    escapes = body.count(_SLIP_ESC_END) + body.count(_SLIP_ESC_ESC)
    if body.count(_SLIP_ESC) != escapes:
        return None  # an escape byte followed by something else: a damaged frame
    return body.replace(_SLIP_ESC_END, _SLIP_END).replace(_SLIP_ESC_ESC, _SLIP_ESC)


def _checksum(data: bytes) -> int:
    return functools.reduce(operator.xor, data, _CHECKSUM_SEED)


# --- the chip's peripherals -----------------------------------------------------------


class _SpiNorChip:
    """The flash chip's answers to the commands esptool sends through SPI0."""

    def __init__(self, size: int):
        self.jedec_id = bytes([_WINBOND, _W25Q_MEMORY_TYPE, size.bit_length() - 1])

    def answer(self, command: int, address: int) -> bytes:
        if command == _RDID:
            return self.jedec_id
        if command == _RDSFDP:
            return _SFDP_TABLE[address:] + b"\xff" * 4
        if command in _READ_STATUS_COMMANDS:
            return b"\x00"
        return b""  # reset, power-down...: the chip drives nothing


class _Uart:
    """The ROM's UART: its baud rate, and the wall time bytes take on the wire."""

    def __init__(self, pace: bool, stop: threading.Event):
        self.baud = _ROM_BAUD
        self._pace = pace
        self._stop = stop
        self._line_free_at = 0.0
        self._next_baud: int | None = None

    def carry(self, nbytes: int) -> None:
        """Wait until `nbytes` would have crossed the wire (one direction at a time)."""
        if not self._pace or nbytes <= 0:
            return
        now = time.monotonic()
        self._line_free_at = max(self._line_free_at, now) + nbytes * _BITS_PER_BYTE / self.baud
        self._stop.wait(self._line_free_at - now)

    def auto_baud(self, host_baud: int | None) -> None:
        """A SYNC frame's 0x55 bytes let the ROM measure the host's bit time."""
        if host_baud:
            self.baud = host_baud

    def switch_after_answer(self, baud: int) -> None:
        self._next_baud = baud

    def answer_sent(self) -> None:
        if self._next_baud is not None:
            self.baud, self._next_baud = self._next_baud, None

    def clock_divider(self) -> int:
        return round(_XTAL_HZ / self.baud)


class _Registers:
    """The address space READ_REG / WRITE_REG see: fixed words, live ones, RAM-like rest."""

    def __init__(self, profile: ChipProfile, mac: bytes, flash_chip: _SpiNorChip, uart: _Uart):
        self._profile = profile
        self._fixed = profile.fixed_registers(mac)
        self._written: dict[int, int] = {}
        self._flash_chip = flash_chip
        self._uart = uart

    def read(self, addr: int) -> int:
        if addr == self._profile.uart_clkdiv_reg:
            return self._uart.clock_divider()
        if addr in self._fixed:
            return self._fixed[addr]
        return self._written.get(addr, 0)

    def write(self, addr: int, value: int, mask: int) -> None:
        if addr in self._fixed:
            return  # ROM and eFuse words are read-only
        old = self._written.get(addr, 0)
        self._written[addr] = ((old & ~mask) | (value & mask)) & 0xFFFFFFFF
        spi = self._profile.spi
        if addr == spi.base and self._written[addr] & _SPI_CMD_USR:
            self._run_spi_user_command(spi)
            self._written[addr] &= ~_SPI_CMD_USR  # done at once

    def _run_spi_user_command(self, spi: _SpiRegisters) -> None:
        user = self._written.get(spi.base + spi.user, 0)
        command = self._written.get(spi.base + spi.user2, 0) & 0xFF
        address = 0
        if user & _SPI_USR_ADDR:
            addr_bits = ((self._written.get(spi.base + spi.user1, 0) >> _SPI_USR_ADDR_BITLEN_SHIFT) & 0x3F) + 1
            address = self._written.get(spi.base + _SPI_ADDR_REG, 0)
            if spi.addr_in_high_bits:
                address >>= 32 - addr_bits
        answer = self._flash_chip.answer(command, address)
        if user & _SPI_USR_MISO and answer:
            nbytes = min(4, ((self._written.get(spi.base + spi.miso_dlen, 0) + 1) + 7) // 8)
            self._written[spi.base + spi.w0] = int.from_bytes(answer[:nbytes].ljust(nbytes, b"\xff"), "little")


# --- the ROM's command loop ----------------------------------------------------------------


class _RomError(Exception):
    """The command fails: the ROM answers status 1 and this error code."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class _Download:
    """A FLASH_BEGIN / FLASH_DEFL_BEGIN / MEM_BEGIN in progress."""

    offset: int
    blocks: int
    block_size: int
    inflater: object | None = None  # zlib decompressobj for FLASH_DEFL_*
    next_seq: int = 0
    written: int = 0  # bytes programmed so far (deflate: decompressed bytes)


@dataclass
class RomStats:
    """What the ROM saw, for tests and the curious."""

    bytes_received: int = 0
    commands: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    left_loader: str | None = None  # after FLASH_END: "reboot" or "run user code"
    ram_code_crashes: int = 0  # MEM_END jumps into code that cannot run here


_Answer = tuple[int, bytes]  # (value field, payload before the status bytes)


class _DownloadMode:
    """One request packet in, response packets out: the ROM loader's command loop."""

    def __init__(self, vb: VirtualBoard, profile: ChipProfile, uart: _Uart, host_baud: Callable[[], int | None]):
        self.vb = vb
        self.profile = profile
        self.uart = uart
        self.stats = RomStats()
        self._host_baud = host_baud
        self._flash_size = int(vb.board["flash_size"])
        mac = bytes(vb.settings.get("mac") or _FALLBACK_MAC)
        self.registers = _Registers(profile, mac, _SpiNorChip(self._flash_size), uart)
        self._spi_attached = False
        self._spi_params: tuple[int, ...] | None = None
        self._flash_download: _Download | None = None
        self._mem_download: _Download | None = None
        self._jumped_to_ram_code = False
        self._handlers: dict[int, Callable[[bytes, int], list[_Answer]]] = {
            _SYNC: self._sync,
            _READ_REG: self._read_reg,
            _WRITE_REG: self._write_reg,
            _SPI_SET_PARAMS: self._spi_set_params,
            _SPI_ATTACH: self._spi_attach,
            _FLASH_BEGIN: self._flash_begin,
            _FLASH_DATA: self._flash_data,
            _FLASH_END: self._flash_end,
            _FLASH_DEFL_BEGIN: self._flash_defl_begin,
            _FLASH_DEFL_DATA: self._flash_defl_data,
            _FLASH_DEFL_END: self._flash_end,
            _SPI_FLASH_MD5: self._spi_flash_md5,
            _READ_FLASH_SLOW: self._read_flash_slow,
            _CHANGE_BAUDRATE: self._change_baudrate,
            _MEM_BEGIN: self._mem_begin,
            _MEM_DATA: self._mem_data,
            _MEM_END: self._mem_end,
        }
        if profile.security_info_chip_id is not None:
            self._handlers[_GET_SECURITY_INFO] = self._get_security_info

    def handle(self, packet: bytes) -> list[bytes]:
        """What the chip sends back for one request packet, as bytes on the wire."""
        if self.stats.left_loader or len(packet) < _HEADER.size:
            return []
        direction, command, size, checksum = _HEADER.unpack_from(packet)
        if direction != _DIRECTION_REQUEST:
            return []
        data = packet[_HEADER.size:]
        self.stats.commands[command] += 1
        handler = self._handlers.get(command)
        try:
            if handler is None or size != len(data):
                raise _RomError(_ERR_INVALID_MESSAGE)
            answers = handler(data, checksum)
        except _RomError as e:
            self.stats.errors[command] += 1
            return [slip_encode(_HEADER.pack(_DIRECTION_RESPONSE, command, 4, 0) + bytes([1, e.code, 0, 0]))]
        wire = [slip_encode(_HEADER.pack(_DIRECTION_RESPONSE, command, len(payload) + 4, value) + payload
                            + _STATUS_OK) for value, payload in answers]
        if self._jumped_to_ram_code:
            wire.append(self._crash_and_restart())
        return wire

    def _crash_and_restart(self) -> bytes:
        """The loaded code cannot run here: the chip panics, and with GPIO0 still low
        its reset lands in download mode again (UART back to auto-baud)."""
        self.stats.ram_code_crashes += 1
        self._jumped_to_ram_code = False
        self._spi_attached = False
        self._flash_download = self._mem_download = None
        self.uart.switch_after_answer(_ROM_BAUD)
        return _RAM_CODE_PANIC + _DOWNLOAD_BOOT_LOG

    # --- link and registers ---------------------------------------------------------
    def _sync(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        if data != _SYNC_PAYLOAD:
            raise _RomError(_ERR_INVALID_MESSAGE)
        self.uart.auto_baud(self._host_baud())
        return [(_SYNC_VALUE, b"")] * _SYNC_ANSWERS

    def _read_reg(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        (addr,) = _unpack("<I", data)
        return [(self.registers.read(addr), b"")]

    def _write_reg(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        if not data or len(data) % 16:
            raise _RomError(_ERR_INVALID_MESSAGE)
        for addr, value, mask, delay_us in struct.iter_unpack("<IIII", data):
            self.registers.write(addr, value, mask)
            if delay_us:
                time.sleep(delay_us / 1e6)
        return [(0, b"")]

    def _change_baudrate(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        new_baud, _old_baud = _unpack("<II", data)
        if new_baud <= 0:
            raise _RomError(_ERR_INVALID_MESSAGE)
        self.uart.switch_after_answer(new_baud)
        return [(0, b"")]

    def _get_security_info(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        # flags, flash_crypt_cnt, 7 key purposes, chip id, API version: nothing secured.
        info = struct.pack("<IB7BII", 0, 0, *([0] * 7), self.profile.security_info_chip_id, 0)
        return [(0, info)]

    # --- SPI flash ----------------------------------------------------------------------
    def _spi_attach(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        _unpack("<II", data)  # pin configuration, "is legacy" + 3 reserved bytes
        self._spi_attached = True
        return [(0, b"")]

    def _spi_set_params(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        self._spi_params = _unpack("<IIIIII", data)  # id, total, block, sector, page, status mask
        return [(0, b"")]

    def _begin_params(self, data: bytes) -> tuple[int, int, int, int]:
        if len(data) == 20 and self.profile.begin_takes_encrypt_word:
            size, blocks, block_size, offset, encrypted = _unpack("<IIIII", data)
            if encrypted:
                raise _RomError(_ERR_FAILED_TO_ACT)  # no flash encryption here
        else:
            size, blocks, block_size, offset = _unpack("<IIII", data)
        if not self._spi_attached or offset % _SECTOR or offset + size > self._flash_size:
            raise _RomError(_ERR_FAILED_TO_ACT)
        return size, blocks, block_size, offset

    def _erase_for_download(self, offset: int, size: int) -> None:
        length = -(-size // _SECTOR) * _SECTOR
        if length:
            with self._flash() as flash:
                flash.erase(offset, length)

    def _flash_begin(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        size, blocks, block_size, offset = self._begin_params(data)
        self._erase_for_download(offset, size)
        self._flash_download = _Download(offset, blocks, block_size)
        return [(0, b"")]

    def _flash_defl_begin(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        size, blocks, block_size, offset = self._begin_params(data)
        self._erase_for_download(offset, size)
        self._flash_download = _Download(offset, blocks, block_size, inflater=zlib.decompressobj())
        return [(0, b"")]

    def _data_block(self, download: _Download | None, data: bytes, checksum_field: int) -> bytes:
        """The payload of a _DATA command after the ROM's checks."""
        if download is None:
            raise _RomError(_ERR_FAILED_TO_ACT)  # no _BEGIN first
        if len(data) < _DATA_HEADER.size:
            raise _RomError(_ERR_INVALID_MESSAGE)
        length, seq, _, _ = _DATA_HEADER.unpack_from(data)
        block = data[_DATA_HEADER.size:]
        if len(block) != length or length > download.block_size or seq != download.next_seq:
            raise _RomError(_ERR_INVALID_MESSAGE)
        if _checksum(block) != checksum_field:
            raise _RomError(_ERR_BAD_CHECKSUM)
        download.next_seq += 1
        return block

    def _flash_data(self, data: bytes, checksum_field: int) -> list[_Answer]:
        download = self._flash_download
        block = self._data_block(download, data, checksum_field)
        self._program(download.offset + (download.next_seq - 1) * download.block_size, block)
        download.written += len(block)
        return [(0, b"")]

    def _flash_defl_data(self, data: bytes, checksum_field: int) -> list[_Answer]:
        download = self._flash_download
        block = self._data_block(download, data, checksum_field)
        if download.inflater is None:
            raise _RomError(_ERR_FAILED_TO_ACT)  # FLASH_BEGIN, then deflate data
        try:
            plain = download.inflater.decompress(block)
        except zlib.error:
            raise _RomError(_ERR_DEFLATE) from None
        self._program(download.offset + download.written, plain)
        download.written += len(plain)
        return [(0, b"")]

    def _program(self, addr: int, data: bytes) -> None:
        if not data:
            return
        if addr + len(data) > self._flash_size:
            raise _RomError(_ERR_FAILED_TO_ACT)
        with self._flash() as flash:
            flash.program(addr, data)
            # The ROM reads each block back: flash that was not erased keeps zero bits.
            if flash.read_bytes(addr, len(data)) != data:
                raise _RomError(_ERR_FLASH_WRITE)

    def _flash_end(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        (action,) = _unpack("<I", data)
        self._flash_download = None
        self.stats.left_loader = "run user code" if action == _END_RUN_USER_CODE else "reboot"
        return [(0, b"")]

    def _spi_flash_md5(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        addr, size, _, _ = _unpack("<IIII", data)
        if not self._spi_attached or addr + size > self._flash_size:
            raise _RomError(_ERR_FAILED_TO_ACT)
        with self._flash() as flash:
            digest = hashlib.md5(flash.read_bytes(addr, size)).hexdigest()
        return [(0, digest.encode("ascii"))]

    def _read_flash_slow(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        addr, length = _unpack("<II", data)
        if length > _READ_SLOW_BLOCK:
            raise _RomError(_ERR_FLASH_READ_LENGTH)
        if not self._spi_attached or addr + length > self._flash_size:
            raise _RomError(_ERR_FAILED_TO_ACT)
        with self._flash() as flash:
            block = flash.read_bytes(addr, min(_READ_SLOW_BLOCK, self._flash_size - addr))
        return [(0, bytes(block).ljust(_READ_SLOW_BLOCK, b"\xff"))]

    @contextlib.contextmanager
    def _flash(self) -> Iterator:
        # Opened per command: data and wear counters are on disk after every command,
        # so the board (or a test) sees them even while the port stays open.
        flash = self.vb.flash()
        try:
            yield flash
        finally:
            flash.close()

    # --- RAM (the stub's way in) ----------------------------------------------------
    def _mem_begin(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        _size, blocks, block_size, offset = _unpack("<IIII", data)
        self._mem_download = _Download(offset, blocks, block_size)
        return [(0, b"")]

    def _mem_data(self, data: bytes, checksum_field: int) -> list[_Answer]:
        self._data_block(self._mem_download, data, checksum_field)  # checked, not kept
        return [(0, b"")]

    def _mem_end(self, data: bytes, _checksum_field: int) -> list[_Answer]:
        stay, entry = _unpack("<II", data)
        self._mem_download = None
        if not stay and entry:
            self._jumped_to_ram_code = True  # esptool's flasher stub, say: see handle()
        return [(0, b"")]


def _unpack(fmt: str, data: bytes) -> tuple[int, ...]:
    if len(data) != struct.calcsize(fmt):
        raise _RomError(_ERR_INVALID_MESSAGE)
    return struct.unpack(fmt, data)


# --- the pseudo-terminal ---------------------------------------------------------------

_TERMIOS_BAUDS = {getattr(termios, f"B{rate}"): rate for rate in (
    9600, 19200, 38400, 57600, 115200, 230400, 460800, 500000, 576000, 921600,
    1000000, 1152000, 1500000, 2000000, 2500000, 3000000, 3500000, 4000000,
) if hasattr(termios, f"B{rate}")}


class RomBootloader:
    """A virtual board in download mode, its ROM loader on a pty (see the module docstring).

    Use as a context manager, or call `close()`. `port` is the path to open;
    `stats` counts what arrived; `unplugged` tells whether `fail_after_bytes` struck;
    `error` holds an exception that ended the relay thread (a bug), if any.
    """

    def __init__(self, vb: VirtualBoard, fail_after_bytes: int | None = None, *,
                 pace_uart: bool = True, unreliable_above_baud: int | None = None):
        if not sys.platform.startswith("linux"):
            raise SimError("the ROM bootloader emulator needs Linux pseudo-terminals")
        chip = vb.board.get("chip")
        if chip not in CHIP_PROFILES:
            raise SimError(f"{vb.device_id}: no ROM loader emulation for chip {chip!r} "
                           f"(emulated: {', '.join(CHIP_PROFILES)})")
        if fail_after_bytes is not None and fail_after_bytes < 0:
            raise SimError("fail_after_bytes must not be negative")
        self.vb = vb
        self.fail_after_bytes = fail_after_bytes
        self.unreliable_above_baud = unreliable_above_baud
        self.unplugged = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._uart = _Uart(pace_uart, self._stop)
        self._master, self._slave, self.port = open_raw_pty()
        self._wake_r, self._wake_w = os.pipe()
        self._rom = _DownloadMode(vb, CHIP_PROFILES[chip], self._uart, self._host_baud)
        self._decoder = _SlipDecoder()
        self._outbox = bytearray()
        self._thread = threading.Thread(target=self._relay, name=f"sim-rom-{vb.device_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def __enter__(self) -> RomBootloader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> RomStats:
        return self._rom.stats

    @property
    def baud(self) -> int:
        """The ROM UART's current baud rate."""
        return self._uart.baud

    def close(self) -> None:
        """Stop the relay thread and close the pty (a client still on it sees a hang-up)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join()
        self._close_port()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ relay
    def _relay(self) -> None:
        try:
            while not self._stop.is_set() and not self.unplugged:
                self._step()
        except BaseException as e:  # noqa: BLE001 - kept for the owner to see
            self.error = e

    def _step(self) -> None:
        writers = [self._master] if self._outbox else []
        readable, writable, _ = select.select([self._master, self._wake_r], writers, [])
        if self._wake_r in readable:
            return
        if writable:
            self._flush()
        if self._master in readable:
            self._received(self._read())

    def _read(self) -> bytes:
        try:
            return os.read(self._master, _READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno == errno.EIO:  # no client has the port open
                time.sleep(0.01)
                return b""
            raise

    def _received(self, data: bytes) -> None:
        if not data:
            return
        limit = self.fail_after_bytes
        if limit is not None:
            data = data[:max(0, limit - self.stats.bytes_received)]
        self.stats.bytes_received += len(data)
        self._uart.carry(len(data))
        for frame in self._decoder.feed(self._through_link(data)):
            for answer in self._rom.handle(frame):
                self._send(answer)
            self._uart.answer_sent()
        if limit is not None and self.stats.bytes_received >= limit:
            self._unplug()

    def _through_link(self, data: bytes) -> bytes:
        """What survives the cable: on an unreliable one, long frames lose a bit."""
        threshold = self.unreliable_above_baud
        if threshold is None or self._uart.baud <= threshold or len(data) <= _CORRUPTIBLE_FRAME:
            return data
        for i in range(len(data) // 2, len(data)):
            if data[i] not in _SLIP_BYTES_AND_NEIGHBOURS:  # keep the framing intact
                return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
        return data

    def _send(self, data: bytes) -> None:
        self._uart.carry(len(data))
        self._outbox += data
        self._flush()

    def _flush(self) -> None:
        try:
            n = os.write(self._master, self._outbox)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            n = len(self._outbox)  # nobody listening: the bytes are lost, as on a UART
        del self._outbox[:n]

    def _host_baud(self) -> int | None:
        """The rate the client set on its end of the pty, if it is a standard one."""
        if self._master is None:
            return None
        try:
            return _TERMIOS_BAUDS.get(termios.tcgetattr(self._master)[5])
        except termios.error:
            return None

    def _unplug(self) -> None:
        self.unplugged = True
        self._close_port()

    def _close_port(self) -> None:
        for name in ("_master", "_slave"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
