"""Every file that runs on a device compiles with mpy-cross (MicroPython syntax only)."""

import pytest

from mpfleet.tools.check_firmware import DEFAULT_DIRS, compile_errors


@pytest.mark.slow
def test_firmware_and_simulator_runtime_compile_with_mpy_cross():
    files = sorted(p for d in DEFAULT_DIRS for p in d.rglob("*.py"))
    assert files, "no firmware files found"
    assert compile_errors(files) == []


def test_a_cpython_only_construct_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("match x:\n    case 1:\n        pass\n")
    errors = compile_errors([bad])
    assert len(errors) == 1 and "bad.py" in errors[0]
