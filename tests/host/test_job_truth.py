"""Jobs that tell the truth (issue 15): what `job create` refuses, what `job status`
exits with, how `--stages` reads, what a cancel says it did and what it records, the
hint when no dispatcher runs, readable diag results, key columns at 80 columns, and job
id completion. Through `mpfleet.cli.main` (the entry point users run), on a database
the test drives with the rollout engine as `serve` would (no broker here; the device
side of a cancel: tests/e2e/test_cancel_update.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mpfleet.cli import main
from mpfleet.db.store import Store
from mpfleet.fleet import dispatchers
from mpfleet.fleet.jobs_model import Devices, RolloutError, RolloutOptions, check_stage_growth, stage_sizes
from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.otaserve import KIND_CANCELED, ArtifactServer
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine


@pytest.fixture
def fleet(tmp_path):
    """A database with a key and 20 devices: dev-01..dev-20, dev-01 and dev-02 in pumps."""
    db = tmp_path / "m.db"
    with Store(db) as store:
        KeyRing(store, tmp_path / "keys").init()
        registry = Registry(store)
        for i in range(1, 21):
            registry.add(f"dev-{i:02d}", groups=["pumps"] if i <= 2 else ["valves"])
    return tmp_path


def mpfleet(capsys, fleet, *args) -> tuple[int, str, str]:
    """Run `mpfleet ARGS --db ... --keys-dir ...` in process: (exit code, stdout, stderr)."""
    argv = [*map(str, args), "--db", str(fleet / "m.db"), "--keys-dir", str(fleet / "keys")]
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


class Engine:
    """The rollout engine on the fleet's database: what `serve` and the devices do."""

    def __init__(self, fleet):
        self.store = Store(fleet / "m.db")
        self.engine = RolloutEngine(self.store, KeyRing(self.store, fleet / "keys"), Registry(self.store))

    def report(self, job, device, status, detail=None, progress=None):
        row = [r for r in self.engine.job_status(job).devices if r.device == device][-1]
        return self.engine.on_status(device, {"job": job, "seq": row.seq, "status": status, "detail": detail,
                                              "progress": progress, "attempt": 1, "ts": 0})

    def rows(self, job):
        return {r.device: r for r in self.engine.job_status(job).devices}

    def close(self):
        self.store.close()


@pytest.fixture
def eng(fleet):
    e = Engine(fleet)
    yield e
    e.close()


def one_line_error(code, err, *needles):
    """One `mpfleet: ...` line and exit 1, or click's usage error (exit 2: the usage,
    then one `Error: ...` line), naming each of `needles`; never a traceback."""
    assert code != 0 and "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line]
    if code == 2:
        said = [line for line in lines if line.startswith("Error: ")]
        assert len(said) == 1 and lines[0].startswith("Usage: "), err
    else:
        said = lines
        assert code == 1 and len(lines) == 1 and lines[0].startswith("mpfleet: "), err
    for n in needles:
        assert n in said[0], said[0]


def jobs_recorded(fleet) -> list:
    with Store(fleet / "m.db") as store:
        return [r[0] for r in store.db.execute("SELECT id FROM jobs")]


# ---------------------------------------------------------------- --stages
def test_stages_1_10pct_100pct_is_one_device_then_a_tenth_then_all(capsys, fleet, eng):
    code, out, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--all", "--stages", "1,10%,100%",
                             "--id", "canary", "--json")
    assert code == 0, err
    assert json.loads(out)["options"]["stages"] == [{"devices": 1}, 0.1, 1.0]
    eng.engine.tick()
    assert len(eng.rows("canary")) == 1  # one canary device, not 100 %
    (device,) = eng.rows("canary")
    eng.report("canary", device, "SUCCEEDED")
    eng.engine.tick()
    assert len(eng.rows("canary")) == 2  # 10 % of 20
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "canary")
    assert "stage 2/3 (10%, 2 devices)" in out


@pytest.mark.parametrize("stages, needle", [
    ("0,100%", "'0': a stage covers at least 1 device"),
    ("-3,100%", "at least 1 device"),
    ("150%", "at most 100%"),
    ("0%,100%", "more than 0%"),
    ("soon,100%", "'soon' is not a device count (1, 5) or a share (10%)"),
    ("0.5,100%", "write a share as 50%"),
    ("50%,10%,100%", "stages must increase"),
    ("5,2,100%", "stages must increase"),
    ("10,100", "must end at 1.0 (100%"),
    ("5,10%,100%", "stage 2 (10%) covers 2, fewer than stage 1 (5 devices) with 5"),  # of 20 targets
])
def test_stages_that_make_no_sense_are_refused_in_one_line(capsys, fleet, stages, needle):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--all", "--stages", stages)
    one_line_error(code, err, needle)
    assert jobs_recorded(fleet) == []


def test_stage_sizes_never_shrink_and_a_count_is_capped_by_the_targets():
    assert stage_sizes([Devices(1), 0.1, 1.0], 20) == [1, 2, 20]
    assert stage_sizes([Devices(50), 1.0], 20) == [20, 20]
    assert stage_sizes([Devices(5), 0.1, 1.0], 20) == [5, 5, 20]  # what a continuous job that shrank does
    check_stage_growth([Devices(1), 0.1, 1.0], 3)  # 1, 1, 3: a stage that adds nobody passes
    with pytest.raises(RolloutError, match="fewer than stage 1"):
        check_stage_growth([Devices(5), 0.1, 1.0], 20)
    assert RolloutOptions.from_json(RolloutOptions(stages=(Devices(1), 0.5, 1.0)).to_json()).stages == \
        (Devices(1), 0.5, 1.0)


# ---------------------------------------------------------------- targets that match nothing
def test_a_mistyped_group_is_refused_naming_it(capsys, fleet):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps,nosuchgroup")
    one_line_error(code, err, "'nosuchgroup' is neither a registered device id nor a group", "--allow-empty")
    assert jobs_recorded(fleet) == []


def test_a_query_typed_into_targets_gets_the_query_option_as_hint(capsys, fleet):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "fw<v1.25")
    one_line_error(code, err, "looks like a query: --query 'fw<v1.25'")
    assert jobs_recorded(fleet) == []


def test_a_query_that_matches_nothing_is_refused(capsys, fleet):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--query", "fw<v1.25")
    one_line_error(code, err, "the query 'fw<v1.25' matches none of the 20 device(s)")
    assert jobs_recorded(fleet) == []


def test_allow_empty_is_for_a_job_that_waits_and_then_is_accepted(capsys, fleet):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "later", "--allow-empty")
    one_line_error(code, err, "--allow-empty is for a job that waits for devices: add --continuous")
    code, out, err = mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "later", "--continuous",
                             "--allow-empty", "--id", "waits")
    assert code == 0 and jobs_recorded(fleet) == ["waits"], err


# ---------------------------------------------------------------- other input refused at create
@pytest.mark.parametrize("args, needle", [
    (("config", "--set", "sample_interval_s=fast"), 'sample_interval_s = "fast" is refused by the device: '
                                                    'it must be an integer 1..86400'),
    (("config", "--set", "sample_intervl_s=30"), "unknown config key sample_intervl_s"),
    (("config", "--set", "broker.tls=yes"), "broker.tls = \"yes\" is refused by the device: it must be true or false"),
    (("reboot", "--rate", "0"), "--rate"),
    (("reboot", "--rate", "-5"), "--rate"),
    (("reboot", "--rate", "1000000"), "1000000 is not in the range 1<=x<=100000"),
    (("reboot", "--end", "2h"), "is already past (a time from now is written +2h)"),
    (("reboot", "--end", "2001-01-01T00:00Z"), "is already past"),
])
def test_create_refuses_values_the_device_or_the_rollout_cannot_use(capsys, fleet, args, needle):
    code, _, err = mpfleet(capsys, fleet, "job", "create", args[0], "--targets", "pumps", *args[1:])
    one_line_error(code, err, needle)
    assert jobs_recorded(fleet) == []


def test_a_good_config_value_is_accepted(capsys, fleet):
    code, _, err = mpfleet(capsys, fleet, "job", "create", "config", "--set", "sample_interval_s=30",
                           "--set", "wifi.ssid=lab", "--targets", "pumps")
    assert code == 0, err


# ---------------------------------------------------------------- outcomes and exit codes
def test_a_job_that_failed_everywhere_is_not_plain_success_and_exits_5(capsys, fleet, eng):
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "bad")
    eng.engine.tick()
    for d in eng.rows("bad"):
        eng.report("bad", d, "FAILED", "no such thing")
    eng.engine.tick()
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "bad")
    assert code == 5 and "COMPLETED: 2 of 2 targets did not succeed" in " ".join(out.split()), out
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "bad", "--json")
    shown = json.loads(out)
    assert code == 5 and shown["outcome"] == "failures" and shown["exit_code"] == 5
    assert shown["reason"] == "2 of 2 targets did not succeed: FAILED 2"
    code, out, _ = mpfleet(capsys, fleet, "job", "list")
    assert "COMPLETED, failures" in out


def test_exit_codes_say_succeeded_running_canceled(capsys, fleet, eng):
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "good")
    assert mpfleet(capsys, fleet, "job", "status", "good")[0] == 6  # running
    eng.engine.tick()
    for d in eng.rows("good"):
        eng.report("good", d, "SUCCEEDED")
    eng.engine.tick()
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "good")
    assert code == 0 and "every target SUCCEEDED (2)" in out
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "stop")
    mpfleet(capsys, fleet, "job", "cancel", "stop")
    assert mpfleet(capsys, fleet, "job", "status", "stop")[0] == 3


def test_help_of_status_documents_every_exit_code(capsys, fleet):
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "--help")
    for line in ("0  COMPLETED and every target SUCCEEDED", "3  ABORTED or CANCELED", "4  ACTIVE, with at least one",
                 "5  COMPLETED, but some target did not succeed", "6  ACTIVE, still running"):
        assert line in out


# ---------------------------------------------------------------- no dispatcher
@pytest.mark.sqlite_only("the hint names the database file")
def test_watch_and_create_say_when_no_serve_is_running(capsys, fleet, eng):
    code, out, _ = mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "w")
    hint = f"no `mpfleet serve` is running on {fleet / 'm.db'}; nothing will move"
    assert hint in " ".join(out.split())
    eng.engine.cancel("w")  # so that --watch returns at once; the hint is about an ACTIVE job
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "w2")
    dispatchers.beat(eng.store, "host:1")
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "w2")
    assert "nothing will move" not in out and code == 6
    dispatchers.beat(eng.store, "host:1", now=time.time() - 3600)  # a serve killed an hour ago
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "w2")
    assert hint in " ".join(out.split())


def test_watch_json_puts_the_hint_on_stderr(capsys, fleet, eng, monkeypatch):
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "wj")
    monkeypatch.setattr(time, "sleep", lambda s: eng.engine.cancel("wj"))  # the job ends at the first refresh
    code, out, err = mpfleet(capsys, fleet, "job", "status", "wj", "--watch", "--json")
    assert code == 3 and "no `mpfleet serve` is running" in err and json.loads(out)["status"] == "CANCELED"


# ---------------------------------------------------------------- cancel, whole job and per device
def test_cancel_says_what_it_stopped_and_what_may_still_finish(capsys, fleet, eng):
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "c", "--stages", "1,100%")
    eng.engine.tick()
    (running,) = eng.rows("c")
    eng.report("c", running, "IN_PROGRESS")
    code, out, _ = mpfleet(capsys, fleet, "job", "cancel", "c")
    text = " ".join(out.split())
    assert code == 0 and "0 stopped before they started" in text
    assert "1 already past the point of no return or not stoppable midway: they may still finish" in text
    assert "Cancel jobs wait for 1 device(s)" in text
    # the device finishes anyway: recorded as it reported, with the note
    assert eng.report("c", running, "SUCCEEDED", {"boots": 2})
    row = eng.rows("c")[running]
    assert row.status == "SUCCEEDED" and "the cancel came too late" in row.note
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "c", "--json")
    assert json.loads(out)["counts"]["SUCCEEDED"] == 1 and json.loads(out)["counts"]["CANCELED"] == 0


def test_an_update_stopped_by_the_cancel_stays_canceled_with_the_devices_word(capsys, fleet, eng):
    eng.engine.create_job("ota", {"size": 100}, ["pumps"], job_id="u")  # bookkeeping only: no artifact here
    eng.engine.tick()
    for d in eng.rows("u"):
        eng.report("u", d, "IN_PROGRESS")
    first, second = sorted(eng.rows("u"))
    eng.report("u", first, "IN_PROGRESS", progress={"bytes": 100, "total": 100})  # downloaded: may finish
    eng.report("u", second, "IN_PROGRESS", progress={"bytes": 40, "total": 100})
    code, out, _ = mpfleet(capsys, fleet, "job", "cancel", "u", "--json")
    summary = json.loads(out)
    assert (summary["stopping"], summary["may_finish"]) == ([second], [first])
    assert eng.report("u", second, "FAILED", {"stopped": "canceled", "reason": "canceled: ...", "at": 40,
                                               "size": 100})
    row = eng.rows("u")[second]
    assert row.status == "CANCELED" and "the device stopped at byte 40 of 100, before its point of no return" \
        in row.note
    assert not eng.report("u", second, "SUCCEEDED")  # its word was given: final is final now
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "u")
    text = " ".join(out.split())
    assert "canceled while running" in text and "told to stop; not reported since" in text


def test_cancel_one_device_leaves_the_rollout_going(capsys, fleet, eng):
    mpfleet(capsys, fleet, "job", "create", "reboot", "--targets", "pumps", "--id", "p")
    eng.engine.tick()
    a, b = sorted(eng.rows("p"))
    code, out, err = mpfleet(capsys, fleet, "job", "cancel", "p", "--device", a)
    assert code == 0 and "canceled job p on 1 device(s): 1 stopped before they started" in out, err
    assert eng.rows("p")[a].status == "CANCELED" and eng.engine.device_queue(a) == []
    assert eng.engine.job_status("p").status == "ACTIVE" and eng.engine.device_queue(b)
    # every state answers honestly
    one_line_error(*mpfleet(capsys, fleet, "job", "cancel", "p", "--device", a)[::2], "already ended on", "CANCELED")
    one_line_error(*mpfleet(capsys, fleet, "job", "cancel", "p", "--device", "dev-09")[::2],
                   "dev-09 is not a target of job p")
    eng.report("p", b, "IN_PROGRESS")
    code, out, _ = mpfleet(capsys, fleet, "job", "cancel", "p", "--device", b)
    assert code == 0 and "1 already past the point of no return" in " ".join(out.split())
    (envelope,) = eng.engine.device_queue(b)  # the job left b's queue, its cancel job came in
    assert [c.type for c in eng.engine.job_status("p").cancel_jobs if c.device == b] == ["cancel"]
    assert envelope == eng.engine.cancel_envelopes("p")[b]
    # a retry while the device may still be running it would run the job twice: refused until it reports
    one_line_error(*mpfleet(capsys, fleet, "job", "retry", "p", "--device", b)[::2], "has not reported since")
    eng.report("p", b, "FAILED", "interrupted")
    assert eng.rows("p")[b].status == "CANCELED"
    code, out, err = mpfleet(capsys, fleet, "job", "retry", "p", "--device", b)
    assert code == 0 and "new attempt signed for 1 device(s)" in out, err
    # the canceled device does not hold the job back: it completes once b succeeds, without plain success
    eng.report("p", b, "SUCCEEDED")
    eng.engine.tick()
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "p")
    assert code == 5 and "1 of 2 targets did not succeed" in " ".join(out.split())


def test_the_artifact_server_refuses_a_canceled_execution_as_canceled(fleet, eng):
    eng.engine.create_job("ota", {"image": "none", "size": 10}, ["pumps"], job_id="a")
    eng.engine.tick()
    d = sorted(eng.rows("a"))[0]
    eng.report("a", d, "IN_PROGRESS")
    sent = []
    server = ArtifactServer(fleet / "m.db", fleet / "images", lambda t, p: sent.append(p))
    server.handle(d, json.dumps({"job": "a", "offset": 0, "len": 4096}).encode())
    assert int.from_bytes(sent[-1][4:8], "little") == 0  # refused (no artifact), not canceled
    eng.engine.cancel_devices("a", [d])
    server.handle(d, json.dumps({"job": "a", "offset": 0, "len": 4096}).encode())
    assert sent[-1][:4] == b"\xff\xff\xff\xff" and int.from_bytes(sent[-1][4:8], "little") == KIND_CANCELED
    assert sent[-1][8:].decode().startswith(f"canceled: job a was canceled on {d}")
    server.close()


# ---------------------------------------------------------------- output
def test_diag_results_are_shown_readably(capsys, fleet, eng):
    mpfleet(capsys, fleet, "job", "create", "diag", "--targets", "pumps", "--id", "d")
    eng.engine.tick()
    for d in eng.rows("d"):
        eng.report("d", d, "SUCCEEDED", {"heap_free": 81234, "fs_free": 1200000, "rssi": -61})
    code, out, _ = mpfleet(capsys, fleet, "job", "status", "d")
    assert "results (diag)" in out and "heap_free=81234, fs_free=1200000, rssi=-61" in " ".join(out.split())


def test_key_fields_are_never_cut_at_80_columns(fleet, eng):
    long_id = "nightly-config-rollout-to-the-valves.v2"
    eng.engine.create_job("reboot", {}, ["valves"], job_id=long_id)
    eng.engine.tick()
    for d in list(eng.rows(long_id))[:3]:
        eng.report(long_id, d, "FAILED", "a long reason that goes on " * 5)
    env = dict(os.environ, COLUMNS="80", MPFLEET_DB=str(fleet / "m.db"), MPFLEET_KEYS=str(fleet / "keys"))
    for args in (("job", "list"), ("job", "status", long_id)):
        out = subprocess.run([sys.executable, "-m", "mpfleet", *args], capture_output=True, text=True, env=env,
                             timeout=60).stdout
        assert max(len(line) for line in out.splitlines()) <= 80, out
        assert long_id in out, out
        if args[1] == "status":
            for d in list(eng.rows(long_id))[:3]:
                assert d in out


def test_job_ids_complete_from_the_database_read_only(fleet, eng, tmp_path):
    eng.engine.create_job("reboot", {}, ["pumps"], job_id="alpha-1")
    eng.engine.create_job("reboot", {}, ["pumps"], job_id="beta-1")
    env = dict(os.environ, _MPFLEET_COMPLETE="bash_complete", COMP_WORDS="mpfleet job status a", COMP_CWORD="3",
               MPFLEET_DB=str(fleet / "m.db"))
    out = subprocess.run([sys.executable, "-m", "mpfleet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["plain,alpha-1"], out
    missing = tmp_path / "nowhere" / "none.db"
    env["MPFLEET_DB"] = str(missing)
    out = subprocess.run([sys.executable, "-m", "mpfleet"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and not missing.exists(), out


# ---------------------------------------------------------------- per-device history
def show(capsys, fleet, *args) -> tuple[int, str, str]:
    """`mpfleet devices show ARGS --db ...` in process (it takes no --keys-dir)."""
    code = 0
    try:
        main(["devices", "show", *map(str, args), "--db", str(fleet / "m.db")])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def test_devices_show_lists_every_execution_with_attempts_and_reasons(capsys, fleet, eng):
    eng.engine.create_job("config", {"set": {"upload_watermark": 450}}, ["dev-01"], job_id="wm-450",
                          options=RolloutOptions(retries=1))
    eng.engine.tick()
    eng.report("wm-450", "dev-01", "FAILED", detail={"reason": "flash full"})
    eng.engine.tick()  # the retry is queued as attempt 2
    eng.report("wm-450", "dev-01", "SUCCEEDED")
    eng.engine.create_job("reboot", {}, ["dev-01", "dev-02"], job_id="boot-1")
    eng.engine.tick()
    eng.engine.cancel("boot-1")
    code, out, _ = show(capsys, fleet, "dev-01", "--json")
    assert code == 0
    runs = [(e["job"], e["type"], e["attempt"], e["status"]) for e in json.loads(out)["executions"]]
    assert runs == [("boot-1", "reboot", 1, "CANCELED"), ("wm-450", "config", 2, "SUCCEEDED"),
                    ("wm-450", "config", 1, "FAILED")]
    failed = json.loads(out)["executions"][2]
    assert "flash full" in failed["reason"] and failed["detail"] == {"reason": "flash full"}
    code, out, _ = show(capsys, fleet, "dev-01")
    table = out[out.index("job history"):]
    assert "3 of 3" in table and "flash full" in table and table.index("boot-1") < table.index("wm-450")
    code, out, _ = show(capsys, fleet, "dev-01", "--history", "1")
    assert "1 of 3" in out and "wm-450" not in out[out.index("job history"):]
    code, out, _ = show(capsys, fleet, "dev-03")
    assert "no job executions" in out
