"""OTA over MQTT on a virtual board, against the naive ways, in one run.

  throughput  a 1 MiB image pulled over MQTT (agent/otastream.py through mosquitto
              from `serve`'s artifact server) into the update partition, vs a raw
              TCP copy of the same image into the same partition by the same
              interpreter (socket.readinto + the same flash writer). Timed on the
              device; ratio = raw time / MQTT time (target >= 0.5), for windows 2, 4, 8.
  disconnect  a full `ota` job through a proxy that cuts the device's connection
              every 150-450 KiB: bytes the device fetched again per cut (re-asked:
              the chunks lost in flight with the link) and chunks it received twice,
              from the job's SUCCEEDED detail; target: what was already received is
              never fetched again, so re-sent <= the window in flight.
  ram         the smallest heap in which the wake that verifies an `ota` (or `app`)
              job, downloads it, checks it and switches still succeeds (binary search
              over fresh copies of the board, mpfleet.sim.heap), against the 128 KiB budget
  app_vs_ota  an `app` job (the agent's lib/ as a bundle) vs an `ota` job with a
              1.4 MiB image (the size of a MicroPython ESP32 build): bytes and the
              wall time of the boots from job start to SUCCEEDED.

    .venv/bin/python bench/ota.py
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from mpfleet.broker.local import LocalBroker
from mpfleet.fleet.jobs_model import ExecutionRow
from mpfleet.fleet.serve import Dispatcher
from mpfleet.sim.heap import heap_needed
from mpfleet.sim.netfault import LinkCutter
from mpfleet.fleet.updates import app_params, ota_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from update_site import UpdateSite  # noqa: E402 - tests/ is on the path from the line above

IMAGE_SIZE = 1 << 20
FULL_IMAGE_SIZE = 1_400_000
WINDOWS = (2, 4, 8)
CHUNK = 4096

# Both scripts join the board's Wi-Fi first, as the agent does.
WIFI = """
import json, network, time
_cfg = json.load(open("/config.json"))["wifi"]
_w = network.WLAN(network.STA_IF)
_w.active(True)
_w.connect(_cfg["ssid"], _cfg.get("password"))
while not _w.isconnected():
    time.sleep_ms(10)
"""

MQTT_SCRIPT = WIFI + """
import esp32
from agent.mqtt import MQTTClient
from agent.otastream import Puller
from agent.ota import SlotWriter
c = MQTTClient("{did}", "127.0.0.1", {port}, timeout_ms=5000)
c.connect()
part = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
p = Puller("{did}", "{job}", {size}, {chunk}, {window}, 5000)
t = time.ticks_ms()
p.pull(c, 0, SlotWriter(part))
print("RESULT", time.ticks_diff(time.ticks_ms(), t), p.requests, p.reasked, p.ignored)
c.disconnect()
"""

RAW_SCRIPT = WIFI + """
import esp32, socket
from agent.ota import SlotWriter
part = esp32.Partition(esp32.Partition.RUNNING).get_next_update()
write = SlotWriter(part)
buf = bytearray({chunk})
mv = memoryview(buf)
s = socket.socket()
s.connect(socket.getaddrinfo("127.0.0.1", {port})[0][-1])
t = time.ticks_ms()
off = 0
while off < {size}:
    n = 0
    want = min({chunk}, {size} - off)
    while n < want:
        got = s.readinto(mv[n:want])
        if not got:
            raise OSError("short read")
        n += got
    write(off, mv[:n])
    off += n
print("RESULT", time.ticks_diff(time.ticks_ms(), t))
s.close()
"""


class Env(UpdateSite):
    def job(self, type_: str, params: dict, device: str) -> str:
        return super().job(type_, params, device, queue_now=True)


def _run_script(board, script: str) -> str:
    board.fs_put({"/main.py": script.encode()})
    rec = board.boot()
    for line in rec.output.splitlines():
        if line.startswith("RESULT"):
            return line
    raise RuntimeError(f"bench script failed:\n{rec.output[-2000:]}")


def _raw_server(data: bytes) -> tuple[int, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(data)
            time.sleep(0.5)
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv.getsockname()[1], t


def throughput(env: Env, broker_port: int) -> list[dict]:
    record = env.image("v9.0.0", IMAGE_SIZE)
    data = env.images.read(record.id)
    board = env.board()
    rows = []
    raw_ms = []
    for _ in range(3):
        port, t = _raw_server(data)
        raw_ms.append(int(_run_script(board, RAW_SCRIPT.format(chunk=CHUNK, port=port, size=len(data))).split()[1]))
        t.join(5)
    raw = sorted(raw_ms)[1]
    for window in WINDOWS:
        params, _ = ota_params(env.images, record.id, window=window)
        job = env.job("ota", params, board.device_id)
        runs = []
        for _ in range(3):
            out = _run_script(board, MQTT_SCRIPT.format(did=board.device_id, port=broker_port, job=job,
                                                        size=len(data), chunk=CHUNK, window=window)).split()
            runs.append((int(out[1]), int(out[2])))
        ms, requests = sorted(runs)[1]
        rows.append({"case": f"throughput window={window}", "image_bytes": len(data), "mqtt_ms": ms,
                     "raw_tcp_ms": raw, "mqtt_KiB_s": round(len(data) / 1024 / (ms / 1000)),
                     "raw_KiB_s": round(len(data) / 1024 / (raw / 1000)), "ratio_raw_over_mqtt": round(raw / ms, 2),
                     "requests": requests})
    return rows


def _boot_until_final(env: Env, board, job: str, boots: int = 12) -> tuple[ExecutionRow, float]:
    spent = 0.0
    for _ in range(boots):
        t = time.monotonic()
        board.boot()
        spent += time.monotonic() - t
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            row = env.engine.job_status(job).devices[-1]
            if row.status not in ("QUEUED", "IN_PROGRESS"):
                return row, spent
            time.sleep(0.05)
    raise RuntimeError(f"job {job} did not finish: {env.engine.job_status(job).devices}")


def disconnects(env: Env, broker_port: int) -> list[dict]:
    record = env.image("v9.1.0", IMAGE_SIZE)
    rng = random.Random(7)
    rows = []
    for window in (4, 8):
        # The first connection carries the wake's own traffic and the job; later ones are cut.
        with LinkCutter("127.0.0.1", broker_port,
                        lambda n: None if n == 1 else rng.randint(150_000, 450_000)) as cutter:
            board = env.board(port=cutter.port)
            board.boot()  # first contact: registers its state
            params, _ = ota_params(env.images, record.id, window=window)
            job = env.job("ota", params, board.device_id)
            row, _ = _boot_until_final(env, board, job)
            cuts = cutter.cuts
        link = (row.detail or {}).get("link") or {}
        rows.append({"case": f"disconnects window={window}", "status": row.status, "image_bytes": IMAGE_SIZE,
                     "cuts": cuts, "reconnects": link.get("reconnects"),
                     "reasked_bytes_per_cut": round(link.get("reasked", 0) / max(cuts, 1)),
                     "received_twice_bytes_per_cut": round(link.get("ignored", 0) / max(cuts, 1)),
                     "chunk": CHUNK, "window_bytes": window * CHUNK})
    return rows


def _params(env: Env, kind: str, record) -> dict:
    return (app_params if kind == "app" else ota_params)(env.images, record.id)[0]


def app_vs_ota(env: Env) -> list[dict]:
    rows = []
    bundle = env.bundle("9.9.9")
    image = env.image("v9.2.0", FULL_IMAGE_SIZE)
    for kind, record in (("app", bundle), ("ota", image)):
        board = env.board()
        board.boot()
        params = _params(env, kind, record)
        job = env.job(kind, params, board.device_id)
        row, spent = _boot_until_final(env, board, job)
        rows.append({"case": f"{kind} update", "status": row.status, "bytes": record.size,
                     "boot_seconds": round(spent, 2)})
    rows.append({"case": "app vs ota", "bytes_ratio": round(rows[1]["bytes"] / rows[0]["bytes"], 1),
                 "time_ratio": round(rows[1]["boot_seconds"] / rows[0]["boot_seconds"], 1)})
    return rows


def ram(env: Env) -> list[dict]:
    rows = []
    bundle = env.bundle("9.9.8")
    image = env.image("v9.3.0", 200_000)
    for kind, record, done in (("ota", image, "ota: booting"), ("app", bundle, "app: trial boot of")):
        board = env.board()
        board.boot()
        params = _params(env, kind, record)
        env.job(kind, params, board.device_id)
        time.sleep(0.5)  # serve publishes the device's queue
        need = heap_needed(board, lambda rec: done in rec.output and "Traceback" not in rec.output,  # noqa: B023 - called before heap_needed returns
                           low=32 * 1024, high=256 * 1024, resolution=1024)
        rows.append({"case": f"ram {kind} job wake", "heap_needed_KiB": round(need / 1024, 1) if need else None,
                     "budget_KiB": 128, "fits": bool(need and need <= 128 * 1024)})
    return rows


def run() -> dict:
    root = Path(tempfile.mkdtemp(prefix="mpfleet-bench-ota-"))
    try:
        with LocalBroker() as broker:
            env = Env(root, broker)
            port = env.cfg.port
            with Dispatcher(env.cfg, root / "db", keys_dir=root / "keys", tick_s=0.1,
                            images_dir=root / "images"):
                rows = throughput(env, port) + disconnects(env, port) + ram(env) + app_vs_ota(env)
            env.store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = [r for r in rows if r["case"].startswith("throughput")]
    default = next(r for r in best if r["case"].endswith(f"window={8}"))
    return {"name": "ota", "rows": rows, "ratio": default["ratio_raw_over_mqtt"],
            "ratio_label": "raw TCP time / MQTT time, window 8 (target >= 0.5)"}


if __name__ == "__main__":
    result = run()
    for r in result["rows"]:
        print(json.dumps(r))
    sys.exit(0)
