"""Hardware in the loop: flash, deploy and a signed job over USB on a real board.

    make hil PORT=/dev/ttyUSB0 [BOARD=esp32-devkitc] [FIRMWARE=ESP32_GENERIC-OTA-v1.25.0.bin]

The same commands the virtual-board tests run, against the port given; skipped when
no port is given (every `make test`). Without FIRMWARE the board keeps the MicroPython
it has (1.22 or later), and only deploy and the job run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PORT = os.environ.get("MPFLEET_HIL_PORT")
BOARD = os.environ.get("MPFLEET_HIL_BOARD") or "esp32-devkitc"
FIRMWARE = os.environ.get("MPFLEET_HIL_FIRMWARE")

pytestmark = [pytest.mark.hil,
              pytest.mark.skipif(not PORT, reason="no board attached: make hil PORT=/dev/ttyUSB0")]


@pytest.fixture(scope="module")
def laptop(tmp_path_factory):
    root = tmp_path_factory.mktemp("hil")
    env = {**os.environ, "MPFLEET_DB": str(root / "mpfleet.db"), "MPFLEET_KEYS": str(root / "keys"),
           "COLUMNS": "200"}

    def mpfleet(*args, timeout=600):
        return subprocess.run([sys.executable, "-m", "mpfleet", *args], capture_output=True, text=True,
                              env=env, timeout=timeout)

    assert mpfleet("keys", "init").returncode == 0
    return mpfleet


@pytest.mark.skipif(not FIRMWARE, reason="no FIRMWARE= given: the board keeps its MicroPython")
def test_flash(laptop):
    out = laptop("flash", "--board", BOARD, "--firmware", FIRMWARE, "--port", PORT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_deploy_and_self_check(laptop):
    # A fresh board has no broker in its config, so deploy needs one (MPFLEET_BROKER if set); the board
    # need not reach it: the job below runs over USB.
    broker = os.environ.get("MPFLEET_BROKER") or "mqtt://192.168.4.1"
    out = laptop("deploy", "--port", PORT, "--board", BOARD, "--wifi-ssid", "hil", "--wifi-password", "hil",
                 "--broker", broker, "--json", "--wait", "90")
    assert out.returncode == 0, out.stdout + out.stderr
    (result,) = json.loads(out.stdout)
    assert result["ok"] and result["device"], result


def test_signed_job_over_usb(laptop):
    devices = json.loads(laptop("devices", "list", "--json").stdout)
    device = devices[0]["id"]
    assert laptop("job", "create", "diag", "--targets", device, "--id", "hil-diag").returncode == 0
    out = laptop("usb", "run", "hil-diag", "--port", PORT, "--json", "--wait", "90")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)[0]["detail"]["status"] == "SUCCEEDED"
