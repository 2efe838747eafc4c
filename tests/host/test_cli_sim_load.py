"""`mpfleet sim load` through its command line (docs/sim-load.md): every bad number is
one click error line (exit 2) before anything is opened, --provision-only registers the
devices in the --db it is given, a short run against a real mosquitto and serve gives a
--json summary whose counts agree with each other and with the host's records, and
--help states each option's rule."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import click
import pytest
from click.testing import CliRunner

from agent_harness import FleetEnv
from mpfleet.broker.local import free_port
from mpfleet.cli import cli
from mpfleet.cli.sim_load import sim_load
from mpfleet.db.store import Store


def run_cli(*args):
    return CliRunner().invoke(cli, ["sim", "load", *map(str, args)])


# ------------------------------------------------------------ bad values
RANGE_1 = "is not in the range x>=1."
PROBABILITY = "is not in the range 0.0<=x<=1.0."
BAD = [
    (["--devices", "-5"], "--devices", "-5 " + RANGE_1),
    (["--devices", "0"], "--devices", "0 " + RANGE_1),
    (["--devices", "ten"], "--devices", "'ten' is not a valid whole number."),
    (["--devices", "2.5"], "--devices", "'2.5' is not a valid whole number."),
    (["--interval", "0"], "--interval", "0.0 is not in the range x>=0.1."),
    (["--interval", "-60"], "--interval", "-60.0 is not in the range x>=0.1."),
    (["--interval", "nan"], "--interval", "'nan' is not a finite number."),
    (["--interval", "inf"], "--interval", "'inf' is not a finite number."),
    (["--interval", "soon"], "--interval", "'soon' is not a valid number."),
    (["--jitter", "-0.5"], "--jitter", "-0.5 is not in the range x>=0.0."),
    (["--jitter", "nan"], "--jitter", "'nan' is not a finite number."),
    (["--jitter", "61"], "--jitter",
     "61 is more than --interval (60): a wake may come at most one interval early or late."),
    (["--interval", "2", "--jitter", "2.5"], "--jitter",
     "2.5 is more than --interval (2): a wake may come at most one interval early or late."),
    (["--duration", "-1"], "--duration", "-1.0 is not in the range x>=0.0."),
    (["--duration", "nan"], "--duration", "'nan' is not a finite number."),
    (["--duration", "inf"], "--duration", "'inf' is not a finite number."),
    (["--concurrency", "0"], "--concurrency", "0 " + RANGE_1),
    (["--concurrency", "-3"], "--concurrency", "-3 " + RANGE_1),
    (["--seed", "x"], "--seed", "'x' is not a valid integer."),
    *[([f"--{p}", v], f"--{p}", f"{float(v)} " + PROBABILITY)
      for p in ("lost-ack", "duplicate-status", "never-wake") for v in ("1.5", "-0.1")],
    *[([f"--{p}", "nan"], f"--{p}", "'nan' is not a finite number.")
      for p in ("lost-ack", "duplicate-status", "never-wake")],
    (["--prefix", ""], "--prefix", "the prefix is empty: device ids would begin with '-'."),
    (["--prefix", "Load/x"], "--prefix",
     "'Load/x' makes device ids such as 'Load/x-1000', which are not 1..64 of a-z, 0-9, _ and -."),
    (["--prefix", "p" * 59, "--devices", "10000"], "--prefix",
     f"'{'p' * 59}' makes device ids such as '{'p' * 59}-10000', which are not 1..64 of a-z, 0-9, _ and -."),
]


@pytest.mark.parametrize("args, option, message", BAD, ids=[" ".join(a) or "empty" for a, _, _ in BAD])
def test_a_bad_value_is_one_click_error_before_anything_is_opened(tmp_path, args, option, message):
    db = tmp_path / "mpfleet.db"
    result = run_cli("--provision-only", "--db", db, "--keys-dir", tmp_path / "keys", *args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Invalid value for '{option}': {message}"], result.stderr
    assert result.stdout == ""
    assert not db.exists() and not (tmp_path / "keys").exists()


@pytest.mark.parametrize("args", [
    ["--interval", "2", "--jitter", "2"],        # jitter up to the interval
    ["--interval", "0.1"],                        # the default jitter shrinks to half a short interval
    ["--jitter", "0", "--duration", "0"],
    ["--lost-ack", "1", "--duplicate-status", "0", "--never-wake", "1"],
    ["--devices", "1", "--concurrency", "1", "--seed", "-7"],
    ["--prefix", "p" * 59, "--devices", "9999"],  # p...p-9999: 64 characters
], ids=lambda a: " ".join(a))
def test_the_edges_of_each_rule_are_accepted(tmp_path, args):
    result = run_cli("--provision-only", "--db", tmp_path / "mpfleet.db", "--keys-dir", tmp_path / "keys", *args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("kw", [{"interval_s": 0}, {"interval_s": float("nan")}, {"jitter_s": -1},
                                {"interval_s": 2, "jitter_s": 3}, {"concurrency": 0}, {"first_wake_s": -1}],
                         ids=str)
def test_the_library_holds_the_same_schedule_rules(kw):
    from mpfleet.sim.load import LoadFleet

    with pytest.raises(ValueError, match=next(iter(kw))):
        LoadFleet([], "127.0.0.1", 1883, **kw)


@pytest.mark.parametrize("name", ["lost_ack", "duplicate_status", "never_wake"])
@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_the_library_holds_the_same_fault_rules(name, value):
    from mpfleet.sim.load import Faults

    with pytest.raises(ValueError, match=f"Faults.{name} is a probability"):
        Faults(**{name: value})


# ------------------------------------------------------------ --provision-only
def test_provision_only_registers_the_devices_in_the_given_database(tmp_path):
    db = tmp_path / "fleet.db"
    closed = f"mqtt://127.0.0.1:{free_port()}"  # provisioning needs no broker
    result = run_cli("--provision-only", "--devices", 12, "--prefix", "pv", "--group", "lab", "--group", "east",
                     "--broker", closed, "--db", db, "--keys-dir", tmp_path / "keys")
    assert result.exit_code == 0, result.output
    assert "provisioned 12 devices pv-0001 ... pv-0012" in result.stdout
    with Store(db) as store:
        devices = {d["id"]: d for d in store.devices()}
        assert sorted(devices) == [f"pv-{i:04d}" for i in range(1, 13)]
        assert all(sorted(d["groups"]) == ["east", "lab"] for d in devices.values()), devices
        assert all(store.is_member(d) for d in devices)
    # the same ids again: still twelve, none added
    again = run_cli("--provision-only", "--devices", 12, "--prefix", "pv", "--db", db, "--keys-dir", tmp_path / "keys")
    assert again.exit_code == 0, again.output
    with Store(db) as store:
        assert len([d for d in store.devices() if d["id"].startswith("pv-")]) == 12
    assert not (tmp_path / "mpfleet.db").exists()  # --db was used, nothing else


# ------------------------------------------------------------ a short run
@pytest.mark.slow
def test_a_short_run_against_mosquitto_and_serve_gives_a_summary_that_adds_up(tmp_path, mosquitto):
    from mpfleet.fleet.serve import Dispatcher

    n, duration = 20, 3.0
    env = FleetEnv(tmp_path, mosquitto)  # the host: database, keys, rollout engine
    try:
        common = ["--devices", n, "--prefix", "run", "--db", env.db, "--keys-dir", env.keys]
        provisioned = run_cli("--provision-only", "--group", "run", *common)
        assert provisioned.exit_code == 0, provisioned.output
        job = env.engine.create_job("diag", {}, ["run"], job_id="diag-run")
        with Dispatcher(env.cfg, env.db, keys_dir=env.keys, tick_s=0.1) as serve:
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "mpfleet", "sim", "load", *map(str, common), "--broker", mosquitto.url,
                 "--interval", "0.5", "--jitter", "0.2", "--duration", str(duration), "--seed", "7",
                 "--lost-ack", "0.3", "--duplicate-status", "1", "--never-wake", "0.2", "--json"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            took = time.monotonic() - started
            assert proc.returncode == 0, proc.stderr
            s = json.loads(proc.stdout)
            awake = n - s["never_wake"]

            def stored() -> int:
                return env.store.db.execute("SELECT COUNT(*) FROM samples WHERE device LIKE 'run-%'").fetchone()[0]

            deadline = time.monotonic() + 10
            while (stored() < s["wakes"] or env.engine.job_status(job).counts["SUCCEEDED"] < s["statuses"].get(
                    "IN_PROGRESS", 0)) and time.monotonic() < deadline:
                time.sleep(0.1)
            host = env.engine.job_status(job)
        assert serve.stats.errors == 0, serve.stats.last_error

        assert s["devices"] == n and duration <= s["elapsed_s"] < took
        assert 0 < s["never_wake"] < n  # seed 7: some never wake, most do
        assert s["wake_errors"] == 0 and s["errors"] == {}, s["errors"]
        # every awake device woke, several times: one sample and one frame each wake
        assert s["wakes"] >= 2 * awake
        assert s["frames"] == s["wakes"]
        # a lost ack sends those samples again; the host stores each sample once
        assert s["acks_lost"] > 0 and 0 < s["acks_taken"] <= s["wakes"]
        assert s["samples_sent"] > s["frames"]
        assert stored() == s["wakes"]
        # the job: each awake device ran it once (IN_PROGRESS, SUCCEEDED); finished envelopes
        # still in the queue are reported again, so SUCCEEDED counts at least as many
        assert set(s["statuses"]) == {"IN_PROGRESS", "SUCCEEDED"}, s["statuses"]
        assert s["statuses"]["IN_PROGRESS"] == awake
        assert s["statuses"]["SUCCEEDED"] >= awake
        assert s["duplicate_statuses_sent"] == sum(s["statuses"].values())  # --duplicate-status 1
        # what the host recorded: one SUCCEEDED execution per awake device, the others still queued
        assert host.counts["SUCCEEDED"] == awake and len(host.devices) == n
        assert host.counts["QUEUED"] == s["never_wake"]
        assert s["mean_wake_s"] > 0 and s["cpu_s"] > 0
    finally:
        env.store.close()


def test_running_devices_that_were_never_provisioned_is_one_line(tmp_path, mosquitto):
    proc = subprocess.run([sys.executable, "-m", "mpfleet", "sim", "load", "--devices", "3", "--prefix", "ghost",
                           "--broker", mosquitto.url, "--duration", "1", "--db", str(tmp_path / "mpfleet.db"),
                           "--keys-dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == "mpfleet: device ghost-0001 is not registered: run with --provision first"
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------ --help
def test_help_explains_every_option_and_its_rule():
    result = run_cli("--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # as one line: the help is wrapped to the terminal
    options = [p for p in sim_load.params if isinstance(p, click.Option) and p.name != "help"]
    assert len(options) >= 18
    for option in options:
        assert option.help, option.name
        assert " ".join(option.help.split()) in text, option.name
        for flag in option.opts + option.secondary_opts:
            assert flag in text, flag
    for rule in ("Number of devices, at least 1", "PREFIX-0001 must be a device id",
                 "Seconds between a device's wakes, at least 0.1", "0 up to --interval",
                 "[default: (5, or half of --interval when less); x>=0.0]", "Stop after this many seconds, 0 or more",
                 "at most (1 or more)", "--lost-ack P Probability, 0 to 1", "--duplicate-status P Probability, 0 to 1",
                 "--never-wake P Probability, 0 to 1"):
        assert rule in text, rule
