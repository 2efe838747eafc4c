# `dht` for the virtual board: DHT11/DHT22 readings from the board's signal
# models. A sensor marked "fail" in the board definition times out as a
# disconnected one does (OSError ETIMEDOUT).

import _simhw
import machine

_ETIMEDOUT = 110


class DHTBase:
    def __init__(self, pin):
        self.pin = pin
        self._t = None
        self._h = None

    def _sensor(self):
        pin_id = self.pin.id if isinstance(self.pin, machine.Pin) else self.pin
        for sensor in _simhw.hw.board.get("sensors", ()):
            if sensor.get("kind") in ("dht22", "dht11") and sensor.get("pin") == pin_id:
                return sensor
        return None

    def measure(self):
        sensor = self._sensor()
        if sensor is None or sensor.get("fail"):
            raise OSError(_ETIMEDOUT)
        t = _simhw.hw.clock_s()
        self._t = machine.signal_value(sensor.get("signal"), t)
        self._h = machine.signal_value(sensor.get("humidity") or {"model": "constant", "base": 45.0}, t)


class DHT11(DHTBase):
    def temperature(self):
        return int(self._t)

    def humidity(self):
        return int(self._h)


class DHT22(DHTBase):
    def temperature(self):
        return int(self._t * 10) / 10

    def humidity(self):
        return int(self._h * 10) / 10
