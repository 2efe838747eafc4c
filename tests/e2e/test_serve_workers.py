"""Several `serve` workers on one PostgreSQL and one mosquitto (fleet/serve.py,
docs/scale.md): the devices' messages are shared among them, one leads, a killed
leader is replaced, and a staged rollout to a load fleet (mpfleet.sim.load) survives
`kill -9` of any worker at random points with nothing run twice and nothing lost,
giving the records the same rollout gives on SQLite with one serve.

Skipped, with the reason, where no PostgreSQL answers (tests/pgharness.py)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from agent_harness import FleetEnv
from conftest import stress_count
from mpfleet.fleet import dispatchers
from mpfleet.fleet.serve import Dispatcher, ServeError
from mpfleet.sim.load import LoadFleet, provision_load_fleet

DEVICES = stress_count(120, 1000)
KILLS = stress_count(8, 30)  # at most, one a round while the rollout runs
STAGES = [0.05, 0.1, 0.25, 0.5, 1.0]


@pytest.fixture
def pg_url(pg_database):
    return pg_database.url()


def _records(store, job: str) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for dev, status, attempt, dev_attempt, detail in store.db.execute(
            "SELECT device, status, attempt, device_attempt, detail_json FROM executions WHERE job = ? "
            "ORDER BY device, attempt", (job,)):
        out.setdefault(dev, []).append((status, attempt, dev_attempt, json.loads(detail) if detail else None))
    return out


def _leaders(store) -> list[dispatchers.Dispatcher]:
    return [d for d in dispatchers.running(store) if d.leads is not None]


def test_a_worker_name_needs_postgresql_and_runs_once(tmp_path, mosquitto, pg_url):
    env = FleetEnv(tmp_path, mosquitto)
    with pytest.raises(ServeError, match="need a PostgreSQL database"):
        Dispatcher(env.cfg, env.db, keys_dir=env.keys, worker="a")
    env.store.close()
    pg = FleetEnv(tmp_path / "pg", mosquitto, db=pg_url)
    with Dispatcher(pg.cfg, pg_url, keys_dir=pg.keys, worker="a", tick_s=0.1):
        with pytest.raises(ServeError, match="a serve worker named 'a' already runs"):
            Dispatcher(pg.cfg, pg_url, keys_dir=pg.keys, worker="a", client_id="another-id").start()
    pg.store.close()


def test_two_workers_share_the_messages_one_leads_and_the_other_takes_over(tmp_path, mosquitto, pg_url):
    env = FleetEnv(tmp_path, mosquitto, db=pg_url)
    devices = provision_load_fleet(env.store, env.ring, 60, prefix="sw", groups=["sw"])
    fleet = LoadFleet(devices, env.cfg.host, env.cfg.port, concurrency=60)
    a = Dispatcher(env.cfg, pg_url, keys_dir=env.keys, worker="a", tick_s=0.1).start()
    b = Dispatcher(env.cfg, pg_url, keys_dir=env.keys, worker="b", tick_s=0.1).start()
    try:
        env.wait(lambda: len(_leaders(env.store)) == 1, 10, "one leader")
        assert a.leads != b.leads
        asyncio.run(fleet.wake_all())
        env.engine.create_job("config", {"set": {"sample_interval_s": 45}}, ["sw"], job_id="share")
        _roll_out(env, fleet, "share", rounds=20)
        assert env.engine.job_status("share").status == "COMPLETED"
        # the broker spread the statuses and samples over both workers, exactly once in total
        assert a.stats.statuses > 0 and b.stats.statuses > 0, (a.stats.statuses, b.stats.statuses)
        assert a.stats.ingest.samples_new > 0 and b.stats.ingest.samples_new > 0
        assert env.store.sample_count() == sum(d.next_seq - 1 for d in devices)

        leader, other = (a, b) if a.leads else (b, a)
        stopped_at = time.time()
        leader.stop()
        env.wait(lambda: other.leads, 5, "the other worker to lead")
        row = _leaders(env.store)
        assert len(row) == 1 and row[0].leads >= stopped_at
        # the new leader runs the next job on its own
        env.engine.create_job("config", {"set": {"sample_interval_s": 50}}, ["sw"], job_id="after")
        _roll_out(env, fleet, "after", rounds=20)
        assert env.engine.job_status("after").status == "COMPLETED"
        assert all(d.config["sample_interval_s"] == 50 for d in devices)
    finally:
        a.stop()
        b.stop()
        env.store.close()
    assert a.stats.errors == 0 and b.stats.errors == 0, (a.stats.last_error, b.stats.last_error)


def test_a_leader_without_the_broker_steps_down_for_one_that_has_it(tmp_path, mosquitto, pg_url, monkeypatch):
    from mpfleet.broker.link import BrokerConfig
    from mpfleet.fleet import serve
    from mpfleet.sim.netfault import LinkCutter

    monkeypatch.setattr(serve, "LEAD_OFFLINE_S", 1.0)
    env = FleetEnv(tmp_path, mosquitto, db=pg_url)
    link = LinkCutter(env.cfg.host, env.cfg.port).start()
    cut_off = BrokerConfig(host="127.0.0.1", port=link.port)
    a = Dispatcher(cut_off, pg_url, keys_dir=env.keys, worker="a", tick_s=0.1).start()
    try:
        env.wait(lambda: a.leads, 10, "the first worker to lead")
        b = Dispatcher(env.cfg, pg_url, keys_dir=env.keys, worker="b", tick_s=0.1).start()
        try:
            time.sleep(1.5)
            assert a.leads and not b.leads  # a leader with the broker keeps the lead
            link.stop()  # a loses the broker, and cannot reach it again
            env.wait(lambda: b.leads and not a.leads, 15, "the worker with the broker to lead")
            assert [d.name for d in _leaders(env.store)] == [b.name]
        finally:
            b.stop()
    finally:
        a.stop()
        link.stop()
        env.store.close()


class Workers:
    """`mpfleet serve` workers as processes of their own, killed with SIGKILL."""

    def __init__(self, env: FleetEnv, db: str, names: list[str]):
        self.env, self.db = env, db
        self.procs: dict[str, subprocess.Popen] = {}
        for name in names:
            self.start(name)

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "mpfleet", "serve", "--db", self.db, "--worker", name, "--quiet",
             "--broker", self.env.broker.url, "--keys-dir", str(self.env.keys), "--tick", "0.1"],
            stdout=subprocess.DEVNULL, stderr=open(self.env.root / f"serve-{name}.log", "ab"),
            start_new_session=True)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def leader(self) -> str | None:
        pids = {p.pid: n for n, p in self.procs.items()}
        for d in _leaders(self.env.store):
            if d.pid in pids:
                return pids[d.pid]
        return None

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _roll_out(env: FleetEnv, fleet: LoadFleet, job: str, between=None, rounds: int = 60) -> None:
    for i in range(rounds):
        time.sleep(0.2)
        asyncio.run(fleet.wake_all())
        if between is not None:
            between(i)
        if env.engine.job_status(job).status != "ACTIVE":
            return
    raise AssertionError(f"{job} still ACTIVE after {rounds} rounds: {env.engine.job_status(job)}")


def _staged_rollout(env: FleetEnv, devices, job: str) -> None:
    from mpfleet.fleet.jobs_model import RolloutOptions

    env.engine.create_job("config", {"set": {"sample_interval_s": 40}}, ["acc"], job_id=job,
                          options=RolloutOptions(stages=STAGES))


def test_kill_9_of_any_worker_during_a_staged_rollout_loses_nothing_and_runs_nothing_twice(
        tmp_path, mosquitto, pg_url):
    rng = random.Random(17)
    env = FleetEnv(tmp_path, mosquitto, db=pg_url)
    devices = provision_load_fleet(env.store, env.ring, DEVICES, prefix="acc", groups=["acc"])
    fleet = LoadFleet(devices, env.cfg.host, env.cfg.port, concurrency=100)
    workers = Workers(env, pg_url, ["w1", "w2", "w3"])
    handovers: list[float] = []
    kills: list[str] = []
    try:
        env.wait(lambda: workers.leader() is not None, 30, "a leader among the workers")
        asyncio.run(fleet.wake_all())
        _staged_rollout(env, devices, "staged")

        def between(i: int) -> None:
            if len(kills) >= KILLS:
                return
            leader = workers.leader()
            victim = leader if len(kills) % 2 == 0 and leader else rng.choice(sorted(workers.procs))
            time.sleep(rng.uniform(0, 0.3))  # somewhere in what the round caused
            killed_at = time.time()
            workers.kill(victim)
            kills.append(victim)
            if victim == leader:
                env.wait(lambda: any(d.leads >= killed_at for d in _leaders(env.store)), 15, "a new leader")
                handovers.append(max(d.leads for d in _leaders(env.store)) - killed_at)
            workers.start(victim)  # as a supervisor restarts it, under its name (its broker session)

        _roll_out(env, fleet, "staged", between)
        for _ in range(3):  # the last acks and samples
            time.sleep(0.3)
            asyncio.run(fleet.wake_all())
        time.sleep(1)
    finally:
        workers.stop()
    assert len(kills) >= 4 and len(handovers) >= 2, (kills, handovers)
    records = _records(env.store, "staged")
    assert env.engine.job_status("staged").status == "COMPLETED"
    assert len(records) == DEVICES
    for dev in devices:
        # one execution, succeeded, as the device ran it: once
        assert [r[:3] for r in records[dev.id]] == [("SUCCEEDED", 1, 1)], (dev.id, records[dev.id])
        assert [r[0] for r in dev.ran].count("staged") == 1, dev.ran
        # every sample the device no longer holds is stored; nothing is stored twice or made up
        stored = [s for (s,) in env.store.db.execute("SELECT seq FROM samples WHERE device = ? ORDER BY seq",
                                                     (dev.id,))]
        held = {seq for seq, _, _ in dev.backlog}
        assert set(range(1, dev.next_seq)) - held <= set(stored), dev.id
        assert set(stored) <= set(range(1, dev.next_seq)) and len(stored) == len(set(stored))
    assert fleet.stats.wake_errors == 0, fleet.stats.errors
    print(f"\nworkers killed: {kills}; leader handovers (s): {[round(h, 2) for h in handovers]}")
    (tmp_path / "handover.json").write_text(json.dumps({"kills": kills, "handovers_s": handovers}))
    pg_records = {d: [r[:3] + (r[3],) for r in recs] for d, recs in records.items()}
    env.store.close()

    # the same staged rollout with one serve on SQLite gives the same records
    lite = FleetEnv(tmp_path / "sqlite", mosquitto)
    again = provision_load_fleet(lite.store, lite.ring, DEVICES, prefix="acc", groups=["acc"])
    lite_fleet = LoadFleet(again, lite.cfg.host, lite.cfg.port, concurrency=100)
    with Dispatcher(lite.cfg, lite.db, keys_dir=lite.keys, tick_s=0.1):
        asyncio.run(lite_fleet.wake_all())
        _staged_rollout(lite, again, "staged")
        _roll_out(lite, lite_fleet, "staged")
    lite_records = _records(lite.store, "staged")
    lite.store.close()
    assert lite_records == pg_records
