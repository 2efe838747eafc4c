"""Regression tests for the device's promises: one test per defect
found by attacking the agent with broker access, each failing on the agent
before the fix. The exhaustive proofs are tests/e2e/test_promise_powercut.py and
tests/e2e/test_promise_fuzz.py; these name each hole that was found."""

import json
import time

from test_agent_jobs import _device, _settle, _wakes

from mpfleet.protocol.signing import SigningKey, b64url


def _trace(vb):
    return (vb.fs_get("/trace.txt") or b"").decode().split()


def _exec_job(desk, seq, job_id=None, **extra):
    job_id = job_id or f"x{seq}"
    code = f"with open('/trace.txt', 'a') as f:\n    f.write('{job_id}\\n')"
    return desk.job("exec", {"code": code}, seq=seq, job_id=job_id, **extra)[1]


def _unsigned(kid: str, payload_text: str) -> str:
    """An envelope with a zero signature around any payload text."""
    return f"mpf1.{kid}.{b64url(payload_text.encode())}.{b64url(bytes(64))}"


def test_the_same_envelope_twice_in_one_queue_runs_once(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    env = _exec_job(desk, 1)
    desk.publish_queue([env, env])
    _wakes(vb, 3)
    assert _trace(vb) == ["x1"]


def test_two_payloads_with_the_same_kid_and_seq_run_once(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    a = _exec_job(desk, 7, job_id="first")
    b = _exec_job(desk, 7, job_id="second")
    desk.publish_queue([a, b])
    _wakes(vb, 2)
    desk.publish_queue([b])  # and the other one alone, on a later wake
    _wakes(vb, 2)
    assert len(_trace(vb)) == 1, _trace(vb)


def test_an_unsigned_deeply_nested_envelope_does_not_block_the_job_behind_it(tmp_path, mosquitto, desk_factory,
                                                                            host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    nested = _unsigned("0123456789abcdef", "[" * 600 + "]" * 600)
    desk.publish_queue([nested, _exec_job(desk, 1)])
    records = _wakes(vb, 3)
    assert all(r.exit_reason == "deepsleep" for r in records)
    assert _trace(vb) == ["x1"]
    assert any("unknown signing key" in str(s["detail"]) for s in desk.statuses if s["status"] == "REJECTED")


def test_a_nested_queue_message_is_rejected_and_loses_no_sample(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    desk.client.publish(f"mpf/v1/{vb.device_id}/jobs", "[" * 8000 + "]" * 8000, qos=1,
                        retain=True).wait_for_publish(5)
    records = _wakes(vb, 7)
    assert all(r.exit_reason == "deepsleep" for r in records)
    host.wait_idle()
    seqs = sorted(row[1] for row in host.rows(vb.device_id))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) >= 6, seqs
    assert any("not a JSON list" in str(s["detail"]) for s in desk.statuses)


def test_a_config_job_with_a_non_string_unset_is_rejected_without_a_crash(tmp_path, mosquitto, desk_factory,
                                                                          host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    desk.publish_queue([desk.job("config", {"unset": [5]}, job_id="bad-unset")[1]])
    records = _wakes(vb, 3)
    assert all(r.exit_reason == "deepsleep" for r in records)
    final = _settle(desk, 1)
    assert [s["status"] for s in final["bad-unset"]] == ["REJECTED"]


def test_another_devices_envelope_does_not_move_this_devices_floor(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    other = desk.job("diag", seq=50, job_id="for-b", targets=["device-b"])[1]
    desk.publish_queue([other])
    _wakes(vb, 2)
    desk.publish_queue([_exec_job(desk, 5)])
    _wakes(vb, 2)
    assert _trace(vb) == ["x5"]
    assert "for-b" not in desk.final(), "another device's job is never named by this one"


def test_a_config_job_cannot_allow_exec_or_drop_the_trusted_keys(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    desk.publish_queue([
        desk.job("config", {"set": {"exec_allowed": True}}, seq=1, job_id="allow-exec")[1],
        desk.job("config", {"unset": ["trusted_keys"]}, seq=2, job_id="drop-keys")[1],
        _exec_job(desk, 3),
        desk.job("diag", seq=4, job_id="still-trusted")[1],
    ])
    _wakes(vb, 3)
    final = _settle(desk, 4)
    assert final["allow-exec"][0]["status"] == "REJECTED" and "security setting" in final["allow-exec"][0]["detail"]
    assert final["drop-keys"][0]["status"] == "REJECTED"
    assert final["x3"][0]["status"] == "REJECTED" and _trace(vb) == []
    assert final["still-trusted"][0]["status"] == "SUCCEEDED"


def test_key_rotation_adds_a_key_and_never_empties_the_set(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    new = SigningKey.generate()
    desk.publish_queue([
        desk.job("keys", {"add": {new.kid: new.public_b64}}, seq=1, job_id="add")[1],
        desk.job("keys", {"remove": [desk.key.kid, new.kid]}, seq=2, job_id="empty")[1],
    ])
    _wakes(vb, 3)
    final = _settle(desk, 2)
    assert final["add"][0]["status"] == "SUCCEEDED"
    assert final["empty"][0]["status"] == "REJECTED"
    by_new = new.sign({"id": "by-new", "seq": 1, "type": "diag", "params": {}, "targets": [vb.device_id],
                       "iat": int(time.time())})
    desk.publish_queue([by_new])
    _wakes(vb, 2)
    assert _settle(desk, 3)["by-new"][0]["status"] == "SUCCEEDED"


def test_garbage_left_in_a_queue_costs_no_flash_after_the_first_wake(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    evil = SigningKey.generate()
    desk.publish_queue([evil.sign({"id": f"g{i}", "seq": i + 1, "type": "diag", "targets": ["*"]})
                        for i in range(20)])
    _wakes(vb, 2)
    quiet = []
    for _ in range(3):
        before = vb.counters()["vfs"]["erases"]
        _wakes(vb, 1)
        quiet.append(vb.counters()["vfs"]["erases"] - before)
    # A connected wake with nothing new costs its flash-log and stage writes only.
    assert max(quiet) <= 4, quiet
    rejected = [s for s in desk.statuses if s["status"] == "REJECTED"]
    assert len(rejected) == 20, "each reported once"


def test_an_expired_job_does_not_run_after_a_power_loss_without_a_host_time(tmp_path, mosquitto, desk_factory,
                                                                            host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    now = int(time.time())
    desk.publish_queue([desk.job("diag", seq=1, job_id="sets-floor", iat=now)[1]])
    _wakes(vb, 2)
    vb.power_off()
    vb.power_on()  # the RTC restarts in 2000
    host.stop()  # no fresh ack, and no retained one: no host time at all
    desk.client.publish(f"mpf/v1/{vb.device_id}/samples/ack", b"", qos=1, retain=True).wait_for_publish(5)
    desk.publish_queue([_exec_job(desk, 2, iat=now - 7200, exp=now - 3600)])
    _wakes(vb, 2)
    assert _trace(vb) == []
    final = _settle(desk, 2)
    assert final["x2"][0]["status"] == "REJECTED" and "expired" in final["x2"][0]["detail"]


def test_a_forged_ack_time_never_moves_a_set_clock_back(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    _wakes(vb, 2)
    before = vb.clock_s
    desk.client.publish(f"mpf/v1/{vb.device_id}/samples/ack", json.dumps({"upto": 0, "time": 1_000_000_000}),
                        qos=1, retain=True).wait_for_publish(5)
    _wakes(vb, 1)
    assert vb.clock_s >= before


def _contiguous(host, device_id):
    host.wait_idle()
    seqs = sorted(row[1] for row in host.rows(device_id))
    return seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


def test_a_job_that_crashes_the_agent_ends_failed_and_no_sample_seq_is_reused(tmp_path, mosquitto, desk_factory,
                                                                               host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    _wakes(vb, 2)
    # The snippet breaks the agent's state writes: the handler's own failure report
    # raises again and the exception escapes to main.py.
    code = ("with open('/trace.txt', 'a') as f:\n    f.write('crasher\\n')\n"
            "import agent.jobs\nagent.jobs.save_state = None\n")
    desk.publish_queue([desk.job("exec", {"code": code}, seq=1, job_id="crasher")[1],
                        _exec_job(desk, 2)])
    records = vb.run(boots=6)
    assert any("Traceback" in r.output for r in records), "the crash happened"
    after = [r.output for r in records if "the last wake crashed" in r.output]
    assert after, "the next wake noticed the crash"
    final = _settle(desk, 2)
    (crashed,) = final["crasher"]
    assert crashed["status"] == "FAILED" and "crashed while running it" in crashed["detail"]
    assert final["x2"][0]["status"] == "SUCCEEDED", "the queue goes on after the crash"
    assert _trace(vb) == ["crasher", "x2"], "nothing ran twice"
    ok, seqs = _contiguous(host, vb.device_id)
    assert ok and len(seqs) >= 7, seqs
    assert vb.fs_get("/last_crash.txt") is None
    state = host.store.device(vb.device_id)["state"]
    assert state["crashes"] == 0 and state["safe_mode"] is False, "a good wake since"


def test_a_job_that_hangs_is_ended_by_the_watchdog_and_not_run_again(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True, wdt_timeout_ms=1000)
    code = "with open('/trace.txt', 'a') as f:\n    f.write('hang\\n')\nwhile True:\n    pass\n"
    desk.publish_queue([desk.job("exec", {"code": code}, seq=1, job_id="hang")[1]])
    records = vb.run(boots=4)
    assert any(r.exit_reason == "wdt" for r in records)
    final = _settle(desk, 1)
    assert final["hang"][0]["status"] == "FAILED" and "watchdog" in final["hang"][0]["detail"]
    assert _trace(vb) == ["hang"]
    ok, seqs = _contiguous(host, vb.device_id)
    assert ok, seqs


def test_a_finished_job_the_host_still_lists_is_reported_again_and_never_run_again(tmp_path, mosquitto,
                                                                                   desk_factory, host):
    """Reconciliation: the retained queue is the host's view of what is unfinished. A
    final status the host lost (a crash before its commit, a broker restart without
    persistence) is heard again at the device's next wake, and nothing runs twice."""
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    ran = _exec_job(desk, 3, job_id="ran")
    refused = desk.job("diag", seq=4, job_id="refused", exp=int(time.time()) - 60)[1]  # expired: REJECTED, named
    desk.publish_queue([ran, refused])
    _wakes(vb, 1)
    first = _settle(desk, 2)
    assert [s["status"] for s in first["ran"]] == ["SUCCEEDED"]
    assert [s["status"] for s in first["refused"]] == ["REJECTED"]
    _wakes(vb, 2)  # the host never took them off the queue
    time.sleep(0.3)
    again = desk.final(again=True)
    assert [(s["status"], s["seq"], s["attempt"]) for s in again["ran"]] == [("SUCCEEDED", 3, 1)] * 2
    assert [s["status"] for s in again["refused"]] == ["REJECTED"] * 2
    assert _trace(vb) == ["ran"], "reported again, not run again"
    desk.publish_queue([])  # the host has them now
    _wakes(vb, 2)
    time.sleep(0.3)
    assert len(desk.final(again=True)["ran"]) == 2
