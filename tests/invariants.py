"""The device's promises, checked after a run (docs: DESIGN "The device's promises and how they are proven").

One checker, used by the power-loss sweeps (test_promise_powercut.py) and the job
fuzzer (test_promise_fuzz.py). It reads a virtual board and the host side after
a run and returns a list of violations, one clear sentence each (empty: every
promise held):

- nothing unsigned or untargeted ran, and each (kid, seq) ran at most once:
  jobs with a side effect are `exec` jobs whose code appends "<job id>\\n" to
  /trace.txt (see `trace_code`); every line there must be a valid job for this
  device, no line twice and no (kid, seq) twice; no SUCCEEDED, FAILED or
  IN_PROGRESS was reported for anything that was not a validly signed job
  targeting this device; at most one distinct final status per job (a final
  status re-sent identically, the same (status, attempt), is one);
- no crash escaped: no "Traceback" in any boot, no exit other than deep sleep
  or reset (a power cut only where one was scheduled), no /last_crash.txt;
- samples: the seqs the host store holds for the device are contiguous from
  its first (empty records, which stand for samples lost with RTC memory,
  count as present), and every sample taken in a clean boot since the last
  power-on is on the host (a reused seq shows as one missing);
- reachable with last-good settings: with no more cuts, within a few wakes a
  fresh state message from the device reaches the Store;
- flash erases of the filesystem per wake stay within a bound.

`Run` boots a board and records what the checker needs (outputs, exit reasons,
erases per boot, where cuts were scheduled); `HostLog` is the host-side ear on
the broker (job statuses and state messages of every device, in arrival order).
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

FINAL = ("SUCCEEDED", "FAILED", "REJECTED")
# Statuses that say a job started or ended by running: only a validly signed,
# targeted job may ever have one.
RAN = ("SUCCEEDED", "FAILED", "IN_PROGRESS")
CLEAN_EXITS = ("deepsleep", "reset")
TRACE_PATH = "/trace.txt"
CRASH_PATH = "/last_crash.txt"


def trace_code(job_id: str) -> str:
    """The code of an `exec` job whose only side effect is one line in /trace.txt."""
    return "with open(%r, 'a') as f:\n    f.write(%r)\n" % (TRACE_PATH, job_id + "\n")


# ---------------------------------------------------------------- host side
class HostLog:
    """Job statuses and state messages of every device, as the broker delivers
    them (mpf/v1/+/jobs/status, mpf/v1/+/state), plus a publisher for queues."""

    def __init__(self, broker, client_id: str = "promise-hostlog"):
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self.statuses: dict[str, list[dict]] = {}
        self.states: dict[str, list[dict]] = {}
        self._marks: set[str] = set()
        self._mark_n = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([("mpf/v1/+/jobs/status", 1), ("mpf/v1/+/state", 1),
                               (f"promise/{client_id}/mark", 1)])
        self._mark_topic = f"promise/{client_id}/mark"
        self.client.loop_start()
        self.flush()

    def _on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        with self._lock:
            if msg.topic == self._mark_topic:
                self._marks.add(msg.payload.decode())
                return
            try:
                data = json.loads(msg.payload)
            except ValueError:
                data = {"unreadable": msg.payload[:200].decode(errors="replace")}
            if parts[-1] == "status":
                self.statuses.setdefault(parts[2], []).append(data)
            elif parts[-1] == "state" and not msg.retain:
                self.states.setdefault(parts[2], []).append(data)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Return once everything the broker received before now has reached us
        (mosquitto delivers in the order it received: a marker we publish comes
        back after the device's earlier messages)."""
        self._mark_n += 1
        mark = str(self._mark_n)
        self.client.publish(self._mark_topic, mark, qos=1).wait_for_publish(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if mark in self._marks:
                    return
            time.sleep(0.002)

    def publish_queue(self, device_id: str, payload: str | bytes) -> None:
        """The device's retained job queue (a JSON text, or anything at all)."""
        self.client.publish(f"mpf/v1/{device_id}/jobs", payload, qos=1, retain=True).wait_for_publish(5)

    def clear_queue(self, device_id: str) -> None:
        self.client.publish(f"mpf/v1/{device_id}/jobs", b"", qos=1, retain=True).wait_for_publish(5)

    def statuses_of(self, device_id: str) -> list[dict]:
        with self._lock:
            return list(self.statuses.get(device_id, []))

    def states_of(self, device_id: str) -> list[dict]:
        with self._lock:
            return list(self.states.get(device_id, []))

    def final(self, device_id: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for s in self.statuses_of(device_id):
            if isinstance(s, dict) and s.get("status") in FINAL:
                out.setdefault(str(s.get("job")), []).append(s)
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------- device side
@dataclass
class Boot:
    record: object  # mpfleet.sim.BootRecord
    cut_scheduled: bool
    vfs_erases: int
    ops: int
    clean_sample: bool  # a clean boot: its sample must reach the host


@dataclass
class Run:
    """Boots of one board, with what the checker needs to know about each.

    `since_clock` is the device clock from which every sample taken in a clean
    boot must reach the host: the start of the run, moved to the power-on after
    each cut (power comes back `gap_s` later than the cut, so that a sample taken
    in the cut boot and one taken after power-on never share a second)."""

    vb: object
    since_clock: float = 0.0
    boots: list[Boot] = field(default_factory=list)
    gap_s: float = 5.0

    def __post_init__(self):
        if not self.since_clock:
            self.since_clock = self.vb.clock_s

    def boot(self, cut_after_ops: int | None = None, seed: int | None = None) -> Boot:
        """One boot; with `cut_after_ops` the power fails at that flash operation
        of this boot (and not later: a cut that did not come is cancelled)."""
        vb = self.vb
        before = vb.counters()
        if cut_after_ops is not None:
            vb.schedule_power_cut(after_ops=cut_after_ops, seed=seed)
        rec = vb.boot()
        after = vb.counters()
        if vb.state.get("cut_after_ops") is not None:
            vb.state["cut_after_ops"] = None
            vb.save()
        b = Boot(rec, cut_after_ops is not None, after["vfs"]["erases"] - before["vfs"]["erases"],
                 after["ops"] - before["ops"], rec.exit_reason in CLEAN_EXITS)
        self.boots.append(b)
        if rec.exit_reason == "power_cut":
            self.power_on()
        return b

    def power_on(self) -> None:
        self.since_clock = self.vb.clock_s + self.gap_s
        for b in self.boots:
            b.clean_sample = False  # what was staged in RTC memory went with the power
        self.vb.power_on(clock_s=self.since_clock)

    def outputs(self) -> str:
        return "".join(b.record.output for b in self.boots)


def read_files(vb, paths) -> dict[str, bytes | None]:
    """Several files from the device's LittleFS in one go ({path: bytes or None})."""
    lines = []
    for i, path in enumerate(paths):
        lines += ["try:", f"    src = open({path!r}, 'rb')", "except OSError:", "    src = None",
                  "if src is not None:", f"    with open('/.host/out/f{i}', 'wb') as dst:",
                  "        dst.write(src.read())", "    src.close()"]
    _, results = vb.exec_script("\n".join(lines) + "\n")
    return {path: results.get(f"f{i}") for i, path in enumerate(paths)}


# ---------------------------------------------------------------- the checks
def _short(text, n=160) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "..."


def check_runs(trace: bytes | None, runnable: dict[str, tuple[str, int]]) -> list[str]:
    """/trace.txt holds only valid jobs for this device, each once, each (kid, seq) once.

    `runnable`: {job id: (kid, seq)} of every job validly signed by a trusted key,
    targeting this device and well-formed (the only ones that may run)."""
    out = []
    lines = (trace or b"").decode(errors="replace").split("\n")
    seen: dict[str, int] = {}
    by_seq: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if not line:
            continue
        seen[line] = seen.get(line, 0) + 1
        if line not in runnable:
            out.append(f"ran: {line!r} ran but it is not a valid signed job for this device")
        else:
            by_seq.setdefault(runnable[line], []).append(line)
    for job, n in seen.items():
        if n > 1:
            out.append(f"at most once: exec job {job!r} ran {n} times")
    for (kid, seq), jobs in by_seq.items():
        if len(set(jobs)) > 1:
            out.append(f"at most once: (kid {kid}, seq {seq}) ran as {len(set(jobs))} different jobs: "
                       f"{sorted(set(jobs))}")
    return out


def check_statuses(statuses: list[dict], signed: set[str]) -> list[str]:
    """No running status for anything but a validly signed, targeted job; one final status per job.

    `signed`: ids of every envelope validly signed by a trusted key and targeting
    this device (well-formed or not)."""
    out = []
    finals: dict[str, set] = {}
    for s in statuses:
        if not isinstance(s, dict):
            out.append(f"status: unreadable status message {_short(s)}")
            continue
        job, status = s.get("job"), s.get("status")
        if status in RAN and job not in signed:
            out.append(f"ran: {status} reported for {job!r}, which is not a validly signed job for this device")
        if status in FINAL:
            finals.setdefault(str(job), set()).add((status, json.dumps(s.get("attempt"))))
    for job, kinds in finals.items():
        if len(kinds) > 1:
            out.append(f"one final status: job {job!r} ended {len(kinds)} ways: {sorted(kinds)}")
    return out


def check_crashes(run: Run, last_crash: bytes | None) -> list[str]:
    out = []
    for b in run.boots:
        rec = b.record
        if "Traceback" in rec.output:
            tail = rec.output[rec.output.rfind("Traceback"):].strip().splitlines()
            out.append(f"crash: boot {rec.index} raised {_short(tail[-1] if tail else '?')}")
        allowed = CLEAN_EXITS + (("power_cut",) if b.cut_scheduled else ())
        if rec.exit_reason not in allowed:
            out.append(f"crash: boot {rec.index} ended {rec.exit_reason!r} ({_short(rec.detail)})")
    if last_crash is not None:
        out.append(f"crash: /last_crash.txt says {_short(last_crash.decode(errors='replace'))}")
    return out


def check_samples(run: Run, store, device_id: str, dropped: int = 0) -> list[str]:
    """The host's seqs are contiguous from its first; each clean boot's sample got there."""
    out = []
    rows = list(store.samples(device_id))
    seqs = [r[1] for r in rows]
    if len(seqs) != len(set(seqs)):
        out.append(f"samples: seqs stored twice for {device_id}")
    if seqs:
        first, last = min(seqs), max(seqs)
        missing = sorted(set(range(first, last + 1)) - set(seqs))
        if missing:
            out.append(f"samples: {len(missing)} seqs missing on the host between {first} and {last}: "
                       f"{_short(missing, 80)}")
    taken = sum(1 for b in run.boots if b.clean_sample)
    since = int(run.since_clock)
    held = sum(1 for r in rows if r[2] >= since and r[3] and any(v is not None for v in r[3]))
    if held + dropped < taken:
        out.append(f"samples: {taken} clean boots since clock {since} took a sample each, the host holds "
                   f"{held} from then (a seq lost or reused)")
    return out


def check_reachable(run: Run, hostlog: HostLog, store, device_id: str, max_wakes: int = 8) -> list[str]:
    """With no more cuts the device reaches its broker within `max_wakes` wakes: a
    state message newer than now arrives (boots it until then)."""
    t0 = int(run.vb.clock_s)
    for _ in range(max_wakes):
        run.boot()
        hostlog.flush()
        if any(isinstance(s, dict) and isinstance(s.get("time"), (int, float)) and s["time"] >= t0
               for s in hostlog.states_of(device_id)):
            break
    else:
        last = run.boots[-1].record.output.strip().splitlines()[-3:] if run.boots else []
        return [f"reachable: no state from {device_id} within {max_wakes} wakes after the run "
                f"(last output: {_short(' | '.join(last), 240)})"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        dev = store.device(device_id)
        state = dev["state"] if dev else None
        if state and isinstance(state.get("time"), (int, float)) and state["time"] >= t0:
            return []
        time.sleep(0.02)
    return [f"reachable: the device published a state but the Store has none newer than {t0}"]


def check_erases(run: Run, bound: int) -> list[str]:
    worst = max(run.boots, key=lambda b: b.vfs_erases, default=None)
    if worst is not None and worst.vfs_erases > bound:
        return [f"wear: boot {worst.record.index} erased {worst.vfs_erases} filesystem blocks "
                f"(bound {bound} per wake)"]
    return []


def check_all(run: Run, hostlog: HostLog, store, device_id: str, runnable: dict[str, tuple[str, int]],
              signed: set[str], erase_bound: int, max_wakes: int = 8, extra_statuses=(),
              reach: bool = True) -> list[str]:
    """Every invariant, in one list. Boots the device (reachability) unless `reach` is False;
    `extra_statuses` are statuses the same job history reported under another id (a snapshot's)."""
    out = []
    if reach:
        out += check_reachable(run, hostlog, store, device_id, max_wakes)
    hostlog.flush()
    files = read_files(run.vb, [TRACE_PATH, CRASH_PATH])
    out += check_runs(files[TRACE_PATH], runnable)
    out += check_statuses(list(extra_statuses) + hostlog.statuses_of(device_id), signed)
    out += check_crashes(run, files[CRASH_PATH])
    dev = store.device(device_id)
    dropped = (dev or {}).get("state") or {}
    out += check_samples(run, store, device_id, dropped=int(dropped.get("dropped") or 0))
    out += check_erases(run, erase_bound)
    return out


@contextmanager
def watched_host(broker, root, name: str):
    """A promise test's host side: an ingesting Host on `root`/host.db and a HostLog of
    every status and state, both named for the test (`name`) and closed after it."""
    from agent_harness import Host

    host = Host(broker, root / "host.db", client_id=f"ingest-{name}").start()
    log = HostLog(broker, client_id=f"hostlog-{name}")
    try:
        yield host, log
    finally:
        log.close()
        host.close()
