"""The device's checks of a downloaded firmware image before set_boot (agent/otacheck.py),
run by the real MicroPython on a virtual board against what is on its flash."""

from __future__ import annotations

import hashlib

import pytest
from conftest import firmware_files

from mpfleet.images.espimage import build_app_image

CHECK = """
import esp32, machine
from agent import otacheck
run = esp32.Partition(esp32.Partition.RUNNING)
try:
    print("OK", otacheck.check(run.get_next_update(), run, {size}, "{sha}", allow_downgrade={allow}))
except otacheck.Rejected as e:
    print("REJECTED", e)
print("running", run.info()[4], "boot", esp32.Partition(esp32.Partition.BOOT).info()[4])
machine.deepsleep(1000)
"""
FILES = ("lib/agent/__init__.py", "lib/agent/otacheck.py")


def _check(new_board, image: bytes | None, size: int | None = None, sha: str | None = None, allow: bool = False,
           secure_version: int = 0, written: bytes | None = None) -> str:
    vb = new_board(secure_version=secure_version)
    if written is not None:
        vb.write_app_image("ota_1", written)
    elif image is not None:
        vb.write_app_image("ota_1", image)
    files = firmware_files(only=FILES)
    files["/main.py"] = CHECK.format(size=len(image) if size is None else size,
                                     sha=sha or hashlib.sha256(image).hexdigest(), allow=allow).encode()
    vb.fs_put(files)
    out = vb.boot().output
    assert "running ota_0 boot ota_0" in out, out  # a check never switches
    return out


def test_a_good_image_passes(new_board):
    out = _check(new_board, build_app_image("esp32", "v1.25.0", size=20_000))
    assert "OK v1.25.0" in out


@pytest.mark.parametrize("case, reason", [
    ("sha", "SHA-256 of the written image"),
    ("truncated", "SHA-256 of the written image"),
    ("chip", "this chip is"),
    ("downgrade", "below the running 2"),
    ("too_big", "does not fit"),
])
def test_bad_images_are_rejected_with_the_reason(new_board, case, reason):
    image = build_app_image("esp32", "v1.25.0", secure_version=1, size=20_000)
    kwargs = {"secure_version": 0}
    if case == "sha":
        kwargs["sha"] = hashlib.sha256(b"another image").hexdigest()
    elif case == "truncated":  # only part of it reached flash
        kwargs["written"] = image[:12_000]
    elif case == "chip":
        image = build_app_image("esp32c3", "v1.25.0", size=20_000)
    elif case == "downgrade":
        kwargs["secure_version"] = 2
    elif case == "too_big":
        kwargs["size"] = 8 * 1024 * 1024
    out = _check(new_board, image, **kwargs)
    assert "REJECTED" in out and reason in out, out


def test_a_downgrade_passes_when_the_job_allows_it(new_board):
    out = _check(new_board, build_app_image("esp32", "v1.23.0", secure_version=1), secure_version=2, allow=True)
    assert "OK v1.23.0" in out


def test_an_erased_slot_is_no_image(new_board):
    out = _check(new_board, build_app_image("esp32", "v1"), written=b"")
    assert "REJECTED no app image in ota_1" in out
