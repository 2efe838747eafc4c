# Variable-length integers, and the missing-channel bitmap, shared by the sample
# formats (RTC stage, flash log records, the sample frame).
#
# uvarint: LEB128, 7 bits per byte, least significant group first, the high
# bit set on every byte but the last. zigzag maps signed to unsigned so that
# small magnitudes stay short: n >= 0 -> 2n, n < 0 -> -2n - 1.

_MAX_SHIFT = 63


def missing_bits(values):
    """The missing-channel bitmap of a sample: bit i set when values[i] is None."""
    bits = 0
    for i in range(len(values)):
        if values[i] is None:
            bits |= 1 << i
    return bits


def zigzag(n):
    return n << 1 if n >= 0 else ((-n) << 1) - 1


def unzigzag(z):
    return (z >> 1) if not z & 1 else -((z + 1) >> 1)


def uvlen(n):
    """Bytes the uvarint of n >= 0 takes."""
    size = 1
    while n > 0x7F:
        n >>= 7
        size += 1
    return size


def put_uvarint(buf, pos, n):
    """Write n >= 0 at buf[pos]; returns the position after it."""
    while n > 0x7F:
        buf[pos] = (n & 0x7F) | 0x80
        n >>= 7
        pos += 1
    buf[pos] = n
    return pos + 1


def get_uvarint(buf, pos, end):
    """(value, position after it) of the uvarint at buf[pos:end]; ValueError if
    it is cut off or longer than 64 bits."""
    shift = 0
    n = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            if shift == _MAX_SHIFT and b > 1:
                break  # a tenth byte holds only bit 63
            return n, pos
        shift += 7
        if shift > _MAX_SHIFT:
            break
    raise ValueError("truncated or overlong varint")
