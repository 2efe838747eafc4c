"""The rollout engine's promises about one device's jobs (mpfleet.fleet.rollout), issue 13:

- a device runs the jobs of one kind in the order they were created, not the order
  their envelopes happened to be signed (staged rollouts sign late);
- a QUEUED execution the device does not take is flagged stuck, with the reason, and
  `job status` says so in its exit code; the operator can retry or remove it;
- a final status is applied once, whatever the execution's state and however often
  the device reports it.

Library level (a Store, a KeyRing, a Registry and a fake clock) with simulated devices
that behave as the agent does: they read their queue, run what is above their replay
floor in ascending seq, and report at least once.
"""

from __future__ import annotations

import json
import random

import pytest
from test_rollout import T0, Clock

from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.jobs_model import QUEUED_TIMEOUT_DEFAULT_S, HeldDevice, RolloutError, RolloutOptions
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.protocol.signing import b64url_decode
from mpfleet.db.store import Store



def payload_of(envelope: str) -> dict:
    return json.loads(b64url_decode(envelope.split(".")[2]))


class Device:
    """A device as the agent behaves: on a connected wake it reads its queue, skips what
    it finished, runs envelopes above its replay floor in ascending seq (a config job
    sets its keys) and reports; an envelope at or below the floor is rejected by digest."""

    def __init__(self, device_id: str):
        self.id = device_id
        self.config: dict = {}
        self.floor = 0
        self.done: set[int] = set()
        self.ran: list[tuple[str, int]] = []      # (job id, seq) in the order they ran
        self.replays: list[tuple[str, int]] = []  # envelopes refused as replays
        self.outbox: list[dict] = []

    def wake(self, engine: RolloutEngine, fail: set[str] = frozenset(), budget: int | None = None) -> None:
        queue = sorted(engine.device_queue(self.id), key=lambda e: payload_of(e)["seq"])
        for envelope in queue[:budget]:
            p = payload_of(envelope)
            if p["seq"] in self.done:
                continue
            self.done.add(p["seq"])
            if p["seq"] <= self.floor:
                self.replays.append((p["id"], p["seq"]))
                continue
            self.floor = p["seq"]
            self.ran.append((p["id"], p["seq"]))
            self.outbox.append({"job": p["id"], "seq": p["seq"], "status": "IN_PROGRESS", "attempt": 1})
            if p["id"] in fail:
                self.outbox.append({"job": p["id"], "seq": p["seq"], "status": "FAILED", "attempt": 1,
                                    "detail": "simulated failure"})
                continue
            if p["type"] == "config":
                self.config.update(p["params"].get("set", {}))
            self.outbox.append({"job": p["id"], "seq": p["seq"], "status": "SUCCEEDED", "attempt": 1})

    def deliver(self, engine: RolloutEngine) -> None:
        for message in self.outbox:
            engine.on_status(self.id, message)
        self.outbox.clear()


@pytest.fixture
def env(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    ring = KeyRing(store, tmp_path / "keys")
    ring.init()
    reg = Registry(store)
    for i in range(12):
        reg.add(f"dev-{i:02d}", board="virtual", groups=["pumps"])
    clock = Clock()
    engine = RolloutEngine(store, ring, reg, clock=clock)
    devices = {f"dev-{i:02d}": Device(f"dev-{i:02d}") for i in range(12)}
    yield store, ring, reg, clock, engine, devices
    store.close()


def wake_all(engine, devices, **kw):
    for d in devices.values():
        d.wake(engine, **kw)
        d.deliver(engine)


def run_to_completion(engine, clock, devices, jobs, rounds=50):
    for _ in range(rounds):
        engine.tick()
        wake_all(engine, devices)
        clock.advance(60)
        if all(engine.job_status(j).status != "ACTIVE" for j in jobs):
            return
    raise AssertionError("the jobs did not finish")


def rows(engine, job, device):
    return [r for r in engine.job_status(job).devices if r.device == device]


def report(engine, device, seq, status, job, attempt=1, detail=None) -> bool:
    return engine.on_status(device, {"job": job, "seq": seq, "status": status, "progress": None,
                                     "detail": detail, "attempt": attempt, "ts": 0})


# ---------------------------------------------------------------- creation order


def test_a_later_config_job_is_not_overtaken_by_the_last_stage_of_an_earlier_one(env):
    """Issue 13: the second job was created while the first's last stage was unsigned;
    the devices of that stage ran the older job last and kept its value."""
    store, ring, reg, clock, engine, devices = env
    older = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["pumps"], job_id="older",
                              options=RolloutOptions(stages=[0.25, 1.0]))
    engine.tick()  # the canaries get the older job
    newer = engine.create_job("config", {"set": {"upload_watermark": 200}}, ["pumps"], job_id="newer")
    run_to_completion(engine, clock, devices, [older, newer])
    for job in (older, newer):
        s = engine.job_status(job)
        assert s.status == "COMPLETED" and s.counts["SUCCEEDED"] == 12
    assert {d.id: d.config["upload_watermark"] for d in devices.values()} == {d: 200 for d in devices}
    for d in devices.values():  # and each device ran them in creation order
        assert [job for job, _ in d.ran] == ["older", "newer"] and d.replays == []


def test_a_later_job_waits_while_an_earlier_attempt_may_still_be_retried(env):
    store, ring, reg, clock, engine, devices = env
    older = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-01"], job_id="older",
                              options=RolloutOptions(retries=1))
    engine.tick()
    newer = engine.create_job("config", {"set": {"upload_watermark": 200}}, ["dev-01"], job_id="newer")
    engine.tick()
    assert rows(engine, newer, "dev-01") == []  # a retry of `older` would otherwise come after it
    assert engine.job_status(newer).held == [HeldDevice(device="dev-01", behind=older)]
    devices["dev-01"].wake(engine, fail={"older"})
    devices["dev-01"].deliver(engine)  # FAILED: retried at once, still ahead of `newer`
    run_to_completion(engine, clock, {"dev-01": devices["dev-01"]}, [older, newer])
    assert [j for j, _ in devices["dev-01"].ran] == ["older", "older", "newer"]
    assert devices["dev-01"].config["upload_watermark"] == 200


def test_jobs_of_other_kinds_are_not_held(env):
    """A diag (or an ota) does not wait for an unfinished config rollout, nor hold one."""
    store, ring, reg, clock, engine, devices = env
    engine.create_job("config", {"set": {"upload_watermark": 100}}, ["pumps"], job_id="cfg",
                      options=RolloutOptions(stages=[0.25, 1.0]))
    engine.tick()
    diag = engine.create_job("diag", {}, ["pumps"], job_id="look")
    engine.tick()
    assert engine.job_status(diag).counts["QUEUED"] == 12 and engine.job_status(diag).held == []


def test_a_job_scheduled_for_later_is_ordered_by_its_start(env):
    store, ring, reg, clock, engine, devices = env
    later = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-02"], job_id="tomorrow",
                              options=RolloutOptions(start_at=T0 + 86_400))
    now = engine.create_job("config", {"set": {"upload_watermark": 200}}, ["dev-02"], job_id="today")
    engine.tick()
    assert engine.job_status(now).counts["QUEUED"] == 1  # not held by a job that has not begun
    clock.advance(86_400)
    run_to_completion(engine, clock, {"dev-02": devices["dev-02"]}, [later, now])
    assert [j for j, _ in devices["dev-02"].ran] == ["today", "tomorrow"]


def test_usb_refuses_a_job_an_earlier_one_has_not_reached(env):
    store, ring, reg, clock, engine, devices = env
    engine.create_job("config", {"set": {"upload_watermark": 100}}, ["pumps"], job_id="staged",
                      options=RolloutOptions(stages=[0.1, 1.0]))
    engine.tick()
    held = next(d for d in devices if not engine.device_queue(d))
    newer = engine.create_job("config", {"set": {"upload_watermark": 200}}, [held], job_id="by-usb")
    with pytest.raises(RolloutError, match=f"waits for job staged.*{held}"):
        engine.usb_envelope(newer, held)


# ---------------------------------------------------------------- stuck executions


def last_report(store, device, at):
    """The registry's record of `device`'s latest message (ingest sets it on every state
    and samples message, in wall-clock time)."""
    store.db.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (at, device))


def test_a_queued_execution_past_its_bound_is_flagged_and_keeps_its_state(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-03"], job_id="look")
    engine.tick()
    clock.advance(QUEUED_TIMEOUT_DEFAULT_S)
    assert engine.stuck() == [] and engine.job_status(job).stuck == []  # at the bound: not yet
    clock.advance(1)
    [flag] = engine.job_status(job).stuck
    assert (flag.device, flag.kind, flag.in_queue) == ("dev-03", "offline", True)
    assert "queued 2 h ago, longer than its bound of 2 h" in flag.reason
    assert "has not reported since it was queued (last report: never)" in flag.reason
    [row] = engine.job_status(job).devices
    assert row.status == "QUEUED" and row.stuck == flag
    # the flag changed nothing: the device that wakes late still takes the job
    devices["dev-03"].wake(engine)
    devices["dev-03"].deliver(engine)
    assert engine.job_status(job).stuck == [] and engine.job_status(job).counts["SUCCEEDED"] == 1


def test_a_device_that_reported_but_did_not_take_the_job_is_flagged_as_such(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-03", "dev-04"], job_id="look",
                            options=RolloutOptions(queued_timeout_s=600))
    engine.tick()
    last_report(store, "dev-03", T0 + 300)   # awake after the job was queued
    last_report(store, "dev-04", T0 - 300)   # not since
    clock.advance(601)
    flags = {f.device: f for f in engine.job_status(job).stuck}
    assert flags["dev-03"].kind == "not_taken" and "although dev-03 reported 5 min ago" in flags["dev-03"].reason
    assert flags["dev-04"].kind == "offline" and "last report: 15 min ago" in flags["dev-04"].reason
    assert flags["dev-03"].bound_s == 600 and engine.job_status(job).queued_timeout_s == 600


def test_an_envelope_over_the_limit_the_device_now_reports_is_flagged_at_once(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"name": "x" * 900}}, ["dev-05"], job_id="fat")
    engine.tick()
    assert engine.stuck() == []
    store.touch_device("dev-05", state={"device": "dev-05", "limits": {"job_max_bytes": 512}})
    [flag] = engine.stuck()
    assert flag.kind == "too_large" and "over the limit of 512 bytes" in flag.reason
    assert engine.job_status(job).devices[0].status == "QUEUED"


def test_a_stuck_execution_behind_the_queue_cap_says_so(env):
    store, ring, reg, clock, engine, devices = env
    jobs = [engine.create_job("config", {"set": {"upload_watermark": 100 + i}, "pad": "x" * 900}, ["dev-06"])
            for i in range(10)]
    engine.tick()
    clock.advance(QUEUED_TIMEOUT_DEFAULT_S + 1)
    flags = sorted(engine.stuck(), key=lambda f: f.seq)
    assert len(flags) == 10
    assert all(f.in_queue for f in flags[:2]) and not flags[-1].in_queue
    assert "not in its queue yet: earlier envelopes fill the 6144 bytes" in flags[-1].reason
    assert {f.job for f in flags} == set(jobs)


def test_tick_reports_each_newly_stuck_execution_once_and_changes_nothing(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-07"], job_id="look")
    engine.tick()
    clock.advance(QUEUED_TIMEOUT_DEFAULT_S + 10)
    changes = engine.tick()
    assert [(j, d) for j, d, _ in changes.stuck] == [(job, "dev-07")] and not changes  # a warning, not a change
    clock.advance(60)
    assert engine.tick().stuck == []


# ---------------------------------------------------------------- the operator: retry, remove


def test_retry_replaces_a_stuck_execution_with_a_new_envelope(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-08"], job_id="cfg")
    engine.tick()
    [old] = engine.job_status(job).devices
    with pytest.raises(RolloutError, match="QUEUED on dev-08 and not stuck"):
        engine.retry(job, ["dev-08"])
    clock.advance(QUEUED_TIMEOUT_DEFAULT_S + 1)
    changes = engine.retry(job)  # by default: the failed and the stuck
    assert changes.queued == [(job, "dev-08", 2)] and "dev-08" in changes.devices
    first, second = engine.job_status(job).devices
    assert first.status == "REMOVED" and "replaced by attempt 2" in first.note
    assert second.status == "QUEUED" and second.seq > old.seq and second.stuck is None
    assert [payload_of(e)["seq"] for e in engine.device_queue("dev-08")] == [second.seq]
    # the device had taken the first after all: noted, and the second runs as usual
    assert not report(engine, "dev-08", old.seq, "SUCCEEDED", job)
    assert "device later reported SUCCEEDED" in engine.job_status(job).devices[0].note
    devices["dev-08"].wake(engine)
    devices["dev-08"].deliver(engine)
    assert engine.tick().completed == [job]


def test_retry_of_a_completed_job_reopens_it_for_the_failed_device(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-01", "dev-02"], job_id="cfg",
                            options=RolloutOptions(success_threshold=0.5))
    engine.tick()
    devices["dev-01"].wake(engine, fail={"cfg"})
    wake_all(engine, {"dev-01": devices["dev-01"], "dev-02": devices["dev-02"]})
    assert engine.tick().completed == [job]
    engine.retry(job)
    s = engine.job_status(job)
    assert s.status == "ACTIVE" and "reopened" in s.reason and s.counts["QUEUED"] == 1
    run_to_completion(engine, clock, devices, [job])
    assert devices["dev-01"].config["upload_watermark"] == 100
    assert engine.job_status(job).counts["SUCCEEDED"] == 2


@pytest.mark.parametrize("setup, devices_, message", [
    ("succeeded", ["dev-01"], "already SUCCEEDED on dev-01"),
    ("running", ["dev-01"], "IN_PROGRESS on dev-01"),
    ("succeeded", ["dev-11"], "dev-11 is not a target"),
    ("aborted", ["dev-01"], "is ABORTED: create a new job"),
    ("succeeded", None, "nothing to retry"),
])
def test_retry_refuses_what_it_cannot_retry(env, setup, devices_, message):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-01"], job_id="cfg",
                            options=RolloutOptions(continuous=True, abort_threshold=0.5))
    engine.tick()
    [row] = engine.job_status(job).devices
    report(engine, "dev-01", row.seq, "IN_PROGRESS", job)
    if setup != "running":
        report(engine, "dev-01", row.seq, "FAILED" if setup == "aborted" else "SUCCEEDED", job)
    before = engine.job_status(job)
    with pytest.raises(RolloutError, match=message):
        engine.retry(job, devices_)
    assert engine.job_status(job).devices == before.devices


def test_retry_signs_a_later_queued_job_again_so_the_device_keeps_their_order(env):
    store, ring, reg, clock, engine, devices = env
    older = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-09"], job_id="older")
    engine.tick()
    newer = engine.create_job("config", {"set": {"upload_watermark": 200}}, ["dev-09"], job_id="newer")
    engine.tick()  # `older` QUEUED without retries left: `newer` is queued behind it
    clock.advance(QUEUED_TIMEOUT_DEFAULT_S + 1)
    changes = engine.retry(older, ["dev-09"])
    assert changes.queued == [(older, "dev-09", 2), (newer, "dev-09", 2)]
    queue = [payload_of(e)["id"] for e in engine.device_queue("dev-09")]
    assert queue == ["older", "newer"]
    devices["dev-09"].wake(engine)
    devices["dev-09"].deliver(engine)
    assert devices["dev-09"].config["upload_watermark"] == 200


def test_retry_refuses_when_a_later_job_already_ran_there(env):
    store, ring, reg, clock, engine, devices = env
    older = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-09"], job_id="older")
    engine.tick()
    devices["dev-09"].wake(engine, fail={"older"})
    devices["dev-09"].deliver(engine)
    engine.create_job("config", {"set": {"upload_watermark": 200}}, ["dev-09"], job_id="newer")
    run_to_completion(engine, clock, {"dev-09": devices["dev-09"]}, ["newer"])
    with pytest.raises(RolloutError, match="job newer, which comes after older, has already run on dev-09 "
                                           r"\(SUCCEEDED\): a retry of older would run after it and undo it"):
        engine.retry(older, ["dev-09"])


def test_an_operators_retry_is_not_retried_by_itself(env):
    """It may come after a later job's envelope (signed again behind it): a retry of it
    after a failure would then run after the later job and undo it."""
    store, ring, reg, clock, engine, devices = env
    older = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["dev-09"], job_id="older",
                              options=RolloutOptions(retries=2))
    engine.tick()
    [row] = rows(engine, older, "dev-09")
    report(engine, "dev-09", row.seq, "REJECTED", older, detail="not yet valid")  # never retried by itself
    newer = engine.create_job("config", {"set": {"upload_watermark": 200}}, ["dev-09"], job_id="newer")
    engine.tick()
    assert engine.retry(older, ["dev-09"]).queued == [(older, "dev-09", 2), (newer, "dev-09", 2)]
    devices["dev-09"].wake(engine, fail={"older"})
    devices["dev-09"].deliver(engine)
    engine.tick()
    assert [r.status for r in rows(engine, older, "dev-09")] == ["REJECTED", "FAILED"]  # and no third attempt
    assert devices["dev-09"].config["upload_watermark"] == 200


def test_a_database_from_before_operator_retries_is_upgraded(tmp_path):
    import sqlite3

    # `executions` as made before operator retries (its other tables: db/schema.py at open;
    # every older file: tests/host/test_db_schema.py)
    with sqlite3.connect(tmp_path / "old.db") as old:
        old.execute("CREATE TABLE executions (id INTEGER PRIMARY KEY, job TEXT NOT NULL, device TEXT NOT NULL, "
                    "attempt INTEGER NOT NULL, seq INTEGER NOT NULL, kid TEXT NOT NULL, envelope TEXT NOT NULL, "
                    "status TEXT NOT NULL, stage INTEGER NOT NULL, queued REAL NOT NULL, started REAL, "
                    "finished REAL, updated REAL NOT NULL, device_attempt INTEGER, detail_json TEXT, note TEXT, "
                    "progress_json TEXT, UNIQUE (job, device, attempt))")
        assert "by_operator" not in {r[1] for r in old.execute("PRAGMA table_info(executions)")}
    old.close()
    with Store(tmp_path / "old.db") as store:
        ring = KeyRing(store, tmp_path / "keys")
        ring.init()
        Registry(store).add("dev-1")
        engine = RolloutEngine(store, ring, Registry(store))
        job = engine.create_job("diag", {}, ["dev-1"])
        engine.tick()
        assert engine.job_status(job).counts["QUEUED"] == 1


def test_remove_takes_a_stuck_execution_away_and_the_rollout_goes_on(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"upload_watermark": 100}}, ["pumps"], job_id="staged",
                            options=RolloutOptions(stages=[0.25, 1.0], retries=1))
    engine.tick()
    canaries = [r.device for r in engine.job_status(job).devices]
    dead, alive = canaries[0], canaries[1:]
    later = engine.create_job("config", {"set": {"upload_watermark": 200}}, [dead], job_id="later")
    for d in alive:
        devices[d].wake(engine)
        devices[d].deliver(engine)
    assert not engine.tick().advanced  # the dead canary holds the stage
    assert engine.job_status(later).held == [HeldDevice(device=dead, behind=job)]  # it may still be retried
    with pytest.raises(RolloutError, match=f"already ended on {alive[0]}: SUCCEEDED"):
        engine.remove(job, [alive[0]])
    changes = engine.remove(job, [dead])
    assert changes.removed == [(job, dead)] and engine.device_queue(dead) == []
    [row] = rows(engine, job, dead)
    assert row.status == "REMOVED" and row.note == "removed by the operator"
    with pytest.raises(RolloutError, match="has no execution on dev-"):
        engine.remove(job, [next(d for d in devices if not rows(engine, job, d))])
    ch = engine.tick()
    assert ch.advanced == [(job, 1)]  # not counted against the success threshold of 100%
    assert (later, dead, 1) in ch.queued  # and no longer holding the later job there


def test_remove_refuses_a_running_execution(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look")
    engine.tick()
    [row] = engine.job_status(job).devices
    report(engine, "dev-01", row.seq, "IN_PROGRESS", job)
    with pytest.raises(RolloutError, match="IN_PROGRESS on dev-01.*cancel the job"):
        engine.remove(job, ["dev-01"])


# ---------------------------------------------------------------- final statuses, at least once


def full_rows(store, job):
    return store.db.execute("SELECT * FROM executions WHERE job = ? ORDER BY id", (job,)).fetchall()


@pytest.mark.parametrize("final", ["SUCCEEDED", "FAILED", "REJECTED"])
def test_a_final_status_for_a_still_queued_execution_is_applied_once(env, final):
    """The IN_PROGRESS was lost; the final word comes twice (the device re-reports a job
    it finished while it still sees it in its retained queue)."""
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look")
    engine.tick()
    [row] = engine.job_status(job).devices
    clock.advance(5)
    assert report(engine, "dev-01", row.seq, final, job, detail="done")
    after = full_rows(store, job)
    [r] = engine.job_status(job).devices
    assert (r.status, r.finished, r.detail) == (final, T0 + 5, "done")
    assert engine.device_queue("dev-01") == []
    clock.advance(5)
    for again in (final, final, "SUCCEEDED" if final != "SUCCEEDED" else "FAILED", "IN_PROGRESS"):
        assert not report(engine, "dev-01", row.seq, again, job, detail="later")
    assert full_rows(store, job) == after
    assert engine.tick().completed == [job]
    assert not report(engine, "dev-01", row.seq, final, job)  # and after the job completed
    assert engine.job_status(job).status == "COMPLETED" and full_rows(store, job) == after


def test_a_repeated_failure_is_not_retried_or_counted_twice(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("config", {"set": {"a": 1}}, ["dev-01", "dev-02", "dev-03"], job_id="cfg",
                            options=RolloutOptions(retries=1, abort_threshold=0.5, abort_min_finished=2))
    engine.tick()
    seq = rows(engine, job, "dev-01")[0].seq
    for _ in range(3):
        report(engine, "dev-01", seq, "FAILED", job, detail="boom")
    s = engine.job_status(job)
    assert s.status == "ACTIVE" and s.attempt_counts["FAILED"] == 1
    assert [r.attempt for r in rows(engine, job, "dev-01")] == [1, 2]  # one retry, not three


def test_a_final_status_repeated_for_a_timed_out_attempt_is_noted_once(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look", options=RolloutOptions(timeout_s=60))
    engine.tick()
    seq = rows(engine, job, "dev-01")[0].seq
    report(engine, "dev-01", seq, "IN_PROGRESS", job)
    clock.advance(61)
    engine.tick()
    for _ in range(3):
        assert not report(engine, "dev-01", seq, "SUCCEEDED", job)
    [row] = rows(engine, job, "dev-01")
    assert row.status == "TIMED_OUT" and row.note.count("device later reported SUCCEEDED") == 1


def test_a_repeated_cancel_job_status_changes_nothing(env):
    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look")
    engine.tick()
    seq = rows(engine, job, "dev-01")[0].seq
    report(engine, "dev-01", seq, "IN_PROGRESS", job)
    engine.cancel(job)
    stop = payload_of(engine.cancel_envelopes(job)["dev-01"])
    assert report(engine, "dev-01", stop["seq"], "SUCCEEDED", stop["id"], detail={"canceled": job})
    assert not report(engine, "dev-01", stop["seq"], "SUCCEEDED", stop["id"], detail={"canceled": job})


def test_a_rejection_by_digest_ends_the_execution_it_names(env):
    """The device names an envelope it refused before reading it (over its size limit,
    a replay) by digest; such an execution used to stay QUEUED for ever."""
    from mpfleet.fleet.rollout import envelope_digest

    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look")
    engine.tick()
    [envelope] = engine.device_queue("dev-01")
    message = {"job": f"envelope:{envelope_digest(envelope)}", "seq": None, "status": "REJECTED",
               "detail": "too long: 5000 bytes", "attempt": 1, "ts": 0}
    assert engine.on_status("dev-01", message)
    [row] = engine.job_status(job).devices
    assert row.status == "REJECTED" and row.detail == "too long: 5000 bytes"
    assert not engine.on_status("dev-01", message)  # repeated: nothing more
    assert engine.job_status(job).unattributed_rejects == [] and engine.device_queue("dev-01") == []


def test_an_envelope_refused_as_a_replay_is_flagged_not_failed(env):
    """The device has passed its seq: it ran it long ago and lost the status, or skipped
    it. A REJECTED would count toward the abort threshold for a job that may have run."""
    from mpfleet.fleet.rollout import envelope_digest

    store, ring, reg, clock, engine, devices = env
    job = engine.create_job("diag", {}, ["dev-01"], job_id="look", options=RolloutOptions(abort_threshold=0.5))
    engine.tick()
    [envelope] = engine.device_queue("dev-01")
    message = {"job": f"envelope:{envelope_digest(envelope)}", "seq": None, "status": "REJECTED",
               "detail": "replay: seq 3 is not above 9, the last started for key k", "attempt": 1, "ts": 0}
    assert engine.on_status("dev-01", message)
    assert not engine.on_status("dev-01", message)
    s = engine.job_status(job)
    assert s.status == "ACTIVE" and s.devices[0].status == "QUEUED"
    [flag] = s.stuck
    assert flag.kind == "passed" and "refused it as a replay (replay: seq 3 is not above 9" in flag.reason
    engine.remove(job, ["dev-01"])  # the operator decides
    assert engine.tick().completed == [job]


# ---------------------------------------------------------------- generated interleavings

SEEDS = range(40)


def flagged_as_expected(engine, store, now):
    """Every QUEUED execution of an ACTIVE job older than its bound is flagged, and
    nothing else is (the envelopes here are far below any limit); looking changes nothing."""
    before = store.db.execute("SELECT * FROM executions ORDER BY id").fetchall()
    flagged = {(f.job, f.device, f.attempt) for f in engine.stuck(now=now)}
    expected = set()
    for job in engine.jobs("ACTIVE"):
        bound = engine.job_status(job).queued_timeout_s
        for r in engine.job_status(job).devices:
            if r.status == "QUEUED" and now - r.queued > bound:
                expected.add((job, r.device, r.attempt))
    assert store.db.execute("SELECT * FROM executions ORDER BY id").fetchall() == before
    return flagged == expected


def replaced(engine, device) -> bool:
    """Whether an operator's retry replaced a QUEUED execution on `device`: a device that
    had taken it unknown to the host may run that job (and those after it) once more."""
    return any("replaced by attempt" in (r.note or "") for job in engine.jobs()
               for r in rows(engine, job, device))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_interleavings_keep_each_device_in_creation_order(tmp_path, seed):
    """Config jobs (staged, rate-limited, scheduled, with retries) created at random
    moments, ticks, device wakes that run part of the queue or fail jobs, statuses
    delivered late, twice, or without their IN_PROGRESS, operators retrying and
    removing. Invariants: each device runs the jobs in their order (unless an operator
    replaced an envelope it may have taken) and ends with the newest successful job's
    value; no envelope is refused as a replay; no execution stays QUEUED unflagged past
    its bound."""
    rng = random.Random(seed)
    store = Store(tmp_path / "db.sqlite")
    ring = KeyRing(store, tmp_path / "keys")
    ring.init()
    reg = Registry(store)
    names = [f"d{i}" for i in range(5)]
    for name in names:
        reg.add(name, groups=["all"])
    clock = Clock()
    engine = RolloutEngine(store, ring, reg, clock=clock)
    devices = {name: Device(name) for name in names}
    order: dict[str, tuple[float, int]] = {}   # job -> (begins, created index): a device's order
    value: dict[str, int] = {}
    try:
        for _ in range(70):
            action = rng.choices(["create", "tick", "wake", "deliver", "advance", "operator"],
                                 [2, 4, 4, 4, 2, 1])[0]
            if action == "create" and len(order) < 8:
                job = f"j{len(order)}"
                start = rng.choice([None, None, None, clock() + rng.choice([30, 900])])
                value[job] = 100 + len(order)
                engine.create_job("config", {"set": {"upload_watermark": value[job]}},
                                  rng.sample(names, rng.randint(1, len(names))), job_id=job,
                                  options=RolloutOptions(
                                      stages=rng.choice([[1.0], [0.5, 1.0], [0.3, 0.6, 1.0]]),
                                      retries=rng.choice([0, 0, 1]), rate_per_min=rng.choice([None, None, 1]),
                                      start_at=start, success_threshold=rng.choice([0.0, 0.5]),
                                      queued_timeout_s=rng.choice([None, 600, 1800])))
                order[job] = (clock() if start is None else start, len(order))
            elif action == "tick":
                engine.tick()
            elif action == "wake":
                d = devices[rng.choice(names)]
                d.wake(engine, fail={j for j in order if rng.random() < 0.15}, budget=rng.choice([None, 1, 2]))
            elif action == "deliver":
                d = devices[rng.choice(names)]
                for message in d.outbox:
                    if message["status"] == "IN_PROGRESS" and rng.random() < 0.3:
                        continue  # lost
                    for _ in range(2 if rng.random() < 0.3 else 1):  # at least once
                        engine.on_status(d.id, message)
                d.outbox.clear()
            elif action == "operator" and order:
                # what an operator might try; what the engine refuses is refused whole
                job = rng.choice(sorted(order))
                d = rng.choice([r.device for r in engine.job_status(job).devices] or names)
                try:
                    engine.retry(job, [d]) if rng.random() < 0.7 else engine.remove(job, [d])
                except RolloutError:
                    pass
            else:
                clock.advance(rng.choice([1, 30, 300, 3000]))
            assert flagged_as_expected(engine, store, clock())
        for _ in range(300):  # then let everything finish
            engine.tick()
            wake_all(engine, devices)
            clock.advance(60)
            if not engine.jobs("ACTIVE"):
                break
        assert engine.jobs("ACTIVE") == []
        for d in devices.values():
            ran = [order[job] for job, _ in d.ran]
            if not replaced(engine, d.id):
                assert ran == sorted(ran), (d.id, d.ran)
            assert d.replays == []
            # what the host knows ran: SUCCEEDED, or noted so on an attempt it had given up on
            succeeded = [job for job in order
                         if any(r.status == "SUCCEEDED" or "later reported SUCCEEDED" in (r.note or "")
                                for r in rows(engine, job, d.id))]
            newest = max(succeeded, key=order.get, default=None)
            assert d.config.get("upload_watermark") == (value[newest] if newest else None), (d.id, d.ran)
    finally:
        store.close()


# ---------------------------------------------------------------- the command line


def mpfleet(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, MPFLEET_DB=str(tmp_path / "m.db"), MPFLEET_KEYS=str(tmp_path / "keys"), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.slow
def test_job_status_exits_4_while_an_execution_is_stuck_and_the_operator_can_act(tmp_path):
    import time

    assert mpfleet(tmp_path, "keys", "init").returncode == 0
    for name in ("dev-1", "dev-2"):
        assert mpfleet(tmp_path, "devices", "add", name).returncode == 0
    made = mpfleet(tmp_path, "job", "create", "diag", "--targets", "dev-1,dev-2", "--queued-timeout", "30m",
                   "--id", "look", "--json")
    assert made.returncode == 0 and json.loads(made.stdout)["options"]["queued_timeout_s"] == 1800
    with Store(tmp_path / "m.db") as store:  # serve's tick, three hours ago
        engine = RolloutEngine(store, KeyRing(store, tmp_path / "keys"), Registry(store),
                               clock=lambda: time.time() - 3 * 3600)
        engine.tick()
    shown = mpfleet(tmp_path, "job", "status", "look")
    assert shown.returncode == 4, shown.stderr
    assert "stuck: 2 execution(s) not taken" in shown.stdout and "longer than its bound of 30 min" in shown.stdout
    as_json = mpfleet(tmp_path, "job", "status", "look", "--json")
    assert as_json.returncode == 4 and [f["device"] for f in json.loads(as_json.stdout)["stuck"]] == ["dev-1", "dev-2"]
    listed = json.loads(mpfleet(tmp_path, "job", "list", "--json").stdout)
    assert listed[0]["stuck"] == 2

    retried = mpfleet(tmp_path, "job", "retry", "look", "--device", "dev-1")
    assert retried.returncode == 0 and "new attempt signed for 1 device(s) (dev-1 #2)" in retried.stdout
    removed = mpfleet(tmp_path, "job", "remove", "look", "--device", "dev-2", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] == ["dev-2"]
    after = json.loads(mpfleet(tmp_path, "job", "status", "look", "--json").stdout)
    assert after["stuck"] == [] and after["counts"]["QUEUED"] == 1 and after["counts"]["REMOVED"] == 1
    assert mpfleet(tmp_path, "job", "status", "look").returncode == 6  # still running

    again = mpfleet(tmp_path, "job", "remove", "look", "--device", "dev-2")
    assert again.returncode == 1 and again.stderr.strip() == "mpfleet: job look already ended on dev-2: REMOVED"
    nothing = mpfleet(tmp_path, "job", "retry", "look")
    assert nothing.returncode == 1 and "nothing to retry" in nothing.stderr and "Traceback" not in nothing.stderr
    bad = mpfleet(tmp_path, "job", "create", "diag", "--targets", "dev-1", "--queued-timeout", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_job_status_help_documents_the_exit_codes(tmp_path):
    out = mpfleet(tmp_path, "job", "status", "--help").stdout
    assert "4  ACTIVE, with at least one execution flagged stuck" in out and "3  ABORTED or CANCELED" in out
    assert "--queued-timeout" in mpfleet(tmp_path, "job", "create", "--help").stdout
