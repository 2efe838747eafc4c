# Emulated SPI NOR flash of the virtual board, kept in a file.
#
# This module runs under both MicroPython (inside the virtual device, where the
# esp32/LittleFS shims use it) and CPython (host tools that write images or
# inspect counters), so it uses only the common subset of the two languages.
#
# NOR rules (as on the ESP32's external SPI flash):
# - erase sets a whole 4 KiB sector to 0xFF;
# - program can only clear bits: the stored byte becomes old AND new;
# - every erase and program is counted per region (partition).
#
# Power-cut injection: when `cut_after_ops` is set, the operation that brings
# the count of erase/program operations to that number is applied only partly
# (torn), then `on_power_cut` is called. On the device that callback ends the
# process at once, so nothing after the cut reaches the flash.

import struct

SECTOR = 4096
# Counters file: ops u32, then per region (board order, then "other"):
# erases u32, programs u32, bytes programmed u64; all little endian.
_OPS_FMT = "<I"
_REGION_FMT = "<IIQ"
_REGION_SIZE = 16


class PowerCut(Exception):
    """Raised by the flash after a cut when no `on_power_cut` ends the process."""


class Lcg:
    """Deterministic pseudo-random numbers, identical in MicroPython and CPython."""

    def __init__(self, seed):
        self.state = (seed * 2654435761 + 1) & 0xFFFFFFFF

    def below(self, n):
        self.state = (self.state * 1103515245 + 12345) & 0x7FFFFFFF
        if n <= 0:
            return 0
        return (self.state >> 4) % n


class Region:
    """A named address range with its own wear counters."""

    def __init__(self, name, offset, size):
        self.name = name
        self.offset = offset
        self.size = size
        self.erases = 0
        self.programs = 0
        self.bytes_programmed = 0

    def counters(self):
        return {
            "erases": self.erases,
            "programs": self.programs,
            "bytes_programmed": self.bytes_programmed,
        }


class NorFlash:
    """A flash chip image in `path` of `size` bytes.

    `regions` is a list of (name, offset, size); addresses outside every region
    are counted under "other".
    """

    def __init__(self, path, size, regions=(), cut_after_ops=None, seed=1, on_power_cut=None,
                 counters_path=None):
        self.path = path
        self.size = size
        self._file = open(path, "r+b")
        self.regions = [Region(r[0], r[1], r[2]) for r in regions]
        self._other = Region("other", 0, size)
        # Built once: the write path must not allocate (see program()).
        self._every_region = self.regions + [self._other]
        self.ops = 0
        # Counters persist in a small binary file written after every
        # operation, so they survive a killed process (power cut, WDT).
        self._counters_file = None
        self._counters_buf = bytearray(4 + _REGION_SIZE * (len(self.regions) + 1))
        if counters_path is not None:
            self._counters_file = self._open_counters(counters_path)
        self.cut_after_ops = cut_after_ops
        self.dead = False
        self.cut_detail = None
        self._rng = Lcg(seed)
        self._on_power_cut = on_power_cut
        self._sector = bytearray(SECTOR)
        self._erased = b"\xff" * SECTOR

    def close(self):
        self._file.close()
        if self._counters_file is not None:
            self._counters_file.close()

    def region_at(self, addr):
        for region in self.regions:
            if region.offset <= addr < region.offset + region.size:
                return region
        return self._other

    def counters(self):
        out = {}
        for region in self.regions:
            out[region.name] = region.counters()
        out["other"] = self._other.counters()
        out["ops"] = self.ops
        return out

    def _all_regions(self):
        return self._every_region

    def _open_counters(self, path):
        try:
            f = open(path, "r+b")
        except OSError:
            f = open(path, "w+b")
        n = f.readinto(self._counters_buf)
        if n == len(self._counters_buf):
            self.ops = struct.unpack_from(_OPS_FMT, self._counters_buf, 0)[0]
            pos = 4
            for region in self._all_regions():
                region.erases, region.programs, region.bytes_programmed = struct.unpack_from(
                    _REGION_FMT, self._counters_buf, pos)
                pos += _REGION_SIZE
        return f

    def _save_counters(self):
        f = self._counters_file
        if f is None:
            return
        buf = self._counters_buf
        struct.pack_into(_OPS_FMT, buf, 0, self.ops)
        pos = 4
        for region in self._all_regions():
            struct.pack_into(_REGION_FMT, buf, pos, region.erases, region.programs, region.bytes_programmed)
            pos += _REGION_SIZE
        f.seek(0)
        f.write(buf)

    def _check_range(self, addr, length):
        if addr < 0 or length < 0 or addr + length > self.size:
            raise ValueError("flash access 0x%x+0x%x beyond 0x%x" % (addr, length, self.size))

    def _check_alive(self):
        if self.dead:
            # The chip has no power: nothing reaches it any more.
            raise PowerCut("flash has no power")

    def _next_op_is_cut(self):
        self.ops += 1
        return self.cut_after_ops is not None and self.ops >= self.cut_after_ops

    def read(self, addr, buf):
        """Fill `buf` (a bytearray or memoryview) from `addr`."""
        self._check_alive()
        self._check_range(addr, len(buf))
        self._file.seek(addr)
        self._file.readinto(buf)

    def read_bytes(self, addr, length):
        buf = bytearray(length)
        self.read(addr, buf)
        return buf

    def erase(self, addr, length=SECTOR):
        """Erase the sectors covering [addr, addr+length): both must be sector aligned."""
        self._check_alive()
        if addr % SECTOR or length % SECTOR:
            raise ValueError("erase 0x%x+0x%x is not sector aligned" % (addr, length))
        self._check_range(addr, length)
        end = addr + length
        while addr < end:
            region = self.region_at(addr)
            if self._next_op_is_cut():
                self._torn_erase(addr)
                region.erases += 1
                self._save_counters()
                self._cut("erase", addr, SECTOR)
                return
            self._file.seek(addr)
            self._file.write(self._erased)
            region.erases += 1
            self._save_counters()
            addr += SECTOR

    def program(self, addr, data):
        """Program `data` at `addr`: each stored byte becomes old AND new.

        Allocation-free apart from the torn case: LittleFS may flush a file
        from a garbage-collector finaliser, where the heap is locked, and a
        flash chip's driver needs no heap either.
        """
        self._check_alive()
        n = len(data)
        self._check_range(addr, n)
        # One operation per call, as a driver's page-program loop is one write
        # request; split at sector boundaries only to bound the scratch buffer.
        cut = self._next_op_is_cut()
        region = self.region_at(addr)
        region.programs += 1
        done = 0
        while done < n:
            chunk = min(n - done, SECTOR - ((addr + done) % SECTOR))
            if cut:
                self._torn_program(addr + done, memoryview(data)[done:done + chunk])
                region.bytes_programmed += chunk
                self._save_counters()
                self._cut("program", addr, n)
                return
            self._program_range(addr + done, data, done, chunk)
            region.bytes_programmed += chunk
            done += chunk
        self._save_counters()

    def _program_range(self, addr, data, start, count):
        # Read-modify-write of the whole sector in the preallocated buffer.
        base = addr - addr % SECTOR
        off = addr - base
        buf = self._sector
        f = self._file
        f.seek(base)
        f.readinto(buf)
        for i in range(count):
            buf[off + i] &= data[start + i]
        f.seek(base)
        f.write(buf)

    def _program_chunk(self, addr, data):
        self._program_range(addr, data, 0, len(data))

    def _torn_program(self, addr, data):
        # A prefix of the bytes lands; the byte at the tear gets only some of
        # its bits cleared; the rest keep their old value.
        n = len(data)
        keep = self._rng.below(n + 1)
        if keep:
            self._program_chunk(addr, data[:keep])
        if keep < n:
            old = self.read_bytes(addr + keep, 1)
            partial = data[keep] | self._rng.below(256)
            self._file.seek(addr + keep)
            self._file.write(bytes([old[0] & partial]))
        self.cut_detail = "program torn after %d of %d bytes" % (keep, n)

    def _torn_erase(self, addr):
        # An interrupted erase leaves the sector partly erased: a prefix reads
        # 0xFF, one byte holds a mix, the rest keep their old contents.
        keep = self._rng.below(SECTOR)
        if keep:
            self._file.seek(addr)
            self._file.write(memoryview(self._erased)[:keep])
        old = self.read_bytes(addr + keep, 1)
        self._file.seek(addr + keep)
        self._file.write(bytes([old[0] | self._rng.below(256)]))
        self.cut_detail = "erase torn after %d of %d bytes" % (keep, SECTOR)

    def _cut(self, kind, addr, length):
        self.dead = True
        detail = "power cut during %s at 0x%x+0x%x (operation %d): %s" % (
            kind, addr, length, self.ops, self.cut_detail)
        self.cut_detail = detail
        if self._on_power_cut is not None:
            self._on_power_cut(detail)
        raise PowerCut(detail)
