"""`make demo` (python -m mpfleet.demo.fleet) runs to the end and every demo device SUCCEEDED."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpfleet.db.store import Store

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("broker, devices", [("mosquitto", 20)])
def test_demo_runs_to_a_passing_summary(tmp_path, broker, devices):
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "mpfleet.demo.fleet", "--dir", str(workdir), "--broker", broker,
                           "--devices", str(devices)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo passed" in proc.stdout and f"broker: {broker}" in proc.stdout
    with Store(workdir / "mpfleet.db") as store:
        rows = store.db.execute("SELECT job, status, COUNT(*) FROM executions GROUP BY job, status").fetchall()
        jobs = dict(store.db.execute("SELECT id, status FROM jobs").fetchall())
    assert jobs == {"bad-interval": "ABORTED", "wake-budget-15s": "COMPLETED", "app-0.2.0": "COMPLETED"}
    assert "three staged rollouts" in README.read_text()  # what the README says the demo does, it does
    counts = {(job, status): n for job, status, n in rows}
    assert counts[("wake-budget-15s", "SUCCEEDED")] == devices
    assert counts[("app-0.2.0", "SUCCEEDED")] == devices
    with Store(workdir / "mpfleet.db") as store:
        assert {d["state"]["app"] for d in store.devices()} == {"0.2.0"}
    assert sum(n for (job, _), n in counts.items() if job == "bad-interval") <= max(1, round(devices * 0.1))
    if broker == "mosquitto":  # mutual TLS: a certificate per device, the ACL written and used, no passwords
        assert "mqtts://127.0.0.1:" in proc.stdout and "with mutual TLS" in proc.stdout
        assert "user demo-0001" in (workdir / "broker" / "acl").read_text()
        assert not (workdir / "broker" / "passwd").exists()
        with Store(workdir / "mpfleet.db") as store:
            subjects = {c["subject"] for c in store.certificates() if c["kind"] == "device"}
        assert subjects == {f"demo-{i:04d}" for i in range(1, devices + 1)}


def test_amqtt_fallback_carries_a_job_to_a_device(tmp_path):
    """The broker used when mosquitto is missing: serve and the real firmware over amqtt.
    (One device at a time: see docs/dispatch.md for amqtt's limits with many.)"""
    from mpfleet.broker.local import AmqttBroker
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.broker.link import parse_broker_url
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine
    from mpfleet.fleet.serve import Dispatcher
    from mpfleet.sim.fleet import AWAKE_CONFIG, provision_sim_fleet

    with AmqttBroker() as broker, Store(tmp_path / "m.db") as store:
        cfg = parse_broker_url(broker.url)
        ring = KeyRing(store, tmp_path / "keys")
        ring.init()
        (board,) = provision_sim_fleet(store, ring, tmp_path / "fleet", 1, cfg, with_credentials=False,
                                       config_overrides=AWAKE_CONFIG)
        engine = RolloutEngine(store, ring, Registry(store))
        with Dispatcher(cfg, store.path, keys_dir=tmp_path / "keys", tick_s=0.1):
            board.boot()
            job = engine.create_job("config", {"set": {"upload_watermark": 401}}, "*")
            for _ in range(6):
                time.sleep(0.5)
                board.boot()
                if engine.job_status(job).status == "COMPLETED":
                    break
            status = engine.job_status(job)
        assert status.status == "COMPLETED" and status.counts["SUCCEEDED"] == 1
        assert store.sample_count() >= 2  # samples went through amqtt and were acked
