# `time` for the virtual board: the built-in time, except that the clock is
# the board's RTC (kept over deep sleep, scaled by the supervisor) rather than
# the host's, and sleeps within a wake follow the boot's clock scale (0, the
# default of a headless run: skipped, the ticks and the RTC jump ahead; see
# _simhw.Hardware.sleep_us). Waits on sockets are real.
#
# Note: inside this file `import time` would import itself; `utime` names the
# interpreter's built-in module.

import utime

import _simhw


def sleep(seconds):
    _simhw.hw.sleep_us(seconds * 1000000)


def sleep_ms(ms):
    _simhw.hw.sleep_us(ms * 1000)


def sleep_us(us):
    _simhw.hw.sleep_us(us)


def ticks_ms():
    return _simhw.hw.ticks_ms()


def ticks_us():
    return _simhw.hw.ticks_us()

ticks_cpu = utime.ticks_cpu
ticks_add = utime.ticks_add
ticks_diff = utime.ticks_diff
mktime = utime.mktime


def time():
    return int(_simhw.hw.clock_s())


def time_ns():
    return int(_simhw.hw.clock_s() * 1000000) * 1000


def gmtime(secs=None):
    return utime.gmtime(time() if secs is None else secs)


def localtime(secs=None):
    return utime.gmtime(time() if secs is None else secs)
