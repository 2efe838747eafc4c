"""mpfleet host tools: flash, provision and command fleets of MicroPython ESP32 devices."""

__version__ = "0.1.0"
