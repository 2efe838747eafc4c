"""`mpfleet flash` on 8 boards at once vs one board after another (mpfleet.usb.flash).

The boards are virtual boards in download mode (mpfleet.sim.rom.RomBootloader): the
real esptool (v5, --no-stub, as the emulator requires) talks to each board's emulated
ESP32 ROM loader over a pseudo-terminal, and the data lands in the board's emulated
NOR flash. The ROM charges the wire time of every byte at the UART's baud rate (10
bits per byte), as a USB-serial bridge would; flash erase and program times are not
modelled, so a real board spends somewhat longer.

Same run, same 8 boards, same merged firmware image (app of APP_KIB KiB at 0x10000,
written from 0x1000 with otadata erased), same baud rate:

  parallel     one flash_boards() call with the 8 ports: one esptool thread per board
  sequential   8 flash_boards() calls, one port each, one after another

  ratio = sequential wall time / parallel wall time (8.0 would be perfect overlap)

Also reported: the wire-time floor of one board (bytes esptool sends / (baud / 10))
and this process's CPU time per board (esptool and the emulator share the 2 cores
and the GIL, which is what keeps the ratio below 8).

    .venv/bin/python bench/usb_flash.py       # prints a table
    run() -> {"name": "usb_flash", "rows": [...], "ratio": ...}
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from mpfleet.images.espimage import build_app_image
from mpfleet.sim import VirtualBoard
from mpfleet.sim.rom import RomBootloader
from mpfleet.usb.flash import flash_boards

BOARDS = 8
APP_KIB = 256
BAUD = 921600
FIRMWARE_OFFSET = 0x1000
APP_OFFSET = 0x10000
OPTIONS = {"baud": BAUD, "no_stub": True, "before": "no-reset", "after": "no-reset"}


def merged_firmware(version: str) -> bytes:
    """Bootloader at 0x1000, partition table at 0x8000, 0xFF, the app at 0x10000."""
    app = build_app_image("esp32", version, size=APP_KIB * 1024)
    flash = bytearray(b"\xff" * (APP_OFFSET + len(app)))
    bootloader = build_app_image("esp32", "bootloader")[:0x400]
    flash[FIRMWARE_OFFSET:FIRMWARE_OFFSET + len(bootloader)] = bootloader
    flash[0x8000:0x8020] = b"\xaa\x50" + bytes(30)
    flash[APP_OFFSET:] = app
    return bytes(flash[FIRMWARE_OFFSET:])


def timed(ports: list[str], firmware: Path, parallel: bool) -> tuple[float, float, list]:
    """(wall seconds, CPU seconds of this process, results)."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if parallel:
        results = flash_boards(ports, "virtual", firmware, **OPTIONS)
    else:
        results = [r for port in ports for r in flash_boards([port], "virtual", firmware, **OPTIONS)]
    return time.perf_counter() - wall0, time.process_time() - cpu0, results


def check(results: list, boards: list[VirtualBoard], image: bytes, label: str) -> None:
    failed = [f"{r.port}: {r.error}" for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{label}: " + "; ".join(failed))
    for vb in boards:
        flash = vb.flash()
        try:
            if bytes(flash.read_bytes(FIRMWARE_OFFSET, len(image))) != image:
                raise RuntimeError(f"{label}: {vb.device_id}'s flash does not hold the image")
        finally:
            flash.close()


def run(boards: int = BOARDS) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mpfleet-bench-usbflash-"))
    try:
        image = merged_firmware("v1.26.0")
        firmware = tmp / "firmware.bin"
        firmware.write_bytes(image)
        vbs = [VirtualBoard.create(tmp / f"board{i}") for i in range(boards)]
        with ExitStack() as stack:
            roms = [stack.enter_context(RomBootloader(vb)) for vb in vbs]
            ports = [rom.port for rom in roms]
            par_s, par_cpu, par_results = timed(ports, firmware, parallel=True)
            check(par_results, vbs, image, "parallel")
            received = [rom.stats.bytes_received for rom in roms]
            seq_s, seq_cpu, seq_results = timed(ports, firmware, parallel=False)
            check(seq_results, vbs, image, "sequential")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wire_floor_s = max(received) * 10 / BAUD
    per_board = [r.seconds for r in seq_results]
    kib = len(image) / 1024
    rows = [
        {"measure": f"parallel, {boards} boards", "value": f"{par_s:.1f} s",
         "detail": f"{boards * kib / par_s:.0f} KiB/s in all, CPU {par_cpu / boards:.2f} s per board"},
        {"measure": f"sequential, {boards} boards", "value": f"{seq_s:.1f} s",
         "detail": f"{min(per_board):.1f}-{max(per_board):.1f} s per board, CPU {seq_cpu / boards:.2f} s per board"},
        {"measure": "one board's wire-time floor", "value": f"{wire_floor_s:.1f} s",
         "detail": f"{max(received)} bytes from esptool at {BAUD} baud, 10 bits per byte"},
        {"measure": "image", "value": f"{kib:.0f} KiB",
         "detail": f"merged, app {APP_KIB} KiB, written at {FIRMWARE_OFFSET:#x}, --no-stub, verified by MD5"},
    ]
    return {"name": "usb_flash", "boards": boards, "baud": BAUD, "image_bytes": len(image),
            "parallel_s": round(par_s, 2), "sequential_s": round(seq_s, 2),
            "parallel_cpu_s": round(par_cpu, 2), "sequential_cpu_s": round(seq_cpu, 2),
            "wire_floor_s": round(wire_floor_s, 2), "rows": rows,
            "ratio": round(seq_s / par_s, 2),
            "ratio_label": f"sequential / parallel wall time for {boards} boards (ideal {boards}.0)"}


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else BOARDS)
    for row in result["rows"]:
        print(f"{row['measure']:32s} {row['value']:>9s}  {row['detail']}")
    print(f"ratio ({result['ratio_label']}): {result['ratio']}")
