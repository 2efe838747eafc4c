"""Measuring the smallest heap a boot fits in."""

from mpfleet.sim.heap import heap_needed

ALLOCATES_60K = """
import gc
blocks = [bytearray(1024) for _ in range(60)]
print("ok")
"""


def test_heap_needed_brackets_what_the_program_holds(new_board):
    vb = new_board()
    vb.fs_put({"/main.py": ALLOCATES_60K.encode()})
    need = heap_needed(vb, lambda rec: "ok" in rec.output, low=32 * 1024, high=128 * 1024, resolution=2048)
    assert need is not None
    assert 60 * 1024 < need <= 80 * 1024
    assert vb.state["boot_count"] == 0, "the measured board itself is not booted"
