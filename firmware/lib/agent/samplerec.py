# One sample as a flash log record (the log's records are opaque bytes).
#
#   off  size  field
#   0    1     missing-channel bitmap (bit i: channel i has no reading)
#   1    1     channel count N
#   2    4     t, u32 LE seconds since 1970
#   6    ..    N - popcount(bitmap) zigzag varints: the stored integer value
#              (reading * 10**scale) of each channel present, in order
#
# The sample's seq is the log's seq for the record.

import struct

from agent.varint import get_uvarint, missing_bits, put_uvarint, unzigzag, zigzag


def encode(t, values, buf):
    """Write the record into `buf` (bytearray); returns its length."""
    buf[0] = missing_bits(values)
    buf[1] = len(values)
    struct.pack_into("<I", buf, 2, t & 0xFFFFFFFF)
    pos = 6
    for v in values:
        if v is None:
            continue
        pos = put_uvarint(buf, pos, zigzag(v))
    return pos


def decode(rec):
    """(t, values) of a record; raises ValueError for a malformed one."""
    n = len(rec)
    if n < 6:
        raise ValueError("sample record too short")
    missing = rec[0]
    nchan = rec[1]
    t = struct.unpack_from("<I", rec, 2)[0]
    values = []
    pos = 6
    for i in range(nchan):
        if missing & (1 << i):
            values.append(None)
            continue
        z, pos = get_uvarint(rec, pos, n)
        values.append(unzigzag(z))
    if pos != n:
        raise ValueError("sample record has trailing bytes")
    return t, values
