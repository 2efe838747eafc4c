"""`mpfleet image add/list/show`: app and merged images are validated with esptool's
image code and kept by SHA-256; wrong, truncated and mismatched files are refused."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from mpfleet.images.espimage import build_app_image
from mpfleet.images.store import ImageStore, ImageStoreError
from mpfleet.db.store import Store


def _merged(app: bytes, base: int, bootloader_at: int) -> bytes:
    """A flash image as the file holds it from flash address `base` (0, or the bootloader)."""
    flash = bytearray(b"\xff" * (0x10000 + len(app) + 0x100))
    bootloader = build_app_image("esp32", "bootloader")[:0x400]  # starts with 0xE9, as a real one
    flash[bootloader_at:bootloader_at + len(bootloader)] = bootloader
    flash[0x8000:0x8020] = b"\xaa\x50" + bytes(30)
    flash[0x10000:0x10000 + len(app)] = app
    return bytes(flash[base:])


@pytest.fixture
def images(tmp_path):
    store = Store(tmp_path / "m.db")
    yield ImageStore(store, tmp_path / "images")
    store.close()


def test_app_image_is_recorded_with_what_its_header_says(images, tmp_path):
    app = build_app_image("esp32s3", "v1.25.0", secure_version=3, size=60_000)
    f = tmp_path / "micropython.bin"
    f.write_bytes(app + b"\xff" * 100)  # a partition read back: the erased tail is dropped
    record, new = images.add(f)
    assert new and record.kind == "app"
    assert (record.chip, record.version, record.secure_version, record.size) == ("esp32s3", "v1.25.0", 3, len(app))
    assert record.sha256 == hashlib.sha256(app).hexdigest() and record.id == record.sha256[:12]
    assert images.read(record.id[:6]) == app
    again, new = images.add(f)
    assert not new and again == record and len(images.list()) == 1


@pytest.mark.parametrize("base, bootloader_at", [(0x1000, 0x1000), (0, 0x1000), (0, 0)])
def test_merged_image_gives_its_app(images, tmp_path, base, bootloader_at):
    app = build_app_image("esp32", "v1.24.1")
    f = tmp_path / "firmware.bin"
    f.write_bytes(_merged(app, base, bootloader_at))
    record, _ = images.add(f)
    assert record.kind == "merged" and record.version == "v1.24.1" and images.read(record.id) == app


@pytest.mark.parametrize("make, reason", [
    (lambda app: b"", "empty file"),
    (lambda app: b"\x7fELF" + app, "neither an app image"),
    (lambda app: app[: len(app) // 2], "truncated image"),
    (lambda app: app[:-32] + bytes(32), "SHA-256"),
    (lambda app: app[:2000] + bytes([app[2000] ^ 1]) + app[2001:], "corrupted"),
    (lambda app: app + b"trailing garbage", "not erased flash"),
])
def test_bad_files_are_refused_with_the_reason(images, tmp_path, make, reason):
    f = tmp_path / "bad.bin"
    f.write_bytes(make(build_app_image("esp32", "v9")))
    with pytest.raises(ImageStoreError, match=reason):
        images.add(f)
    assert images.list() == [] and not any((tmp_path / "images").glob("*.bin"))


def test_wrong_chip_and_missing_files(images, tmp_path):
    f = tmp_path / "c3.bin"
    f.write_bytes(build_app_image("esp32c3", "v1"))
    with pytest.raises(ImageStoreError, match="for esp32c3, not for esp32"):
        images.add(f, chip="esp32")
    with pytest.raises(ImageStoreError, match="cannot read"):
        images.add(tmp_path / "nope.bin")
    with pytest.raises(ImageStoreError, match="no image"):
        images.get("abc")


def test_a_stored_image_changed_on_disk_is_not_served(images, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(build_app_image("esp32", "v2"))
    record, _ = images.add(f)
    stored = tmp_path / "images" / f"{record.sha256}.bin"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ImageStoreError, match="does not match its SHA-256"):
        images.read(record.id)


@pytest.fixture
def image_cli(tmp_path):
    """`mpfleet image ...` on a fresh database and store."""
    env = dict(os.environ, MPFLEET_DB=str(tmp_path / "m.db"), MPFLEET_IMAGES=str(tmp_path / "images"))

    def mpfleet(*args):
        return subprocess.run([sys.executable, "-m", "mpfleet", "image", *args], capture_output=True, text=True,
                              timeout=60, env=env)
    return mpfleet


def test_cli_adds_lists_and_shows_an_image_by_a_prefix_of_its_id(tmp_path, image_cli):
    f = tmp_path / "fw.bin"
    f.write_bytes(build_app_image("esp32", "v1.26.0", secure_version=1))
    added = json.loads(image_cli("add", str(f), "--json").stdout)
    assert added["new"] and added["version"] == "v1.26.0"
    assert added["id"] in image_cli("list").stdout
    assert json.loads(image_cli("show", added["id"][:8], "--json").stdout)["sha256"] == added["sha256"]


def test_cli_refuses_a_file_that_is_no_image_in_one_line(tmp_path, image_cli):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"hello")
    refused = image_cli("add", str(bad))
    assert refused.returncode == 1 and refused.stderr.startswith("mpfleet: bad.bin: neither an app image")
