# `machine` for the virtual board: the ESP32 port's API, backed by _simhw.
#
# Only what an ESP32 agent uses is here; names, constants and error types
# follow the ESP32 port so that firmware runs unchanged on both.

import math
import utime

import _simfacts
import _simhw

# Reset causes and wake reasons (esp_sleep_get_wakeup_cause()): the ESP32 port's
# values, owned by _simfacts, which the supervisor reads too.
from _simfacts import (  # noqa: F401 - machine's API
    DEEPSLEEP_RESET,
    EXT0_WAKE,
    EXT1_WAKE,
    HARD_RESET,
    PIN_WAKE,
    PWRON_RESET,
    SOFT_RESET,
    TIMER_WAKE,
    TOUCHPAD_WAKE,
    ULP_WAKE,
    WDT_RESET,
)

IDLE = 0
SLEEP = 2
DEEPSLEEP = 4

_CPU_FREQS = (20000000, 40000000, 80000000, 160000000, 240000000)


def _hw():
    return _simhw.hw


def reset_cause():
    return _hw().boot["reset_cause"]


def wake_reason():
    return _hw().boot.get("wake_reason", _simfacts.NO_WAKE)


def unique_id():
    return bytes(_hw().settings["mac"])


def freq(hz=None):
    hw = _hw()
    if hz is None:
        return hw.boot.get("cpu_hz", 160000000)
    if hz not in _CPU_FREQS:
        raise ValueError("frequency must be 20MHz, 40MHz, 80Mhz, 160MHz or 240MHz")
    hw.boot["cpu_hz"] = hz


def idle():
    utime.sleep_ms(1)


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


def deepsleep(time_ms=0):
    """Sleep until the timer (or forever with 0) wakes the chip: the process ends."""
    _hw().halt(_simfacts.EXIT_DEEPSLEEP, sleep_ms=int(time_ms))


def lightsleep(time_ms=0):
    # Paced by the boot's clock scale like time.sleep (skipped in a headless run).
    _hw().sleep_us(int(time_ms) * 1000)


def reset():
    _hw().halt(_simfacts.EXIT_RESET)


def soft_reset():
    _hw().halt(_simfacts.EXIT_SOFT_RESET)


def bootloader():
    _hw().halt(_simfacts.EXIT_BOOTLOADER)


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2
    WAKE_LOW = 4
    WAKE_HIGH = 5

    def __init__(self, id, mode=-1, pull=-1, value=None):
        if not isinstance(id, int) or id < 0 or id > 48:
            raise ValueError("invalid pin")
        self.id = id
        self._mode = mode
        self._value = 0
        if value is not None:
            self._value = 1 if value else 0

    def init(self, mode=-1, pull=-1, value=None):
        self._mode = mode
        if value is not None:
            self._value = 1 if value else 0

    def value(self, v=None):
        if v is None:
            return self._value
        self._value = 1 if v else 0

    def on(self):
        self._value = 1

    def off(self):
        self._value = 0

    def __call__(self, v=None):
        return self.value(v)

    def irq(self, handler=None, trigger=3, wake=None):
        return None

    def __repr__(self):
        return "Pin(%d)" % self.id


def _sensor_on_pin(pin_id):
    for sensor in _hw().board.get("sensors", ()):
        if sensor.get("pin") == pin_id:
            return sensor
    return None


def signal_value(signal, t_s):
    """Deterministic value of a board signal model at device time t_s."""
    if not signal:
        return 0.0
    model = signal.get("model", "constant")
    base = signal.get("base", 0.0)
    amplitude = signal.get("amplitude", 0.0)
    period = signal.get("period_s", 3600) or 3600
    if model == "sine":
        return base + amplitude * math.sin(2 * math.pi * t_s / period)
    if model == "ramp":
        return base + amplitude * ((t_s % period) / period)
    if model == "noise":
        seed = signal.get("seed", 1)
        step = int(t_s) * 2654435761 + seed * 40503
        frac = ((step ^ (step >> 13)) & 0xFFFF) / 65535.0
        return base + amplitude * (2 * frac - 1)
    return base


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_9BIT = 0
    WIDTH_10BIT = 1
    WIDTH_11BIT = 2
    WIDTH_12BIT = 3
    # Full-scale input voltage per attenuation on the ESP32 (approximate).
    _FULL_SCALE_V = (0.95, 1.25, 1.75, 3.1)

    def __init__(self, pin, atten=ATTN_0DB):
        pin_id = pin.id if isinstance(pin, Pin) else pin
        if pin_id not in (32, 33, 34, 35, 36, 37, 38, 39, 0, 2, 4, 12, 13, 14, 15, 25, 26, 27,
                          1, 3, 5, 6, 7, 8, 9, 10):
            raise ValueError("invalid pin")
        self._pin = pin_id
        self._atten = atten

    def atten(self, atten):
        self._atten = atten

    def width(self, bits):
        pass

    def _volts(self):
        sensor = _sensor_on_pin(self._pin)
        if sensor is None:
            return 0.0
        volts = signal_value(sensor.get("signal"), _hw().clock_s())
        divider = sensor.get("divider")
        if divider:
            volts = volts / divider
        full = self._FULL_SCALE_V[self._atten]
        return min(max(volts, 0.0), full)

    def read_uv(self):
        return int(self._volts() * 1000000)

    def read_u16(self):
        return int(self._volts() / self._FULL_SCALE_V[self._atten] * 65535)

    def read(self):
        return self.read_u16() >> 4


class WDT:
    """Task watchdog: once created it cannot be stopped, only fed."""

    def __init__(self, id=0, timeout=5000):
        if timeout < 1:
            raise ValueError("timeout too short")
        _hw().arm_wdt(timeout)

    def feed(self):
        _hw().feed_wdt()


class RTC:
    def __init__(self, id=0):
        pass

    def memory(self, data=None):
        hw = _hw()
        if data is None:
            return hw.rtc_memory()
        hw.set_rtc_memory(data)

    def datetime(self, dt=None):
        hw = _hw()
        if dt is None:
            t = hw.clock_s()
            y, mo, d, h, mi, s, wd = utime.gmtime(int(t))[:7]  # the unix port gives 9 fields, the ESP32 8
            return (y, mo, d, wd, h, mi, s, int((t % 1) * 1000000))
        y, mo, d, _wd, h, mi, s = dt[:7]
        us = dt[7] if len(dt) > 7 else 0
        hw.set_clock_s(utime.mktime((y, mo, d, h, mi, s, 0, 0)) + us / 1000000)

    def init(self, dt):
        self.datetime(dt)


class Signal:
    def __init__(self, pin, invert=False):
        self._pin = pin
        self._invert = invert

    def value(self, v=None):
        if v is None:
            return self._pin.value() ^ self._invert
        self._pin.value((1 if v else 0) ^ self._invert)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)
