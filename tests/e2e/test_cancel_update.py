"""Cancel during an update, end to end (issue 15, finding 1): virtual boards running the
real agent pull a firmware image from `serve`'s artifact server through a real
mosquitto, and the operator runs `mpfleet job cancel` mid-download.

What would break without the feature: the boards' running image (they must keep the
old one: set_boot never called), the otadata, and what the host records for each
(CANCELED with the device's word that it stopped, or SUCCEEDED noted as too late for a
board past its point of no return), and what `job cancel` says it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from update_site import BASE_FW, UpdateSite

from mpfleet.fleet.serve import Dispatcher
from mpfleet.fleet.updates import ota_params
from mpfleet.sim.netfault import LinkCutter

BOARDS = 5
LINK_BYTES_PER_S = 250_000  # a slow link, so that the operator has time to cancel mid-download


class SlowLink(LinkCutter):
    """A loopback proxy that forwards towards the device at LINK_BYTES_PER_S per connection."""

    def _pump(self, src, dst, down, link):
        if not down:
            return super()._pump(src, dst, down, link)

        class Paced:
            def __init__(self, sock):
                self.sock = sock

            def recv(self, n):
                return self.sock.recv(min(n, 8192))

            def __getattr__(self, name):
                return getattr(self.sock, name)

        class Slow:
            def __init__(self, sock):
                self.sock = sock

            def sendall(self, data):
                time.sleep(len(data) / LINK_BYTES_PER_S)
                self.sock.sendall(data)

            def __getattr__(self, name):
                return getattr(self.sock, name)

        return super()._pump(Paced(src), Slow(dst), down, link)


@pytest.fixture(scope="module")
def env(tmp_path_factory, mosquitto):
    root = tmp_path_factory.mktemp("cancel")
    e = UpdateSite(root, mosquitto)
    e.dispatcher = Dispatcher(e.cfg, root / "db", keys_dir=root / "keys", tick_s=0.05,
                              images_dir=root / "images").start()
    try:
        yield e
    finally:
        e.dispatcher.stop()
        e.store.close()
    assert e.dispatcher.stats.errors == 0, e.dispatcher.stats.last_error


def mpfleet(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpfleet", *args, "--db", str(env.root / "db"),
                           "--keys-dir", str(env.root / "keys")], capture_output=True, text=True,
                          env={**os.environ, "MPFLEET_IMAGES": str(env.root / "images")}, timeout=60)


def latest(env, job: str) -> dict:
    return {r.device: r for r in env.engine.job_status(job).devices}


def test_cancel_mid_download_stops_every_board_before_set_boot(env):
    link = SlowLink("127.0.0.1", env.cfg.port).start()
    try:
        _cancel_mid_download(env, link)
    finally:
        link.stop()


def _cancel_mid_download(env, link):
    boards = [env.board(port=link.port) for _ in range(BOARDS)]
    image = env.image("v1.80.0", size=1_000_000)
    job = env.engine.create_job("ota", ota_params(env.images, image.id)[0], [b.device_id for b in boards])
    records = {}

    def run(board):
        records[board.device_id] = board.boot()

    threads = [threading.Thread(target=run, args=(b,)) for b in boards]
    for t in threads:
        t.start()
    # cancel once every board is between 10 % and 90 % of its download
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = latest(env, job)
        done = [r.progress["bytes"] / r.progress["total"] for r in rows.values()
                if isinstance(r.progress, dict) and r.progress.get("total")]
        if len(done) == BOARDS and min(done) >= 0.1:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the boards did not get going: {latest(env, job)}")
    assert max(done) < 0.9, done  # mid-download, as the operator saw it
    canceled = mpfleet(env, "job", "cancel", job, "--json")
    for t in threads:
        t.join(120)
    assert canceled.returncode == 0, canceled.stderr
    summary = json.loads(canceled.stdout)
    assert sorted(summary["stopping"]) == sorted(b.device_id for b in boards) and not summary["may_finish"]
    # every board stopped and said so before the host's word changed anything
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any("; then: " not in (r.note or "") for r in latest(env, job).values()):
        time.sleep(0.05)
    for board in boards:
        rec = records[board.device_id]
        assert "Traceback" not in rec.output, rec.output
        assert board.boot_records()[-1]["firmware_version"] == BASE_FW
        row = latest(env, job)[board.device_id]
        assert row.status == "CANCELED", row
        assert "the device stopped at byte" in row.note and "before its point of no return" in row.note, row.note
        assert row.detail["stopped"] == "canceled" and row.detail["at"] < image.size
    # the next boot still runs the old image, and nothing is left half switched
    for board in boards[:2]:
        rec = board.boot()
        assert "Traceback" not in rec.output and board.boot_records()[-1]["firmware_version"] == BASE_FW
    shown = mpfleet(env, "job", "status", job, "--json")
    status = json.loads(shown.stdout)
    assert shown.returncode == 3 and status["counts"]["CANCELED"] == BOARDS and status["counts"]["SUCCEEDED"] == 0


def test_cancel_after_set_boot_is_recorded_as_the_success_it_became(env):
    board = env.board()
    image = env.image("v1.81.0", size=60_000)
    job = env.engine.create_job("ota", ota_params(env.images, image.id)[0], [board.device_id])
    rec = board.boot()  # downloads, checks, set_boot, resets into the trial boot
    assert "Traceback" not in rec.output, rec.output
    row = latest(env, job)[board.device_id]
    assert row.status == "IN_PROGRESS" and row.progress["bytes"] == image.size, row
    canceled = mpfleet(env, "job", "cancel", job)
    said = " ".join(canceled.stdout.split())
    assert canceled.returncode == 0 and "1 already past the point of no return" in said and "may still finish" in said
    rec = board.boot()  # the trial boot: the new image runs, passes its self-test, reports SUCCEEDED
    assert "Traceback" not in rec.output, rec.output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and latest(env, job)[board.device_id].status != "SUCCEEDED":
        time.sleep(0.05)
    row = latest(env, job)[board.device_id]
    assert board.boot_records()[-1]["firmware_version"] == "v1.81.0"
    assert row.status == "SUCCEEDED" and "the cancel came too late" in row.note, row
    status = json.loads(mpfleet(env, "job", "status", job, "--json").stdout)
    assert status["counts"]["SUCCEEDED"] == 1 and status["counts"]["CANCELED"] == 0
