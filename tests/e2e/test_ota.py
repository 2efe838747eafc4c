"""A/B updates end to end: firmware OTA (`ota`) and app updates (`app`) on virtual
boards running the real agent, through real mosquitto, from `serve`'s artifact
server, with an independent observer of every status the devices publish.

What would break without the feature: the running image (boot records, otadata),
the final status at the host and on the wire, and the bytes on the wire.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import defaultdict

import paho.mqtt.client as mqtt
import pytest
from conftest import STRESS
from update_site import BASE_FW, UpdateSite

from mpfleet.images.espimage import build_app_image
from mpfleet.fleet.jobs_model import ExecutionRow
from mpfleet.fleet.otaserve import ArtifactServer, Refusal, parse_request
from mpfleet.fleet.serve import Dispatcher
from mpfleet.sim.netfault import LinkCutter
from mpfleet.fleet.updates import UpdateError, app_params, ota_params

FINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED")


class StatusLog:
    """Every jobs/status message any device publishes, as the broker delivers it."""

    def __init__(self, cfg):
        self.lock = threading.Lock()
        self.by_job: dict[str, list[dict]] = defaultdict(list)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ota-observer")
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.connect(cfg.host, cfg.port)
        self.client.subscribe("mpf/v1/+/jobs/status", 1)
        self.client.loop_start()
        assert done.wait(5)

    def _on_message(self, client, userdata, msg):
        status = json.loads(msg.payload)
        with self.lock:
            self.by_job[status.get("job")].append(status)

    def of(self, job: str) -> list[dict]:
        with self.lock:
            return list(self.by_job[job])

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Env(UpdateSite):
    def execution(self, job: str) -> ExecutionRow:
        return self.engine.job_status(job).devices[-1]

    def run_until_final(self, board, job: str, boots: int = 10, crashes: bool = False) -> ExecutionRow:
        """Boot the device until the host holds a final status for the job; no boot may
        end in a traceback unless `crashes` (the update under test raises)."""
        for _ in range(boots):
            rec = board.boot()
            assert crashes or "Traceback" not in rec.output, rec.output
            deadline = time.monotonic() + 0.6  # a final status was published before the boot ended
            while time.monotonic() < deadline:
                row = self.engine.job_status(job).devices
                if row and row[-1].status in FINAL:
                    return row[-1]
                time.sleep(0.05)
        raise AssertionError(f"job {job} not final after {boots} boots: {self.engine.job_status(job).devices}")


@pytest.fixture(scope="module")
def env(tmp_path_factory, mosquitto):
    root = tmp_path_factory.mktemp("ota")
    e = Env(root, mosquitto)
    e.log = StatusLog(e.cfg)
    e.dispatcher = Dispatcher(e.cfg, root / "db", keys_dir=root / "keys", tick_s=0.05,
                              images_dir=root / "images").start()
    try:
        yield e
    finally:
        e.dispatcher.stop()
        e.log.close()
        e.store.close()
    assert e.dispatcher.stats.errors == 0, e.dispatcher.stats.last_error


def _running(board) -> str:
    return board.boot_records()[-1]["firmware_version"]


def _otadata(board) -> list[tuple[int, str, bool]]:
    from mpfleet.sim.board import runtime_module

    STATE_NAMES = runtime_module("_simota").STATE_NAMES
    return [(e.seq, STATE_NAMES.get(e.state, hex(e.state)), e.valid) for e in board.ota_entries()]


def _active_state(board) -> str:
    return max((e for e in _otadata(board) if e[2]), key=lambda e: e[0])[1]


# ---------------------------------------------------------------- firmware OTA
def test_ota_downloads_switches_confirms_and_reports_the_new_version(env):
    board = env.board()
    image = env.image("v1.30.0", size=200_000)
    job = env.job("ota", ota_params(env.images, image.id)[0], board)
    row = env.run_until_final(board, job)
    assert row.status == "SUCCEEDED", row
    assert row.detail["fw"] == "v1.30.0" and row.detail["from"] == BASE_FW
    assert row.progress is None or row.progress["total"] == image.size
    assert _running(board) == "v1.30.0"
    assert _active_state(board) == "VALID", _otadata(board)
    # the new image keeps booting (no rollback at the next reset) and says so
    board.press_reset()
    board.boot()
    assert _running(board) == "v1.30.0"
    assert env.store.device(board.device_id)["state"]["fw"] == "v1.30.0"
    statuses = [s["status"] for s in env.log.of(job)]
    assert statuses.count("SUCCEEDED") >= 1 and "FAILED" not in statuses
    # the job's status view shows the running version
    assert env.engine.job_status(job).devices[-1].running == "v1.30.0"


def _truncated(env) -> tuple[dict, str]:
    full = build_app_image("esp32", "v1.31.0", size=40_000, secure_version=2)
    record = env.raw_artifact(full[:-3000], "v1.31.0", kind="app")
    params = {"image": record.id, "size": record.size, "sha256": record.sha256, "version": "v1.31.0",
              "chunk": 4096, "window": 8}
    return params, "set_boot refused the image"


REFUSALS = {
    "bad-sha": (lambda env: (dict(ota_params(env.images, env.image("v1.32.0", secure_version=2).id)[0],
                                  sha256="ab" * 32),
                             "SHA-256 of the written image"), "FAILED"),
    "wrong-chip": (lambda env: (ota_params(env.images, env.image("v1.33.0", chip="esp32s3", secure_version=2).id)[0],
                                "the image is for chip id 9, this chip is 0"), "REJECTED"),
    "truncated": (_truncated, "FAILED"),
    "downgrade": (lambda env: (ota_params(env.images, env.image("v1.20.0", secure_version=1).id)[0],
                               "secure_version 1 is below the running 2"), "REJECTED"),
    "slot-too-small": (lambda env: (dict(ota_params(env.images, env.image("v1.34.0", secure_version=2).id)[0],
                                         size=2_000_000),
                                    "does not fit the 1572864-byte slot ota_1"), "REJECTED"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_image_leaves_the_running_image_and_never_switches(env, case):
    board = env.board(secure_version=2)
    board.boot()
    before = _otadata(board)
    make, want_status = REFUSALS[case]
    params, reason = make(env)
    job = env.job("ota", params, board)
    row = env.run_until_final(board, job)
    assert row.status == want_status, (row.status, row.detail)
    assert reason in json.dumps(row.detail), row.detail
    board.boot()
    assert _running(board) == BASE_FW
    assert _otadata(board) == before, "set_boot must not have been called"


def test_downgrade_is_accepted_when_the_job_allows_it(env):
    board = env.board(secure_version=2)
    image = env.image("v1.21.0", secure_version=1)
    job = env.job("ota", ota_params(env.images, image.id, allow_downgrade=True)[0], board)
    assert env.run_until_final(board, job).status == "SUCCEEDED"
    assert _running(board) == "v1.21.0"


@pytest.mark.parametrize("note, reason", [
    ({"wifi": "broken"}, "self-test: cannot reach the broker"),
    ({"crash": "boot"}, "did not start"),
])
def test_image_that_fails_its_trial_boot_is_rolled_back_and_reported_failed(env, note, reason):
    board = env.board()
    image = env.image(f"v1.40.{len(reason)}", sim_note=note)
    job = env.job("ota", ota_params(env.images, image.id)[0], board)
    row = env.run_until_final(board, job)
    assert row.status == "FAILED", row
    assert reason in row.detail["reason"]
    assert row.detail["fw"] == BASE_FW
    assert _running(board) == BASE_FW
    assert "SUCCEEDED" not in [s["status"] for s in env.log.of(job)], "a rolled-back image reported success"
    assert {e[1] for e in _otadata(board) if e[2]} & {"ABORTED", "INVALID"}, _otadata(board)


def test_download_resumes_across_dropped_connections(env):
    rng = random.Random(5)
    image = env.image("v1.50.0", size=600_000)
    # every connection is cut after 60-160 KiB towards the device
    with LinkCutter("127.0.0.1", env.cfg.port, lambda n: rng.randint(60_000, 160_000)) as cutter:
        board = env.board(port=cutter.port)
        job = env.job("ota", ota_params(env.images, image.id)[0], board)
        row = env.run_until_final(board, job, boots=12)
        cuts = cutter.cuts
    assert row.status == "SUCCEEDED", row
    assert cuts >= 2
    link = row.detail["link"]
    assert link["reconnects"] >= 1
    assert link["ignored"] <= 4096 * link["reconnects"], link  # nothing already received came twice
    assert link["reasked"] <= 8 * 4096 * cuts, link  # at most the window in flight per cut


# ---------------------------------------------------------------- app updates
def test_app_update_installs_into_the_other_slot_and_reports_its_version(env):
    board = env.board()
    bundle = env.bundle("0.2.0")
    job = env.job("app", app_params(env.images, bundle.id)[0], board)
    row = env.run_until_final(board, job)
    assert row.status == "SUCCEEDED", row
    assert row.detail == {"app": "0.2.0", "slot": "a", "from": "0.1.0", "link": row.detail["link"]}
    assert json.loads(board.fs_get("/app.json")) == {"active": "a"}
    board.boot()
    assert env.store.device(board.device_id)["state"]["app"] == "0.2.0"
    # and the next one goes to the other slot
    job = env.job("app", app_params(env.images, env.bundle("0.3.0").id)[0], board)
    row = env.run_until_final(board, job)
    assert row.detail["slot"] == "b" and row.detail["from"] == "0.2.0"


def test_app_bundle_that_raises_at_import_is_rolled_back(env):
    board = env.board()
    bundle = env.bundle("0.9.0-broken", raise_at_import=True)
    job = env.job("app", app_params(env.images, bundle.id)[0], board)
    row = env.run_until_final(board, job, crashes=True)
    assert row.status == "FAILED", row
    assert "ImportError: broken build" in row.detail["reason"]
    assert row.detail["app"] == "0.1.0"
    assert "SUCCEEDED" not in [s["status"] for s in env.log.of(job)]
    assert json.loads(board.fs_get("/app.json")).get("active") is None
    rec = board.boot()
    assert "Traceback" not in rec.output


def test_app_bundle_the_firmware_cannot_load_is_refused_before_anything_is_written(env):
    board = env.board()
    good = env.images.read(env.bundle("0.4.0").id)
    mlen = int.from_bytes(good[5:9], "little")
    manifest = json.loads(good[9:9 + mlen])
    manifest["mpy"]["version"] = 5  # MicroPython < 1.22
    raw = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    data = good[:5] + len(raw).to_bytes(4, "little") + raw + good[9 + mlen:]
    record = env.raw_artifact(data, "0.4.0", kind="app-bundle")
    params = {"bundle": record.id, "size": record.size, "sha256": record.sha256, "version": "0.4.0",
              "chunk": 4096, "window": 8}
    job = env.job("app", params, board)
    row = env.run_until_final(board, job)
    assert row.status == "REJECTED", row
    assert "cannot be loaded by this firmware" in row.detail
    assert board.fs_get("/apps/a.mpfa") is None
    assert board.fs_get("/app.json") is None


# ---------------------------------------------------------------- power cuts
def _sweep(ops: int, quick: int) -> list[int]:
    """Every flash operation of an update cycle in `make stress`; an even slice of
    `quick` of them (always the first and the last) in `make test`."""
    if STRESS:
        return list(range(1, ops + 1))
    step = max(1, ops // quick)
    return sorted(set(range(1, ops + 1, step)) | {ops})


def test_power_cuts_during_updates_always_leave_a_bootable_device_and_one_true_status(env):
    """A cut at every flash operation of a whole update cycle (download, writes,
    set_boot, the reset, the trial boot, the report), for ota and app jobs in turn on
    one board: after each, the device boots a valid image and the job has one final
    status, the one that matches what runs."""
    board = env.board()
    board.boot()
    images = [env.image(f"v2.{i}.0", size=20_000) for i in range(4)]
    bundles = [env.bundle(f"1.{i}.0") for i in range(2)]
    # flash operations of one clean update cycle, to spread the cuts over all of it
    ops = {}
    for kind in ("ota", "app"):
        start = board.counters()["ops"]
        params = (ota_params(env.images, images[0].id) if kind == "ota" else app_params(env.images, bundles[0].id))[0]
        row = env.run_until_final(board, env.job(kind, params, board))
        assert row.status == "SUCCEEDED"
        ops[kind] = board.counters()["ops"] - start
    counts = defaultdict(int)
    # MPFLEET_UPDATE_SWEEP=ota (or app) sweeps one kind only: the app cycle alone is
    # about 1,300 cut points in `make stress`.
    only = os.environ.get("MPFLEET_UPDATE_SWEEP", "ota,app").split(",")
    cuts = {kind: _sweep(ops[kind], quick=8) for kind in ops if kind in only}
    plan = []
    for i in range(max(len(c) for c in cuts.values())):
        plan += [(kind, cuts[kind][i]) for kind in cuts if i < len(cuts[kind])]
    rounds = len(plan)
    for round_, (kind, cut_at) in enumerate(plan):
        if kind == "ota":
            record = images[(round_ // 2) % len(images)]
            if record.version == _running(board):
                record = images[(round_ // 2 + 1) % len(images)]
            params = ota_params(env.images, record.id)[0]
        else:
            record = bundles[(round_ // 2) % len(bundles)]
            params = app_params(env.images, record.id)[0]
        before_fw = _running(board)
        before_app = env.store.device(board.device_id)["state"]["app"]
        job = env.job(kind, params, board)
        board.schedule_power_cut(after_ops=cut_at, seed=round_)
        row = None
        for _ in range(12):
            rec = board.boot()
            assert rec.exit_reason != "no_bootable_image", rec.output
            if rec.exit_reason == "power_cut":
                counts["cuts"] += 1
                board.power_on(clock_s=board.clock_s)
            rows = env.engine.job_status(job).devices
            time.sleep(0.1)
            rows = env.engine.job_status(job).devices
            if rows and rows[-1].status in FINAL:
                row = rows[-1]
                break
        board.state["cut_after_ops"] = None
        board.save()
        assert row is not None, f"round {round_}: {kind} job never ended (cut at operation {cut_at} of {ops[kind]})"
        counts[row.status] += 1
        if STRESS:
            print(f"round {round_}: {kind} cut at {cut_at}/{ops[kind]} -> {row.status}", flush=True)
        rec = board.boot()
        assert rec.exit_reason != "no_bootable_image"
        finals = {s["status"] for s in env.log.of(job) if s["status"] in FINAL}
        assert finals == {row.status}, \
            f"round {round_} (cut at {cut_at}): device sent {finals}, host holds {row.status}"
        if kind == "ota":
            want = record.version if row.status == "SUCCEEDED" else before_fw
            assert _running(board) == want, f"round {round_}: {row}"
        else:
            state_app = env.store.device(board.device_id)["state"]["app"]
            want = record.version if row.status == "SUCCEEDED" else before_app
            assert state_app == want, f"round {round_}: {row}, device reports app {state_app}"
    print(f"power cuts: {rounds} rounds (operations per cycle {ops}), {dict(counts)}")
    assert counts["cuts"] >= rounds // 2, counts
    assert counts["SUCCEEDED"] >= 1, counts


# ---------------------------------------------------------------- host side
def test_artifact_server_refuses_what_it_must_not_serve(env):
    board = env.board()
    image = env.image("v1.60.0")
    job = env.job("ota", ota_params(env.images, image.id)[0], board)
    env.engine.tick()  # the execution exists now
    sent = []
    server = ArtifactServer(env.root / "db", env.root / "images", lambda t, p: sent.append((t, p)))

    def ask(device, **req):
        sent.clear()
        server.handle(device, json.dumps(req).encode())
        return sent

    out = ask(board.device_id, job=job, offset=0, len=4096, count=3)
    assert [int.from_bytes(p[:4], "little") for _, p in out] == [0, 4096, 8192]
    assert out[0][1][8:] == env.images.read(image.id)[:4096]
    for device, req, why in [
        ("someone-else", {"job": job, "offset": 0, "len": 4096}, "is not for someone-else"),
        (board.device_id, {"job": "nope", "offset": 0, "len": 4096}, "no job nope"),
        (board.device_id, {"job": job, "offset": 0, "len": 100_000}, "out of range"),
    ]:
        (_, payload), = ask(device, **req)
        assert payload[:4] == b"\xff\xff\xff\xff" and why in payload[8:].decode(), payload[8:]
    server.close()
    with pytest.raises(Refusal, match="malformed"):
        parse_request(b"{not json")


def test_update_params_refuse_the_wrong_kind_and_bad_stream_settings(env):
    image = env.image("v1.61.0")
    bundle = env.bundle("0.5.0")
    with pytest.raises(UpdateError, match="app bundle"):
        ota_params(env.images, bundle.id)
    with pytest.raises(UpdateError, match="not an app bundle"):
        app_params(env.images, image.id)
    with pytest.raises(UpdateError, match="chunk 3000"):
        ota_params(env.images, image.id, chunk=3000)


def test_cli_creates_update_jobs_and_explains_what_is_missing(env):
    board = env.board()
    common = ["--db", str(env.root / "db"), "--keys-dir", str(env.root / "keys")]

    def mpfleet(*args):
        return subprocess.run([sys.executable, "-m", "mpfleet", *args], capture_output=True, text=True,
                              env={**os.environ, "MPFLEET_IMAGES": str(env.root / "images")}, timeout=60)

    out = mpfleet("job", "create", "ota", "--targets", board.device_id, *common)
    assert out.returncode == 2 and "needs --image" in out.stderr, out.stderr
    s3 = env.root / "s3.bin"
    s3.write_bytes(build_app_image("esp32s3", "v1.70.0"))
    out = mpfleet("job", "create", "ota", "--image", str(s3), "--targets", board.device_id, *common)
    assert out.returncode == 1 and "(esp32s3," in out.stderr and "virtual: esp32)" in out.stderr, out.stderr
    fw = env.root / "fw.bin"
    fw.write_bytes(build_app_image("esp32", "v1.70.0"))
    out = mpfleet("job", "create", "ota", "--image", str(fw), "--targets", board.device_id, "--json", *common)
    assert out.returncode == 0, out.stderr
    created = json.loads(out.stdout)
    assert created["params"]["version"] == "v1.70.0" and created["params"]["size"] == fw.stat().st_size
    out = mpfleet("job", "status", created["id"], *common)
    assert out.returncode == 6 and "target version v1.70.0" in out.stdout, out.stdout
    assert mpfleet("job", "cancel", created["id"], *common).returncode == 0
