# The ESP-IDF otadata partition and the bootloader's app-rollback rules.
#
# Runs under MicroPython (the virtual board's bootloader and esp32.Partition)
# and CPython (host inspection), so it keeps to their common subset.
#
# Layout (ESP-IDF esp_ota_select_entry_t, one per 4 KiB sector, two sectors):
#
#   offset size  field
#   0      4     ota_seq     u32 LE; the active slot is (ota_seq - 1) % slots
#   4      20    seq_label   unused, 0xFF
#   24     4     ota_state   u32 LE, one of the STATE_* values below
#   28     4     crc         u32 LE, crc32 of the 4 bytes of ota_seq, computed as
#                            the ROM's crc32_le(UINT32_MAX, ...) (= zlib
#                            crc32(data, 0xFFFFFFFF))
#
# The entry with the highest valid ota_seq wins. Every update rewrites a
# whole sector (erase, then program 32 bytes): set_boot writes the sector
# that is *not* active, marking valid/aborted rewrites the active one in place.

import binascii
import struct

STATE_NEW = 0x0
STATE_PENDING_VERIFY = 0x1
STATE_VALID = 0x2
STATE_INVALID = 0x3
STATE_ABORTED = 0x4
STATE_UNDEFINED = 0xFFFFFFFF

STATE_NAMES = {
    STATE_NEW: "NEW",
    STATE_PENDING_VERIFY: "PENDING_VERIFY",
    STATE_VALID: "VALID",
    STATE_INVALID: "INVALID",
    STATE_ABORTED: "ABORTED",
    STATE_UNDEFINED: "UNDEFINED",
}

SECTOR = 4096
ENTRY_SIZE = 32
_ENTRY_FMT = "<I20sII"
_SEQ_ERASED = 0xFFFFFFFF


def seq_crc(seq):
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF) & 0xFFFFFFFF


class Entry:
    def __init__(self, sector, seq, state, valid):
        self.sector = sector
        self.seq = seq
        self.state = state
        self.valid = valid

    def slot(self, slots):
        return (self.seq - 1) % slots

    def __repr__(self):
        return "Entry(sector=%d, seq=%d, state=%s, valid=%s)" % (
            self.sector, self.seq, STATE_NAMES.get(self.state, hex(self.state)), self.valid)


def read_entries(flash, otadata_offset):
    entries = []
    for sector in (0, 1):
        raw = flash.read_bytes(otadata_offset + sector * SECTOR, ENTRY_SIZE)
        seq, _label, state, crc = struct.unpack(_ENTRY_FMT, raw)
        valid = seq != _SEQ_ERASED and crc == seq_crc(seq)
        entries.append(Entry(sector, seq, state, valid))
    return entries


def active_entry(entries):
    """The valid entry with the highest sequence number, or None."""
    best = None
    for e in entries:
        if e.valid and (best is None or e.seq > best.seq):
            best = e
    return best


def write_entry(flash, otadata_offset, sector, seq, state):
    addr = otadata_offset + sector * SECTOR
    flash.erase(addr, SECTOR)
    flash.program(addr, struct.pack(_ENTRY_FMT, seq, b"\xff" * 20, state, seq_crc(seq)))


def is_bootable_state(state):
    return state in (STATE_NEW, STATE_PENDING_VERIFY, STATE_VALID, STATE_UNDEFINED)


def set_boot(flash, otadata_offset, slot, slots):
    """Make `slot` boot next, as esp_ota_set_boot_partition does with
    rollback enabled: a new entry in the inactive sector, state NEW."""
    entries = read_entries(flash, otadata_offset)
    active = active_entry(entries)
    if active is None:
        seq = slot + 1
        sector = 0
    else:
        seq = active.seq
        while (seq - 1) % slots != slot or seq <= active.seq:
            seq += 1
        sector = (active.sector + 1) % 2
    write_entry(flash, otadata_offset, sector, seq, STATE_NEW)
    return seq


def set_state_of_active(flash, otadata_offset, state):
    """Rewrite the active entry in place with a new state (marking valid or aborted)."""
    active = active_entry(read_entries(flash, otadata_offset))
    if active is None:
        return False
    write_entry(flash, otadata_offset, active.sector, active.seq, state)
    return True
