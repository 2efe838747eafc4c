"""The smallest heap a boot fits in: the honest "peak heap" of firmware.

MicroPython's `mem_peak()` counts garbage that the collector has not yet
reclaimed, so in a small heap it reads close to the heap size whatever the
program needs. What matters on the target is whether the work completes in a
given heap, so this searches for the smallest budget in which the boot still
succeeds, each trial on a fresh copy of the same board.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mpfleet.sim.board import BootRecord, VirtualBoard


def _trial(vb: VirtualBoard, budget: int, succeeded: Callable[[BootRecord], bool]) -> bool:
    with tempfile.TemporaryDirectory(prefix="mpfleet-heap-") as tmp:
        copy = Path(tmp) / "dev"
        shutil.copytree(vb.path, copy)
        trial = VirtualBoard(copy)
        trial.settings["heap"] = str(budget)
        trial.save()
        return succeeded(trial.boot())


def heap_needed(vb: VirtualBoard, succeeded: Callable[[BootRecord], bool],
                low: int = 4 * 1024, high: int = 256 * 1024, resolution: int = 1024) -> int | None:
    """Smallest heap (bytes, to `resolution`) in which the board's next boot succeeds.

    The board itself is not changed. Returns None when even `high` is not enough.
    """
    if not _trial(vb, high, succeeded):
        return None
    while high - low > resolution:
        mid = (low + high) // 2
        if _trial(vb, mid, succeeded):
            high = mid
        else:
            low = mid
    return high
