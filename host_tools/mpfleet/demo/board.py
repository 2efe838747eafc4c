"""`python -m mpfleet.demo.board`: one virtual board: deep sleeps, RTC memory, A/B rollback.

The virtual ESP32 itself: the firmware's view of deep sleep, RTC memory, the A/B
bootloader with automatic rollback, and flash wear. (`make demo` is the fleet demo.)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mpfleet.images.espimage import build_app_image
from mpfleet.sim import VirtualBoard

console = Console()

DEMO_MAIN = b"""
import esp32, machine, time
rtc = machine.RTC()
wakes = int(rtc.memory() or b"0") + 1
rtc.memory(b"%d" % wakes)
slot = esp32.Partition(esp32.Partition.RUNNING).info()[4]
print("wake", wakes, "cause", machine.reset_cause(), "slot", slot, "t", time.time())
if wakes == 3 and slot == "ota_0":
    esp32.Partition(esp32.Partition.RUNNING).get_next_update().set_boot()
    machine.reset()
machine.deepsleep(15 * 60 * 1000)
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpfleet-demo-") as tmp:
        vb = VirtualBoard.create(Path(tmp) / "dev1", device_id="demo-1", firmware_version="v1.24.0")
        console.rule("[bold]mpfleet demo: a virtual ESP32")
        console.print("firmware v1.24.0 in ota_0; a v1.25.0 image that [red]panics at boot[/] in ota_1")
        vb.write_app_image("ota_1", build_app_image("esp32", "v1.25.0", sim_note={"crash": "boot"}))
        vb.fs_put({"/main.py": DEMO_MAIN})
        vb.power_on()
        records = vb.run(boots=8)
        table = Table(title="boots (15 minutes of deep sleep between wakes)")
        for col in ("boot", "reset cause", "slot", "firmware", "ended by"):
            table.add_column(col)
        for r in records:
            table.add_row(str(r.index), r.reset_cause_name, str(r.running_slot), str(r.firmware_version),
                          r.exit_reason + (f" ({r.detail})" if r.detail and r.exit_reason != "deepsleep" else ""))
        console.print(table)
        console.print("The switch to v1.25.0 crashed at boot; the bootloader rolled back to v1.24.0 by itself.")
        c = vb.counters()
        console.print(f"flash: vfs {c['vfs']['erases']} erases, otadata {c['otadata']['erases']} erases, "
                      f"{c['ops']} operations in all; device clock advanced "
                      f"{(vb.clock_s - records[0].clock_s) / 3600:.1f} h")
        ok = records[-1].running_slot == "ota_0" and any(r.exit_reason == "panic" for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
