"""The protocol-level load fleet (mpfleet.sim.load, docs/sim-load.md) against real
mosquitto and the serve library: jobs end as the agent would end them, hostile
envelopes are refused with the agent's reasons, faults leave no duplicates, and the
execution records match those of the real firmware."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from agent_harness import FleetEnv
from conftest import stress_count
from mpfleet.fleet.serve import Dispatcher
from mpfleet.sim.load import Faults, LoadFleet, provision_load_fleet

EQUIV_K = stress_count(20, 200)


class Env(FleetEnv):
    def executions(self, job: str) -> dict[str, list[tuple]]:
        out: dict[str, list[tuple]] = {}
        for dev, status, attempt, detail in self.store.db.execute(
                "SELECT device, status, device_attempt, detail_json FROM executions WHERE job = ? "
                "ORDER BY device, attempt", (job,)):
            out.setdefault(dev, []).append((status, attempt, json.loads(detail) if detail else None))
        return out


@pytest.fixture
def env(tmp_path, mosquitto):
    e = Env(tmp_path, mosquitto)
    d = Dispatcher(e.cfg, e.db, keys_dir=e.keys, tick_s=0.1).start()
    e.dispatcher = d
    yield e
    d.stop()
    e.store.close()
    assert d.stats.errors == 0, d.stats.last_error


def _fleet(env, devices, **kw) -> LoadFleet:
    return LoadFleet(devices, env.cfg.host, env.cfg.port, **kw)


def _wake_until(env, fleet, predicate, rounds: int = 8) -> None:
    for _ in range(rounds):
        time.sleep(0.3)  # serve publishes what the last round caused
        asyncio.run(fleet.wake_all())
        time.sleep(0.3)
        if predicate():
            return
    raise AssertionError(f"condition not met after {rounds} rounds: {fleet.stats.to_json()}")


def test_config_job_on_500_load_devices_succeeds_once_each(env):
    devices = provision_load_fleet(env.store, env.ring, 500, prefix="ld", groups=["load"])
    fleet = _fleet(env, devices, concurrency=200)
    asyncio.run(fleet.wake_all())  # the host hears of them
    env.engine.create_job("config", {"set": {"sample_interval_s": 30}}, ["load"], job_id="cfg-500")
    _wake_until(env, fleet, lambda: env.engine.job_status("cfg-500").status != "ACTIVE")
    records = env.executions("cfg-500")
    assert len(records) == 500
    for dev in devices:
        assert records[dev.id] == [("SUCCEEDED", 1, {"applied": ["sample_interval_s"]})], dev.id
        ran = [r for r in dev.ran if r[0] == "cfg-500"]
        assert ran == [("cfg-500", "SUCCEEDED", 1, {"applied": ["sample_interval_s"]})]
        assert dev.config["sample_interval_s"] == 30
    assert fleet.stats.wake_errors == 0, fleet.stats.errors


def test_tampered_and_foreign_envelopes_are_rejected_with_the_agents_reasons(env, mosquitto):
    import paho.mqtt.client as mqtt

    from mpfleet.fleet.rollout import envelope_digest
    from mpfleet.protocol.signing import b64url, b64url_decode

    a, b = provision_load_fleet(env.store, env.ring, 2, prefix="hx")
    key = env.ring.load(env.ring.active().kid)
    good = key.sign({"id": "j-tamper", "seq": 10**6, "type": "diag", "params": {}, "targets": [a.id],
                     "iat": int(time.time())})
    kid, body, sig = good.split(".")[1:]
    payload = json.loads(b64url_decode(body))
    payload["type"] = "reboot"
    tampered = f"mpf1.{kid}.{b64url(json.dumps(payload).encode())}.{sig}"
    foreign = key.sign({"id": "j-other", "seq": 10**6 + 1, "type": "diag", "params": {}, "targets": [b.id],
                        "iat": int(time.time())})
    fleet = _fleet(env, [a])
    env.dispatcher.stop()  # the queue is ours for this test
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile")
    pub.connect(env.cfg.host, env.cfg.port)
    pub.loop_start()
    pub.publish(a.topic("jobs"), json.dumps([tampered, foreign]), qos=1, retain=True).wait_for_publish()
    asyncio.run(fleet.wake_all())
    asyncio.run(fleet.wake_all())  # each reported once
    pub.publish(a.topic("jobs"), b"", qos=1, retain=True).wait_for_publish()
    pub.loop_stop()
    pub.disconnect()
    rejected = {r[0]: r[3] for r in a.ran if r[1] == "REJECTED"}
    assert rejected == {"envelope:" + envelope_digest(tampered): "bad signature",
                        "envelope:" + envelope_digest(foreign): "not for this device"}
    assert len([r for r in a.ran if r[1] == "REJECTED"]) == 2
    assert a.last == {}  # no rejection moves the floor


def test_duplicate_statuses_and_lost_acks_leave_no_duplicates(env):
    devices = provision_load_fleet(env.store, env.ring, 40, prefix="fx", groups=["fx"])
    fleet = _fleet(env, devices, faults=Faults(duplicate_status=1.0, lost_ack=0.5), seed=3)
    asyncio.run(fleet.wake_all())
    env.engine.create_job("diag", {}, ["fx"], job_id="diag-dup")
    _wake_until(env, fleet, lambda: env.engine.job_status("diag-dup").status != "ACTIVE")
    for _ in range(3):
        asyncio.run(fleet.wake_all())
        time.sleep(0.2)
    records = env.executions("diag-dup")
    assert all(len(r) == 1 and r[0][0] == "SUCCEEDED" and r[0][1] == 1 for r in records.values())
    assert len(records) == 40
    assert fleet.stats.duplicates_sent > 0 and fleet.stats.acks_lost > 0
    # lost acks: the same seqs sent again, stored once
    assert fleet.stats.samples_sent > sum(d.next_seq - 1 for d in devices)
    rows = env.store.db.execute("SELECT device, COUNT(*), COUNT(DISTINCT seq), MAX(seq) FROM samples "
                                "WHERE device LIKE 'fx-%' GROUP BY device").fetchall()
    assert len(rows) == 40
    for _dev, n, distinct, top in rows:
        assert n == distinct == top


def test_same_config_job_gives_the_same_records_as_the_real_firmware(env, tmp_path):
    from mpfleet.sim.fleet import AWAKE_CONFIG, FleetRunner, provision_sim_fleet

    boards = provision_sim_fleet(env.store, env.ring, tmp_path / "real", EQUIV_K, env.cfg, prefix="real",
                                 groups_fn=lambda i, d: ["eq-real"], with_credentials=False,
                                 config_overrides=AWAKE_CONFIG)
    load = provision_load_fleet(env.store, env.ring, EQUIV_K, prefix="lq", groups=["eq-load"])
    fleet = _fleet(env, load)
    env.engine.create_job("config", {"set": {"upload_every_wakes": 1}}, ["eq-real"], job_id="eq-real")
    env.engine.create_job("config", {"set": {"upload_every_wakes": 1}}, ["eq-load"], job_id="eq-load")
    with FleetRunner(boards, mode="awake") as runner:
        _wake_until(env, fleet, lambda: env.engine.job_status("eq-load").status != "ACTIVE")
        deadline = time.monotonic() + 60
        while env.engine.job_status("eq-real").status == "ACTIVE" and time.monotonic() < deadline:
            time.sleep(0.2)
        runner.stop()
    real = sorted(r for recs in env.executions("eq-real").values() for r in [tuple(map(json.dumps, recs))])
    mine = sorted(r for recs in env.executions("eq-load").values() for r in [tuple(map(json.dumps, recs))])
    assert len(real) == len(mine) == EQUIV_K
    assert real == mine


def test_a_fan_out_past_the_unconfirmed_window_publishes_every_queue(env, monkeypatch):
    # serve holds at most QUEUE_WINDOW queue publishes unconfirmed (MQTT packet ids are 16
    # bits: past 65,535 outstanding, paho reuses one and a queue is lost); the rest follow
    from mpfleet.fleet import serve

    monkeypatch.setattr(serve, "QUEUE_WINDOW", 7)
    devices = provision_load_fleet(env.store, env.ring, 60, prefix="win", groups=["win"])
    fleet = _fleet(env, devices, concurrency=60)
    asyncio.run(fleet.wake_all())
    env.engine.create_job("config", {"set": {"sample_interval_s": 35}}, ["win"], job_id="windowed")
    _wake_until(env, fleet, lambda: env.engine.job_status("windowed").status != "ACTIVE")
    assert all(r == [("SUCCEEDED", 1, {"applied": ["sample_interval_s"]})]
               for r in env.executions("windowed").values())
    assert len(env.executions("windowed")) == 60
    assert env.dispatcher.stats.queue_confirmed >= 60
