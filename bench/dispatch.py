"""A config job rolled out to a fleet of awake virtual devices through `mpfleet serve`
and real mosquitto, end to end: provisioning, the job's wall time, the dispatcher's
CPU per device execution and its memory.

The dispatcher runs as its own process (`mpfleet serve`, as deployed), so its CPU
time and peak RSS are its own; the devices (forked MicroPython processes) and
mosquitto share the same 2 cores.

Same-run comparison: a device learns of its job only when it wakes, so no
dispatcher can do better than one wake per device; the ratio is the device wakes
during the job per execution (1.0 = every device ran the job on its first wake
after it was queued). Also reported: the job's wall time against the fleet's wake
cycle measured just before the job (N / wakes per second). For scale, AWS IoT Jobs
rolls out at most 1000 devices per minute.

    .venv/bin/python bench/dispatch.py [DEVICES]        # default 1000
    run() -> {"name": "dispatch", "rows": [...]}
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpfleet.broker.local import LocalBroker
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import parse_broker_url
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.sim.fleet import AWAKE_CONFIG, FleetRunner, provision_sim_fleet
from mpfleet.db.store import Store

DEVICES = int(os.environ.get("MPFLEET_BENCH_DEVICES", "1000"))
TARGET_S = 60.0


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def _start_serve(broker_url: str, db: Path, keys: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mpfleet", "serve", "--broker", broker_url, "--db", str(db),
           "--keys-dir", str(keys), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if b"serving" in log.read_bytes():
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"mpfleet serve exited: {log.read_text()}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mpfleet serve did not start within 30 s")


def run(devices: int = DEVICES) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mpfleet-bench-dispatch-"))
    rows = []
    with LocalBroker() as broker:
        cfg = parse_broker_url(broker.url)
        db, keys = tmp / "mpfleet.db", tmp / "keys"
        store = Store(db)
        ring = KeyRing(store, keys)
        ring.init()
        started = time.perf_counter()
        boards = provision_sim_fleet(store, ring, tmp / "fleet", devices, cfg, with_credentials=False,
                                     config_overrides=AWAKE_CONFIG)
        provision_s = time.perf_counter() - started
        serve = _start_serve(broker.url, db, keys, tmp / "serve.log")
        try:
            engine = RolloutEngine(store, ring, Registry(store))
            with FleetRunner(boards, keep_starts=False) as runner:
                # Steady state first: every device has booted (and reported) at least once.
                runner.wait_until(lambda s: s["boots_per_device_min"] >= 1, timeout=300)
                b0, t0 = runner.stats()["boots"], time.monotonic()
                time.sleep(5)
                wake_rate = (runner.stats()["boots"] - b0) / (time.monotonic() - t0)
                cycle_s = devices / wake_rate

                cpu0, boots0 = _proc_cpu_s(serve.pid), runner.stats()["boots"]
                t_job = time.monotonic()
                job = engine.create_job("config", {"set": {"upload_watermark": 400}}, "*", job_id="bench-config")
                status = engine.job_status(job)
                while status.status == "ACTIVE" and time.monotonic() - t_job < 300:
                    time.sleep(0.2)
                    status = engine.job_status(job)
                job_s = time.monotonic() - t_job
                serve_cpu = _proc_cpu_s(serve.pid) - cpu0
                boots = runner.stats()["boots"] - boots0
                peak_kib = _proc_peak_rss_kib(serve.pid)
                fleet = runner.stats()
        finally:
            serve.terminate()
            serve.wait(timeout=30)
        store.close()
    ok = status.counts["SUCCEEDED"]
    rows.append({"measure": "provisioning", "value": f"{provision_s:.1f} s",
                 "detail": f"{provision_s / devices * 1000:.1f} ms per device"})
    rows.append({"measure": "fleet wake cycle before the job", "value": f"{cycle_s:.1f} s",
                 "detail": f"{wake_rate:.1f} wakes/s"})
    rows.append({"measure": "config job, create to all final", "value": f"{job_s:.1f} s",
                 "detail": f"{ok}/{devices} SUCCEEDED, job {status.status}, target <= {TARGET_S:.0f} s"})
    rows.append({"measure": "device wakes per execution", "value": f"{boots / max(ok, 1):.2f}",
                 "detail": "1.0 = every device ran the job on its first wake after it was queued"})
    rows.append({"measure": "job time / wake cycle", "value": f"{job_s / cycle_s:.2f}",
                 "detail": "a wake that verifies and runs a job costs the simulation more than a plain one"})
    rows.append({"measure": "serve CPU per device execution", "value": f"{serve_cpu / max(ok, 1) * 1000:.2f} ms",
                 "detail": f"{serve_cpu:.1f} s CPU over the job, {boots} device wakes handled"})
    rows.append({"measure": "serve peak memory (VmHWM)", "value": f"{peak_kib / 1024:.1f} MiB", "detail": ""})
    return {"name": "dispatch", "devices": devices, "provision_s": round(provision_s, 2),
            "cycle_s": round(cycle_s, 2), "job_s": round(job_s, 2), "succeeded": ok,
            "job_status": status.status, "serve_cpu_s": round(serve_cpu, 2),
            "serve_cpu_per_execution_ms": round(serve_cpu / max(ok, 1) * 1000, 3),
            "serve_peak_rss_kib": peak_kib, "wakes_during_job": boots, "fleet": {
                k: fleet[k] for k in ("boots", "boots_per_s", "mean_boot_s", "exit_reasons", "stopped", "errors")},
            "ratio": round(boots / max(ok, 1), 3),
            "ratio_label": "device wakes per execution (ideal 1.0: each device ran the job on its first wake)",
            "job_over_cycle": round(job_s / cycle_s, 2), "target_met": ok == devices and job_s <= TARGET_S,
            "rows": rows}


if __name__ == "__main__":
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else DEVICES)
    for row in result["rows"]:
        print(f"{row['measure']:40s} {row['value']:>10s}  {row['detail']}")
