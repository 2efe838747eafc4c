"""The rollout engine (mpfleet.fleet.rollout): stages, rates, timeouts, retries, cancel, restart.

Library level: a Store, a KeyRing, a Registry of 60 devices and a fake clock; no MQTT.
"""

from __future__ import annotations

import json

import pytest

from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.jobs_model import RolloutError, RolloutOptions
from mpfleet.fleet.rollout import QUEUE_MAX_BYTES, RolloutEngine, encode_queue
from mpfleet.protocol.signing import b64url_decode, open_envelope
from mpfleet.db.store import Store

T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def env(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    ring = KeyRing(store, tmp_path / "keys")
    ring.init()
    reg = Registry(store)
    for i in range(60):
        reg.add(f"dev-{i:02d}", board="virtual", groups=["pumps" if i % 2 else "valves", "all"])
    clock = Clock()
    engine = RolloutEngine(store, ring, reg, clock=clock)
    yield store, ring, reg, clock, engine
    store.close()


def trusted(ring: KeyRing) -> dict[str, bytes]:
    return {k: b64url_decode(v) for k, v in ring.trusted_keys().items()}


def payload_of(envelope: str) -> dict:
    import json
    return json.loads(b64url_decode(envelope.split(".")[2]))


def pending(engine: RolloutEngine, job: str) -> list[tuple[str, int]]:
    """(device, seq) of the job's QUEUED executions."""
    return [(r.device, r.seq) for r in engine.job_status(job).devices if r.status == "QUEUED"]


def report(engine, device, seq, status, job, attempt=1, detail=None) -> bool:
    return engine.on_status(device, {"job": job, "seq": seq, "status": status, "progress": None,
                                     "detail": detail, "attempt": attempt, "ts": 0})


def finish_all(engine, job, status="SUCCEEDED"):
    """Run every QUEUED or IN_PROGRESS execution of the job to `status`."""
    for r in engine.job_status(job).devices:
        if r.status == "QUEUED":
            assert report(engine, r.device, r.seq, "IN_PROGRESS", job)
        if r.status in ("QUEUED", "IN_PROGRESS"):
            assert report(engine, r.device, r.seq, status, job)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("opts, word", [
    ({"stages": [0.5, 0.25, 1.0]}, "stages must increase"),
    ({"stages": [0.1, 0.5]}, "stages must end at 1.0"),
    ({"stages": [0, 1.0]}, "stages[0]"),
    ({"rate_per_min": 0}, "rate_per_min"),
    ({"rate_per_min": 2.5}, "rate_per_min"),
    ({"success_threshold": 1.5}, "success_threshold"),
    ({"abort_threshold": 0}, "abort_threshold"),
    ({"abort_min_finished": 0}, "abort_min_finished"),
    ({"timeout_s": -1}, "timeout_s"),
    ({"retries": -1}, "retries"),
    ({"retries": True}, "retries"),
    ({"start_at": T0 + 10, "end_at": T0}, "end_at"),
    ({"continuous": "yes"}, "continuous"),
    ({"speed": 3}, "speed"),
])
def test_bad_options_named(env, opts, word):
    engine = env[4]
    with pytest.raises(RolloutError, match=word.replace("[", r"\[")):
        engine.create_job("diag", {}, "*", options=RolloutOptions.from_json(opts))


def test_default_options_are_one_stage_without_limits_stored_by_name():
    assert RolloutOptions().to_json() == {
        "rate_per_min": None, "stages": [1.0], "success_threshold": 1.0, "abort_threshold": None,
        "abort_min_finished": 1, "timeout_s": None, "queued_timeout_s": None, "retries": 0, "start_at": None,
        "end_at": None, "continuous": False, "sign_kid": None, "rotation": None}


def test_options_from_json_take_none_as_the_default_and_round_trip():
    given = RolloutOptions.from_json({"stages": [0.1, 1], "retries": None, "timeout_s": 600, "rotation": None})
    assert given == RolloutOptions(stages=(0.1, 1.0), timeout_s=600)
    assert given.stages == (0.1, 1.0) and given.retries == 0
    assert RolloutOptions.from_json(given.to_json()) == given
    rotation = RolloutOptions.from_json({"rotation": {"old": "0123456789abcdef", "new": "fedcba9876543210"}})
    assert rotation.rotation.old == "0123456789abcdef"
    assert rotation.to_json()["rotation"] == {"old": "0123456789abcdef", "new": "fedcba9876543210"}


def test_job_status_json_keeps_the_keys_job_status_has_always_printed(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, {"ids": ["dev-01"]})
    update = engine.create_job("app", {}, {"ids": ["dev-02"]})
    engine.tick()
    clock.advance(3 * 3600)  # both stuck: QUEUED past the default bound
    status = engine.job_status(job).to_json()
    assert set(status) == {"id", "type", "params", "targets", "options", "status", "reason", "created", "finished",
                           "stage", "stages", "stage_size", "target_count", "not_started", "counts",
                           "attempt_counts", "failures", "devices", "stuck", "queued_timeout_s", "held",
                           "cancel_jobs", "unattributed_rejects"}
    [row] = status["devices"]
    assert set(row) == {"device", "attempt", "seq", "status", "stage", "queued", "started", "finished",
                        "device_attempt", "detail", "note", "progress", "stuck"}  # "running": update jobs only
    assert set(row["stuck"]) == {"job", "device", "attempt", "seq", "kind", "reason", "queued", "queued_for_s",
                                 "bound_s", "last_report", "in_queue"}
    assert row["stuck"] == status["stuck"][0] and status["stages"] == [1.0]
    assert json.loads(json.dumps(status)) == status  # plain JSON, nothing to convert
    store.touch_device("dev-02", state={"app": "0.1.0"})
    [update_row] = engine.job_status(update).to_json()["devices"]
    assert update_row["running"] == "0.1.0" and set(update_row) == set(row) | {"running"}


def test_bad_targets_and_type(env):
    engine = env[4]
    with pytest.raises(RolloutError, match="job type"):
        engine.create_job("format-disk", {}, "*")
    with pytest.raises(RolloutError, match="targets.query"):
        engine.create_job("diag", {}, {"query": "fw<<1"})
    with pytest.raises(RolloutError, match="unknown device nope"):
        engine.create_job("diag", {}, {"ids": ["nope"]})
    with pytest.raises(RolloutError, match="targets is empty"):
        engine.create_job("diag", {}, [])
    assert engine.jobs() == []


# ---------------------------------------------------------------- envelopes and targeting


def test_envelopes_verify_and_target_one_device(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, {"groups": ["pumps"]}, options=RolloutOptions(timeout_s=120))
    changes = engine.tick()
    assert len(changes.devices) == 30 and all(int(d[-2:]) % 2 for d in changes.devices)
    keys = trusted(ring)
    seqs = []
    for device in sorted(changes.devices):
        queue = engine.device_queue(device)
        assert len(queue) == 1
        p = open_envelope(queue[0], keys)
        assert p["targets"] == [device] and p["id"] == job and p["type"] == "diag"
        assert p["timeout"] == 120 and p["iat"] == int(T0)
        seqs.append(p["seq"])
    assert len(set(seqs)) == 30  # one seq per execution
    assert engine.device_queue("dev-00") == []  # valves: not targeted


def test_query_and_list_targets(env):
    store, ring, reg, clock, engine = env
    store.touch_device("dev-03", state={"fw": "v1.24.0"})
    store.touch_device("dev-04", state={"fw": "v1.26.0"})
    job = engine.create_job("ota", {}, {"query": "fw<v1.25.0"})
    assert engine.tick().devices == {"dev-03"}
    job2 = engine.create_job("reboot", {}, ["dev-05", "valves"])
    devices = engine.tick().devices
    assert "dev-05" in devices and "dev-03" not in devices and len(devices) == 31
    assert engine.job_status(job).target_count == 1
    assert engine.job_status(job2).target_count == 31


# ---------------------------------------------------------------- stages


def test_canary_first_then_later_stages_after_success(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("config", {"set": {"log.level": 2}}, "*",
                            options=RolloutOptions(stages=[0.05, 0.25, 1.0], success_threshold=0.9))
    first = engine.tick()
    assert len(first.queued) == 3  # ceil(0.05 * 60)
    canary = {d for _, d, _ in first.queued}
    # the canary set is a deterministic function of job id and device ids
    assert engine.tick().queued == []  # nothing more before the canary finishes
    status = engine.job_status(job)
    assert status.stage == 0 and status.counts["QUEUED"] == 3

    # one canary in progress: still waiting
    (d0, s0), *rest = pending(engine, job)
    assert report(engine, d0, s0, "IN_PROGRESS", job)
    assert engine.tick().queued == []
    finish_all(engine, job)
    ch = engine.tick()
    assert ch.advanced == [(job, 1)]
    assert len(ch.queued) == 12  # ceil(0.25 * 60) - 3
    assert not canary & {d for _, d, _ in ch.queued}
    assert all(r.stage == 1 for r in engine.job_status(job).devices if r.device not in canary)

    finish_all(engine, job)
    ch = engine.tick()
    assert ch.advanced == [(job, 2)] and len(ch.queued) == 45
    finish_all(engine, job)
    ch = engine.tick()
    assert ch.completed == [job]
    status = engine.job_status(job)
    assert status.status == "COMPLETED" and status.counts["SUCCEEDED"] == 60
    assert all(engine.device_queue(f"dev-{i:02d}") == [] for i in range(60))


def test_canary_set_stable_across_engines(env, tmp_path):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, "*", options=RolloutOptions(stages=[0.1, 1.0]), job_id="stable-job")
    canary = {d for _, d, _ in engine.tick().queued}
    # a fresh database with the same devices and job id picks the same canaries
    store2 = Store(tmp_path / "other.sqlite")
    ring2 = KeyRing(store2, tmp_path / "keys2")
    ring2.init()
    reg2 = Registry(store2)
    for i in reversed(range(60)):
        reg2.add(f"dev-{i:02d}", groups=["all"])
    engine2 = RolloutEngine(store2, ring2, reg2, clock=clock)
    engine2.create_job("diag", {}, "*", options=RolloutOptions(stages=[0.1, 1.0]), job_id="stable-job")
    assert {d for _, d, _ in engine2.tick().queued} == canary
    store2.close()
    assert job == "stable-job"


def test_failing_canary_aborts_and_later_stages_never_run(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("ota", {}, "*", options=RolloutOptions(stages=[0.05, 0.25, 1.0], abort_threshold=0.5,
                                                                  abort_min_finished=2))
    engine.tick()
    (d0, s0), (d1, s1), (d2, s2) = pending(engine, job)
    assert report(engine, d0, s0, "FAILED", job, detail="self-test failed")
    assert engine.job_status(job).status == "ACTIVE"  # 1 finished < abort_min_finished
    assert report(engine, d1, s1, "FAILED", job, detail="self-test failed")
    status = engine.job_status(job)
    assert status.status == "ABORTED" and "abort threshold" in status.reason
    assert status.counts["REMOVED"] == 1 and status.counts["FAILED"] == 2
    assert engine.device_queue(d2) == []
    for _ in range(5):
        clock.advance(60)
        assert not engine.tick()
    assert len(engine.job_status(job).devices) == 3  # later stages never got executions
    assert [f.detail for f in status.failures] == ["self-test failed"] * 2
    # a late status for the removed canary changes nothing
    assert not report(engine, d2, s2, "SUCCEEDED", job)


def test_stage_below_success_threshold_aborts(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, "*", options=RolloutOptions(stages=[0.05, 1.0], success_threshold=0.9))
    engine.tick()
    (d0, s0), (d1, s1), (d2, s2) = pending(engine, job)
    report(engine, d0, s0, "SUCCEEDED", job)
    report(engine, d1, s1, "SUCCEEDED", job)
    report(engine, d2, s2, "FAILED", job, detail="boom")
    ch = engine.tick()
    assert ch.aborted == [job] and ch.queued == []
    assert "success_threshold" in engine.job_status(job).reason


# ---------------------------------------------------------------- rate, start/end


def test_rate_limit_holds_per_minute(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, "*", options=RolloutOptions(rate_per_min=7))
    queued_at: list[float] = []
    for _ in range(120):  # ten simulated minutes in 5 s steps
        ch = engine.tick()
        queued_at += [clock()] * len(ch.queued)
        finish_all(engine, job)
        clock.advance(5)
    assert len(queued_at) == 60
    for t in queued_at:
        assert sum(1 for u in queued_at if t - 60 < u <= t) <= 7
    assert engine.job_status(job).status == "COMPLETED"


def test_start_at_and_end_at(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, {"groups": ["pumps"]},
                            options=RolloutOptions(start_at=T0 + 100, end_at=T0 + 200, rate_per_min=10))
    assert not engine.tick()
    clock.advance(100)
    ch = engine.tick()
    assert len(ch.queued) == 10
    assert payload_of(engine.device_queue(ch.queued[0][1])[0])["exp"] == int(T0 + 200)
    clock.advance(100)
    ch = engine.tick()
    assert ch.completed == [job] and len(ch.removed) == 10
    status = engine.job_status(job)
    assert status.status == "COMPLETED" and status.reason == "end_at passed"
    assert status.counts["REMOVED"] == 10 and status.not_started == 20


# ---------------------------------------------------------------- timeouts and retries


def test_timeout_then_retry_with_new_seq_then_exhausted(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("upload", {}, {"ids": ["dev-07"]}, options=RolloutOptions(timeout_s=300, retries=1))
    engine.tick()
    [(dev, seq1)] = pending(engine, job)
    assert report(engine, dev, seq1, "IN_PROGRESS", job)
    clock.advance(299)
    assert not engine.tick()
    clock.advance(1)
    ch = engine.tick()
    assert ch.timed_out == [(job, dev)] and ch.queued == [(job, dev, 2)]
    [(dev2, seq2)] = pending(engine, job)
    assert dev2 == dev and seq2 > seq1
    [env2] = engine.device_queue(dev)
    assert payload_of(env2)["seq"] == seq2 and payload_of(env2)["id"] == job
    # the old attempt's late SUCCEEDED does not resurrect it
    assert not report(engine, dev, seq1, "SUCCEEDED", job)
    old = engine.job_status(job).devices[0]
    assert old.status == "TIMED_OUT" and "later reported SUCCEEDED" in old.note
    # second attempt times out too: retries exhausted, final
    report(engine, dev, seq2, "IN_PROGRESS", job)
    clock.advance(300)
    ch = engine.tick()
    assert ch.timed_out == [(job, dev)] and ch.queued == [] and ch.completed == [job]
    rows = engine.job_status(job).devices
    assert [(r.attempt, r.status) for r in rows] == [(1, "TIMED_OUT"), (2, "TIMED_OUT")]
    assert engine.device_queue(dev) == []


def test_failed_retried_immediately_rejected_never(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("config", {"set": {"a": 1}}, {"ids": ["dev-01", "dev-02"]},
                            options=RolloutOptions(retries=2))
    engine.tick()
    q = dict(pending(engine, job))
    assert report(engine, "dev-01", q["dev-01"], "FAILED", job, detail="schema")
    assert report(engine, "dev-02", q["dev-02"], "REJECTED", job, detail="replay")
    q2 = dict(pending(engine, job))
    assert list(q2) == ["dev-01"] and q2["dev-01"] > q["dev-01"]  # retried at once with a new seq
    assert engine.device_queue("dev-02") == []
    assert not engine.tick().queued  # nothing more to queue; REJECTED is final
    report(engine, "dev-01", q2["dev-01"], "SUCCEEDED", job)
    assert engine.tick().completed == [job]
    status = engine.job_status(job)
    assert status.counts["SUCCEEDED"] == 1 and status.counts["REJECTED"] == 1
    assert status.attempt_counts["FAILED"] == 1


# ---------------------------------------------------------------- statuses


def test_duplicate_and_stale_statuses_ignored(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, {"ids": ["dev-09"]}, options=RolloutOptions(retries=1))
    engine.tick()
    [(dev, seq)] = pending(engine, job)
    assert report(engine, dev, seq, "IN_PROGRESS", job)
    assert not report(engine, dev, seq, "IN_PROGRESS", job)  # duplicate
    assert report(engine, dev, seq, "IN_PROGRESS", job, attempt=2)  # device resumed after a reset
    assert report(engine, dev, seq, "FAILED", job, attempt=2, detail="x")
    assert not report(engine, dev, seq, "FAILED", job, attempt=2, detail="x")  # at-least-once duplicate
    assert not report(engine, dev, seq, "SUCCEEDED", job)  # final is final
    [(_, seq2)] = pending(engine, job)
    assert not report(engine, dev, seq, "IN_PROGRESS", job)  # old attempt, stale
    assert not report(engine, dev, seq2 + 100, "SUCCEEDED", job)  # unknown seq
    assert not report(engine, "dev-10", seq2, "SUCCEEDED", job)  # not that device's execution
    assert not report(engine, dev, seq2, "SUCCEEDED", "other-job")
    assert not engine.on_status(dev, {"job": job, "seq": seq2, "status": "TIMED_OUT"})  # host-only state
    assert not engine.on_status(dev, "garbage")
    assert report(engine, dev, seq2, "SUCCEEDED", job)
    rows = engine.job_status(job).devices
    assert [(r.attempt, r.status, r.device_attempt) for r in rows] == [(1, "FAILED", 2),
                                                                                 (2, "SUCCEEDED", 1)]


def test_unattributable_reject_recorded_once(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("diag", {}, {"ids": ["dev-09"]})
    msg = {"job": "envelope:0123456789abcdef", "seq": None, "status": "REJECTED", "detail": "bad signature",
           "attempt": 1, "ts": 0}
    assert engine.on_status("dev-09", msg)
    assert not engine.on_status("dev-09", msg)
    rejects = engine.job_status(job).unattributed_rejects
    assert [(r.device, r.ref, r.detail) for r in rejects] == [
        ("dev-09", "envelope:0123456789abcdef", "bad signature")]


# ---------------------------------------------------------------- continuous, cancel


def test_continuous_picks_up_late_joiner_and_drops_leaver(env):
    store, ring, reg, clock, engine = env
    reg.add("late-1", groups=["fresh"])
    job = engine.create_job("app", {}, {"groups": ["pumps"]}, options=RolloutOptions(continuous=True))
    assert len(engine.tick().queued) == 30
    finish_all(engine, job)
    assert engine.tick().completed == []  # continuous: stays ACTIVE
    assert engine.job_status(job).status == "ACTIVE"
    reg.tag("late-1", add=["pumps"])
    ch = engine.tick()
    assert ch.queued == [(job, "late-1", 1)]
    assert open_envelope(engine.device_queue("late-1")[0], trusted(ring))["targets"] == ["late-1"]
    reg.tag("late-1", remove=["pumps"])
    ch = engine.tick()
    assert ch.removed == [(job, "late-1")] and engine.device_queue("late-1") == []


def test_frozen_targets_ignore_late_joiner(env):
    store, ring, reg, clock, engine = env
    reg.add("late-2")
    job = engine.create_job("diag", {}, {"groups": ["pumps"]}, options=RolloutOptions(rate_per_min=10))
    engine.tick()
    reg.tag("late-2", add=["pumps"])
    for _ in range(5):
        clock.advance(60)
        engine.tick()
        finish_all(engine, job)
    assert engine.device_queue("late-2") == []
    assert engine.job_status(job).target_count == 30


def test_cancel_clears_queue_and_signs_cancel_jobs(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("sample", {"sensor": "t", "rate_hz": 1, "duration_s": 5}, {"groups": ["valves"]})
    engine.tick()
    (d_run, s_run), (d_wait, s_wait) = pending(engine, job)[:2]
    report(engine, d_run, s_run, "IN_PROGRESS", job)
    assert engine.device_queue(d_wait)
    ch = engine.cancel(job)
    assert d_wait in ch.devices and d_run in ch.devices
    assert engine.device_queue(d_wait) == []
    status = engine.job_status(job)
    assert status.status == "CANCELED" and status.counts["CANCELED"] == 30
    run_row = next(r for r in status.devices if r.device == d_run)
    assert "cancel job" in run_row.note
    envs = engine.cancel_envelopes(job)
    assert list(envs) == [d_run]
    p = open_envelope(envs[d_run], trusted(ring))
    assert p["type"] == "cancel" and p["params"] == {"job": job} and p["targets"] == [d_run]
    assert p["seq"] > s_run
    assert engine.cancel_envelopes(job) == envs  # signed once
    assert engine.device_queue(d_run) == [envs[d_run]]
    assert report(engine, d_run, p["seq"], "SUCCEEDED", p["id"], detail={"canceled": job})
    assert engine.device_queue(d_run) == []
    assert not engine.tick()
    with pytest.raises(RolloutError, match="CANCELED"):
        engine.cancel(job)


# ---------------------------------------------------------------- restart


def test_restart_mid_rollout_continues_without_duplicates(env, tmp_path):
    store, ring, reg, clock, engine = env
    job = engine.create_job("ota", {}, "*", options=RolloutOptions(stages=[0.05, 0.5, 1.0], rate_per_min=20,
                                                                  timeout_s=600, retries=1))
    engine.tick()
    finish_all(engine, job)
    ch = engine.tick()
    # stage 1 opens; the 3 canaries queued this minute count toward the rate of 20
    assert ch.advanced == [(job, 1)] and len(ch.queued) == 17
    first_seqs = {r.seq for r in engine.job_status(job).devices}
    (d_run, s_run), *_ = pending(engine, job)
    report(engine, d_run, s_run, "IN_PROGRESS", job)
    store.close()

    # a new process: new store, keyring, registry and engine on the same files
    store2 = Store(tmp_path / "db.sqlite")
    ring2 = KeyRing(store2, tmp_path / "keys")
    engine2 = RolloutEngine(store2, ring2, Registry(store2), clock=clock)
    assert not engine2.tick().queued  # same minute: the rate limit survived the restart
    assert engine2.job_status(job).stage == 1
    # a duplicate of a status delivered before the restart changes nothing
    assert not report(engine2, d_run, s_run, "IN_PROGRESS", job)
    clock.advance(60)
    ch = engine2.tick()
    assert len(ch.queued) == 10  # the rest of stage 1: ceil(0.5 * 60) - 3 - 17
    assert not engine2.tick().queued  # and nothing twice
    rows = engine2.job_status(job).devices
    assert len({(r.device, r.attempt) for r in rows}) == len(rows) == 30
    seqs = [r.seq for r in rows]
    assert len(set(seqs)) == len(seqs) and min(s for s in seqs if s not in first_seqs) > max(first_seqs)
    clock.advance(600)  # d_run times out under the new engine and is retried once
    ch = engine2.tick()
    assert (job, d_run) in ch.timed_out and (job, d_run, 2) in ch.queued
    for _ in range(10):
        finish_all(engine2, job)
        clock.advance(60)
        engine2.tick()
    status = engine2.job_status(job)
    assert status.status == "COMPLETED" and status.counts["SUCCEEDED"] == 60
    assert len(status.devices) == 61  # 60 devices + one retry
    store2.close()


def test_a_device_queue_carries_at_most_queue_max_bytes_oldest_first(tmp_path):
    def payload(envelope: str) -> dict:
        return json.loads(b64url_decode(envelope.split(".")[2]))

    with Store(tmp_path / "q.db") as store:
        ring = KeyRing(store, tmp_path / "keys")
        ring.init()
        Registry(store).add("dev-1")
        engine = RolloutEngine(store, ring, Registry(store))
        jobs = [engine.create_job("config", {"set": {"upload_watermark": 100 + i}, "pad": "x" * 900}, ["dev-1"])
                for i in range(12)]
        engine.tick()
        queue = engine.device_queue("dev-1")
        assert 1 < len(queue) < 12 and len(encode_queue(queue)) <= QUEUE_MAX_BYTES
        assert [payload(e)["id"] for e in queue] == jobs[:len(queue)]  # the oldest, in seq order
        first = payload(queue[0])
        engine.on_status("dev-1", {"job": first["id"], "seq": first["seq"], "status": "SUCCEEDED"})
        assert payload(engine.device_queue("dev-1")[-1])["id"] == jobs[len(queue)]  # the next comes in
        # what serve publishes is the same capped queue (all_queues once had no cap)
        assert engine.all_queues() == {"dev-1": engine.device_queue("dev-1")}


# ---------------------------------------------------------------- sizes the device takes
def _fat_config(n: int) -> dict:
    return {"set": {"name": "x" * n}}


def test_create_refuses_a_job_larger_than_the_device_takes(env):
    store, ring, reg, clock, engine = env
    before = ring.get(ring.fleet_key().kid).last_seq
    with pytest.raises(RolloutError) as e:
        engine.create_job("config", _fat_config(21_000), ["dev-01"])
    msg = str(e.value)
    assert "\n" not in msg and "over the limit of 4096 bytes" in msg and "limits.job_max_bytes" in msg
    n = int(msg.split("would be ")[1].split(" bytes")[0])
    assert n > 28_000  # the envelope, base64 and all, not the params
    assert engine.jobs() == [] and ring.get(ring.fleet_key().kid).last_seq == before  # nothing recorded or signed
    # measured as signed in the worst case: a job whose envelope fits today's seq but not a large one is refused
    for pad in range(2700, 3000):
        try:
            engine.create_job("config", _fat_config(pad), ["dev-01"], job_id=f"probe-{pad}")
        except RolloutError as refused:
            assert "over the limit of 4096 bytes" in str(refused)
            break
    else:
        raise AssertionError("no probe was refused")
    engine.tick()
    largest = store.db.execute("SELECT MAX(LENGTH(envelope)) FROM executions").fetchone()[0]
    assert 4096 - 40 < largest <= 4096 - 18  # the largest accepted leaves room for a 19-digit seq


def test_create_uses_the_limit_a_device_reports(env):
    store, ring, reg, clock, engine = env
    store.touch_device("dev-02", state={"device": "dev-02", "limits": {"job_max_bytes": 1024}})
    with pytest.raises(RolloutError, match=r"over the limit of 1024 bytes \(the limits.job_max_bytes dev-02 reports"):
        engine.create_job("config", _fat_config(1000), ["dev-02"])
    engine.create_job("config", _fat_config(1000), ["dev-03"])  # the default 4096 for the others
    with pytest.raises(RolloutError, match="1024"):
        engine.create_job("config", _fat_config(1000), ["dev-02", "dev-03"])  # every target must take it
    # a device that takes more is still bounded by what one queue carries
    store.touch_device("dev-04", state={"device": "dev-04", "limits": {"job_max_bytes": 16384}})
    engine.create_job("config", _fat_config(4000), ["dev-04"])
    with pytest.raises(RolloutError, match=f"over the limit of {QUEUE_MAX_BYTES - 4} bytes .*QUEUE_MAX_BYTES"):
        engine.create_job("config", _fat_config(5000), ["dev-04"])


def test_a_device_that_cannot_take_the_envelope_gets_a_rejected_execution_not_a_stuck_queue(env):
    store, ring, reg, clock, engine = env
    job = engine.create_job("config", _fat_config(1500), ["late"], options=RolloutOptions(continuous=True))
    after = engine.create_job("reboot", {}, ["late"], options=RolloutOptions(continuous=True))
    engine.tick()
    store.touch_device("dev-05", state={"device": "dev-05", "limits": {"job_max_bytes": 512}})
    reg.tag("dev-05", add=["late"])
    engine.tick()
    [row] = engine.job_status(job).devices
    assert row.status == "REJECTED" and "over the limit of 512 bytes" in row.note
    assert [payload_of(e)["id"] for e in engine.device_queue("dev-05")] == [after]  # the next one is not blocked


# ---------------------------------------------------------------- security policy: keys and exec
@pytest.mark.parametrize("params", [
    {"set": {"trusted_keys.0123456789abcdef": "AAAA"}},
    {"unset": ["trusted_keys"]},
    {"set": {"exec_allowed": True}},
    {"unset": ["exec_allowed"]},
])
def test_config_jobs_cannot_change_keys_or_exec_permission(env, params):
    engine = env[4]
    with pytest.raises(RolloutError, match="keys rotate|USB"):
        engine.create_job("config", params, "*")
    assert engine.jobs() == []


def test_keys_jobs_checked_like_the_device_checks_them(env):
    store, ring, reg, clock, engine = env
    fleet = ring.fleet_key().kid
    with pytest.raises(RolloutError, match="remove every trusted key"):
        engine.create_job("keys", {"remove": [fleet]}, "*")
    with pytest.raises(RolloutError, match="not the id of its key"):
        engine.create_job("keys", {"add": {"0123456789abcdef": ring.fleet_key().public_b64}}, "*")
    with pytest.raises(RolloutError, match="at least one"):
        engine.create_job("keys", {}, "*")


def test_rotation_is_a_keys_job_then_a_remove_signed_by_the_new_key(env):
    store, ring, reg, clock, engine = env
    old = ring.fleet_key()
    job, new_kid = engine.create_rotation_job(["pumps"])
    new = ring.get(new_kid)
    engine.tick()
    s = engine.job_status(job)
    assert s.type == "keys" and s.params == {"add": {new_kid: new.public_b64}} and s.target_count == 30
    envelope = engine.device_queue("dev-01")[0]
    assert open_envelope(envelope, {old.kid: b64url_decode(old.public_b64)})["params"] == s.params
    finish_all(engine, job)
    engine.tick()
    assert "retired" in engine.job_status(job).reason and not ring.get(old.kid).active
    [retire] = [j for j in engine.jobs() if j.startswith(f"key-retire-{old.kid[:8]}")]
    engine.tick()
    r = engine.job_status(retire)
    assert r.type == "keys" and r.params == {"remove": [old.kid]} and r.target_count == 30
    payload = open_envelope(engine.device_queue("dev-01")[0], {new_kid: b64url_decode(new.public_b64)})
    assert payload["type"] == "keys" and payload["params"] == {"remove": [old.kid]}
    assert ring.fleet_key().kid == new_kid
