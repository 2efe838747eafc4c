"""Signed jobs on the device, end to end: the real agent on virtual boards, real
mosquitto, envelopes signed by `cryptography` on the host."""

import json
import random
import time

from agent_harness import make_device
from conftest import stress_count

from mpfleet.protocol.signing import SigningKey, b64url, b64url_decode


def _device(tmp_path, mosquitto, desk_factory, name="dev", **overrides):
    import hashlib

    device_id = "job-" + hashlib.sha1(str(tmp_path / name).encode()).hexdigest()[:10]
    desk = desk_factory(device_id)
    overrides.setdefault("upload_every_wakes", 1)
    vb = make_device(tmp_path / name, mosquitto.port, device_id=device_id, trusted_keys=desk.trusted(),
                     groups=["pumps"], **overrides)
    return vb, desk


def _wakes(vb, n):
    records = vb.run(boots=n)
    import os
    if os.environ.get("MPFLEET_DEBUG"):
        for r in records:
            print(r.index, r.exit_reason, r.detail, r.output)
    for r in records:
        assert "Traceback" not in r.output, r.output
    return records


def _config(vb):
    return json.loads(vb.fs_get("/config.json"))


def _settle(desk, expected, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(desk.final()) < expected:
        time.sleep(0.05)
    return desk.final()


def test_a_signed_config_job_runs_and_succeeds_once(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    payload, env = desk.job("config", {"set": {"sample_interval_s": 90}})
    desk.publish_queue([env])
    _wakes(vb, 3)
    final = _settle(desk, 1)
    assert [s["status"] for s in final["job-1"]] == ["SUCCEEDED"]
    assert _config(vb)["sample_interval_s"] == 90
    assert vb.boot().sleep_ms > 80_000


def _tamper_payload(env):
    p, kid, body, sig = env.split(".")
    data = json.loads(b64url_decode(body))
    data["params"] = {"set": {"sample_interval_s": 5}}
    return ".".join([p, kid, b64url(json.dumps(data).encode()), sig])


def _tamper_sig(env):
    head, sig = env.rsplit(".", 1)
    raw = bytearray(b64url_decode(sig))
    raw[10] ^= 1
    return head + "." + b64url(bytes(raw))


def test_every_bad_envelope_is_rejected_with_its_reason_and_nothing_runs(tmp_path, mosquitto, desk_factory,
                                                                          host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    evil = SigningKey.generate()
    set_5 = {"set": {"sample_interval_s": 5}}
    cases = {}
    _, good = desk.job("config", set_5, job_id="tampered-payload")
    cases["tampered-payload"] = (_tamper_payload(good), "bad signature")
    _, good = desk.job("config", set_5, job_id="tampered-sig")
    cases["tampered-sig"] = (_tamper_sig(good), "bad signature")
    payload, _ = desk.job("config", set_5, job_id="wrong-key")
    forged = evil.sign(payload).split(".")
    forged[1] = desk.key.kid  # claims the trusted kid, signed by another key
    cases["wrong-key"] = (".".join(forged), "bad signature")
    cases["unknown-kid"] = (evil.sign(desk.job("config", set_5, job_id="unknown-kid")[0]), "unknown signing key")
    cases["expired"] = (desk.job("config", set_5, job_id="expired", exp=int(time.time()) - 10)[1], "expired")
    cases["not-yet"] = (desk.job("config", set_5, job_id="not-yet", nbf=int(time.time()) + 3600)[1],
                        "not yet valid")
    cases["other-device"] = (desk.job("config", set_5, job_id="other-device", targets=["someone-else"])[1],
                             "not for this device")
    head, _ = desk.job("diag", job_id="bad-b64")[1].rsplit(".", 1)
    cases["malformed-b64"] = (head + ".!!not*base64!!", "malformed base64url")
    signed = f"mpf1.{desk.key.kid}.{b64url(b'{oops')}"
    cases["not-json"] = (signed + "." + b64url(desk.key.private.sign(signed.encode())), "not base64url JSON")
    cases["four-parts"] = ("mpf1.only.three", "malformed envelope")
    cases["oversized"] = (desk.job("config", {"set": {"groups": ["x" * 50] * 100}}, job_id="oversized")[1],
                          "over the limit")
    cases["unknown-type"] = (desk.job("selfdestruct", {}, job_id="unknown-type")[1], "unknown job type")
    desk.publish_queue([env for env, _ in cases.values()])
    _wakes(vb, 2)
    # Replay: once seq 1000 has run, a job with a lower seq is refused.
    desk.publish_queue([desk.job("diag", seq=1000, job_id="runs")[1]])
    _wakes(vb, 2)
    desk.publish_queue([desk.job("config", set_5, seq=999, job_id="replayed")[1]])
    _wakes(vb, 2)
    time.sleep(0.5)
    statuses = desk.statuses
    reasons = [s["detail"] for s in statuses if s["status"] == "REJECTED"]
    for name, (_, reason) in cases.items():
        assert any(reason in str(r) for r in reasons), f"{name}: no REJECTED with {reason!r} in {reasons}"
    assert any("replay" in str(r) for r in reasons)
    assert _config(vb).get("sample_interval_s", 60) == 60, "nothing rejected ran"
    assert all(r.sleep_ms > 50_000 for r in vb.run(boots=2)), "the device keeps sampling and sleeping"
    rejected_ids = [s["job"] for s in statuses if s["status"] == "REJECTED"
                    and not (isinstance(s["detail"], dict) and s["detail"].get("reported_again"))]
    assert len(rejected_ids) == len(set(rejected_ids)), "each rejection is reported once"
    # A named rejection the desk still lists is reported again (the host may have
    # lost it); one that cannot be named is not.
    again = {s["job"] for s in statuses if isinstance(s["detail"], dict) and s["detail"].get("reported_again")}
    assert again and all(not job.startswith("envelope:") for job in again), again


def test_fuzzed_envelopes_never_crash_the_agent_or_run_anything(tmp_path, mosquitto, desk_factory, host):
    count = stress_count(quick=500, full=5000)  # byte-level noise; the structure-aware fuzzer is test_promise_fuzz.py
    rng = random.Random(7)
    vb, desk = _device(tmp_path, mosquitto, desk_factory, wake_budget_ms=60000, wdt_timeout_ms=120000,
                       limits={"job_max_bytes": 2048})
    _, base = desk.job("config", {"set": {"sample_interval_s": 5}}, job_id="base")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.=+/{}\"[],: \x00\xff"
    envelopes = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            s = list(base)
            for _ in range(rng.randint(1, 4)):
                s[rng.randrange(len(s))] = rng.choice(alphabet)
            envelopes.append("".join(s))
        elif kind < 0.5:
            envelopes.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))))
        elif kind < 0.7:
            parts = base.split(".")
            rng.shuffle(parts)
            envelopes.append(".".join(parts[: rng.randint(1, 5)]))
        elif kind < 0.85:
            envelopes.append(rng.choice([None, 1, [], {}, "mpf1", "mpf1...", "." * rng.randint(0, 9)]))
        else:
            envelopes.append(base[: rng.randint(0, len(base))])
    for chunk in range(0, count, 250):
        desk.publish_queue(envelopes[chunk:chunk + 250])
        for r in _wakes(vb, 1):
            assert r.exit_reason == "deepsleep", (r.exit_reason, r.detail, r.output[-2000:])
    assert _config(vb).get("sample_interval_s", 60) == 60
    assert not any(s["status"] == "SUCCEEDED" for s in desk.statuses)


def test_three_queued_jobs_run_in_seq_order_across_wakes(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    envs = [desk.job("exec", {"code": f"with open('/trace.txt', 'a') as f:\n    f.write('{n}\\n')"},
                     seq=n, job_id=f"j{n}")[1] for n in (3, 1, 2)]
    desk.publish_queue(envs)
    _wakes(vb, 3)
    final = _settle(desk, 3)
    assert {k: [s["status"] for s in v] for k, v in final.items()} == {
        "j1": ["SUCCEEDED"], "j2": ["SUCCEEDED"], "j3": ["SUCCEEDED"]}
    assert vb.fs_get("/trace.txt") == b"1\n2\n3\n"


def test_power_cuts_during_jobs_end_in_exactly_one_final_status_each(tmp_path, mosquitto, desk_factory, host):
    rounds = stress_count(quick=6, full=120)  # random cuts; every cut point: test_promise_powercut.py
    rng = random.Random(99)
    vb, desk = _device(tmp_path, mosquitto, desk_factory, exec_allowed=True)
    seq = 1
    for round_ in range(rounds):
        envs = []
        for _ in range(3):
            kind = rng.choice(["exec", "config", "diag"])
            if kind == "exec":
                params = {"code": f"with open('/trace.txt', 'a') as f:\n    f.write('{seq}\\n')"}
            elif kind == "config":
                params = {"set": {"upload_watermark": 100 + seq}}
            else:
                params = {}
            envs.append(desk.job(kind, params, seq=seq, job_id=f"j{seq}")[1])
            seq += 1
        desk.publish_queue(envs)
        vb.schedule_power_cut(after_ops=rng.randint(1, 30), seed=round_)
        for _ in range(6):
            rec = vb.boot()
            assert "Traceback" not in rec.output, rec.output
            if rec.exit_reason == "power_cut":
                vb.power_on(clock_s=vb.clock_s)
        vb.state["cut_after_ops"] = None
        vb.save()
        _wakes(vb, 4)
    final = _settle(desk, seq - 1, timeout_s=10)
    assert sorted(final) == sorted(f"j{n}" for n in range(1, seq)), "every job ended"
    for job_id, statuses in final.items():
        attempts = {(s["status"], s["attempt"]) for s in statuses}
        assert len(attempts) == 1, f"{job_id} ended more than once: {statuses}"
    trace = [int(x) for x in (vb.fs_get("/trace.txt") or b"").split()]
    assert len(trace) == len(set(trace)), f"an exec job ran twice: {trace}"


def test_config_with_unreachable_wifi_reverts_and_a_later_good_one_succeeds(tmp_path, mosquitto, desk_factory,
                                                                          host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    _, bad = desk.job("config", {"set": {"wifi.ssid": "does-not-exist"}, "trial_wakes": 3}, job_id="bad-wifi")
    desk.publish_queue([bad])
    records = _wakes(vb, 8)
    assert any("previous settings restored" in r.output for r in records)
    final = _settle(desk, 1)
    assert [s["status"] for s in final["bad-wifi"]] == ["FAILED"]
    assert "reverted" in final["bad-wifi"][0]["detail"]
    assert _config(vb)["wifi"]["ssid"] == "lab"
    _, good = desk.job("config", {"set": {"wifi.connect_timeout_ms": 800}}, job_id="good-wifi")
    desk.publish_queue([good])
    _wakes(vb, 4)
    final = _settle(desk, 2)
    assert [s["status"] for s in final["good-wifi"]] == ["SUCCEEDED"]
    assert _config(vb)["wifi"]["connect_timeout_ms"] == 800


def test_reboot_succeeds_only_after_the_reboot(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    _wakes(vb, 2)
    _, env = desk.job("reboot", job_id="reboot-1")
    desk.publish_queue([env])
    first = vb.boot()
    assert first.exit_reason == "reset"
    time.sleep(0.3)
    assert "reboot-1" not in desk.final(), "no SUCCEEDED before the reboot"
    after = vb.boot()
    assert after.reset_cause == 2  # HARD_RESET
    final = _settle(desk, 1)
    (status,) = final["reboot-1"]
    assert status["status"] == "SUCCEEDED"
    assert status["detail"]["boots"] == status["detail"]["before"]["boots"] + 1


def test_diag_upload_sample_cancel_and_exec_refusal(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    envs = [
        desk.job("diag", job_id="diag")[1],
        desk.job("upload", job_id="upload")[1],
        desk.job("sample", {"sensor": "adc0", "rate_hz": 20, "duration_s": 0.5}, job_id="burst")[1],
        desk.job("config", {"set": {"upload_watermark": 7}}, job_id="to-cancel")[1],
        desk.job("cancel", {"job": "to-cancel"}, job_id="cancel")[1],
        desk.job("exec", {"code": "print('hi')"}, job_id="exec")[1],
    ]
    desk.publish_queue(envs)
    _wakes(vb, 3)
    final = _settle(desk, 5)
    diag = final["diag"][0]
    assert diag["status"] == "SUCCEEDED" and diag["detail"]["fw"] == "v1.24.0" and diag["detail"]["slot"] == "ota_0"
    assert final["upload"][0]["status"] == "SUCCEEDED"
    burst = final["burst"][0]["detail"]
    assert burst["sensor"] == "adc0" and len(burst["values"]) == 10
    assert final["cancel"][0]["detail"] == {"canceled": "to-cancel"}
    assert "to-cancel" not in final and _config(vb).get("upload_watermark") != 7
    assert final["exec"][0]["status"] == "REJECTED" and "exec_allowed" in final["exec"][0]["detail"]


def test_jobs_that_do_not_fit_the_wake_budget_continue_on_later_wakes(tmp_path, mosquitto, desk_factory, host):
    vb, desk = _device(tmp_path, mosquitto, desk_factory, wake_budget_ms=2500)
    burst = {"sensor": "adc0", "rate_hz": 10, "duration_s": 1.0}  # about a second each
    desk.publish_queue([desk.job("sample", burst, seq=n, job_id=f"b{n}")[1] for n in (1, 2, 3, 4)])
    records = _wakes(vb, 4)
    final = _settle(desk, 4)
    assert sorted(final) == ["b1", "b2", "b3", "b4"]
    done_at = {job: v[0]["ts"] for job, v in final.items()}
    assert done_at["b1"] <= done_at["b2"] <= done_at["b3"] <= done_at["b4"], "ascending seq"
    spent = [r for r in records if "wake budget spent" in r.output]
    assert spent, "the budget split the queue over wakes"


def test_a_plaintext_device_installs_a_first_tls_identity_only_with_the_fleet_ca(tmp_path, mosquitto, desk_factory,
                                                                                host):
    """A `cert` job while broker.tls is off (devices cert migrate): without the fleet CA,
    or for another device, it fails and writes nothing; with both it installs the CA and
    the identity and the device goes on over plaintext (a config job turns TLS on)."""
    import base64

    from mpfleet.fleet.certs import FleetCA

    vb, desk = _device(tmp_path, mosquitto, desk_factory)
    ca = FleetCA(tmp_path / "ca")
    ca.init()
    mine = ca.issue_device(vb.device_id).identity()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    _, no_ca = desk.job("cert", {"identity": b64(mine)})
    _, other = desk.job("cert", {"identity": b64(ca.issue_device("someone-else").identity()), "ca": b64(ca.ca_der())})
    _, good = desk.job("cert", {"identity": b64(mine), "ca": b64(ca.ca_der())})
    desk.publish_queue([no_ca])
    _wakes(vb, 2)
    final = _settle(desk, 1)
    assert [s["status"] for s in final["job-1"]] == ["FAILED"] and "no fleet CA" in str(final["job-1"][0]["detail"])
    assert vb.fs_get("/tls/id.der") is None and vb.fs_get("/tls/ca.der") is None
    desk.publish_queue([other])
    _wakes(vb, 2)
    final = _settle(desk, 2)
    assert [s["status"] for s in final["job-2"]] == ["FAILED"], final
    assert "the certificate is for someone-else" in str(final["job-2"][0]["detail"])
    assert vb.fs_get("/tls/id.der") is None and vb.fs_get("/tls/ca.der") is None
    desk.publish_queue([good])
    _wakes(vb, 2)
    final = _settle(desk, 3)
    assert [s["status"] for s in final["job-3"]] == ["SUCCEEDED"], final
    assert vb.fs_get("/tls/id.der") == mine and vb.fs_get("/tls/ca.der") == ca.ca_der()
    assert _config(vb)["broker"].get("tls") in (None, False)
    assert not any("upload failed" in r.output for r in _wakes(vb, 2))
