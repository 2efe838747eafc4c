# The in-place rewrite of the RTC stage's payload (agent.rtcstage): drop the
# oldest samples (the host acked them) and/or move the times taken on an unset
# clock, in the stage's own 2048-byte buffer, with a few integers of heap
# however many samples are staged. Loaded only when a trim or a clock
# correction needs it; unloaded before the jobs run (agent.wake).

from micropython import const

from agent.rtcstage import _CAPACITY, _HEADER, _MAX_CHANNELS, _RTC_MAX
from agent.varint import get_uvarint, put_uvarint, unzigzag, uvlen, zigzag

_MOVE_CHUNK = const(64)  # bytes moved at a time when a rewrite needs the payload moved (_move_up)


def recode(stage, drop, delta, before):
    """Rewrite the payload in place without its first `drop` samples and
    with the times earlier than `before` moved by `delta`; returns whether
    it did (it does not when the result would not fit).

    Only deltas at edges change: the first kept sample's time (it becomes
    base_t, delta 0) and the first kept value of each channel (its delta
    from 0), and the time delta of a sample that was moved when the one
    before it was not, or the other way round. A first pass decodes only,
    measuring the new payload and how far its write position would run
    ahead of the read position; the second writes it over the old one.
    Writing behind the read position needs no second buffer. When the new
    encoding runs ahead somewhere (a time delta that grew), the payload is
    first moved to the end of the 2048-byte buffer, which puts the read
    position that many bytes further on. Dropping never runs ahead: the
    new first value of a channel takes no more bytes than the dropped
    deltas that led to it plus the delta it replaces."""
    size, ahead, same, base, last_t = _walk(stage, drop, delta, before, _HEADER, False)
    end = _HEADER + stage.payload_len
    if ahead > _RTC_MAX - end or size > max(_CAPACITY, stage.payload_len):
        return False
    old_base = stage.base_t
    if drop or not same:
        src = _HEADER
        if ahead > 0:
            src = _RTC_MAX - stage.payload_len
            _move_up(stage.buf, src, _HEADER, stage.payload_len)
        _walk(stage, drop, delta, before, src, True)
        stage.payload_len = size
        stage.staged -= drop
    # else every sample moved, or none did: the payload stands as it is.
    stage.base_t = old_base + base
    stage._last_t = old_base + last_t
    return True


def _walk(stage, drop, delta, before, src, write):
    """One pass of _recode over the payload at buf[src:]. Writing, the new
    payload goes to buf[_HEADER:] and its last values to _last_values.

    Returns (new payload length, the most the write position ran ahead of
    the read position with src at _HEADER, whether the kept samples' bytes
    stay as they are, the new base_t and the last time, both relative to
    the old base_t). Times are kept relative to base_t: small integers."""
    buf = stage.buf
    nchan = stage.nchan
    end = src + stage.payload_len
    last_in = [0] * nchan
    if write:
        last_out = stage._last_values
        for i in range(_MAX_CHANNELS):
            last_out[i] = 0
    else:
        last_out = [0] * nchan
    limit = before - stage.base_t
    r = src
    w = _HEADER
    ahead = 0
    same = True
    t_in = 0
    t_out = 0
    base = 0
    for j in range(stage.staged):
        missing = buf[r]
        z, r = get_uvarint(buf, r + 1, end)
        t_in += unzigzag(z)
        kept = j >= drop
        if kept:
            t = t_in + delta if t_in < limit else t_in
            if j == drop:
                base = t_out = t
            nz = zigzag(t - t_out)
            t_out = t
            if nz != z:
                same = False
            if write:
                buf[w] = missing
                w = put_uvarint(buf, w + 1, nz)
            else:
                w += 1 + uvlen(nz)
                if w - r > ahead:
                    ahead = w - r
        for c in range(nchan):
            if missing & (1 << c):
                continue
            z, r = get_uvarint(buf, r, end)
            v = last_in[c] + unzigzag(z)
            last_in[c] = v
            if kept:
                nz = zigzag(v - last_out[c])
                last_out[c] = v
                if write:
                    w = put_uvarint(buf, w, nz)
                else:
                    w += uvlen(nz)
                    if w - r > ahead:
                        ahead = w - r
    return w - _HEADER, ahead, same, base, t_out


def _move_up(buf, dst, src, n):
    """buf[dst:dst+n] = buf[src:src+n] for dst > src, the two overlapping: from
    the end, a chunk at a time through a small buffer (slice assignment within
    one buffer is a memcpy, which overlapping ranges break)."""
    chunk = bytearray(_MOVE_CHUNK)
    mv = memoryview(buf)
    cv = memoryview(chunk)
    while n > 0:
        m = min(n, _MOVE_CHUNK)
        n -= m
        cv[:m] = mv[src + n:src + n + m]
        mv[dst + n:dst + n + m] = cv[:m]
