"""How far one `mpfleet serve` goes: one config job to N protocol-level devices
(mpfleet.sim.load, docs/sim-load.md), N = 10,000 by default, 100,000 to find the
edge, through real mosquitto, timed from the job's creation to the last final status
committed.

Processes, all on the same cores: mosquitto (mpfleet.broker.local.LocalBroker, its own
port), `mpfleet serve` (a subprocess with `--db` given, so its CPU time and peak RSS are
its own, read from /proc), and one LoadFleet process per FLEET_PER_PROCESS devices
waking every `interval` seconds. The bench itself only provisions, creates the job and
polls the database.

Checked, not only timed: N executions, each SUCCEEDED once at attempt 1; every sample
the fleet took committed once (no hole, no duplicate); the fleet's statuses match.

Same-run comparison (the ratio): the broker's own ceiling for the same message
pattern. Per device a job costs serve's side of the wire six messages (its retained
queue, the device's state, one sample frame and serve's retained ack, IN_PROGRESS and
the final status); a raw asyncio publisher and subscriber push that many messages of
those sizes, QoS 1, through the same mosquitto, as fast as it takes them. The ratio is
serve's messages per second during the job over that ceiling.

A second run with the fleet's samples off (same N) splits serve's CPU: what the
samples cost, and what the job's own messages (the queues, the statuses) and the
states cost.

    .venv/bin/python bench/scale.py [DEVICES] [--interval S] [--no-samples-run] [--profile]
    MPFLEET_BENCH_SCALE=100000 .venv/bin/python bench/run.py scale
    run() -> {"name": "scale", "rows": [...]}

`--profile` runs serve under cProfile (every thread, one .prof each, in the run's
directory) and prints the top functions of its worker thread.

`run_case(db_url, workers)` takes a database URL: a path (SQLite) today; a
postgresql:// URL is tried and, when `mpfleet serve` cannot open it, recorded as not
available with serve's own reason. `workers` is the number of serve processes (1 today).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEVICES = int(os.environ.get("MPFLEET_BENCH_SCALE", "10000"))
FLEET_PER_PROCESS = 5000
TARGET_CPU_MS = 1.0          # dispatcher CPU per execution
TARGET_100K_S = 120.0        # 100,000 devices, create to all final
JOB_TIMEOUT_S = 900.0
MESSAGES_PER_DEVICE = 6      # queue, state, frame, ack, IN_PROGRESS, final status
PREFIX = "sc"
BENCH = Path(__file__).resolve()


# ---------------------------------------------------------------- /proc
def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------- the load fleet process
def fleet_worker(config_path: str) -> int:
    """One LoadFleet (a slice of the provisioned ids) until SIGTERM; its stats to
    config["stats"] every second and at the end (with per-device totals)."""
    import mpfleet.sim.load as load

    cfg = json.loads(Path(config_path).read_text())
    if not cfg["states"]:
        class NoStateMqtt(load.MiniMqtt):
            async def publish(self, name, payload, qos=1, retain=False, timeout=5.0):
                if name.endswith("/state"):
                    return
                await super().publish(name, payload, qos, retain, timeout)
        load.MiniMqtt = NoStateMqtt

    class Device(load.LoadDevice):
        def take_sample(self, now: int) -> None:
            if cfg["samples"]:
                super().take_sample(now)

    ids = load.device_ids(cfg["total"], cfg["prefix"])[cfg["start"]:cfg["start"] + cfg["count"]]
    devices = [Device(d, cfg["trusted"]) for d in ids]
    fleet = load.LoadFleet(devices, cfg["host"], cfg["port"], interval_s=cfg["interval"], jitter_s=cfg["jitter"],
                           seed=cfg["seed"], concurrency=cfg["concurrency"])
    out = Path(cfg["stats"])

    def write(final: bool = False) -> None:
        s = fleet.stats.to_json()
        s["woken"] = sum(1 for d in devices if d.wakes)
        s["statuses_sent"] = sum(fleet.stats.statuses.values()) + fleet.stats.duplicates_sent
        s["cpu_s"] = time.process_time()
        if final:
            job = cfg["job"]
            runs = [sum(1 for r in d.ran if r[0] == job) for d in devices]
            s["job_runs"] = {"once": runs.count(1), "more": sum(1 for n in runs if n > 1),
                             "never": runs.count(0),
                             "succeeded": sum(1 for d in devices for r in d.ran
                                              if r[0] == job and r[1] == "SUCCEEDED" and r[2] == 1)}
            s["samples_taken"] = sum(d.next_seq - 1 for d in devices)
            s["samples_unacked"] = sum(len(d.backlog) for d in devices)
            s["final"] = True
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(s))
        tmp.replace(out)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)

        async def report():
            while not stop.is_set():
                write()
                await asyncio.sleep(1.0)
        reporter = asyncio.ensure_future(report())
        await fleet.run(None, stop)
        reporter.cancel()

    asyncio.run(main())
    write(final=True)
    return 0


class Fleets:
    """The LoadFleet processes of one case."""

    def __init__(self, tmp: Path, host: str, port: int, total: int, trusted: dict, interval: float,
                 samples: bool, states: bool, job: str):
        self.procs, self.stats_paths = [], []
        parts = max(1, -(-total // FLEET_PER_PROCESS))
        per = -(-total // parts)
        for i in range(parts):
            start = i * per
            count = min(per, total - start)
            stats = tmp / f"fleet-{i}.json"
            cfg = {"host": host, "port": port, "prefix": PREFIX, "total": total, "start": start, "count": count,
                   "trusted": trusted, "interval": interval, "jitter": interval / 10, "seed": 1000 + i,
                   "concurrency": 512, "samples": samples, "states": states, "stats": str(stats), "job": job}
            path = tmp / f"fleet-{i}.cfg.json"
            path.write_text(json.dumps(cfg))
            log = open(tmp / f"fleet-{i}.log", "wb")
            self.procs.append(subprocess.Popen([sys.executable, str(BENCH), "--fleet-worker", str(path)],
                                               stdout=log, stderr=subprocess.STDOUT))
            self.stats_paths.append(stats)

    def stats(self) -> list[dict]:
        out = []
        for p in self.stats_paths:
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                out.append({})
        return out

    def total(self, key: str) -> int:
        return sum(s.get(key, 0) or 0 for s in self.stats())

    def stop(self) -> list[dict]:
        _terminate(self.procs, 60)
        return self.stats()


def _terminate(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM to each process still running, then wait; SIGKILL what is still there."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ---------------------------------------------------------------- serve
def _serve_cmd(broker_url: str, db_url: str, keys: Path, profile_dir: Path | None,
               worker: str | None = None) -> list[str]:
    args = ["serve", "--broker", broker_url, "--db", db_url, "--keys-dir", str(keys), "--quiet",
            *(("--worker", worker) if worker else ())]
    if profile_dir is None:
        return [sys.executable, "-m", "mpfleet", *args]
    return [sys.executable, str(BENCH), "--profiled-serve", str(profile_dir), *args]


def profiled_serve(profile_dir: str, args: list[str]) -> None:
    """`mpfleet serve` with every thread under cProfile, timed by the thread's own CPU
    clock (waits for the GIL, the inbox or the socket count nothing): one
    <thread name>.prof each."""
    import cProfile
    import runpy
    import threading

    original = threading.Thread.run

    def run(self):
        prof = cProfile.Profile(time.thread_time)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()
            prof.dump_stats(str(Path(profile_dir) / f"{self.name}.prof"))

    threading.Thread.run = run
    sys.argv = ["mpfleet", *args]
    runpy.run_module("mpfleet", run_name="__main__")


def _env(tmp: Path) -> dict:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    return dict(os.environ, HOME=str(home), MPFLEET_HOME=str(home / ".mpfleet"))


def start_serve(broker_url: str, db_url: str, keys: Path, tmp: Path, profile_dir: Path | None = None,
                timeout_s: float = 60, worker: str | None = None) -> subprocess.Popen:
    log = tmp / (f"serve-{worker}.log" if worker else "serve.log")
    proc = subprocess.Popen(_serve_cmd(broker_url, db_url, keys, profile_dir, worker), stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, cwd=tmp, env=_env(tmp))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if b"serving" in log.read_bytes():
            return proc
        if proc.poll() is not None:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            raise NotAvailable(lines[-1] if lines else f"mpfleet serve exited {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise NotAvailable(f"mpfleet serve did not start within {timeout_s:.0f} s")


class Serves:
    """The serve processes of one case (one on SQLite; `workers` on PostgreSQL), measured
    together: CPU and memory are their sums."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs

    @classmethod
    def start(cls, broker_url: str, db_url: str, keys: Path, tmp: Path, workers: int,
              profile_dir: Path | None = None, timeout_s: float = 60) -> "Serves":
        if workers == 1 and "://" not in db_url:
            return cls([start_serve(broker_url, db_url, keys, tmp, profile_dir, timeout_s)])
        procs: list[subprocess.Popen] = []
        try:
            for i in range(workers):
                procs.append(start_serve(broker_url, db_url, keys, tmp, profile_dir, timeout_s, worker=f"w{i + 1}"))
        except BaseException:
            cls(procs).stop()
            raise
        return cls(procs)

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(p.pid) for p in self.procs)

    def kib(self, key: str) -> int:
        return sum(_proc_kib(p.pid, key) for p in self.procs)

    def poll(self):
        """None while every process runs, else the first exit code."""
        return next((p.poll() for p in self.procs if p.poll() is not None), None)

    def stop(self) -> None:
        _terminate(self.procs, 120)


class NotAvailable(Exception):
    """A case that cannot run here: its one-line reason."""


# ---------------------------------------------------------------- the database, read
class Counts:
    """What the bench reads back (its own connection, read only)."""

    def __init__(self, db_url: str):
        if "://" in db_url:
            import psycopg  # a PostgreSQL URL: only once serve accepted it

            self.db = psycopg.connect(db_url, autocommit=True)
            self.q = lambda sql: sql.replace("?", "%s")
        else:
            self.db = sqlite3.connect(f"file:{db_url}?mode=ro", uri=True, timeout=30)
            self.q = lambda sql: sql

    def one(self, sql: str, *args):
        return self.db.execute(self.q(sql), args).fetchone()

    def all(self, sql: str, *args):
        return self.db.execute(self.q(sql), args).fetchall()

    def final(self, job: str) -> int:
        return self.one("SELECT COUNT(*) FROM executions WHERE job = ? AND status IN "
                        "('SUCCEEDED', 'FAILED', 'REJECTED', 'TIMED_OUT', 'CANCELED')", job)[0]

    def samples(self) -> int:
        return self.one("SELECT COUNT(*) FROM samples")[0]

    def close(self) -> None:
        self.db.close()


# ---------------------------------------------------------------- one case
def _interval_for(devices: int) -> float:
    """Short enough that the job spreads in about one interval, long enough that the
    fleet's steady wakes before the job do not saturate the two cores."""
    return float(max(10, devices // 250))


def _own_folder(case):
    """`case` run in a folder of its own (the database, keys, logs: hundreds of MB at
    100,000 devices) that goes when it ends, unless the caller gave one (tmp=...)."""
    import functools
    import shutil

    @functools.wraps(case)
    def run(*args, tmp: Path | None = None, **kwargs):
        if tmp is not None:
            return case(*args, tmp=tmp, **kwargs)
        folder = Path(tempfile.mkdtemp(prefix=f"mpfleet-bench-{case.__name__}-"))
        try:
            return case(*args, tmp=folder, **kwargs)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return run


@_own_folder
def run_case(db_url: str | None = None, workers: int = 1, devices: int = DEVICES, *, interval: float | None = None,
             samples: bool = True, states: bool = True, profile: bool = False, broker=None,
             tmp: Path | None = None) -> dict:
    """One config job to `devices` load devices through `workers` serve processes on
    the database `db_url` (None: a fresh SQLite file). A dict of measurements, or
    {"available": False, "reason": ...}."""
    from mpfleet.db.store import Store
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine
    from mpfleet.sim.load import provision_load_fleet

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpfleet-bench-scale-"))
    db_url = db_url or str(tmp / "mpfleet.db")
    keys = tmp / "keys"
    interval = interval or _interval_for(devices)
    case = {"db": "postgresql" if db_url.startswith("postgres") else "sqlite", "workers": workers,
            "devices": devices, "interval_s": interval, "samples": samples, "states": states}
    if workers != 1 and case["db"] != "postgresql":
        return case | {"available": False, "reason": "several serve workers need PostgreSQL"}
    job = "scale-config"

    serve = None
    if case["db"] == "postgresql":
        # serve first: if it cannot open the URL, that is the case's reason (and the
        # bench's Store is never asked to make a file out of a URL)
        try:
            serve = Serves.start(broker.url, db_url, keys, tmp, workers, timeout_s=20)
        except NotAvailable as e:
            return case | {"available": False, "reason": str(e)}
    started = time.perf_counter()
    try:
        store = Store(db_url)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        if serve is not None:
            serve.stop()
        return case | {"available": False, "reason": f"{type(e).__name__}: {e}"}
    ring = KeyRing(store, keys)
    ring.init()
    provision_load_fleet(store, ring, devices, prefix=PREFIX)
    provision_s = time.perf_counter() - started
    trusted = ring.trusted_keys()
    engine = RolloutEngine(store, ring, Registry(store))
    profile_dir = tmp / "profile" if profile else None
    if profile_dir:
        profile_dir.mkdir(exist_ok=True)
    if serve is None:
        try:
            serve = Serves.start(broker.url, db_url, keys, tmp, workers, profile_dir)
        except NotAvailable as e:
            store.close()
            return case | {"available": False, "reason": str(e)}
    fleets = counts = None
    try:
        counts = Counts(db_url)
        rss_start = serve.kib("VmRSS")
        fleets = Fleets(tmp, broker.host, broker.port, devices, trusted, interval, samples, states, job)
        # every device has woken (state and samples reported) once: the host knows the fleet
        deadline = time.monotonic() + max(120.0, 3 * interval)
        while fleets.total("woken") < devices and time.monotonic() < deadline:
            time.sleep(0.5)
        woken = fleets.total("woken")
        time.sleep(2)  # serve catches up with the first round
        wakes0, frames0, sent0 = fleets.total("wakes"), fleets.total("frames"), fleets.total("samples_sent")
        statuses0 = fleets.total("statuses_sent")
        samples0 = counts.samples()
        cpu0 = serve.cpu_s()
        t0 = time.monotonic()
        engine.create_job("config", {"set": {"sample_interval_s": 30}}, "*", job_id=job)
        done, progress = 0, []
        while time.monotonic() - t0 < JOB_TIMEOUT_S:
            done = counts.final(job)
            progress.append((round(time.monotonic() - t0, 1), done))
            if done >= devices or serve.poll() is not None:
                break
            time.sleep(0.25)
        job_s = time.monotonic() - t0
        serve_cpu = serve.cpu_s() - cpu0
        samples_job = counts.samples() - samples0
        wakes = fleets.total("wakes") - wakes0
        frames = fleets.total("frames") - frames0
        sent = fleets.total("samples_sent") - sent0
        statuses_sent = fleets.total("statuses_sent") - statuses0
        peak_kib = serve.kib("VmHWM")
        fleet_cpu = sum(s.get("cpu_s", 0) for s in fleets.stats())
        final_stats = fleets.stop()
        fleets = None
        # serve works through what it holds (its inbox, the broker's queue for its session)
        last, still = -1, time.monotonic()
        drain_deadline = time.monotonic() + 300
        while time.monotonic() < drain_deadline and serve.poll() is None:
            n = counts.samples()
            if n != last:
                last, still = n, time.monotonic()
            elif time.monotonic() - still >= 10:
                break
            time.sleep(0.5)
        drain_s = time.monotonic() - t0 - job_s
        serve_alive = serve.poll() is None
    finally:
        if fleets is not None:
            fleets.stop()
        serve.stop()
        store.close()
        if counts is not None and sys.exc_info()[0] is not None:
            counts.close()

    # ---- nothing lost
    rows = counts.all("SELECT status, device_attempt, COUNT(*) FROM executions WHERE job = ? "
                      "GROUP BY status, device_attempt", job)
    per_device = counts.one("SELECT COUNT(DISTINCT device), COUNT(*) FROM executions WHERE job = ?", job)
    succeeded_once = sum(n for s, a, n in rows if s == "SUCCEEDED" and a == 1)
    committed = counts.samples()
    holes = counts.one("SELECT COUNT(*) FROM (SELECT device FROM samples GROUP BY device "
                       "HAVING COUNT(*) != COUNT(DISTINCT seq) OR COUNT(*) != MAX(seq)) AS odd")[0]
    counts.close()
    taken = sum(s.get("samples_taken", 0) for s in final_stats)
    unacked = sum(s.get("samples_unacked", 0) for s in final_stats)
    runs = {k: sum(s.get("job_runs", {}).get(k, 0) for s in final_stats)
            for k in ("once", "more", "never", "succeeded")}
    fleet_statuses: dict = {}
    for s in final_stats:
        for k, v in s.get("statuses", {}).items():
            fleet_statuses[k] = fleet_statuses.get(k, 0) + v
    errors: dict = {}
    for s in final_stats:
        for k, v in s.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    complete = done >= devices
    lost_ok = (complete and per_device == (devices, devices) and succeeded_once == devices
               and runs["once"] == devices and committed == taken and holes == 0)
    result = case | {
        "available": True, "provision_s": round(provision_s, 1), "woken_before_job": woken,
        "job_s": round(job_s, 1), "drain_after_s": round(drain_s, 1), "complete": complete, "final": done,
        "serve_alive": serve_alive,
        "serve_cpu_s": round(serve_cpu, 2),
        "serve_cpu_per_execution_ms": round(serve_cpu / max(done, 1) * 1000, 3),
        "statuses_per_s": round(2 * done / job_s, 1), "executions_per_s": round(done / job_s, 1),
        "samples_committed_during_job": samples_job, "samples_per_s": round(samples_job / job_s, 1),
        "frames_sent_during_job": frames, "frames_per_s": round(frames / job_s, 1),
        "samples_sent_during_job": sent, "wakes_during_job": wakes, "statuses_sent_during_job": statuses_sent,
        "messages_in_during_job": wakes * states + frames + statuses_sent,
        "serve_cpu_per_message_in_ms": round(serve_cpu / max(1, wakes * states + frames + statuses_sent) * 1000, 3),
        "wakes_per_execution": round(wakes / max(done, 1), 2),
        "serve_messages_per_s": round(MESSAGES_PER_DEVICE * done / job_s, 1),
        "serve_rss_start_kib": rss_start, "serve_peak_rss_kib": peak_kib,
        "serve_rss_growth_per_100k_mib": round((peak_kib - rss_start) / 1024 * 100000 / devices, 1),
        "fleet_cpu_s": round(fleet_cpu, 1),
        "check": {"executions": per_device[1], "devices_with_execution": per_device[0],
                  "succeeded_attempt_1": succeeded_once, "by_status_attempt": [list(r) for r in rows],
                  "fleet_runs": runs, "fleet_statuses": fleet_statuses, "samples_taken": taken,
                  "samples_committed": committed, "samples_unacked_at_stop": unacked,
                  "devices_with_sample_holes_or_duplicates": holes, "wake_errors": errors, "ok": lost_ok},
        "progress": progress[:: max(1, len(progress) // 40)],
    }
    if profile_dir:
        result["profile"] = profile_report(profile_dir)
    return result


@_own_folder
def fanout_case(devices: int, broker, tmp: Path | None = None, profile: bool = False) -> dict:
    """The job's fan-out alone, no device awake: from the job's creation until serve
    has every one of the `devices` queues published and confirmed by the broker; serve's
    CPU and memory for it (what one serve does before the first device even wakes)."""
    from mpfleet.db.store import Store
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine
    from mpfleet.sim.load import provision_load_fleet

    tmp = tmp or Path(tempfile.mkdtemp(prefix="mpfleet-bench-fanout-"))
    db_url = str(tmp / "mpfleet.db")
    keys = tmp / "keys"
    started = time.perf_counter()
    store = Store(db_url)
    ring = KeyRing(store, keys)
    ring.init()
    provision_load_fleet(store, ring, devices, prefix=PREFIX)
    provision_s = time.perf_counter() - started
    engine = RolloutEngine(store, ring, Registry(store))
    profile_dir = tmp / "profile" if profile else None
    if profile_dir:
        profile_dir.mkdir(exist_ok=True)
    serve = start_serve(broker.url, db_url, keys, tmp, profile_dir)
    counts = Counts(db_url)
    try:
        time.sleep(2)
        rss_start, cpu0, t0 = _proc_kib(serve.pid, "VmRSS"), _proc_cpu_s(serve.pid), time.monotonic()
        engine.create_job("config", {"set": {"sample_interval_s": 30}}, "*", job_id="scale-fanout")
        queued = confirmed = 0
        first_confirmed = None
        moved, last = time.monotonic(), -1
        progress = []
        while time.monotonic() - t0 < JOB_TIMEOUT_S and serve.poll() is None:
            queued = counts.one("SELECT COUNT(*) FROM executions WHERE job = 'scale-fanout'")[0]
            confirmed = counts.one("SELECT COUNT(*) FROM queue_published WHERE digest != ?",
                                   _empty_digest())[0]
            if confirmed and first_confirmed is None:
                first_confirmed = time.monotonic() - t0
            if queued >= devices and confirmed >= devices:
                break
            if confirmed != last:
                last, moved = confirmed, time.monotonic()
                progress.append((round(moved - t0, 1), confirmed))
            elif time.monotonic() - moved > 60:
                break  # stalled: no confirmation for a minute
            time.sleep(0.25)
        took = time.monotonic() - t0
        cpu = _proc_cpu_s(serve.pid) - cpu0
        peak = _proc_kib(serve.pid, "VmHWM")
    finally:
        counts.close()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=120)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        store.close()
    result = {"devices": devices, "provision_s": round(provision_s, 1), "queued": queued, "confirmed": confirmed,
              "first_confirmed_s": round(first_confirmed, 1) if first_confirmed is not None else None,
              "seconds": round(took, 1), "serve_cpu_s": round(cpu, 2),
              "serve_cpu_per_device_ms": round(cpu / devices * 1000, 3), "serve_rss_start_kib": rss_start,
              "serve_peak_rss_kib": peak, "stalled": confirmed < devices,
              "progress": progress[:: max(1, len(progress) // 30)]}
    if profile_dir:
        result["profile"] = profile_report(profile_dir)
    return result


def _empty_digest() -> str:
    from mpfleet.fleet.serve import EMPTY_QUEUE, queue_digest

    return queue_digest(EMPTY_QUEUE)


def profile_report(profile_dir: Path, top: int = 15) -> dict:
    import io
    import pstats

    out = {}
    for prof in sorted(profile_dir.glob("*.prof")):
        report = {}
        for key in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(str(prof), stream=buf).strip_dirs().sort_stats(key).print_stats(top)
            report[key] = buf.getvalue()
        out[prof.stem] = report
    return out


# ---------------------------------------------------------------- the broker's ceiling
def _sizes(tmp: Path) -> dict[str, int]:
    """Payload sizes of the job's messages, from a real envelope and a load device."""
    from mpfleet.db.store import Store
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.protocol.codec import encode_frame
    from mpfleet.sim.load import SCALES, LoadDevice, _status

    with Store(tmp / "sizes.db") as store:
        ring = KeyRing(store, tmp / "sizes-keys")
        ring.init()
        env = ring.load(ring.active().kid).sign({"id": "scale-config", "seq": 1, "type": "config",
                                                 "params": {"set": {"sample_interval_s": 30}}, "targets": ["*"],
                                                 "iat": int(time.time())})
        dev = LoadDevice(f"{PREFIX}-00001", ring.trusted_keys())
    now = int(time.time())
    frame = encode_frame(dev.id, 2, now, SCALES, [(now, [21, 41])], oldest_seq=2)
    return {"queue": len(json.dumps([env])), "state": len(json.dumps(dev.state(now))), "frame": len(frame),
            "ack": len(json.dumps({"upto": 2})),
            "in_progress": len(json.dumps(_status("scale-config", 1, "IN_PROGRESS"))),
            "final": len(json.dumps(_status("scale-config", 1, "SUCCEEDED", {"applied": ["sample_interval_s"]})))}


def _packet(topic_name: str, payload: bytes, pid: int, retain: bool) -> bytes:
    from mpfleet.sim.load import _remaining_length, _str

    body = _str(topic_name) + pid.to_bytes(2, "big") + payload
    return bytes([0x32 | (1 if retain else 0)]) + _remaining_length(len(body)) + body


async def _ceiling(host: str, port: int, devices: int, sizes: dict[str, int], window: int = 1000) -> dict:
    """A raw publisher and subscriber, QoS 1 both ways, `window` messages in flight:
    MESSAGES_PER_DEVICE x `devices` messages of the job's sizes (retained where serve's
    and the devices' are), timed from the first publish to the last delivery."""
    from mpfleet.sim.load import _remaining_length, _str

    kinds = [("queue", "jobs", True), ("state", "state", True), ("frame", "samples", False),
             ("ack", "samples/ack", True), ("in_progress", "jobs/status", False), ("final", "jobs/status", False)]
    payloads = {k: os.urandom(sizes[k]) for k, _, _ in kinds}
    total = devices * len(kinds)

    async def connect(client_id: str):
        r, w = await asyncio.open_connection(host, port)
        body = _str("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _str(client_id)
        w.write(b"\x10" + _remaining_length(len(body)) + body)
        await r.readexactly(4)
        return r, w

    def packets(buf: bytearray):
        """Complete packets at the front of buf: (first byte, body memoryview); consumed."""
        out, i, n = [], 0, len(buf)
        while i + 2 <= n:
            mult, length, j = 1, 0, i + 1
            while j < n:
                b = buf[j]
                length += (b & 0x7F) * mult
                mult *= 128
                j += 1
                if not b & 0x80:
                    break
            else:
                break
            if j + length > n:
                break
            out.append((buf[i], bytes(buf[j:j + length])))
            i = j + length
        del buf[:i]
        return out

    sr, sw = await connect("ceiling-sub")
    body = (1).to_bytes(2, "big") + _str("ceiling/#") + b"\x01"
    sw.write(b"\x82" + _remaining_length(len(body)) + body)
    await sr.readexactly(5)
    pr, pw = await connect("ceiling-pub")
    received = 0
    done = asyncio.Event()
    room = asyncio.Semaphore(window)

    async def subscriber():
        nonlocal received
        buf = bytearray()
        while received < total:
            chunk = await sr.read(1 << 16)
            if not chunk:
                return
            buf += chunk
            acks = []
            for head, p in packets(buf):
                if head >> 4 == 3:
                    tl = int.from_bytes(p[:2], "big")
                    if (head >> 1) & 3:
                        acks.append(b"\x40\x02" + p[2 + tl:4 + tl])
                    if not head & 1:  # a retained copy from an earlier round is not a delivery
                        received += 1
            sw.write(b"".join(acks))
        done.set()

    async def pubacks():
        buf = bytearray()
        while True:
            chunk = await pr.read(1 << 16)
            if not chunk:
                return
            buf += chunk
            for head, _ in packets(buf):
                if head >> 4 == 4:
                    room.release()

    sub_task, ack_task = asyncio.ensure_future(subscriber()), asyncio.ensure_future(pubacks())
    started = time.perf_counter()
    pid = 0
    for i in range(devices):
        dev = f"ceiling/{PREFIX}-{i:06d}/"
        for kind, leaf, retain in kinds:
            await room.acquire()
            pid = pid % 65535 + 1
            pw.write(_packet(dev + leaf, payloads[kind], pid, retain))
        if i % 64 == 0:
            await pw.drain()
    try:
        await asyncio.wait_for(done.wait(), 300)
    except asyncio.TimeoutError:
        pass
    took = time.perf_counter() - started
    ack_task.cancel()
    for w in (pw, sw):
        w.write(b"\xe0\x00")
        w.close()
    sub_task.cancel()
    return {"messages": total, "received": received, "seconds": round(took, 2),
            "messages_per_s": round(received / took, 1), "bytes_per_device": sum(sizes.values())}


def broker_ceiling(broker, devices: int, tmp: Path) -> dict:
    sizes = _sizes(tmp)
    cpu0 = _proc_cpu_s(broker.process.pid) if getattr(broker, "process", None) else None
    result = asyncio.run(_ceiling(broker.host, broker.port, devices, sizes))
    if cpu0 is not None:
        result["broker_cpu_s"] = round(_proc_cpu_s(broker.process.pid) - cpu0, 2)
    result["sizes"] = sizes
    return result


# ---------------------------------------------------------------- the whole bench
PG_SERVER = os.environ.get("MPFLEET_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def pg_database():
    """A database of the bench's own on PG_SERVER (MPFLEET_BENCH_PG; this project's
    machines run one on 127.0.0.1:5432), dropped afterwards; None where there is no
    server (the PostgreSQL cases then say so)."""
    try:
        import psycopg

        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=3)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        yield None, f"no PostgreSQL at {PG_SERVER}: {str(e).strip().splitlines()[0] if str(e).strip() else e}"
        return
    name = f"mpfleet_bench_{os.getpid()}_{int(time.time())}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_SERVER.rsplit("/", 1)[0] + "/" + name, None
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run(devices: int = DEVICES, interval: float | None = None, samples_run: bool = True,
        profile: bool = False) -> dict:
    from mpfleet.broker.local import LocalBroker

    # a fresh broker per case: no retained ack or queue of one case reaches the next
    cases = []
    with LocalBroker() as broker:
        cases.append(run_case(None, 1, devices, interval=interval, profile=profile, broker=broker))
        # the same mosquitto, holding the job's retained messages, serve and the fleet gone
        with tempfile.TemporaryDirectory(prefix="mpfleet-bench-ceiling-") as folder:
            ceiling = broker_ceiling(broker, devices, Path(folder))
    if samples_run:
        with LocalBroker() as broker:
            cases.append(run_case(None, 1, devices, interval=interval, samples=False, broker=broker))
    for workers in (1, 2):
        with LocalBroker() as broker, pg_database() as (url, why):
            if url is None:
                cases.append({"db": "postgresql", "workers": workers, "available": False, "reason": why})
                continue
            cases.append(run_case(url, workers, devices, interval=interval, broker=broker))
    return report(devices, cases, ceiling)


def report(devices: int, cases: list[dict], ceiling: dict) -> dict:
    main = cases[0]
    rows = []
    if not main.get("available"):
        rows.append({"measure": "sqlite case", "value": "not available", "detail": main.get("reason", "")})
        return {"name": "scale", "devices": devices, "cases": cases, "ceiling": ceiling, "rows": rows}
    ok = main["check"]["ok"]
    cpu_ms = main["serve_cpu_per_execution_ms"]
    rows.append({"measure": "provisioning", "value": f"{main['provision_s']} s",
                 "detail": f"{main['provision_s'] / devices * 1000:.2f} ms per device"})
    need = 100000 / TARGET_100K_S
    rows.append({"measure": "config job, create to all final", "value": f"{main['job_s']} s",
                 "detail": f"{main['final']}/{devices} final, fleet interval {main['interval_s']:.0f} s, "
                           f"{main['wakes_per_execution']} wakes per execution"})
    rows.append({"measure": "executions per s", "value": f"{main['executions_per_s']}",
                 "detail": f"target 100,000 in <= {TARGET_100K_S:.0f} s, i.e. >= {need:.0f}/s: "
                           f"{'met' if main['complete'] and main['executions_per_s'] >= need else 'not met'}"})
    rows.append({"measure": "nothing lost", "value": "yes" if ok else "NO",
                 "detail": f"{main['check']['succeeded_attempt_1']} SUCCEEDED at attempt 1 of "
                           f"{main['check']['executions']} executions; samples committed "
                           f"{main['check']['samples_committed']} of {main['check']['samples_taken']} taken, "
                           f"{main['check']['devices_with_sample_holes_or_duplicates']} devices with holes"})
    rows.append({"measure": "serve CPU per execution", "value": f"{cpu_ms:.2f} ms",
                 "detail": f"{main['serve_cpu_s']} s CPU over the job, samples and states included; "
                           f"target <= {TARGET_CPU_MS:.0f} ms: {'met' if cpu_ms <= TARGET_CPU_MS else 'not met'}; "
                           f"{main['serve_cpu_per_message_in_ms']:.2f} ms per message in"})
    nos = next((c for c in cases[1:] if c.get("available") and not c["samples"]), None)
    if nos:
        rows.append({"measure": "... of it the samples", "value":
                     f"{cpu_ms - nos['serve_cpu_per_execution_ms']:.2f} ms",
                     "detail": f"a run with the fleet's samples off: {nos['serve_cpu_per_execution_ms']:.2f} ms "
                               f"per execution, {nos['serve_cpu_per_message_in_ms']:.2f} ms per message in, "
                               f"{nos['wakes_per_execution']} wakes per execution "
                               f"(job {nos['job_s']} s, check {'ok' if nos['check']['ok'] else 'NO'})"})
    rows.append({"measure": "statuses committed per s", "value": f"{main['statuses_per_s']}",
                 "detail": f"{main['executions_per_s']} executions/s (IN_PROGRESS and final each)"})
    rows.append({"measure": "samples committed per s", "value": f"{main['samples_per_s']}",
                 "detail": f"{main['frames_per_s']} frames/s sent, {main['wakes_per_execution']} wakes/execution"})
    rows.append({"measure": "serve peak RSS (VmHWM)", "value": f"{main['serve_peak_rss_kib'] / 1024:.0f} MiB",
                 "detail": f"{main['serve_rss_start_kib'] / 1024:.0f} MiB at start; the growth is "
                           f"{main['serve_rss_growth_per_100k_mib']:.0f} MiB per 100,000 devices at this size"})
    ratio = main["serve_messages_per_s"] / ceiling["messages_per_s"] if ceiling.get("messages_per_s") else None
    rows.append({"measure": "broker ceiling, same pattern", "value": f"{ceiling['messages_per_s']:.0f} msg/s",
                 "detail": f"{ceiling['received']}/{ceiling['messages']} messages QoS 1 in {ceiling['seconds']} s; "
                           f"serve during the job: {main['serve_messages_per_s']:.0f} msg/s"})
    for c in cases[1:]:
        if not c.get("available"):
            rows.append({"measure": f"{c['db']} x {c.get('workers', 1)} case", "value": "not available",
                         "detail": c["reason"][:160]})
        elif c["db"] == "postgresql":
            rows.append({"measure": f"PostgreSQL x {c['workers']} worker(s)", "value": f"{c['job_s']} s",
                         "detail": f"{c['final']}/{c['devices']} final, {c['executions_per_s']} executions/s, "
                                   f"{c['serve_cpu_per_execution_ms']:.2f} ms CPU per execution (all workers), "
                                   f"peak RSS {c['serve_peak_rss_kib'] / 1024:.0f} MiB (all workers), "
                                   f"{c['wakes_per_execution']} wakes per execution, "
                                   f"check {'ok' if c['check']['ok'] else 'NO'}"})
    return {"name": "scale", "devices": devices, "cases": cases, "ceiling": ceiling,
            "ratio": round(ratio, 3) if ratio else None,
            "ratio_label": "serve's messages/s during the job / the broker's ceiling for the same pattern",
            "target_met": bool(ok and cpu_ms <= TARGET_CPU_MS and main["executions_per_s"] >= need),
            "rows": rows}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--fleet-worker"]:
        return fleet_worker(argv[1])
    # SIGTERM (a timeout, Ctrl-C's cousin) ends the bench through its finally blocks:
    # serve, the fleet processes and mosquitto stop with it
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    if argv[:1] == ["--profiled-serve"]:
        profiled_serve(argv[1], argv[2:])
        return 0
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("devices", nargs="?", type=int, default=DEVICES)
    ap.add_argument("--interval", type=float, help="the fleet's wake interval (default: devices / 250, at least 10 s)")
    ap.add_argument("--no-samples-run", action="store_true", help="skip the second run with samples off")
    ap.add_argument("--profile", action="store_true", help="serve under cProfile in the first run")
    ap.add_argument("--fanout", action="store_true",
                    help="only the job's fan-out to DEVICES queues, no device awake (quick at 100,000)")
    ap.add_argument("--json", help="write the whole result here")
    a = ap.parse_args(argv)
    if a.fanout:
        from mpfleet.broker.local import LocalBroker

        with LocalBroker() as broker:
            result = fanout_case(a.devices, broker, profile=a.profile)
        for thread, rep in result.pop("profile", {}).items():
            print(f"\n==== profile of thread {thread}\n{rep['cumulative']}\n{rep['tottime']}")
        print(json.dumps(result, indent=2))
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2))
        return 0
    result = run(a.devices, a.interval, not a.no_samples_run, a.profile)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    for row in result["rows"]:
        print(f"{row['measure']:34s} {row['value']:>14s}  {row['detail']}")
    if result.get("ratio") is not None:
        print(f"ratio ({result['ratio_label']}): {result['ratio']}")
    prof = result["cases"][0].get("profile")
    if prof:
        for thread, rep in prof.items():
            print(f"\n==== profile of thread {thread}")
            print(rep["cumulative"])
            print(rep["tottime"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
