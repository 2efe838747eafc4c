"""Where mpfleet finds its own files.

Which room: shared by every room (like `mpfleet.errors`); imports nothing of mpfleet.
The package runs from its checkout (`pip install -e .`, as the Makefile sets it up):
the device's tree (`firmware/`) and the board definitions (`boards/`) sit at the
repository root, beside `host_tools/`. The simulator's device runtime (`sim/mpy`)
ships inside the package.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # host_tools/mpfleet
REPO_ROOT = PACKAGE_DIR.parents[1]
FIRMWARE_DIR = REPO_ROOT / "firmware"
BOARDS_DIR = REPO_ROOT / "boards"  # $MPFLEET_BOARDS_DIR overrides it (mpfleet.boards.boards_dir)
SIM_RUNTIME_DIR = PACKAGE_DIR / "sim" / "mpy"  # the code that runs inside a virtual board
