# `esp32` for the virtual board: Partition over the emulated NOR flash with
# the ESP-IDF OTA semantics (otadata, rollback), and the chip temperature.

import _simhw
import _simimage
import _simota
import machine

HEAP_DATA = 4
HEAP_EXEC = 1

_BLOCK = 4096
_ESP_ERR_OTA_VALIDATE_FAILED = 0x1503
_ESP_ERR_NOT_FOUND = 0x105

_TYPES = {"app": 0, "data": 1}
_SUBTYPES = {
    "factory": 0x00, "ota_0": 0x10, "ota_1": 0x11, "test": 0x20,
    "ota": 0x00, "phy": 0x01, "nvs": 0x02, "fat": 0x81, "spiffs": 0x82, "littlefs": 0x83,
}


def _hw():
    return _simhw.hw


def _esp_error(code, name):
    return OSError(code, name)


def _part_def(name):
    for p in _hw().board["partitions"]:
        if p["name"] == name:
            return p
    return None


def _app_slots():
    return [p["name"] for p in _hw().board["partitions"] if p["type"] == "app"]


def _otadata():
    return _part_def("otadata")


def boot_slot_name():
    """The app slot the bootloader will choose at the next (non deep-sleep) reset."""
    slots = _app_slots()
    ota = _otadata()
    active = _simota.active_entry(_simota.read_entries(_hw().flash, ota["offset"])) if ota else None
    if active is None:
        return slots[0]
    return slots[active.slot(len(slots))]


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=_BLOCK):
        if id == Partition.BOOT:
            name = boot_slot_name()
        elif id == Partition.RUNNING:
            name = _hw().running_slot
        else:
            name = id
        part = _part_def(name) if isinstance(name, str) else None
        if part is None:
            raise ValueError("partition not found")
        self._part = part
        self._offset = part["offset"]
        self._size = part["size"]
        self._block = block_size

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None, block_size=_BLOCK):
        out = []
        for p in _hw().board["partitions"]:
            if _TYPES.get(p["type"]) != type:
                continue
            if subtype != 0xFF and _SUBTYPES.get(p.get("subtype")) != subtype:
                continue
            if label is not None and p["name"] != label:
                continue
            out.append(Partition(p["name"], block_size))
        return out

    def info(self):
        p = self._part
        return (_TYPES[p["type"]], _SUBTYPES.get(p.get("subtype"), 0xFF), self._offset, self._size,
                p["name"], False)

    def __repr__(self):
        return "<Partition type=%d, subtype=%d, address=%d, size=%d, label=%s, encrypted=0>" % self.info()[:5]

    def _addr(self, block_num, offset, length):
        addr = self._offset + block_num * self._block + offset
        if addr < self._offset or addr + length > self._offset + self._size:
            raise OSError(22, "EINVAL")
        return addr

    def readblocks(self, block_num, buf, offset=0):
        _hw().flash.read(self._addr(block_num, offset, len(buf)), buf)

    def writeblocks(self, block_num, buf, offset=None):
        flash = _hw().flash
        if offset is None:
            # The two-argument form erases the blocks first, as esp_partition_erase_range.
            addr = self._addr(block_num, 0, len(buf))
            erase_len = (len(buf) + _BLOCK - 1) // _BLOCK * _BLOCK
            flash.erase(addr, erase_len)
            flash.program(addr, buf)
        else:
            flash.program(self._addr(block_num, offset, len(buf)), buf)

    def ioctl(self, cmd, arg):
        if cmd in (1, 2, 3):
            return 0
        if cmd == 4:
            return self._size // self._block
        if cmd == 5:
            return self._block
        if cmd == 6:
            _hw().flash.erase(self._addr(arg, 0, self._block), self._block)
            return 0
        return None

    def set_boot(self):
        if self._part["type"] != "app":
            raise _esp_error(_ESP_ERR_NOT_FOUND, "ESP_ERR_NOT_FOUND")
        hw = _hw()
        try:
            _simimage.verify_slot(hw.flash, self._offset, self._size, hw.board["chip_id"])
        except _simimage.ImageInvalid:
            raise _esp_error(_ESP_ERR_OTA_VALIDATE_FAILED, "ESP_ERR_OTA_VALIDATE_FAILED")
        slots = _app_slots()
        _simota.set_boot(hw.flash, _otadata()["offset"], slots.index(self._part["name"]), len(slots))

    def get_next_update(self):
        slots = _app_slots()
        i = slots.index(self._part["name"]) if self._part["name"] in slots else -1
        return Partition(slots[(i + 1) % len(slots)])

    @staticmethod
    def mark_app_valid_cancel_rollback():
        hw = _hw()
        ota = _otadata()
        flash = hw.flash
        active = _simota.active_entry(_simota.read_entries(flash, ota["offset"]))
        # Writes flash only when the state changes, as ESP-IDF does.
        if active is not None and active.state == _simota.STATE_PENDING_VERIFY:
            _simota.set_state_of_active(flash, ota["offset"], _simota.STATE_VALID)

    @staticmethod
    def mark_app_invalid_rollback_and_reboot():
        hw = _hw()
        ota = _otadata()
        if not _simota.set_state_of_active(hw.flash, ota["offset"], _simota.STATE_INVALID):
            raise _esp_error(0x1504, "ESP_ERR_OTA_ROLLBACK_FAILED")
        machine.reset()


def raw_temperature():
    """ESP32 (original) internal sensor, degrees Fahrenheit, as the port returns it."""
    celsius = _internal_celsius()
    return int(celsius * 9 / 5 + 32)


def mcu_temperature():
    """ESP32-S2/S3/C3/C6 internal sensor, degrees Celsius."""
    return int(_internal_celsius())


def _internal_celsius():
    for sensor in _hw().board.get("sensors", ()):
        if sensor.get("kind") == "internal_temp":
            return machine.signal_value(sensor.get("signal"), _hw().clock_s())
    return 45.0


def wake_on_timer(*args):
    pass


# The original ESP32 has raw_temperature(); the newer chips mcu_temperature().
if _hw().board["chip"] == "esp32":
    del mcu_temperature
else:
    del raw_temperature
