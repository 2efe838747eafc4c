# The checks a downloaded firmware image must pass before set_boot() is called.
#
# Reads the image back from the update partition (what is on flash, not what was
# received), in 4 KiB blocks with one preallocated buffer:
#   - it fits the slot;
#   - image magic 0xE9 and an esp_app_desc_t (magic 0xABCD5432) at 0x20;
#   - the chip id in its header is the running image's (an image for another chip
#     would not boot: the bootloader refuses it);
#   - secure_version is not below the running one, unless the job allows a downgrade
#     (anti-rollback);
#   - SHA-256 of the first `size` bytes is the one the signed job names.
# Any failure raises Rejected with the reason; nothing is switched.

import hashlib
import binascii

_BLOCK = const(4096)
_IMAGE_MAGIC = const(0xE9)
_DESC_MAGIC = const(0xABCD5432)
_OFF_CHIP_ID = const(0x0C)
_OFF_DESC = const(0x20)


class Rejected(Exception):
    pass


def _u16(b, i):
    return b[i] | (b[i + 1] << 8)


def _u32(b, i):
    return b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24)


def describe(part, buf):
    """(chip id, secure_version, version) from the image at the start of `part`;
    `buf` is a 4096-byte scratch buffer."""
    part.readblocks(0, buf)
    if buf[0] != _IMAGE_MAGIC:
        raise Rejected("no app image in %s (first byte 0x%02x, not 0xE9)" % (part.info()[4], buf[0]))
    if _u32(buf, _OFF_DESC) != _DESC_MAGIC:
        raise Rejected("the image in %s has no app descriptor" % part.info()[4])
    version = bytes(buf[_OFF_DESC + 16:_OFF_DESC + 48])
    end = version.find(b"\x00")
    return _u16(buf, _OFF_CHIP_ID), _u32(buf, _OFF_DESC + 4), (version[:end] if end >= 0 else version).decode()


def check_header(part, running, allow_downgrade, buf):
    """The image's chip and secure_version against the running image's (needs only
    its first block on flash); returns its version."""
    run_chip, run_secure, _ = describe(running, buf)
    chip, secure, version = describe(part, buf)
    if chip != run_chip:
        raise Rejected("the image is for chip id %d, this chip is %d" % (chip, run_chip))
    if secure < run_secure and not allow_downgrade:
        raise Rejected("secure_version %d is below the running %d (allow_downgrade not given)" % (secure, run_secure))
    return version


def check_fits(part, size):
    slot = part.info()[3]
    if size <= 0 or size > slot:
        raise Rejected("an image of %d bytes does not fit the %d-byte slot %s" % (size, slot, part.info()[4]))


def check(part, running, size, sha256_hex, allow_downgrade=False, feed=None, buf=None):
    """Check the image written to `part` against the job and the `running` partition;
    returns its version. `feed()` is called between blocks (the watchdog); `buf`, if
    given, is a 4096-byte scratch buffer."""
    check_fits(part, size)
    if buf is None:
        buf = bytearray(_BLOCK)
    version = check_header(part, running, allow_downgrade, buf)
    h = hashlib.sha256()
    mv = memoryview(buf)
    block = 0
    left = size
    while left > 0:
        part.readblocks(block, buf)
        n = _BLOCK if left > _BLOCK else left
        h.update(mv[:n])
        left -= n
        block += 1
        if feed is not None:
            feed()
    got = binascii.hexlify(h.digest()).decode()
    if got != sha256_hex:
        raise Rejected("SHA-256 of the written image is %s, the job says %s" % (got[:16], sha256_hex[:16]))
    return version
