"""The virtual ESP32 board: emulated NOR flash, ESP32 shim modules for the real
MicroPython unix port, and the supervisor that runs a device through resets and
deep sleeps (see docs/architecture.md).

May import the library rooms (`mpfleet.boards`, `mpfleet.images`, `mpfleet.fleet`...),
never `mpfleet.cli`; nothing of the library imports the simulator, and the CLI for it
lives in `mpfleet.cli.sim`.

- `mpfleet.sim.board.VirtualBoard`: one device in a directory; `create`, `power_on`,
  `boot`, `run`, `schedule_power_cut`, flash counters and otadata inspection.
- `mpfleet.sim.mpy`: the code that runs *inside* the device process (shims and
  the bootloader); it is MicroPython, not part of the host package's API. The
  supervisor imports a few of its modules as `mpfleet.sim.mpy.<name>`: `_simfacts`
  (the board facts both sides agree on) and the flash, otadata and image rules.
- `mpfleet.sim.fleet`: many boards at once; `provision_sim_fleet` provisions them
  as the host provisions real devices.
"""

from mpfleet.sim.board import BootRecord, SimError, VirtualBoard

__all__ = ["BootRecord", "SimError", "VirtualBoard"]
