# Reading and verifying an ESP app image in a flash slot, as the ESP-IDF
# bootloader and esp_ota_set_boot_partition() do. MicroPython and CPython.
#
# Image layout (see docs/architecture.md and mpfleet.images.espimage):
#   0x00  u8   magic 0xE9          0x01  u8  segment count
#   0x0C  u16  chip id (LE)        0x17  u8  hash appended (1 = SHA-256 follows)
#   0x18  segment headers: u32 load address, u32 length, then the data
#   0x20  esp_app_desc_t (first segment's data): magic 0xABCD5432, secure_version,
#         version[32] at +16, project_name[32] at +48, idf_ver[32] at +112
#   0x120 sim note: b"MPFS", u16 length, JSON (virtual-board behaviour such as
#         {"crash": "boot"}); absent on real firmware
#   end   checksum byte at the last byte of a 16-byte aligned block (0xEF XOR
#         all segment data), then 32 bytes SHA-256 of everything before.

import hashlib
import json
import struct

IMAGE_MAGIC = 0xE9
APP_DESC_MAGIC = 0xABCD5432
APP_DESC_OFFSET = 0x20
APP_DESC_SIZE = 256
SIM_NOTE_MAGIC = b"MPFS"
HEADER_SIZE = 24
_CHECKSUM_SEED = 0xEF
_MAX_SEGMENTS = 16
_CHUNK = 1024


class ImageInvalid(Exception):
    pass


def _cstr(raw):
    raw = bytes(raw)
    end = raw.find(b"\x00")
    if end >= 0:
        raw = raw[:end]
    return raw.decode()


def _fold_xor(value, nbytes):
    while nbytes > 1:
        nbytes //= 2
        bits = nbytes * 8
        value = (value >> bits) ^ (value & ((1 << bits) - 1))
    return value


def verify_slot(flash, slot_offset, slot_size, expect_chip_id=None):
    """Verify the image at `slot_offset` and return its description dict.

    Raises ImageInvalid with the reason when the slot does not hold a
    complete, intact image for this chip.
    """
    header = flash.read_bytes(slot_offset, HEADER_SIZE)
    if header[0] != IMAGE_MAGIC:
        raise ImageInvalid("no image: magic 0x%02x is not 0xe9" % header[0])
    segments = header[1]
    if segments == 0 or segments > _MAX_SEGMENTS:
        raise ImageInvalid("bad segment count %d" % segments)
    chip_id = struct.unpack("<H", header[12:14])[0]
    if expect_chip_id is not None and chip_id != expect_chip_id:
        raise ImageInvalid("image is for chip id %d, this chip is %d" % (chip_id, expect_chip_id))
    hash_appended = header[23] == 1

    sha = hashlib.sha256()
    sha.update(header)
    # XOR of all segment bytes, computed _CHUNK bytes at a time as one big
    # integer and folded at the end: a per-byte loop is far too slow here.
    xor_acc = 0
    buf = bytearray(_CHUNK)
    pos = HEADER_SIZE
    for _ in range(segments):
        if pos + 8 > slot_size:
            raise ImageInvalid("segment header beyond slot")
        seg_header = flash.read_bytes(slot_offset + pos, 8)
        sha.update(seg_header)
        length = struct.unpack("<II", seg_header)[1]
        pos += 8
        if pos + length > slot_size:
            raise ImageInvalid("segment of %d bytes runs past the slot" % length)
        remaining = length
        while remaining:
            n = min(remaining, _CHUNK)
            mv = memoryview(buf)[:n]
            flash.read(slot_offset + pos, mv)
            sha.update(mv)
            if n < _CHUNK:
                for i in range(n, _CHUNK):
                    buf[i] = 0
                mv = buf
            xor_acc ^= int.from_bytes(mv, "little")
            pos += n
            remaining -= n
    checksum = _CHECKSUM_SEED ^ _fold_xor(xor_acc, _CHUNK)
    # Zero padding up to the checksum byte, which ends a 16-byte block.
    pad = 15 - (pos % 16)
    tail = flash.read_bytes(slot_offset + pos, pad + 1)
    sha.update(tail)
    if tail[pad] != checksum:
        raise ImageInvalid("checksum mismatch (stored 0x%02x, computed 0x%02x)" % (tail[pad], checksum))
    pos += pad + 1
    if hash_appended:
        stored = flash.read_bytes(slot_offset + pos, 32)
        if bytes(stored) != sha.digest():
            raise ImageInvalid("appended SHA-256 does not match the image")
        pos += 32

    desc = flash.read_bytes(slot_offset + APP_DESC_OFFSET, APP_DESC_SIZE + 6)
    magic, secure_version = struct.unpack("<II", desc[0:8])
    if magic != APP_DESC_MAGIC:
        raise ImageInvalid("no esp_app_desc_t in the first segment")
    info = {
        "chip_id": chip_id,
        "secure_version": secure_version,
        "version": _cstr(desc[16:48]),
        "project_name": _cstr(desc[48:80]),
        "idf_ver": _cstr(desc[112:144]),
        "size": pos,
        "sim_note": {},
    }
    note = desc[APP_DESC_SIZE:APP_DESC_SIZE + 6]
    if bytes(note[0:4]) == SIM_NOTE_MAGIC:
        length = struct.unpack("<H", note[4:6])[0]
        raw = flash.read_bytes(slot_offset + APP_DESC_OFFSET + APP_DESC_SIZE + 6, length)
        try:
            info["sim_note"] = json.loads(bytes(raw))
        except ValueError:
            raise ImageInvalid("unreadable sim note")
    return info
