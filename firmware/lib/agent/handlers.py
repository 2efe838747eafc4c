# The job handlers: one function per job type, run_<type>(runner, cur), called
# by agent.jobs once the job is current (its replay floor moved). Each job's
# params were checked before it started (agent.jobschema); a handler ends its
# job with runner.finish, or leaves it in a later phase with runner.save.
# Loaded only to run a job, never while signatures are verified.

import json
import time

import machine
from micropython import const

from agent.jobs import FAILED, IN_PROGRESS, REJECTED, SUCCEEDED, _status
from agent.jsonfile import read_json, write_json
from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL

_MAX_BURST = const(600)
_MAX_EXEC_OUTPUT = const(4096)
_DEFAULT_TRIAL_WAKES = const(3)


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
        exec(code, {"print": bounded_print, "__name__": "__job__"})
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
