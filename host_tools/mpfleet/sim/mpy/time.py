# `time` for the virtual board: the built-in time, except that the clock is
# the board's RTC (kept over deep sleep, scaled by the supervisor) rather than
# the host's. Ticks and sleeps within a wake are real.
#
# Note: inside this file `import time` would import itself; `utime` names the
# interpreter's built-in module.

import utime

import _simhw

sleep = utime.sleep
sleep_ms = utime.sleep_ms
sleep_us = utime.sleep_us
ticks_ms = utime.ticks_ms
ticks_us = utime.ticks_us
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
