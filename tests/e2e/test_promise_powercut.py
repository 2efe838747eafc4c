"""Exhaustive power-loss sweeps of the device agent, as littlefs tests itself.

For each kind of wake (sampling, flushing, uploading, and every phase of each job
type with a side effect) a board is brought to the state just before that wake
and snapshotted (the board is a directory: flash, RTC memory, clock and power
state). The wake is run once uncut to count its flash operations N; then for
every k in 1..N the snapshot is restored, power is cut at operation k, power
comes back, the device recovers over a few wakes, and the one invariant
checker (tests/invariants.py) reads the board and the host side.

Each cut point runs as its own device id (config.json rewritten on the restored
board, the queue re-signed for that id), so retained broker state and host
records never leak from one cut point into the next.

`make test` runs a deterministic slice (every cut point of the cheap kinds,
every STRIDE-th of the others' first wake and the last two of every wake);
`make stress` (MPFLEET_STRESS=1) runs every cut point of every kind. The sweep size is printed per kind and
written to $MPFLEET_SWEEP_LOG (JSON lines) when set.

OTA and app updates have their own power-cut sweeps in tests/e2e/test_ota.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from agent_harness import make_device
from conftest import STRESS
from invariants import Run, watched_host, check_all, read_files, trace_code

from mpfleet.protocol.signing import SigningKey
from mpfleet.sim import VirtualBoard

# Filesystem erases of one wake, at most, in any sweep. Observed on the agent of
# December 2026 over the full sweep: 0-2 for almost every wake (sampling,
# uploading, a job's state writes), 7 once (the first recovery wake after a
# cut at the last operation of a Wi-Fi timeout change: littlefs compacting a
# metadata pair). The bound is that worst case plus one.
ERASE_BOUND = 8
# Cheap kinds run every cut point even in `make test`; the others every STRIDE-th.
CHEAP = ("sample", "flush")
STRIDE = 16
RECOVERY_WAKES = 8
LIFE_WAKES = 8  # wakes a job may take from the queue to its reported end


@pytest.fixture(scope="module")
def world(mosquitto, tmp_path_factory):
    root = tmp_path_factory.mktemp("powercut")
    with watched_host(mosquitto, root, "powercut") as (host, log):
        yield mosquitto, host, log, root


@dataclass
class Kind:
    """A kind of wake: the device's config, the wakes before it, and its jobs."""

    name: str
    config: dict = field(default_factory=dict)
    before: int = 2  # wakes before the queue (or the swept wake)
    jobs: list = field(default_factory=list)  # [(type, params, id)] signed in this order
    # For kinds without jobs: which wake after `before` is swept (0 = the next).
    # For kinds with jobs: every wake from the queue to the job's reported end.
    check: object = None  # (config dict, finals) -> list of violations, kind-specific
    board_check: object = None  # (device id, files, finals) -> list of violations, for the files it names
    board_files: tuple = ()

    @property
    def upload_every(self) -> int:
        return self.config.get("upload_every_wakes", 1)


def _config_follows_status(path, value, job_id):
    def check(cfg, finals):
        got = cfg
        for part in path.split("."):
            got = got.get(part) if isinstance(got, dict) else None
        status = sorted({s["status"] for s in finals.get(job_id, [])})
        if status == ["SUCCEEDED"] and got != value:
            return [f"effect: {job_id} SUCCEEDED but config {path} is {got!r}, not {value!r}"]
        if status and status != ["SUCCEEDED"] and got == value:
            return [f"effect: {job_id} ended {status} but config {path} is {value!r}"]
        return []
    return check


def _reverted(cfg, finals):
    out = []
    ssid = (cfg.get("wifi") or {}).get("ssid")
    if ssid != "lab":
        out.append(f"last good: after the Wi-Fi trial config.json has ssid {ssid!r}, not the working 'lab'")
    status = sorted({s["status"] for s in finals.get("wifi-bad", [])})
    if status and status != ["FAILED"]:
        out.append(f"last good: the unreachable Wi-Fi change ended {status}, not FAILED")
    return out


KEY2 = SigningKey.generate()


class _InstallIdentities:
    """A plaintext device's first TLS identity (a `cert` job with the fleet CA, while
    broker.tls is off): one per device id, the same each time the queue is signed."""

    def __init__(self):
        import tempfile

        from mpfleet.fleet.certs import FleetCA

        self.ca = FleetCA(Path(tempfile.mkdtemp(prefix="mpfleet-sweep-ca-")) / "ca")
        self.ca.init()
        self.issued: dict[str, bytes] = {}

    def params(self, device_id: str) -> dict:
        import base64

        if device_id not in self.issued:
            self.issued[device_id] = self.ca.issue_device(device_id).identity()
        return {"identity": base64.b64encode(self.issued[device_id]).decode(),
                "ca": base64.b64encode(self.ca.ca_der()).decode()}

    def check(self, device_id: str, files: dict, finals: dict) -> list[str]:
        ended = sorted({s["status"] for s in finals.get("cert-1", [])})
        if ended != ["SUCCEEDED"]:
            return []  # the generic checks report a job that did not end
        out = []
        if files["/tls/id.der"] != self.issued.get(device_id):
            out.append("the cert job SUCCEEDED but /tls/id.der is not the identity it sent")
        if files["/tls/ca.der"] != self.ca.ca_der():
            out.append("the cert job SUCCEEDED but /tls/ca.der is not the fleet CA")
        return out


INSTALL = _InstallIdentities()

KINDS = [
    Kind("sample", {"upload_every_wakes": 5}, before=2),
    Kind("flush", {"upload_every_wakes": 6, "limits": {"stage_max_samples": 3}}, before=3),
    Kind("upload-trim", {"upload_every_wakes": 8, "limits": {"stage_max_samples": 3}}, before=7),
    Kind("config", jobs=[("config", {"set": {"upload_watermark": 321}}, "config-1")],
         check=_config_follows_status("upload_watermark", 321, "config-1")),
    Kind("wifi-bad", jobs=[("config", {"set": {"wifi.ssid": "nowhere"}, "trial_wakes": 2}, "wifi-bad")],
         check=_reverted),
    Kind("wifi-timeout", jobs=[("config", {"set": {"wifi.connect_timeout_ms": 800}}, "wifi-timeout")],
         check=_config_follows_status("wifi.connect_timeout_ms", 800, "wifi-timeout")),
    Kind("keys", jobs=[("keys", {"add": {KEY2.kid: KEY2.public_b64}}, "keys-1")],
         check=_config_follows_status(f"trusted_keys.{KEY2.kid}", KEY2.public_b64, "keys-1")),
    Kind("exec", jobs=[("exec", None, "exec-1")]),
    Kind("reboot", jobs=[("reboot", {}, "reboot-1")]),
    Kind("diag", jobs=[("diag", {}, "diag-1")]),
    Kind("burst", jobs=[("sample", {"sensor": "adc0", "rate_hz": 20, "duration_s": 0.5}, "burst-1")]),
    Kind("cancel", jobs=[("config", {"set": {"upload_watermark": 7}}, "to-cancel"),
                         ("cancel", {"job": "to-cancel"}, "cancel-1")]),
    # A plaintext device's first TLS identity (devices cert migrate): installed, not tried.
    Kind("cert-install", jobs=[("cert", INSTALL.params, "cert-1")], board_check=INSTALL.check,
         board_files=("/tls/id.der", "/tls/ca.der")),
]


class Sweep:
    """One kind's sweep on a shared broker and host."""

    def __init__(self, world, kind: Kind):
        self.broker, self.host, self.log, root = world
        self.kind = kind
        self.root = Path(root) / kind.name
        self.root.mkdir()
        self.key = SigningKey.generate()
        self.base = "pc-" + kind.name
        self.violations: dict[str, list[str]] = {}
        self.points = 0

    # --- jobs -------------------------------------------------------------
    def payloads(self, device_id: str, clock_s: float) -> list[dict]:
        out = []
        for seq, (type_, params, job_id) in enumerate(self.kind.jobs, start=1):
            if type_ == "exec":
                params = {"code": trace_code(job_id)}  # noqa: PLW2901 - an exec job's code is its trace line
            elif callable(params):
                params = params(device_id)  # noqa: PLW2901 - made for this device id
            out.append({"id": job_id, "seq": seq, "type": type_, "params": params or {},
                        "targets": [device_id], "iat": int(clock_s) - 60})
        return out

    def queue(self, device_id: str) -> str:
        return json.dumps([self.key.sign(p) for p in self.payloads(device_id, self.iat_clock)])

    def runnable(self) -> dict:
        return {p["id"]: (self.key.kid, p["seq"]) for p in self.payloads("x", 0)}

    # --- the template and its snapshots ----------------------------------
    def build(self) -> list[dict]:
        """Run the template device up to each swept wake; a snapshot before each."""
        kind = self.kind
        trusted = {self.key.kid: self.key.public_b64}
        vb = make_device(self.root / "template", self.broker.port, device_id=self.base, trusted_keys=trusted,
                         exec_allowed=True, **{"upload_every_wakes": 1, **kind.config})
        self.iat_clock = vb.clock_s
        run = Run(vb)
        for _ in range(kind.before):
            run.boot()
        snaps = []
        if not kind.jobs:
            snaps.append(self.snapshot(vb, 0))
            return snaps
        self.log.publish_queue(self.base, self.queue(self.base))
        ending = {j[2] for j in kind.jobs if j[2] != "to-cancel"}
        for phase in range(LIFE_WAKES):
            snaps.append(self.snapshot(vb, phase))
            run.boot()
            self.log.flush()
            if ending <= set(self.log.final(self.base)):
                break
        else:
            pytest.fail(f"{kind.name}: the uncut template did not finish {sorted(ending)} within {LIFE_WAKES} wakes: "
                        f"{self.log.statuses_of(self.base)}")
        return snaps

    def snapshot(self, vb: VirtualBoard, phase: int) -> dict:
        self.log.flush()
        path = self.root / f"snap-{phase}"
        shutil.copytree(vb.path, path)
        names = ["/config.json", "/config.good.json"]
        return {"phase": phase, "path": path, "files": read_files(vb, names),
                "prior": self.log.statuses_of(self.base)}

    def restore(self, snap: dict, device_id: str) -> VirtualBoard:
        work = self.root / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(snap["path"], work)
        vb = VirtualBoard(work)
        vb.settings["device_id"] = device_id
        vb.save()
        put = {}
        for name, data in snap["files"].items():
            if data is None:
                continue
            cfg = json.loads(data)
            cfg["device_id"] = device_id
            put[name] = json.dumps(cfg).encode()
        vb.fs_put(put)
        if self.kind.jobs:
            self.log.publish_queue(device_id, self.queue(device_id))
        return vb

    # --- one cut point -----------------------------------------------------
    def measure(self, snap: dict) -> int:
        device_id = f"{self.base}-p{snap['phase']}-k0"
        vb = self.restore(snap, device_id)
        run = Run(vb)
        b = run.boot()
        self.finish(run, device_id, snap, "uncut")
        return b.ops

    def cut(self, snap: dict, k: int) -> None:
        device_id = f"{self.base}-p{snap['phase']}-k{k}"
        vb = self.restore(snap, device_id)
        run = Run(vb)
        b = run.boot(cut_after_ops=k, seed=k)
        label = f"phase {snap['phase']} cut at op {k}"
        if b.record.exit_reason != "power_cut":
            label += f" (no cut came: the wake took {b.ops} ops this time)"
        self.finish(run, device_id, snap, label)

    def finish(self, run: Run, device_id: str, snap: dict, label: str) -> None:
        self.points += 1
        ending = {j[2] for j in self.kind.jobs if j[2] != "to-cancel"}
        out = []
        for _ in range(RECOVERY_WAKES if ending else 0):
            if ending <= set(self.log.final(device_id)):
                break
            run.boot()
            self.log.flush()
        runnable = self.runnable()
        out += check_all(run, self.log, self.host.store, device_id, runnable, set(runnable), ERASE_BOUND,
                         max_wakes=self.kind.upload_every + 4, extra_statuses=snap["prior"])
        finals = self.log.final(device_id)
        prior_final = {s["job"] for s in snap["prior"] if s.get("status") in ("SUCCEEDED", "FAILED", "REJECTED")}
        for job in sorted(ending - set(finals) - prior_final):
            out.append(f"recoverable: job {job!r} has no final status {RECOVERY_WAKES} wakes after the cut")
        merged = {job: list(v) for job, v in finals.items()}
        for s in snap["prior"]:
            if s.get("status") in ("SUCCEEDED", "FAILED", "REJECTED"):
                merged.setdefault(s["job"], []).append(s)
        if label == "uncut":
            for job in sorted(ending):
                want = "FAILED" if self.kind.name == "wifi-bad" else "SUCCEEDED"
                got = sorted({s["status"] for s in merged.get(job, [])})
                if got != [want]:
                    detail = [str(s.get("detail"))[:80] for s in merged.get(job, [])][:1]
                    out.append(f"uncut: job {job!r} ended {got or 'nowhere'} {detail}, not {want}")
        if self.kind.check is not None:
            files = read_files(run.vb, ["/config.json", "/security.json"])
            cfg = json.loads(files["/config.json"] or b"{}")
            # The security settings the device uses: /security.json once a keys job
            # wrote it, else the provisioned config's (agent/config.py).
            cfg.update(json.loads(files["/security.json"] or b"{}"))
            out += self.kind.check(cfg, merged)
        if self.kind.board_check is not None:
            out += self.kind.board_check(device_id, read_files(run.vb, list(self.kind.board_files)), merged)
        if out:
            self.violations[label] = out
            if len(self.violations) <= 3:
                shutil.copytree(run.vb.path, self.root / f"failed-{device_id}")

    def report(self) -> str:
        lines = [f"{self.kind.name}: {len(self.violations)} of {self.points} runs broke a promise"]
        for label, out in list(self.violations.items())[:12]:
            lines.append(f"  {label}:")
            lines += [f"    - {v}" for v in out[:6]]
        return "\n".join(lines)


def cut_points(n: int, name: str, phase: int) -> list[int]:
    """Every cut point in `make stress`; in `make test` all of the cheap kinds, and of
    the others the first and every STRIDE-th operation of their first wake, the
    first of later wakes, and the last two of every wake (where the commits land:
    the Wi-Fi defects of issue 12 sat at the last operations of the applying and the
    reverting wake)."""
    if STRESS or name in CHEAP:
        return list(range(1, n + 1))
    picked = set(range(1, n + 1, STRIDE)) if phase == 0 else {1}
    picked |= {k for k in (n - 1, n) if k >= 1}
    return sorted(k for k in picked if k <= n)


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_every_power_cut_in_a_wake_keeps_the_promises(world, kind):
    started = time.monotonic()
    sweep = Sweep(world, kind)
    sizes = []
    for snap in sweep.build():
        n = sweep.measure(snap)
        points = cut_points(n, kind.name, snap["phase"])
        sizes.append({"phase": snap["phase"], "ops": n, "swept": len(points)})
        for k in points:
            sweep.cut(snap, k)
    elapsed = time.monotonic() - started
    summary = {"kind": kind.name, "phases": sizes, "cut_points": sum(s["ops"] for s in sizes),
               "swept": sum(s["swept"] for s in sizes), "stress": STRESS, "seconds": round(elapsed, 1),
               "violating_runs": len(sweep.violations)}
    print("sweep", json.dumps(summary))
    if os.environ.get("MPFLEET_SWEEP_LOG"):
        with open(os.environ["MPFLEET_SWEEP_LOG"], "a") as f:
            f.write(json.dumps(summary) + "\n")
    assert not sweep.violations, sweep.report()
