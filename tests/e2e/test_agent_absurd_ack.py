"""A host ack the device cannot follow (issue 13): one CRC-valid frame of garbage
moved a host's ack from 4 to 4,294,967,256; the device renumbered to follow it,
and about forty wakes later its seqs no longer fitted the frame's 32 bits
("first_seq and t_base must fit 32 bits"): it never uploaded again.

The rule (docs/protocol.md): an ack within the seqs the device has numbered is
taken; one ahead of them is an earlier life of the device id (a fresh flash)
and the device renumbers after it, unless it is past 2**31 - 1, which no real
life reaches: then it is refused, nothing is trimmed or renumbered, every sample
is kept and sent again, and the state's last_error says so."""

import json
import threading
import time

import paho.mqtt.client as mqtt
from agent_harness import Host, make_device

REBASE_MAX = (1 << 31) - 1

# Each ack goes to a fresh Uploader of a real Wake (real stage, real flash log),
# as a retained samples/ack message, then the wake applies it. What the device's
# numbering looks like afterwards is printed (`refused` read with getattr: the
# probe runs on the agent from before this rule too).
PROBE = """
import json
from agent.wake import Wake
from agent.topics import topic

for text in json.loads(open("/.host/acks").read()):
    w = Wake(watchdog=False)
    up = w.uploader()
    up.on_message(topic(w.device_id, "samples/ack").encode(), text.encode(), True)
    w.apply_ack()
    log = w.open_log().stats()
    print("A", json.dumps(text), w.stage.first_seq, w.stage.next_seq, w.stage.staged, log["next_seq"],
          log["backlog"], up.acked, getattr(up, "refused", None))
w = Wake(watchdog=False)
w.acked = 4294967256  # agent.usb's path: the host's ack set directly
w.apply_ack()
print("U", w.stage.first_seq, w.stage.next_seq, w.uploader().acked, getattr(w.uploader(), "refused", None))
"""

STAGE = "from agent import rtcstage\nst = rtcstage.Stage()\nst.load()\nprint('stage', st.first_seq, st.next_seq)\n"
ABSURD = [4_294_967_256, (1 << 32) - 3, 1 << 32, REBASE_MAX + 1, 10 ** 30, 1 << 64]
MALFORMED = ['{"upto": -5}', '{"upto": "7"}', '{"upto": 7.5}', '{"upto": true}', '{"upto": null}',
             '{"upto": [1]}', '{}', '[]', '"x"', '7', '{"upto": 1e999}']


def _offline(tmp_path, port, **overrides):
    vb = make_device(tmp_path / "dev", port, wifi={"ssid": "nowhere"}, **overrides)
    records = vb.run(boots=3)
    assert all(r.exit_reason == "deepsleep" for r in records)
    return vb


def _probe(vb, acks):
    out, _ = vb.exec_script(PROBE, {"acks": json.dumps(acks).encode()})
    assert "Traceback" not in out, out
    rows = {}
    for line in out.splitlines():
        if line.startswith("A "):
            head, rest = line[2:].rsplit('"', 1)
            rows[json.loads(head + '"')] = rest.split()
    return rows, out


def test_an_absurd_ack_renumbers_nothing_and_keeps_every_sample(mosquitto, tmp_path):
    vb = _offline(tmp_path, mosquitto.port)
    rows, out = _probe(vb, [json.dumps({"upto": n}) for n in ABSURD])
    assert "renumbering" not in out, out
    for n in ABSURD:
        first, nxt, staged, log_next, backlog, acked, refused = rows[json.dumps({"upto": n})]
        assert (first, nxt, staged) == ("1", "4", "3"), (n, rows[json.dumps({"upto": n})])
        assert int(log_next) <= 4 and acked == "-1" and refused == str(n)
    assert out.count("refusing host ack") == len(ABSURD) + 1
    usb = next(line for line in out.splitlines() if line.startswith("U "))
    assert usb.split()[1:] == ["1", "4", "-1", "4294967256"], "agent.usb's path refuses it too"


def test_a_malformed_ack_or_time_is_ignored_without_a_crash(mosquitto, tmp_path):
    from mpfleet.sim.board import RTC_EPOCH_AFTER_POWER_LOSS

    vb = _offline(tmp_path, mosquitto.port, clock_s=RTC_EPOCH_AFTER_POWER_LOSS)
    times = ['{"upto": 0, "time": 1e999}', '{"upto": 0, "time": %d}' % (1 << 40), '{"upto": 0, "time": -5}']
    rows, out = _probe(vb, MALFORMED + times)
    for text in MALFORMED + times:
        assert rows[text][:3] == ["1", "4", "3"], (text, rows[text])
    assert "renumbering" not in out
    assert vb.clock_s < 1577836800, "no time past 2100 (or infinite, or negative) sets the clock"


def test_an_ack_ahead_of_the_device_up_to_the_bound_still_renumbers_after_it(mosquitto, tmp_path):
    """The reflashed device under a known id: the host's ack is ahead of its seqs
    and it numbers what it holds after it, at the bound as well."""
    vb = _offline(tmp_path, mosquitto.port)
    rows, out = _probe(vb, ['{"upto": 1000}'])
    assert rows['{"upto": 1000}'][:3] == ["1001", "1004", "3"] and "renumbering" in out
    vb2 = _offline(tmp_path / "b", mosquitto.port)
    rows, out = _probe(vb2, [json.dumps({"upto": REBASE_MAX})])
    first, nxt, staged = rows[json.dumps({"upto": REBASE_MAX})][:3]
    assert (int(first), int(nxt), staged) == (REBASE_MAX + 1, REBASE_MAX + 4, "3")


class _StateWatch:
    """Every `state` the device publishes, as the broker delivers them."""

    def __init__(self, broker, device_id):
        self.states = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{device_id}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"mpf/v1/{device_id}/state", qos=1)
        self.client.loop_start()
        self.device_id = device_id

    def _on_message(self, client, userdata, msg):
        with self._lock:
            self.states.append(json.loads(msg.payload))

    def forge_ack(self, upto):
        ack = json.dumps({"upto": upto, "time": int(time.time())})
        self.client.publish(f"mpf/v1/{self.device_id}/samples/ack", ack, qos=1, retain=True).wait_for_publish(5)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def test_uploads_go_on_after_an_absurd_ack_and_the_host_gets_every_sample_once(mosquitto, tmp_path):
    host = Host(mosquitto, tmp_path / "host.db").start()
    vb = make_device(tmp_path / "dev", mosquitto.port, upload_every_wakes=1)
    watch = _StateWatch(mosquitto, vb.device_id)
    try:
        records = vb.run(boots=2)
        host.wait_idle()
        host.stop()  # a host that keeps the absurd ack for a while
        watch.forge_ack(4_294_967_256)
        records += vb.run(boots=1)
        out, _ = vb.exec_script(STAGE)
        assert "stage 3 4" in out, "nothing trimmed, nothing renumbered: " + out
        # The host's ack is right again (it takes the frames sent meanwhile first).
        host = Host(mosquitto, tmp_path / "host.db").start()
        host.wait_idle()
        records += vb.run(boots=2)
        host.wait_idle()
        assert all(r.exit_reason == "deepsleep" and "Traceback" not in r.output for r in records)
        assert not any("renumbering" in r.output for r in records)
        assert ["refusing host ack 4294967256" in r.output for r in records] == [False, False, True, False, False]
        assert [row[1] for row in host.rows(vb.device_id)] == list(range(1, 6)), "every sample, once"
        assert host.store.ack_point(vb.device_id) == 5
        out, _ = vb.exec_script(STAGE)
        assert "stage 6 6" in out, "all trimmed once the ack is real: " + out
        refused = [s["last_error"] for s in watch.states if "refused host ack" in str(s.get("last_error"))]
        assert refused == ["refused host ack 4294967256: ahead of this device's seqs and past 2147483647"], \
            [s.get("last_error") for s in watch.states]
    finally:
        watch.close()
        host.close()
