"""The device agent measured end to end on virtual boards (real MicroPython, real
mosquitto), each number side by side with the naive way in the same run.

  wear   erases per 1000 samples of the agent during a network outage (every
         sample must go to flash) at default settings, vs one open/append/close
         per sample on the same emulated flash
  wire   bytes per sample on the wire (MQTT PUBLISH packets incl. fixed header,
         topic and packet id) of the agent's uploads, vs one JSON message per
         sample for the same samples
  ram    the smallest heap in which a full wake with an upload still succeeds
         (binary search, mpfleet.sim.heap) against the 128 KiB budget
  wake   time and bytes allocated by a sample-only wake vs a bare interpreter
         start that only goes back to sleep
  hostile  filesystem erases per connected wake while a hostile queue stays
         retained (20 envelopes of an unknown key, nested JSON, an oversized
         and a truncated envelope), vs the same device with an empty queue

    .venv/bin/python bench/agent.py          # prints a table
    run() -> {"name": "agent", "rows": [...]}
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from mpfleet.broker.local import LocalBroker
from mpfleet.sim.heap import heap_needed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from agent_harness import Host, make_device  # noqa: E402 - tests/ is on the path from the line above

WEAR_SAMPLES = 1000
NAIVE_MAIN = """
import machine, time, json
from agent import sensors
values, _ = sensors.read_all([{"name": "adc0", "kind": "adc", "pin": 34, "scale": 3},
                              {"name": "mcu_temp", "kind": "internal_temp", "scale": 1}])
with open("/naive.log", "a") as f:
    f.write(json.dumps([time.time()] + values))
    f.write("\\n")
machine.deepsleep(60000)
"""
BARE_MAIN = "import machine\nmachine.deepsleep(60000)\n"


def _mqtt_publish_size(topic: str, payload_len: int, qos: int = 1) -> int:
    remaining = 2 + len(topic) + (2 if qos else 0) + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3
    return 1 + varint + remaining


def wear(tmp: Path, port: int) -> dict:
    agent = make_device(tmp / "wear-agent", port, wifi={"ssid": "nowhere"})
    before = agent.counters()["vfs"]
    agent.run(boots=WEAR_SAMPLES)
    after = agent.counters()["vfs"]
    naive = make_device(tmp / "wear-naive", port)
    naive.fs_put({"/main.py": NAIVE_MAIN.encode()})
    n_before = naive.counters()["vfs"]
    naive.run(boots=WEAR_SAMPLES)
    n_after = naive.counters()["vfs"]
    agent_erases = after["erases"] - before["erases"]
    naive_erases = n_after["erases"] - n_before["erases"]
    return {
        "metric": "flash erases per 1000 samples (network down)",
        "mpfleet": round(agent_erases * 1000 / WEAR_SAMPLES, 1),
        "naive": round(naive_erases * 1000 / WEAR_SAMPLES, 1),
        "ratio": round(naive_erases / max(agent_erases, 1), 1),
        "detail": {"agent_bytes_programmed": after["bytes_programmed"] - before["bytes_programmed"],
                   "naive_bytes_programmed": n_after["bytes_programmed"] - n_before["bytes_programmed"]},
        "target": "<= 10",
    }


def wire(tmp: Path, broker, every: int) -> dict:
    import threading

    import paho.mqtt.client as mqtt

    sizes: list[int] = []
    lock = threading.Lock()
    tap = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"wire-tap-{every}")

    def on_message(c, u, msg):
        with lock:
            sizes.append(_mqtt_publish_size(msg.topic, len(msg.payload)))

    tap.on_message = on_message
    tap.connect(broker.host, broker.port)
    tap.subscribe("mpf/v1/+/samples", qos=1)
    tap.loop_start()
    host = Host(broker, tmp / f"wire-{every}.db", client_id=f"wire-ingest-{every}").start()
    vb = make_device(tmp / f"wire-{every}", broker.port, upload_every_wakes=every)
    vb.run(boots=every * 10)
    host.wait_idle()
    rows = host.rows(vb.device_id)
    tap.loop_stop()
    host.close()
    samples = len(rows)
    json_bytes = 0
    for dev, seq, t, values in rows:
        payload = json.dumps({"seq": seq, "t": t, "adc0": values[0], "mcu_temp": values[1]})
        json_bytes += _mqtt_publish_size(f"mpf/v1/{dev}/sample", len(payload))
    per_sample = sum(sizes) / samples
    return {
        "metric": f"wire bytes per sample (upload every {every} wakes)",
        "mpfleet": round(per_sample, 2),
        "naive": round(json_bytes / samples, 2),
        "ratio": round(json_bytes / sum(sizes), 1),
        "target": "<= 8",
    }


def _heap_row(metric: str, vb, succeeded) -> dict:
    need = heap_needed(vb, succeeded, low=16 * 1024, high=256 * 1024, resolution=1024)
    return {
        "metric": metric,
        "mpfleet": None if need is None else round(need / 1024, 1),
        "naive": 128.0,
        "ratio": None if need is None else round(128 * 1024 / need, 2),
        "target": "fits 128 KiB",
    }


def ram(tmp: Path, broker) -> dict:
    host = Host(broker, tmp / "ram.db", client_id="ram-ingest").start()
    vb = make_device(tmp / "ram", broker.port, upload_every_wakes=2)
    vb.run(boots=1)  # the next wake uploads

    def uploaded(rec):
        return rec.exit_reason == "deepsleep" and "upload failed" not in rec.output and "Error" not in rec.output

    row = _heap_row("smallest heap for a wake with upload (KiB)", vb, uploaded)
    host.close()
    return row


def job_ram(tmp: Path, broker) -> dict:
    from agent_harness import JobDesk

    host = Host(broker, tmp / "jobram.db", client_id="jobram-ingest").start()
    desk = JobDesk(broker, "jobram-1")
    vb = make_device(tmp / "jobram", broker.port, device_id="jobram-1", upload_every_wakes=1,
                     trusted_keys=desk.trusted())
    desk.publish_queue([desk.job("config", {"set": {"upload_watermark": 321}}, job_id="ram-job")[1]])

    def ran(rec):
        return "job ram-job SUCCEEDED" in rec.output and "Traceback" not in rec.output

    row = _heap_row("smallest heap for a wake that verifies and runs a job (KiB)", vb, ran)
    desk.close()
    host.close()
    return row


def wake(tmp: Path, port: int) -> dict:
    agent = make_device(tmp / "wake-agent", port, wifi={"ssid": "nowhere"})
    agent.run(boots=3)
    agent_records = agent.run(boots=30)
    bare = make_device(tmp / "wake-bare", port)
    bare.fs_put({"/main.py": BARE_MAIN.encode()})
    bare.run(boots=3)
    bare_records = bare.run(boots=30)

    def med(records, attr):
        return statistics.median(getattr(r, attr) for r in records)

    return {
        "metric": "sample-only wake: awake ms / bytes allocated",
        "mpfleet": f"{med(agent_records, 'awake_ms'):.0f} ms / {med(agent_records, 'alloc_bytes'):.0f} B",
        "naive": f"{med(bare_records, 'awake_ms'):.0f} ms / {med(bare_records, 'alloc_bytes'):.0f} B",
        "ratio": round(med(agent_records, "real_s") / med(bare_records, "real_s"), 2),
        "detail": {"agent_real_ms": round(med(agent_records, "real_s") * 1000, 1),
                   "bare_real_ms": round(med(bare_records, "real_s") * 1000, 1)},
        "target": "(report)",
    }


HOSTILE_WAKES = 8


def hostile(tmp: Path, broker) -> dict:
    """Erases per wake under a hostile retained queue, against an empty queue."""
    from agent_harness import JobDesk

    from mpfleet.protocol.signing import SigningKey, b64url

    host = Host(broker, tmp / "hostile.db", client_id="hostile-ingest").start()
    evil = SigningKey.generate()

    def erases(device_id: str, queue: list | None) -> list[int]:
        desk = JobDesk(broker, device_id)
        vb = make_device(tmp / device_id, broker.port, device_id=device_id, upload_every_wakes=1,
                         trusted_keys=desk.trusted())
        vb.run(boots=2)
        if queue is not None:
            desk.publish_queue(queue)
        out = []
        for _ in range(HOSTILE_WAKES):
            before = vb.counters()["vfs"]["erases"]
            vb.boot()
            out.append(vb.counters()["vfs"]["erases"] - before)
        desk.close()
        return out

    garbage = [evil.sign({"id": f"g{i}", "seq": i + 1, "type": "exec", "targets": ["*"], "params": {}})
               for i in range(20)]
    nested = f"mpf1.{evil.kid}.{b64url(('[' * 600 + ']' * 600).encode())}.{b64url(bytes(64))}"
    queue = garbage + [nested, "mpf1." + "A" * 5000, garbage[0][:40]]
    calm = erases("hostile-calm", None)
    attacked = erases("hostile-attacked", queue)
    host.close()
    quiet = statistics.mean(attacked[1:])
    return {
        "metric": f"filesystem erases per wake, hostile retained queue ({len(queue)} envelopes)",
        "mpfleet": f"first wake {attacked[0]}, then {quiet:.1f} (max {max(attacked[1:])})",
        "naive": f"empty queue {statistics.mean(calm):.1f} (max {max(calm)})",
        "ratio": round(quiet / max(statistics.mean(calm), 0.1), 2),
        "detail": {"attacked": attacked, "calm": calm},
        "target": "quiet wakes no dearer than with an empty queue",
    }


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="mpfleet-bench-") as tmp_name, LocalBroker() as broker:
        tmp = Path(tmp_name)
        rows = [wear(tmp, broker.port), wire(tmp, broker, 10), wire(tmp, broker, 30), ram(tmp, broker),
                job_ram(tmp, broker), wake(tmp, broker.port), hostile(tmp, broker)]
    return {"name": "agent", "rows": rows}


def main() -> int:
    result = run()
    for row in result["rows"]:
        print(f"{row['metric']:<50} mpfleet {row['mpfleet']!s:>18}  naive {row['naive']!s:>18}  "
              f"ratio {row['ratio']!s:>6}  target {row['target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
