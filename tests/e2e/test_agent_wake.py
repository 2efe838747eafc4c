"""The agent's wake cycle end to end: the real firmware on virtual boards, real
mosquitto, the ingester writing SQLite. Every sample arrives exactly once."""

import time

import pytest
from agent_harness import Host, flushed_seqs, last_state, make_device

from mpfleet.sim.board import DEEPSLEEP_RESET


@pytest.fixture
def host(mosquitto, tmp_path):
    h = Host(mosquitto, tmp_path / "host.db").start()
    yield h
    h.close()


def _run(vb, boots):
    records = vb.run(boots=boots)
    for r in records:
        assert "Traceback" not in r.output, r.output
        assert r.exit_reason == "deepsleep", (r.exit_reason, r.detail, r.output)
    return records


def test_wake_samples_and_sleeps_for_the_rest_of_the_interval(mosquitto, tmp_path, host):
    vb = make_device(tmp_path / "dev", mosquitto.port, sample_interval_s=120)
    records = _run(vb, 3)
    assert [r.reset_cause for r in records[1:]] == [DEEPSLEEP_RESET, DEEPSLEEP_RESET]
    for r in records:
        assert 118_000 <= r.sleep_ms <= 120_000


def test_uploads_every_n_wakes_and_acked_samples_never_touch_flash(mosquitto, tmp_path, host):
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=5)
    _run(vb, 20)
    host.wait_idle()
    rows = host.rows(vb.device_id)
    assert [r[1] for r in rows] == list(range(1, 21))
    assert host.store.ack_point(vb.device_id) == 20
    assert not vb.fs_listdir("/log") or all(not n.endswith(".seg") for n in vb.fs_listdir("/log"))
    state = last_state(vb, host.store)
    assert state["fw"] == "v1.24.0" and state["slot"] == "ota_0" and state["rssi"] == -58
    assert state["channels"] == ["adc0", "mcu_temp"]


def test_sample_values_and_times_are_real(mosquitto, tmp_path, host):
    started = time.time()
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=3)
    _run(vb, 6)
    host.wait_idle()
    rows = host.rows(vb.device_id)
    assert len(rows) == 6
    times = [t for _, _, t, _ in rows]
    assert times == sorted(times) and times[1] - times[0] == 60
    assert abs(times[0] - started) < 30
    for _, _, _, (adc, temp) in rows:
        assert 0.79 <= adc <= 1.61 and 41.5 <= temp <= 48.5


def test_broker_down_for_many_wakes_loses_nothing_and_backs_off(mosquitto, tmp_path, host):
    from mpfleet.broker.local import LocalBroker

    with LocalBroker() as down:
        port = down.port
    # Nothing listens on `port` now: every upload attempt fails.
    vb = make_device(tmp_path / "dev", port, upload_every_wakes=1, limits={"stage_max_samples": 16})
    records = _run(vb, 60)
    attempts = sum("upload failed" in r.output for r in records)
    assert 5 <= attempts <= 12, f"backoff: {attempts} attempts in 60 wakes"
    assert flushed_seqs("".join(r.output for r in records)), "the backlog went to flash"
    # The network comes back: point the device at the live broker.
    import json

    cfg = json.loads(vb.fs_get("/config.json"))
    cfg["broker"]["port"] = mosquitto.port
    vb.fs_put({"/config.json": json.dumps(cfg).encode()})
    records = vb.run(boots=70, stop=lambda r: False)
    host.wait_idle()
    seqs = [r[1] for r in host.rows(vb.device_id)]
    assert seqs == list(range(1, 131)) or seqs[:120] == list(range(1, 121)), seqs[-5:]
    assert len(seqs) == len(set(seqs))


def test_capacity_bound_drops_oldest_and_reports_it(mosquitto, tmp_path, host):
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=1,
                     wifi={"ssid": "elsewhere"}, limits={"stage_max_samples": 40, "log_max_bytes": 8192})
    _run(vb, 900)  # no network the whole time: far more than two segments
    import json

    cfg = json.loads(vb.fs_get("/config.json"))
    cfg["wifi"]["ssid"] = "lab"
    vb.fs_put({"/config.json": json.dumps(cfg).encode()})
    vb.run(boots=70)
    host.wait_idle()
    state = last_state(vb, host.store)
    assert state["dropped"] > 0
    seqs = [r[1] for r in host.rows(vb.device_id)]
    assert len(seqs) == len(set(seqs))
    assert seqs[-1] >= 900
    assert seqs[0] == state["dropped"] + 1, "the oldest were dropped, the newest kept"
    assert host.store.ack_point(vb.device_id) >= 900


def test_lost_ack_and_resend_make_no_duplicate_rows(mosquitto, tmp_path, host):
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=2)
    _run(vb, 4)
    host.wait_idle()
    host.stop()  # the host stops acking: the device re-sends what it sent
    _run(vb, 6)
    host.start()  # its persistent session delivers the queued frames, duplicates included
    _run(vb, 4)
    host.wait_idle()
    seqs = [r[1] for r in host.rows(vb.device_id)]
    assert seqs == list(range(1, 15))
    assert host.ingester.stats.duplicates > 0


def test_wrong_wifi_password_backs_off_with_growing_gaps(mosquitto, tmp_path, host):
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=1,
                     wifi={"password": "wrong"})
    records = _run(vb, 40)
    tried = [i for i, r in enumerate(records) if "upload failed" in r.output]
    gaps = [b - a for a, b in zip(tried, tried[1:])]
    assert gaps[:4] == [2, 4, 8, 16], gaps
    assert "status 202" in records[tried[0]].output  # STAT_WRONG_PASSWORD named in the cause


def test_device_without_time_takes_the_hosts_and_corrects_staged_samples(mosquitto, tmp_path, host):
    from mpfleet.sim.board import RTC_EPOCH_AFTER_POWER_LOSS

    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=4,
                     clock_s=RTC_EPOCH_AFTER_POWER_LOSS)  # power-on: the RTC says 2000-01-01
    _run(vb, 8)
    host.wait_idle()
    times = [r[2] for r in host.rows(vb.device_id)]
    now = time.time()
    assert len(times) == 8
    # Wake 4 learns the time before it sends: the staged samples are corrected too.
    assert all(abs(t - now) < 3600 for t in times), times
    assert all(59 <= b - a <= 61 for a, b in zip(times, times[1:])), times


def test_all_sensor_kinds_and_a_failed_sensor_reading(mosquitto, tmp_path, host):
    import json

    sensors = [
        {"name": "adc0", "kind": "adc", "pin": 34, "scale": 3},
        {"name": "battery", "kind": "battery", "pin": 36, "divider": 2.0, "scale": 2},
        {"name": "mcu_temp", "kind": "internal_temp", "scale": 1},
        {"name": "air", "kind": "dht22", "pin": 4, "scale": 1},
        {"name": "absent", "kind": "dht22", "pin": 5, "scale": 1},  # nothing wired on pin 5
    ]
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=2, sensors=sensors)
    _run(vb, 2)
    host.wait_idle()
    rows = host.rows(vb.device_id)
    assert len(rows) == 2
    adc, battery, temp, air, absent = rows[0][3]
    assert 0.79 <= adc <= 1.61
    assert 3.5 <= battery <= 4.3  # ramp from 4.2 V down, read through the 2:1 divider
    assert 41.5 <= temp <= 48.5 and 16.9 <= air <= 25.1
    assert absent is None
    state = last_state(vb, host.store)
    assert state["sensor_failures"] == 1
    assert state["channels"] == ["adc0", "battery", "mcu_temp", "air", "absent"]
    assert json.loads(json.dumps(state["scales"])) == [3, 2, 1, 1, 1]


def test_ntp_sets_an_unset_clock_before_anything_is_sent(mosquitto, tmp_path, host):
    import socket
    import struct
    import threading

    from mpfleet.sim.board import RTC_EPOCH_AFTER_POWER_LOSS

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    # A time the host's clock is not at, to tell NTP from the ack: two days back (the host
    # quarantines frames far ahead of its clock, and keeps times in the past).
    ntp_now = int(time.time()) - 2 * 86400
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                request, peer = server.recvfrom(48)
            except OSError:
                continue
            reply = bytearray(48)
            reply[0] = 0x1C  # version 3, mode 4 (server)
            reply[1] = 2  # stratum
            struct.pack_into("!II", reply, 40, ntp_now + 2208988800, 0)
            server.sendto(bytes(reply), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=3,
                         clock_s=RTC_EPOCH_AFTER_POWER_LOSS,
                         ntp={"host": "127.0.0.1", "port": server.getsockname()[1]})
        records = _run(vb, 3)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert any("ntp: clock set" in r.output for r in records)
    host.wait_idle()
    times = [r[2] for r in host.rows(vb.device_id)]
    assert len(times) == 3
    assert all(abs(t - ntp_now) < 300 for t in times), times


FILL_STAGE = """
import time
from agent import rtcstage
st = rtcstage.Stage()
st.load()
n = st.nchan  # what the first wake staged: the board's channels
k = 0
while st.room_for(n):
    st.add(time.time() + k, [1200 + (k + i) % 3 for i in range(n)])
    k += 1
st.save()
print("staged", st.staged)
"""


def test_a_full_stage_is_flushed_within_the_heap_budget(mosquitto, tmp_path):
    """The wake that finds the RTC stage full moves a few hundred samples to flash in
    one append; building that batch must not need a large contiguous block (it once
    did: a list of bytes objects, MemoryError at every wake from then on)."""
    vb = make_device(tmp_path / "dev", mosquitto.port, wifi={"ssid": "nowhere"})
    _run(vb, 1)
    out, _ = vb.exec_script(FILL_STAGE)
    staged = int(out.split("staged")[1].split()[0])
    assert staged > 300, out
    records = _run(vb, 2)
    assert f"flushed 1 {staged}" in records[0].output, records[0].output
    assert vb.counters()["vfs"]["erases"] > 0
