"""The RTC stage's clock correction after a power loss (issue 13): a device that
was offline for a whole stage's worth of wakes on an unset clock (year 2000)
gets every staged sample's time corrected when it learns the time, within the
128 KiB heap. Once this built a list of every staged sample: MemoryError when
the clock was set, and all but the newest sample kept their year-2000 times."""

import json
import time

import pytest
from agent_harness import Host, make_device

from mpfleet.sim.board import RTC_EPOCH_AFTER_POWER_LOSS

CLOCK_SET_AFTER = 1577836800  # 2020-01-01: earlier times were taken on an unset clock
INTERVAL_S = 60

# Stages what a long offline stretch leaves in RTC memory: one sample a wake,
# readings that wander like real ones, up to one sample short of full (the wake
# that finds the stage full flushes it to flash instead, and flashed samples
# keep their times: docs/agent.md, "Time"). Seqs from 1, the upload asked for.
FILL_OFFLINE_STAGE = """
import time
from agent import rtcstage
st = rtcstage.Stage()
st.load()
st.next_seq = 1
n = 2  # the board's default sensors: adc0, mcu_temp
t0 = time.time() - %(interval)d * 1000
x = 12345
values = [1500, 450]
k = 0
while st.payload_len + 2 * (1 + 10 * (n + 1)) <= rtcstage._CAPACITY:
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    values[0] += (x >> 8) %% 201 - 100
    values[1] += (x >> 16) %% 7 - 3
    st.add(t0 + %(interval)d * k, [values[0], None if x %% 13 == 0 else values[1]])
    k += 1
st.wake_count = k
st.flags |= rtcstage.FLAG_UPLOAD_REQUESTED
st.save()
print("staged", st.staged, "bytes", st.payload_len, "first", t0)
"""


@pytest.fixture
def host(mosquitto, tmp_path):
    h = Host(mosquitto, tmp_path / "host.db").start()
    yield h
    h.close()


def _offline_device(path, port, clock_s=RTC_EPOCH_AFTER_POWER_LOSS):
    vb = make_device(path, port, clock_s=clock_s, upload_every_wakes=10000,
                     upload_watermark=100000)
    out, _ = vb.exec_script(FILL_OFFLINE_STAGE % {"interval": INTERVAL_S})
    words = out.split()
    return vb, int(words[words.index("staged") + 1])


def test_a_full_stage_from_an_unset_clock_is_corrected_when_the_time_arrives(mosquitto, tmp_path, host):
    vb, staged = _offline_device(tmp_path / "dev", mosquitto.port)
    assert staged > 300
    assert vb.heap_budget() == 128 * 1024
    (rec,) = vb.run(boots=1)
    assert "Traceback" not in rec.output and "MemoryError" not in rec.output, rec.output
    assert rec.exit_reason == "deepsleep", (rec.exit_reason, rec.output)
    host.wait_idle()
    rows = host.rows(vb.device_id)
    assert [r[1] for r in rows] == list(range(1, staged + 2)), "every sample, once"
    times = [r[2] for r in rows]
    old = [t for t in times if t < CLOCK_SET_AFTER]
    assert not old, f"{len(old)} of {len(times)} samples kept their year-2000 times"
    # The correction moves every staged time by the same amount: the spacing stays.
    assert all(b - a == INTERVAL_S for a, b in zip(times[:-2], times[1:-1])), times
    assert abs(times[-1] - time.time()) < 3600, "the wake's own sample is taken at about now"
    assert times[-1] - times[-2] > 0


STAGE_NOW = """
from agent import rtcstage
st = rtcstage.Stage()
print("stage", st.load(), st.staged, st.first_seq, st.next_seq)
for seq, t, values in st.samples():
    print("sample", seq, t)
"""


def _stage_now(vb):
    out, _ = vb.exec_script(STAGE_NOW)
    words = out.split()
    i = words.index("stage")
    head = (words[i + 1] == "True", int(words[i + 2]), int(words[i + 3]), int(words[i + 4]))
    samples = [(int(a), int(b)) for tag, a, b in zip(words, words[1:], words[2:]) if tag == "sample"]
    return head, samples


def _retained_ack(broker, device_id, ack):
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acker-{device_id}")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        c.publish(f"mpf/v1/{device_id}/samples/ack", json.dumps(ack), qos=1, retain=True).wait_for_publish(5)
    finally:
        c.loop_stop()
        c.disconnect()


@pytest.mark.parametrize("clock_set", [True, False], ids=["clock-set", "clock-unset"])
def test_an_ack_of_part_of_a_full_stage_trims_it_in_place(mosquitto, tmp_path, clock_set):
    """No ingester: the only ack is a retained one covering the oldest 200 staged
    samples (with the host's time). The wake drops those from RTC memory, keeps
    the rest with their times (corrected, if the clock was unset), sends them
    and, unacked, keeps them for the next upload."""
    vb, staged = _offline_device(tmp_path / "dev", mosquitto.port,
                                 clock_s=time.time() if clock_set else RTC_EPOCH_AFTER_POWER_LOSS)
    _, before = _stage_now(vb)
    _retained_ack(mosquitto, vb.device_id, {"upto": 200, "time": int(time.time())})
    (rec,) = vb.run(boots=1)
    assert "Traceback" not in rec.output, rec.output
    assert rec.exit_reason == "deepsleep", (rec.exit_reason, rec.output)
    (valid, n, first, next_seq), after = _stage_now(vb)
    assert valid and first == 201 and next_seq == staged + 2 and n == staged + 1 - 200
    assert [s for s, _ in after] == list(range(201, staged + 2))
    shift = after[0][1] - before[200][1]
    assert (shift == 0) == clock_set
    assert [t for _, t in after[:-1]] == [t + shift for _, t in before[200:]], "the kept times, all moved alike"
    assert all(t >= CLOCK_SET_AFTER for _, t in after)
