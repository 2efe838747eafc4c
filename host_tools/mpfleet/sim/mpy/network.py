# `network` for the virtual board: a WLAN whose association is scripted by the
# supervisor (boot.json "wifi"): which access points exist, their passwords,
# signal strength and how long joining takes, so that firmware meets slow,
# wrong-password and absent networks as it would in the field. Traffic itself
# goes over the host's loopback interface.

import utime

import _simhw

STA_IF = 0
AP_IF = 1

# ESP32 port status codes (wlan.status()).
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204

AUTH_OPEN = 0
AUTH_WPA2_PSK = 3


def _wifi():
    return _simhw.hw.boot.get("wifi") or {}


def _state():
    # One radio per chip: every WLAN(STA_IF) object shares it.
    hw = _simhw.hw
    st = getattr(hw, "wlan_state", None)
    if st is None:
        st = {"active": False, "ssid": None, "key": None, "started": None, "status": STAT_IDLE}
        hw.wlan_state = st
    return st


def is_connected():
    st = _state()
    return st["active"] and _resolve(st) == STAT_GOT_IP


def _resolve(st):
    if st["started"] is None:
        return st["status"]
    wifi = _wifi()
    elapsed = utime.ticks_diff(_simhw.hw.ticks_ms(), st["started"])
    delay = wifi.get("connect_ms", 50)
    if elapsed < delay:
        return STAT_CONNECTING
    ap = (wifi.get("networks") or {}).get(st["ssid"])
    app = _simhw.hw.app or {}
    if ap is None or wifi.get("down") or app.get("sim_note", {}).get("wifi") == "broken":
        # (An image whose sim note says {"wifi": "broken"} stands for firmware
        # with a broken radio driver: it never finds the network.)
        # The ESP32 keeps scanning for a while before it gives up.
        return STAT_CONNECTING if elapsed < 2 * delay else STAT_NO_AP_FOUND
    if ap.get("password", "") != (st["key"] or ""):
        return STAT_WRONG_PASSWORD
    return STAT_GOT_IP


class WLAN:
    IF_STA = STA_IF
    IF_AP = AP_IF
    PM_NONE = 0
    PM_PERFORMANCE = 1
    PM_POWERSAVE = 2

    def __init__(self, interface_id=STA_IF):
        self._if = interface_id

    def active(self, is_active=None):
        st = _state()
        if is_active is None:
            return st["active"]
        st["active"] = bool(is_active)
        if not is_active:
            st["started"] = None
            st["status"] = STAT_IDLE

    def connect(self, ssid=None, key=None, *, bssid=None):
        st = _state()
        if not st["active"]:
            raise OSError("Wifi Not Started")
        st["ssid"] = ssid
        st["key"] = key
        st["started"] = _simhw.hw.ticks_ms()

    def disconnect(self):
        st = _state()
        st["started"] = None
        st["status"] = STAT_IDLE

    def isconnected(self):
        return is_connected()

    def status(self, param=None):
        st = _state()
        if param == "rssi":
            if not is_connected():
                raise OSError("Wifi Not Connected")
            ap = (_wifi().get("networks") or {}).get(st["ssid"]) or {}
            return ap.get("rssi", -60)
        if param is not None:
            raise ValueError("unknown status param")
        if not st["active"]:
            return STAT_IDLE
        return _resolve(st)

    def ifconfig(self, config=None):
        if config is not None:
            return None
        if is_connected():
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if kwargs:
            return None
        if args and args[0] == "mac":
            return bytes(_simhw.hw.settings["mac"])
        if args and args[0] == "ssid":
            return _state()["ssid"] or ""
        if args and args[0] == "hostname":
            return "espressif"
        raise ValueError("unknown config param")

    def scan(self):
        out = []
        for ssid, ap in (_wifi().get("networks") or {}).items():
            out.append((ssid.encode(), b"\x00" * 6, ap.get("channel", 6), ap.get("rssi", -60),
                        AUTH_WPA2_PSK if ap.get("password") else AUTH_OPEN, False))
        return out


def hostname(name=None):
    return "espressif" if name is None else None
