# Reading the configured sensors once per wake.
#
# Each sensor gives one integer channel value, the reading scaled by
# 10**scale (e.g. 21.37 degC with scale 1 -> 214), which is what the flash log
# and the batch frame store. A sensor that fails (a DHT22 that times out) yields
# None for that wake and the failure is counted, never raised.

import machine

_DEFAULT_SCALES = {"adc": 3, "battery": 3, "internal_temp": 1, "dht22": 1}


def _adc_volts(pin):
    adc = machine.ADC(machine.Pin(pin), atten=machine.ADC.ATTN_11DB)
    return adc.read_uv() / 1000000


def _internal_celsius():
    import esp32

    if hasattr(esp32, "mcu_temperature"):
        return esp32.mcu_temperature()
    return (esp32.raw_temperature() - 32) * 5 / 9


def _dht22_celsius(pin):
    import dht

    d = dht.DHT22(machine.Pin(pin))
    d.measure()
    return d.temperature()


def read_one(sensor):
    """The sensor's value in its unit (volts, degC), or raise OSError."""
    kind = sensor["kind"]
    if kind == "adc":
        return _adc_volts(sensor["pin"])
    if kind == "battery":
        return _adc_volts(sensor["pin"]) * sensor.get("divider", 2.0)
    if kind == "internal_temp":
        return _internal_celsius()
    if kind == "dht22":
        return _dht22_celsius(sensor["pin"])
    raise OSError("unknown sensor kind %s" % kind)


def scale_of(sensor):
    return sensor.get("scale", _DEFAULT_SCALES.get(sensor["kind"], 0))


def read_all(sensors):
    """One reading per sensor: (values as scaled ints or None, failure count)."""
    values = []
    failures = 0
    for sensor in sensors:
        try:
            v = read_one(sensor)
            values.append(int(round(v * 10 ** scale_of(sensor))))
        except (OSError, ValueError):
            values.append(None)
            failures += 1
    return values, failures
