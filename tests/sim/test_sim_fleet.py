"""Many virtual devices at once (mpfleet.sim.fleet): provisioning and the fleet runner,
with a real mosquitto and the real ingester."""

from __future__ import annotations

import json
import statistics
import time

import pytest
from agent_harness import Host
from click.testing import CliRunner
from conftest import child_processes

from mpfleet.sim.fleet import AWAKE_CONFIG, FleetRunner, load_fleet, provision_fleet


@pytest.fixture(scope="module")
def host(mosquitto, tmp_path_factory):
    h = Host(mosquitto, tmp_path_factory.mktemp("fleetdb") / "fleet.db", client_id="ingest-fleet").start()
    yield h
    h.close()


def test_awake_fleet_boots_concurrently_and_uploads(mosquitto, host, tmp_path):
    before = set(child_processes())
    boards = provision_fleet(tmp_path / "fleet", 8, mosquitto.host, mosquitto.port, prefix="awk",
                             config_overrides=AWAKE_CONFIG)
    runner = FleetRunner(boards, mode="awake")
    runner.start()
    try:
        done = runner.wait_until(lambda s: s["boots_per_device_min"] >= 3, timeout=20)
    finally:
        runner.stop()
    stats = runner.stats()
    print({k: v for k, v in stats.items() if k != "boots_per_device"})
    assert done, stats
    assert not runner.running
    assert stats["stopped"] == {} and stats["errors"] == {} and stats["looping"] == []
    assert set(stats["exit_reasons"]) == {"deepsleep"}
    assert all(n >= 3 for n in stats["boots_per_device"].values())
    # stop() leaves no device process behind
    assert set(child_processes()) - before == set()

    host.wait_idle()
    for vb in boards:
        seqs = [row[1] for row in host.rows(vb.device_id)]
        assert len(seqs) >= 2, (vb.device_id, seqs)
        assert len(seqs) == len(set(seqs))
    # concurrency: all first boots started together, not one board after another
    starts = sorted(t for vb in boards for t in runner.boot_starts(vb.device_id)[:1])
    assert starts[-1] - starts[0] < 1.0


def test_provisioning_50_is_fast_and_each_board_is_its_own(tmp_path):
    started = time.perf_counter()
    boards = provision_fleet(tmp_path / "fleet", 50, "127.0.0.1", 1883, prefix="fast",
                             groups_fn=lambda i, dev: ["even" if i % 2 == 0 else "odd"],
                             trusted_keys={"k1": "AAAA"}, broker_credentials=("fleet", "secret"))
    took = time.perf_counter() - started
    print(f"provisioned 50 boards in {took:.2f} s ({took / 50 * 1000:.1f} ms per board)")
    ids = [vb.device_id for vb in boards]
    assert ids == [f"fast-{i:04d}" for i in range(1, 51)]
    assert len({bytes(vb.settings["mac"]) for vb in boards}) == 50
    assert all(vb.powered and abs(vb.clock_s - time.time()) < 120 for vb in boards)
    assert [vb.device_id for vb in load_fleet(tmp_path / "fleet")] == ids
    for i, vb in zip((1, 2, 50), (boards[0], boards[1], boards[49])):
        cfg = json.loads(vb.fs_get("/config.json"))
        assert cfg["device_id"] == vb.device_id
        assert cfg["groups"] == ["even" if i % 2 == 0 else "odd"]
        assert cfg["trusted_keys"] == {"k1": "AAAA"}
        assert (cfg["broker"]["user"], cfg["broker"]["password"]) == ("fleet", "secret")
        assert "main.py" in vb.fs_listdir("/")
        assert vb.state["boot_count"] == 0 and vb.boot_records() == []


def test_sleeping_fleet_wakes_at_scaled_intervals(mosquitto, tmp_path):
    # 60 s interval on a 60x clock: a boot about every real second; no upload due.
    boards = provision_fleet(tmp_path / "fleet", 3, mosquitto.host, mosquitto.port, prefix="slp",
                             config_overrides={"sample_interval_s": 60, "upload_every_wakes": 1000})
    runner = FleetRunner(boards, mode="sleeping", clock_scale=60)
    runner.start()
    try:
        done = runner.wait_until(lambda s: s["boots_per_device_min"] >= 4, timeout=10)
    finally:
        runner.stop()
    assert done, runner.stats()
    for vb in boards:
        starts = runner.boot_starts(vb.device_id)
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert 0.8 < statistics.median(gaps) < 1.6, gaps
        clocks = [r["clock_s"] for r in vb.boot_records()]
        device_gaps = [b - a for a, b in zip(clocks, clocks[1:])]
        assert all(abs(g - 60) < 2 for g in device_gaps), device_gaps


def test_cli_runs_a_fleet_for_a_duration(mosquitto, tmp_path):
    from mpfleet.cli import cli

    before = set(child_processes())
    result = CliRunner().invoke(cli, ["sim", "fleet", "--devices", "2", "--root", str(tmp_path / "f"),
                                      "--broker", mosquitto.url, "--sleeping", "--scale", "600",
                                      "--duration", "1.5", "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output[result.output.index("{"):])
    assert stats["devices"] == 2 and stats["boots"] >= 2 and stats["stopped"] == {}
    assert set(child_processes()) - before == set()


def test_a_board_that_stops_is_reported_not_retried(tmp_path):
    boards = provision_fleet(tmp_path / "fleet", 3, "127.0.0.1", 1, prefix="stp",
                             config_overrides={"sample_interval_s": 60, "upload_every_wakes": 1000})
    boards[1].fs_put({"/main.py": b"print('main returns: the chip sits at the REPL')\n"})
    runner = FleetRunner(boards, mode="sleeping", clock_scale=600)
    runner.start()
    try:
        done = runner.wait_until(lambda s: s["boots_per_device"]["stp-0001"] >= 5, timeout=10)
    finally:
        runner.stop()
    stats = runner.stats()
    assert done, stats
    assert stats["stopped"] == {"stp-0002": "repl"}
    assert stats["boots_per_device"]["stp-0002"] == 1
    assert stats["running"] == 2 and stats["exit_reasons"]["repl"] == 1
