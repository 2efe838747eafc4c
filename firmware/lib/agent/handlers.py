# Running jobs: the verified jobs in seq order (run_verified), a job's start
# (the replay floor moves in the same write that makes it current), its resume
# after a reset, crash or power cut, and one handler per job type,
# run_<type>(runner, cur). Each job's params were checked before it started
# (agent.jobschema); a handler ends its job with runner.finish, or leaves it in
# a later phase with runner.save. Loaded only to run jobs, never while
# signatures are verified (agent.jobs.Runner.run_pending).

import gc
import json
import time

import machine
from micropython import const

from agent.jobs import _UPDATE_TRIAL_PHASES, FAILED, IN_PROGRESS, REJECTED, SUCCEEDED, _status, record_final
from agent.jsonfile import read_json, write_json
from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL

_MAX_ATTEMPTS = const(3)
_UPDATE_OOM_WAKES = const(4)  # an update out of memory fails at the 4th time, not before
_JOB_MIN_BUDGET_MS = const(500)
_MAX_BURST = const(600)
_MAX_EXEC_OUTPUT = const(4096)
_DEFAULT_TRIAL_WAKES = const(3)


def run_verified(runner, verified):
    """The verified jobs in seq order, one at a time, within the wake's budget."""
    # The intake's rejections are saved with the first job that starts, or at the end.
    stage = runner.ctx.stage
    canceled = []
    for job in verified:
        if job["type"] == "cancel":
            canceled.append(job["params"]["job"])
    ran = 0
    for job in verified:
        if runner.state["cur"] is not None:
            return  # a job is waiting for a reboot or a trial: one at a time
        if job["seq"] <= runner.state["last"].get(job["kid"], 0):
            # Re-checked right before it starts: an earlier job of this wake may
            # have moved the floor.
            runner.reject_unattributed(job["digest"], "replay: seq %d of key %s already started"
                                       % (job["seq"], job["kid"]))
            continue
        if job["id"] in canceled and job["type"] != "cancel":
            # Never started: the cancel job reports it; the host marks it CANCELED.
            record_final(runner.state, job, None, None)
            runner.save()
            continue
        if runner.ctx.budget_left_ms() < _JOB_MIN_BUDGET_MS:
            print("jobs: wake budget spent; the rest continue next wake")
            runner.ctx.request_upload()
            return
        if stage.crashes and ran:
            print("jobs: after a crash, one job per wake; the rest continue next wake")
            runner.ctx.request_upload()
            return
        ran += 1
        start(runner, job)


def start(runner, job):
    cur = {"id": job["id"], "kid": job["kid"], "seq": job["seq"], "digest": job["digest"],
           "type": job["type"], "params": job.get("params", {}), "phase": "start", "attempt": 1,
           "data": None}
    state = runner.state
    state["cur"] = cur
    # The floor moves in the same write that makes the job current: from here
    # no envelope with this seq (this one again, or another payload) can start.
    state["last"][job["kid"]] = job["seq"]
    iat = job.get("iat")
    if isinstance(iat, int) and iat > state.get("tfloor", 0):
        state["tfloor"] = iat
    runner.save()
    runner.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, None, 1))
    run(runner, cur)


def resume(runner):
    """A job that was in progress when the device reset, crashed or lost power."""
    cur = runner.state["cur"]
    if cur is None:
        return
    if cur["type"] == "cert" and cur["phase"] in ("trial", "revert"):
        # Decided by on_connected / on_upload_failed (agent.wakehooks), crash or
        # not: only they know which certificate the connection presented.
        return
    crash = cur.get("crash")
    if crash and (cur["type"] not in ("ota", "app")
                  or (cur["phase"] not in _UPDATE_TRIAL_PHASES and runner.ctx.stage.crashes >= 2)):
        # An update's own trial logic judges a crash of the new code; anything
        # else that crashed the agent is not run again.
        runner.finish(cur, FAILED, "the agent crashed while running it: %s" % crash)
        return
    if cur["type"] == "reboot" and cur["phase"] == "rebooting":
        detail = {"boots": runner.ctx.stage.wake_count, "reset_cause": machine.reset_cause(),
                  "before": cur["data"]}
        runner.finish(cur, SUCCEEDED, detail)
        return
    if cur["type"] == "config" and cur["phase"] in ("trial", "revert"):
        return  # decided by on_connected / on_upload_failed
    if cur["type"] in ("ota", "app"):
        # Resumable by design (download offset, switch phase): no attempt count.
        run(runner, cur)
        return
    if cur["type"] == "exec":
        runner.finish(cur, FAILED, "interrupted by a reset (watchdog or power) while running; not re-run")
        return
    if cur["attempt"] >= _MAX_ATTEMPTS:
        runner.finish(cur, FAILED, "interrupted %d times" % cur["attempt"])
        return
    cur["attempt"] += 1
    runner.save()
    runner.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "resumed", cur["attempt"]))
    run(runner, cur)


def run(runner, cur):
    handler = _HANDLERS.get(cur["type"])
    if handler is None:
        runner.finish(cur, REJECTED, "job type %s is not supported by this agent" % cur["type"])
        return
    if runner.ctx.over_usb and cur["type"] in ("ota", "app", "reboot", "upload"):
        runner.finish(cur, REJECTED, "a %s job needs the network: it cannot run over USB" % cur["type"])
        return
    try:
        handler(runner, cur)
    except Exception as e:  # no handler's failure may escape: it is the job's result
        gc.collect()
        if runner.state["cur"] is None or runner.state["cur"]["id"] != cur["id"]:
            raise
        if isinstance(e, MemoryError) and _resume_next_wake(runner, cur):
            return
        runner.finish(cur, FAILED, "%s: %s" % (type(e).__name__, e))


def _resume_next_wake(runner, cur):
    """An update that ran out of memory goes on in the next wake, whose heap is whole
    again (a download resumes at its offset, a switch at its phase), until it has
    run out _UPDATE_OOM_WAKES times; True if it will. A heap fragmented by one
    wake's connection and queue is not a reason to fail a rollout."""
    if cur["type"] not in ("ota", "app"):
        return False
    cur["oom"] = cur.get("oom", 0) + 1
    if cur["oom"] >= _UPDATE_OOM_WAKES:
        return False
    runner.save()
    runner.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "out of memory; resuming in the next wake",
                           cur["attempt"]))
    runner.ctx.request_upload()
    print("jobs: %s out of memory, resuming next wake" % cur["id"])
    return True


def run_diag(runner, cur):
    runner.finish(cur, SUCCEEDED, runner.ctx.facts())

def run_upload(runner, cur):
    runner.finish(cur, SUCCEEDED, runner.ctx.upload(runner.client))

def run_reboot(runner, cur):
    cur["phase"] = "rebooting"
    cur["data"] = {"boots": runner.ctx.stage.wake_count}
    runner.save()
    runner.ctx.request_upload()  # the rebooted device connects to report
    stage = runner.ctx.stage
    stage.flags |= FLAG_JOBS
    stage.save()
    runner.client.disconnect()
    machine.reset()

def run_sample(runner, cur):
    from agent import sensors

    p = cur["params"]
    sensor = None
    for s in runner.cfg["sensors"]:
        if s["name"] == p["sensor"]:
            sensor = s
    if sensor is None:
        runner.finish(cur, FAILED, "no sensor %s in this device's config" % p["sensor"])
        return
    rate = p["rate_hz"]
    n = int(p["duration_s"] * rate)
    period_ms = int(1000 / rate)
    scale = sensors.scale_of(sensor)
    values = []
    t0 = time.time()
    next_at = time.ticks_ms()
    for _ in range(min(n, _MAX_BURST)):
        try:
            values.append(int(round(sensors.read_one(sensor) * 10 ** scale)))
        except (OSError, ValueError):
            values.append(None)
        runner.ctx.feed()
        next_at = time.ticks_add(next_at, period_ms)
        wait = time.ticks_diff(next_at, time.ticks_ms())
        if wait > 0:
            time.sleep_ms(wait)
    runner.finish(cur, SUCCEEDED, {"sensor": sensor["name"], "rate_hz": rate, "t0": t0, "scale": scale,
                                 "values": values})

def run_cancel(runner, cur):
    runner.finish(cur, SUCCEEDED, {"canceled": cur["params"]["job"]})

def run_exec(runner, cur):
    if not runner.cfg["exec_allowed"]:
        runner.finish(cur, REJECTED, "exec is not allowed on this device (exec_allowed, set only over USB)")
        return
    code = cur["params"]["code"]
    limit = min(cur["params"].get("max_output", 1024), _MAX_EXEC_OUTPUT)
    out = []
    size = [0]

    def bounded_print(*args, **kwargs):
        text = " ".join(str(a) for a in args) + kwargs.get("end", "\n")
        if size[0] < limit:
            out.append(text[:limit - size[0]])
        size[0] += len(text)

    try:
        exec(code, {"print": bounded_print, "__name__": "__job__"})  # noqa: S102 - the exec job, a signed snippet run only where exec_allowed (set over USB)
    except Exception as e:  # noqa: BLE001 - the snippet's failure is the job's result
        runner.finish(cur, FAILED, {"error": "%s: %s" % (type(e).__name__, e), "output": "".join(out)})
        return
    runner.finish(cur, SUCCEEDED, {"output": "".join(out), "truncated": size[0] > limit})

def run_ota(runner, cur):
    from agent import ota

    ota.run(runner, cur)

def run_app(runner, cur):
    from agent import appupdate

    appupdate.run(runner, cur)

def run_keys(runner, cur):
    """Key rotation: the trusted set changes only here, never to an empty set;
    the envelope was signed by a key of the current set."""
    from agent import config

    p = cur["params"]
    keys = dict(runner.cfg["trusted_keys"])
    for kid in p.get("remove", []):
        keys.pop(kid, None)
    add = p.get("add", {})
    for kid in add:
        keys[kid] = add[kid]
    if not keys:
        runner.finish(cur, REJECTED, "a keys job may not leave the device without a trusted key")
        return
    if len(keys) > 8:
        runner.finish(cur, REJECTED, "a device trusts at most 8 keys")
        return
    settings = config.security_settings(runner.cfg)
    settings["trusted_keys"] = keys
    config.write_security(settings)
    runner.cfg["trusted_keys"] = keys
    runner.finish(cur, SUCCEEDED, {"trusted": sorted(keys)})

def run_config(runner, cur):
    from agent import config

    p = cur["params"]
    sets = p.get("set", {})
    unsets = p.get("unset", [])
    current, _ = read_json(config.CONFIG_PATH)
    new = apply_change(current, p)
    _, problems = config.validate(new, None, runner.ctx.device_id)
    if problems:
        runner.finish(cur, FAILED, "invalid config: " + "; ".join(problems))
        return
    connectivity = False
    for key in list(sets) + list(unsets):
        if config.is_connectivity(key):
            connectivity = True
    if not connectivity:
        write_json(config.CONFIG_PATH, new)
        runner.finish(cur, SUCCEEDED, {"applied": sorted(list(sets) + list(unsets))})
        return
    # A connectivity change is on trial from before the file changes: a power
    # cut anywhere after this write finds a trial that reverts to the config
    # the device last connected with (config.good.json) if the broker stays
    # out of reach.
    trial_wakes = p.get("trial_wakes", _DEFAULT_TRIAL_WAKES)
    cur["phase"] = "trial"
    cur["data"] = {"wakes_left": trial_wakes}
    runner.ctx.stage.flags |= FLAG_TRIAL
    runner.save()
    write_json(config.CONFIG_PATH, new)
    runner.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "trial: connecting with the new settings",
                         cur["attempt"]))
    runner.ctx.request_upload()


def run_cert(runner, cur):
    """A new TLS identity (certificate + key DER), on trial at the next
    connection as a connectivity change is (agent.wakehooks)."""
    import binascii

    from agent import tlsid

    p = cur["params"]
    tls_on = runner.cfg["broker"]["tls"]
    if tls_on and p.get("ca") is not None:
        runner.finish(cur, FAILED, "the fleet CA cannot change while the device uses TLS; nothing changed")
        return
    try:
        identity = binascii.a2b_base64(p["identity"])
        cert, _ = tlsid.split_identity(identity)
        cn = tlsid.subject_cn(cert)
        ca = None
        if p.get("ca") is not None:
            ca = binascii.a2b_base64(p["ca"])
            tlsid.check_certificate(ca)
    except (ValueError, UnicodeError, TypeError) as e:
        runner.finish(cur, FAILED, "identity: %s" % e)
        return
    if cn != runner.ctx.device_id:
        # The broker would take it (the fleet's CA) and the ACL would then confine
        # this device to another device's topics: it could never report again.
        runner.finish(cur, FAILED, "the certificate is for %s, not this device; nothing changed" % str(cn)[:64])
        return
    if not tls_on:
        # Not in use until a config job turns broker.tls on (that change is the
        # trial, with its revert to plaintext): installed, nothing to try.
        if ca is None and not tlsid.exists(tlsid.CA_PATH):
            runner.finish(cur, FAILED, "no fleet CA on the device: send it with the certificate; nothing changed")
            return
        tlsid.install(identity, ca)
        identity = ca = None
        runner.finish(cur, SUCCEEDED, "installed; used once a config job turns broker.tls on")
        return
    # The file first, then the phase: a cut between them resumes this handler
    # (phase "start"), which writes the same file again; a trial is never on
    # without its file. The params leave the job state with the phase change:
    # the private key is kept only in /tls.
    tlsid.write_trial(identity)
    identity = None
    cur["phase"] = "trial"
    cur["data"] = {"wakes_left": p.get("trial_wakes", _DEFAULT_TRIAL_WAKES)}
    cur["params"] = {}
    runner.ctx.stage.flags |= FLAG_TRIAL
    runner.save()
    runner.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "trial: connecting with the new certificate",
                           cur["attempt"]))
    runner.ctx.request_upload()


def apply_change(current, params):
    """A config job's set/unset applied to a copy of `current` (idempotent:
    applying it to its own result changes nothing)."""
    new = json.loads(json.dumps(current)) if isinstance(current, dict) else {}
    sets = params.get("set", {})
    for key in sets:
        _set_dotted(new, key, sets[key])
    for key in params.get("unset", []):
        _unset_dotted(new, key)
    return new


def _set_dotted(obj, key, value):
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(obj.get(part), dict):
            obj[part] = {}
        obj = obj[part]
    obj[parts[-1]] = value


def _unset_dotted(obj, key):
    parts = key.split(".")
    for part in parts[:-1]:
        obj = obj.get(part)
        if not isinstance(obj, dict):
            return
    obj.pop(parts[-1], None)


_HANDLERS = {
    "diag": run_diag, "upload": run_upload, "reboot": run_reboot, "sample": run_sample, "cancel": run_cancel,
    "exec": run_exec, "ota": run_ota, "app": run_app, "keys": run_keys, "config": run_config,
    "cert": run_cert,
}
