# SNTP (RFC 4330) client: one request, one answer, a deadline.
#
# Used on a connected wake when the RTC has not been set since the last power
# loss and the config names an NTP server; otherwise the device takes the
# host's time from samples/ack (docs/protocol.md).

import socket
import struct
import time

from micropython import const

_NTP_TO_UNIX = const(2208988800)  # seconds from 1900-01-01 to 1970-01-01
_PACKET = const(48)
_MODE_CLIENT = const(0x1B)  # LI 0, version 3, mode 3 (client)
_MODE_SERVER = const(4)


def query(host, port=123, timeout_ms=1000):
    """The server's time in seconds since 1970 (float); OSError on failure."""
    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][-1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout_ms / 1000)
        request = bytearray(_PACKET)
        request[0] = _MODE_CLIENT
        s.sendto(request, addr)
        reply = s.recv(_PACKET)
    finally:
        s.close()
    if len(reply) < _PACKET or reply[0] & 7 != _MODE_SERVER or reply[1] == 0:
        raise OSError("ntp: bad reply from %s" % host)  # stratum 0 is a kiss-of-death
    seconds, fraction = struct.unpack_from("!II", reply, 40)
    if seconds == 0:
        raise OSError("ntp: server has no time")
    return seconds - _NTP_TO_UNIX + fraction / 4294967296


def sync(host, port=123, timeout_ms=1000):
    """Set the RTC from the server; returns the correction applied (seconds)."""
    import machine

    now = query(host, port, timeout_ms)
    delta = now - time.time()
    tm = time.gmtime(int(now))
    machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], int((now % 1) * 1000000)))
    return delta
