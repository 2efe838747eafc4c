"""mpfleet.images.espimage: the app images we build are images esptool accepts, and every way an
image can be wrong ends in an ImageError that says what is wrong."""

import hashlib
import struct
import subprocess
import sys

import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.cmds import merge_bin
from esptool.targets import CHIP_DEFS

from mpfleet.images import espimage
from mpfleet.errors import MpfleetError
from mpfleet.images.espimage import (
    APP_DESC_OFFSET,
    CHIP_IDS,
    CHIPS_BY_ID,
    SIM_NOTE_OFFSET,
    ImageError,
    build_app_image,
    extract_app_from_merged,
    image_length,
    parse_app_image,
)

CHIPS = list(CHIP_IDS)
CRASH_NOTE = {"crash": "boot"}


def _flip(data: bytes, offset: int) -> bytes:
    corrupted = bytearray(data)
    corrupted[offset] ^= 0x01
    return bytes(corrupted)


def _without_sim_note(chip: str, head: bytes) -> bytes:
    """An image whose first segment is ``head`` and filler, like real firmware."""
    plan = espimage._FillerPlan(rodata=64, dram=64, iram=64)
    return espimage._assemble(chip, head, plan, seed=b"test")


def _desc(version: str = "v1.0.0") -> bytes:
    return espimage._pack_app_desc(version, "micropython", 0, "v5.2.2", bytes(32))


# --- chip tables -------------------------------------------------------------------------


def test_chip_ids_agree_with_esptool():
    for chip, chip_id in CHIP_IDS.items():
        assert CHIP_DEFS[chip].IMAGE_CHIP_ID == chip_id
        assert CHIPS_BY_ID[chip_id] == chip


def test_bootloader_offsets_agree_with_esptool():
    for chip, offset in espimage.BOOTLOADER_OFFSETS.items():
        assert CHIP_DEFS[chip].BOOTLOADER_FLASH_OFFSET == offset


def test_chip_names_are_normalised_and_unknown_ones_rejected():
    assert espimage.normalize_chip("ESP32-S3") == "esp32s3"
    with pytest.raises(ImageError, match="unknown chip 'esp8266'"):
        espimage.normalize_chip("esp8266")


# --- building ----------------------------------------------------------------------------


@pytest.mark.parametrize("chip", CHIPS)
def test_built_image_is_valid_for_esptool(chip):
    data = build_app_image(chip, "v1.4.2", secure_version=7, sim_note=CRASH_NOTE)
    image = LoadFirmwareImage(chip, data)
    assert image.chip_id == CHIP_IDS[chip]
    assert image.checksum == image.calculate_checksum()
    assert image.append_digest
    assert image.stored_digest == image.calc_digest
    assert image.data_length + 32 == len(data)
    first = image.segments[0]
    assert "DROM" in first.get_memory_type(image)  # where esptool looks for the app desc
    assert first.file_offs + 8 == APP_DESC_OFFSET


@pytest.mark.parametrize("chip", CHIPS)
def test_parse_gives_back_what_was_built(chip):
    data = build_app_image(
        chip, "v1.4.2", project_name="mpfleet-agent", secure_version=7, sim_note=CRASH_NOTE
    )
    info = parse_app_image(data, expect_chip=chip)
    assert info.chip == chip
    assert info.chip_id == CHIP_IDS[chip]
    assert info.version == "v1.4.2"
    assert info.project_name == "mpfleet-agent"
    assert info.secure_version == 7
    assert info.idf_ver == "v5.2.2"
    assert info.sim_note == CRASH_NOTE
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.segments == len(LoadFirmwareImage(chip, data).segments)


def test_byte_offsets_are_those_documented_for_the_device_parser():
    data = build_app_image("esp32s3", "v2.0.0", secure_version=5, sim_note=CRASH_NOTE)
    assert data[0] == 0xE9
    assert data[8] == 0xEE  # WP pin disabled
    assert struct.unpack_from("<H", data, 12) == (9,)  # chip id
    assert data[23] == 1  # hash appended
    assert struct.unpack_from("<II", data, 0x20) == (0xABCD5432, 5)
    assert data[0x30:0x50].rstrip(b"\0") == b"v2.0.0"
    assert data[0x50:0x70].rstrip(b"\0") == b"micropython"
    assert SIM_NOTE_OFFSET == 0x120
    magic, length = struct.unpack_from("<4sH", data, 0x120)
    assert magic == b"MPFS"
    assert data[0x126 : 0x126 + length] == b'{"crash":"boot"}'


def test_default_sim_note_is_empty_object():
    assert parse_app_image(build_app_image("esp32", "v1")).sim_note == {}


def test_image_without_sim_note_parses_with_empty_note():
    info = parse_app_image(_without_sim_note("esp32", _desc("v7")))
    assert info.version == "v7"
    assert info.sim_note == {}


def test_default_image_is_a_few_kilobytes():
    assert 2048 <= len(build_app_image("esp32", "v1")) <= 8192


@pytest.mark.parametrize("size", [6_000, 60_000, 300_000, 1_400_000])
def test_image_of_requested_size_is_about_that_size(size):
    data = build_app_image("esp32", "v1.0.0", size=size)
    assert abs(len(data) - size) <= 64
    assert parse_app_image(data).size == len(data)


def test_requested_size_below_minimum_is_rejected():
    with pytest.raises(ImageError, match="too small"):
        build_app_image("esp32", "v1", size=100)


def test_images_are_deterministic_and_versions_differ():
    first = build_app_image("esp32", "v1.0.0", size=100_000)
    assert build_app_image("esp32", "v1.0.0", size=100_000) == first
    second = build_app_image("esp32", "v1.0.1", size=100_000)
    assert second != first
    assert second[-4096:-64] != first[-4096:-64]  # the code filler differs too


def test_version_longer_than_31_bytes_is_rejected():
    with pytest.raises(ImageError, match="version"):
        build_app_image("esp32", "v" * 32)


def test_sim_note_must_be_a_dict():
    with pytest.raises(ImageError, match="sim_note"):
        build_app_image("esp32", "v1", sim_note=["crash"])


def test_image_error_is_an_mpfleet_error():
    assert issubclass(ImageError, MpfleetError)


# --- parsing errors ----------------------------------------------------------------------


def test_corrupted_segment_byte_is_caught():
    data = build_app_image("esp32", "v1.0.0")
    with pytest.raises(ImageError, match="checksum|SHA-256"):
        parse_app_image(_flip(data, 0x200))


def test_corrupted_header_byte_is_caught_by_the_appended_hash():
    data = build_app_image("esp32", "v1.0.0")
    with pytest.raises(ImageError, match="SHA-256"):
        parse_app_image(_flip(data, 2))  # flash mode: not covered by the checksum


def test_corrupted_appended_hash_is_caught():
    data = build_app_image("esp32", "v1.0.0")
    with pytest.raises(ImageError, match="SHA-256"):
        parse_app_image(_flip(data, len(data) - 1))


def test_wrong_first_byte_is_named():
    data = build_app_image("esp32", "v1.0.0")
    with pytest.raises(ImageError, match=r"first byte 0x00 is not 0xE9"):
        parse_app_image(b"\0" + data[1:])


def test_empty_data_is_not_an_image():
    with pytest.raises(ImageError, match="no data"):
        parse_app_image(b"")


@pytest.mark.parametrize("keep", [10, 100, 0x400, -1, -33])
def test_truncated_image_is_rejected(keep):
    data = build_app_image("esp32", "v1.0.0")
    with pytest.raises(ImageError, match="truncated"):
        parse_app_image(data[:keep])


def test_trailing_bytes_after_the_image_are_ignored():
    data = build_app_image("esp32", "v1.0.0")
    info = parse_app_image(data + b"\xff" * 4096)  # a partition read back
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()


def test_chip_mismatch_with_expect_chip_is_rejected():
    data = build_app_image("esp32c3", "v1.0.0")
    with pytest.raises(ImageError, match="for esp32c3.*not for esp32$"):
        parse_app_image(data, expect_chip="esp32")


def test_expect_chip_accepts_the_official_spelling():
    data = build_app_image("esp32c3", "v1.0.0")
    assert parse_app_image(data, expect_chip="ESP32-C3").chip == "esp32c3"


def test_missing_app_descriptor_is_rejected():
    data = _without_sim_note("esp32", bytes(256))
    with pytest.raises(ImageError, match="missing app descriptor"):
        parse_app_image(data)


def test_image_length_walks_segments_checksum_and_hash():
    data = build_app_image("esp32", "v1.0.0", size=80_000)
    assert image_length(data + b"\xff" * 100) == len(data)


# --- merged flash images -----------------------------------------------------------------


def _merged_flash(app: bytes, bootloader_offset: int, app_offset: int = 0x10000) -> bytes:
    flash = bytearray(b"\xff" * (app_offset + len(app) + 0x1000))
    bootloader = bytes(range(256)) * 16  # stands in for a second-stage bootloader
    flash[bootloader_offset : bootloader_offset + len(bootloader)] = bootloader
    partition_table = b"\xaa\x50" + bytes(30)
    flash[0x8000 : 0x8000 + len(partition_table)] = partition_table
    flash[app_offset : app_offset + len(app)] = app
    return bytes(flash)


@pytest.mark.parametrize("chip", CHIPS)
def test_app_is_extracted_from_a_merged_image(chip):
    app = build_app_image(chip, "v3.1.0", size=50_000)
    merged = _merged_flash(app, espimage.BOOTLOADER_OFFSETS[chip])
    assert extract_app_from_merged(merged) == app


def test_app_is_extracted_from_an_esptool_merge_bin_image():
    app = build_app_image("esp32", "v3.1.0")
    merged = merge_bin(
        [(0x1000, bytes(range(256)) * 16), (0x8000, b"\xaa\x50" + bytes(30)), (0x10000, app)],
        "esp32",
    )
    assert extract_app_from_merged(merged, app_offset=0x10000) == app


def test_extract_at_another_app_offset():
    app = build_app_image("esp32", "v3.1.0")
    merged = _merged_flash(app, 0x1000, app_offset=0x20000)
    assert extract_app_from_merged(merged, app_offset=0x20000) == app


def test_extract_from_erased_flash_says_so():
    merged = _merged_flash(b"", 0x1000)
    with pytest.raises(ImageError, match="no app image at 0x10000: flash is erased"):
        extract_app_from_merged(merged)


def test_extract_beyond_the_end_says_so():
    with pytest.raises(ImageError, match="no app image at 0x10000.*only 4096"):
        extract_app_from_merged(b"\xff" * 4096)


def test_extract_of_garbage_names_the_offset_and_the_magic():
    merged = _merged_flash(b"\x12" * 64, 0x1000)
    with pytest.raises(ImageError, match="at 0x10000.*0x12 is not 0xE9"):
        extract_app_from_merged(merged)


def test_extract_of_a_truncated_app_says_so():
    app = build_app_image("esp32", "v3.1.0", size=50_000)
    merged = _merged_flash(app, 0x1000)[: 0x10000 + 20_000]
    with pytest.raises(ImageError, match="at 0x10000.*truncated"):
        extract_app_from_merged(merged)


# --- the real esptool command line -------------------------------------------------------


def test_esptool_image_info_cli_reports_version_and_valid_footer(tmp_path):
    path = tmp_path / "app.bin"
    path.write_bytes(build_app_image("esp32", "v1.4.2", secure_version=7, size=200_000))
    result = subprocess.run(
        [sys.executable, "-m", "esptool", "--chip", "esp32", "image-info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Chip ID: 0 (ESP32)" in out
    assert "App version: v1.4.2" in out
    assert "Project name: micropython" in out
    assert "Secure version: 7" in out
    assert "(valid)" in out.split("Checksum:")[1].splitlines()[0]
    assert "(valid)" in out.split("Validation hash:")[1].splitlines()[0]
