"""The virtual board's ESP32 semantics, each checked through firmware running on
the real MicroPython unix port: boots, deep sleep, RTC memory, the watchdog,
the heap budget, and the bootloader's A/B rollback rules."""

import time

from mpfleet.images.espimage import build_app_image
from mpfleet.sim.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, WDT_RESET

SLEEP_ONE_HOUR = """
import machine, time
print("cause", machine.reset_cause(), "wake", machine.wake_reason(), "t", time.time())
machine.deepsleep(3600 * 1000)
"""


def test_first_boot_formats_littlefs_and_runs_main(run_firmware):
    rec = run_firmware("print('hello from main')\n")
    assert "hello from main" in rec.output
    assert rec.reset_cause == PWRON_RESET
    assert rec.running_slot == "ota_0"
    assert rec.firmware_version == "v1.24.0"


def test_sys_path_and_cwd_are_the_esp32_ports(run_firmware):
    rec = run_firmware("import sys, os\nprint(sys.path, os.getcwd(), os.listdir('/'))\n")
    assert "['', '.frozen', '/lib'] / ['main.py']" in rec.output


def test_boot_py_runs_before_main(run_firmware):
    rec = run_firmware("print('main', BOOTED)\n", files={"/boot.py": b"import builtins\nbuiltins.BOOTED = 42\n"})
    assert "main 42" in rec.output


def test_an_hour_of_deep_sleep_takes_a_fraction_of_a_second(new_board, run_firmware):
    vb = new_board()
    first = run_firmware(SLEEP_ONE_HOUR, board=vb)
    started = time.monotonic()
    second = vb.boot()
    assert first.exit_reason == "deepsleep" and first.sleep_ms == 3600 * 1000
    assert second.reset_cause == DEEPSLEEP_RESET
    assert "wake 4" in second.output  # TIMER_WAKE
    t1 = int(first.output.split(" t ")[1].split()[0])
    t2 = int(second.output.split(" t ")[1].split()[0])
    assert 3600 <= t2 - t1 <= 3602
    assert time.monotonic() - started < 1.0


def test_rtc_memory_survives_deep_sleep_and_reset_but_not_power_loss(new_board, run_firmware):
    vb = new_board()
    src = """
import machine
rtc = machine.RTC()
print("rtc", rtc.memory())
if not rtc.memory():
    rtc.memory(b"kept")
    machine.deepsleep(1000)
if machine.reset_cause() == machine.DEEPSLEEP_RESET:
    machine.reset()
machine.deepsleep(1000)
"""
    assert "rtc b''" in run_firmware(src, board=vb).output
    woke = vb.boot()
    assert woke.reset_cause == DEEPSLEEP_RESET and "rtc b'kept'" in woke.output
    after_reset = vb.boot()
    assert after_reset.reset_cause == HARD_RESET and "rtc b'kept'" in after_reset.output
    vb.power_off()
    vb.power_on()
    assert "rtc b''" in vb.boot().output


def test_rtc_memory_is_limited_to_2048_bytes(run_firmware):
    rec = run_firmware("""
import machine
machine.RTC().memory(b"x" * 2048)
try:
    machine.RTC().memory(b"x" * 2049)
except ValueError as e:
    print("refused", e)
""")
    assert "refused buffer too long" in rec.output


def test_firmware_gets_its_heap_budget_and_no_more(run_firmware):
    rec = run_firmware("""
import gc
gc.collect()
a = bytearray(100 * 1024)
print("100k ok")
del a
gc.collect()
try:
    b = bytearray(140 * 1024)
    print("140k ok")
except MemoryError:
    print("140k MemoryError")
""")
    assert "100k ok" in rec.output
    assert "140k MemoryError" in rec.output


def test_watchdog_resets_a_hung_firmware(run_firmware, new_board):
    vb = new_board()
    rec = run_firmware("import machine\nwdt = machine.WDT(timeout=300)\nwhile True:\n    pass\n", board=vb)
    assert rec.exit_reason == "wdt"
    nxt = vb.boot()
    assert nxt.reset_cause == WDT_RESET


def test_exception_with_watchdog_armed_ends_in_a_reset_not_the_repl(run_firmware):
    rec = run_firmware("import machine\nmachine.WDT(timeout=5000)\nraise RuntimeError('boom')\n")
    assert "RuntimeError: boom" in rec.output
    assert rec.exit_reason == "wdt"


def test_exception_without_watchdog_leaves_the_board_at_the_repl(run_firmware):
    rec = run_firmware("raise RuntimeError('boom')\n")
    assert rec.exit_reason == "repl"


def test_deepsleep_skips_finally_blocks_like_a_real_chip(run_firmware):
    rec = run_firmware("import machine\ntry:\n    machine.deepsleep(10)\nfinally:\n    print('finally ran')\n")
    assert rec.exit_reason == "deepsleep"
    assert "finally ran" not in rec.output


def test_unique_id_is_the_mac_and_wifi_connects_only_to_known_networks(new_board, run_firmware):
    vb = new_board()
    vb.set_wifi(networks={"site": {"password": "secret", "rssi": -55}}, connect_ms=20)
    rec = run_firmware("""
import machine, network, time, socket
print("id", machine.unique_id().hex())
wlan = network.WLAN(network.STA_IF)
wlan.active(True)
try:
    socket.getaddrinfo("127.0.0.1", 1883)
except OSError as e:
    print("no wifi", e.args[0])
wlan.connect("site", "wrong")
time.sleep_ms(60)
print("status", wlan.status())
wlan.connect("site", "secret")
time.sleep_ms(60)
print("connected", wlan.isconnected(), wlan.status("rssi"))
print("resolved", len(socket.getaddrinfo("127.0.0.1", 1883)) > 0)
""", board=vb)
    assert f"id {bytes(vb.settings['mac']).hex()}" in rec.output
    assert "no wifi -202" in rec.output
    assert "status 202" in rec.output  # STAT_WRONG_PASSWORD
    assert "connected True -55" in rec.output
    assert "resolved True" in rec.output


def test_sensors_follow_the_board_definition(run_firmware):
    rec = run_firmware("""
import machine, dht, esp32
adc = machine.ADC(machine.Pin(34), atten=machine.ADC.ATTN_11DB)
print("adc_uv", adc.read_uv())
d = dht.DHT22(machine.Pin(4))
d.measure()
print("dht", d.temperature(), d.humidity())
print("mcu_f", esp32.raw_temperature())
print("has_mcu_temperature", hasattr(esp32, "mcu_temperature"))
""")
    uv = int(rec.output.split("adc_uv ")[1].split()[0])
    assert 800_000 <= uv <= 1_600_000  # 1.2 V +- 0.4 V sine
    temp, hum = (float(x) for x in rec.output.split("dht ")[1].split()[:2])
    assert 17 <= temp <= 25 and 45 <= hum <= 65
    assert "has_mcu_temperature False" in rec.output  # the original ESP32 has raw_temperature only


# --------------------------------------------------------------------------- A/B
AB_MAIN = """
import esp32, machine
running = esp32.Partition(esp32.Partition.RUNNING).info()[4]
try:
    mode = open("/mode").read().strip()
except OSError:
    mode = ""
print("running", running, "mode", mode)
if mode == "switch" and running == "ota_0":
    nxt = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
    print("next", nxt.info()[4])
    nxt.set_boot()
    machine.reset()
if mode == "switch-then-sleep" and running == "ota_0":
    esp32.Partition(esp32.Partition.RUNNING).get_next_update().set_boot()
    machine.deepsleep(1000)
if mode == "confirm":
    esp32.Partition.mark_app_valid_cancel_rollback()
    print("confirmed")
machine.deepsleep(1000)
"""


def _ab_board(new_board, run_firmware, mode, new_image=None):
    vb = new_board()
    vb.write_app_image("ota_1", new_image or build_app_image("esp32", "v1.25.0"))
    rec = run_firmware(AB_MAIN, board=vb, files={"/mode": mode.encode()})
    return vb, rec


def _states(vb):
    return {e.sector: (e.seq, e.state) for e in vb.ota_entries() if e.valid}


def test_set_boot_then_reset_boots_the_new_image_pending_verify(new_board, run_firmware):
    vb, rec = _ab_board(new_board, run_firmware, "switch")
    assert "next ota_1" in rec.output and rec.exit_reason == "reset"
    new = vb.boot()
    assert new.running_slot == "ota_1" and new.firmware_version == "v1.25.0"
    assert any(state == 1 for _, state in _states(vb).values()), "PENDING_VERIFY after the first boot"


def test_reset_without_marking_valid_rolls_back(new_board, run_firmware):
    vb, _ = _ab_board(new_board, run_firmware, "switch")
    assert vb.boot().running_slot == "ota_1"
    vb.press_reset()
    back = vb.boot()
    assert back.running_slot == "ota_0" and back.firmware_version == "v1.24.0"
    assert "rolling back" in back.output


def test_marked_valid_stays_across_resets(new_board, run_firmware):
    vb, _ = _ab_board(new_board, run_firmware, "switch")
    vb.fs_put({"/mode": b"confirm"})
    first = vb.boot()
    assert first.running_slot == "ota_1" and "confirmed" in first.output
    for _ in range(3):
        vb.press_reset()
        assert vb.boot().running_slot == "ota_1"
    assert any(state == 2 for _, state in _states(vb).values()), "VALID"


def test_deep_sleep_wake_boots_the_remembered_partition_not_otadata(new_board, run_firmware):
    vb, rec = _ab_board(new_board, run_firmware, "switch-then-sleep")
    assert rec.exit_reason == "deepsleep"
    woke = vb.boot()
    assert woke.reset_cause == DEEPSLEEP_RESET
    assert woke.running_slot == "ota_0", "a deep-sleep wake skips otadata"
    vb.press_reset()
    assert vb.boot().running_slot == "ota_1", "only a reset through the bootloader switches"


def test_image_that_crashes_at_boot_rolls_back(new_board, run_firmware):
    bad = build_app_image("esp32", "v1.25.0-crash", sim_note={"crash": "boot"})
    vb, _ = _ab_board(new_board, run_firmware, "switch", new_image=bad)
    crashed = vb.boot()
    assert crashed.exit_reason == "panic" and crashed.running_slot == "ota_1"
    back = vb.boot()
    assert back.running_slot == "ota_0" and back.reset_cause == HARD_RESET


def test_set_boot_refuses_a_corrupt_image(new_board, run_firmware):
    image = bytearray(build_app_image("esp32", "v1.25.0"))
    image[600] ^= 0xFF
    vb, rec = _ab_board(new_board, run_firmware, "switch", new_image=bytes(image))
    assert "ESP_ERR_OTA_VALIDATE_FAILED" in rec.output
    assert _states(vb) == {}, "otadata untouched"


def test_set_boot_refuses_an_image_for_another_chip(new_board, run_firmware):
    vb, rec = _ab_board(new_board, run_firmware, "switch", new_image=build_app_image("esp32s3", "v1.25.0"))
    assert "ESP_ERR_OTA_VALIDATE_FAILED" in rec.output
    assert _states(vb) == {}
