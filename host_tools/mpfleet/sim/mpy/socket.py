# `socket` for the virtual board: the interpreter's own sockets (traffic goes
# over loopback), except that name resolution fails while the station is not
# associated, as lwIP does on an ESP32 without Wi-Fi (OSError -202).

import usocket

import network

from usocket import *  # noqa: F403 - socket() and its constants, as the port has them

_EAI_FAIL = -202


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    if not network.is_connected():
        raise OSError(_EAI_FAIL)
    return usocket.getaddrinfo(host, port, af, type, proto, flags)
