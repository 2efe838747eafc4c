# Signed jobs: read the retained queue, verify, run in seq order within the
# wake's budget, resume across resets, report each final status.
#
# The job state lives in /jobs.json (replaced atomically: write, then rename),
# so a reset or a power cut at any point finds it as it was before or after a
# step, never half-written:
#
#   last   {kid: seq}  highest seq finished per key: anything at or below it
#                      that is not in `done` is a replay
#   done   [[kid, seq], ...]  recently finished jobs (dropped from the queue
#                      silently until the host removes them)
#   rej    digests of envelopes rejected before a seq could be trusted
#   cur    the job in progress: id, kid, seq, type, phase, attempt, data
#   out    final statuses not yet published (published, then cleared)
#   trial  a connectivity config on trial: job, wakes_left, the previous config
#
# A final status is written to `out` in the same state write that finishes
# the job, then published: it reaches the host at least once, and the host
# keys it by (job, attempt). Nothing that failed a check runs.

import gc
import json
import os
import time

import machine
from micropython import const

from agent.envelope import Rejected

STATE_PATH = "/jobs.json"
_DONE_KEEP = const(16)
_REJ_KEEP = const(16)
_MAX_ATTEMPTS = const(3)
_JOB_MIN_BUDGET_MS = const(500)
_DEFAULT_TRIAL_WAKES = const(3)
_CLOCK_KNOWN_AFTER = const(1577836800)
_MAX_BURST = const(600)
_MAX_EXEC_OUTPUT = const(4096)
# RTC stage flags (agent.rtcstage): a connectivity config is on trial; a job
# is in progress or a status waits to be sent (so the next wake loads this code).
FLAG_TRIAL = const(2)
FLAG_JOBS = const(4)

QUEUED = "QUEUED"
IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
REJECTED = "REJECTED"


def load_state():
    try:
        with open(STATE_PATH) as f:
            state = json.load(f)
        if isinstance(state, dict):
            return state
    except (OSError, ValueError):
        pass
    return {"last": {}, "done": [], "rej": [], "cur": None, "out": [], "trial": None}


def save_state(state):
    tmp = STATE_PATH + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.rename(tmp, STATE_PATH)


def _digest(text):
    import hashlib
    import binascii

    return binascii.hexlify(hashlib.sha256(text.encode()).digest()[:8]).decode()


def record_final(state, job, status, detail):
    """A job's end in the state: its seq used up, remembered as done, no longer
    current, and its status (unless None) in the outbox. The caller saves the state."""
    kid, seq = job["kid"], job["seq"]
    if seq > state["last"].get(kid, 0):
        state["last"][kid] = seq
    state["done"] = (state["done"] + [[kid, seq]])[-_DONE_KEEP:]
    if state["cur"] is not None and state["cur"]["id"] == job["id"]:
        state["cur"] = None
    if status is not None:
        state["out"].append(_status(job["id"], seq, status, detail, job.get("attempt", 1)))


def _status(job_id, seq, status, detail=None, attempt=1, progress=None):
    return {"job": job_id, "seq": seq, "status": status, "progress": progress, "detail": detail,
            "attempt": attempt, "ts": time.time()}


class Runner:
    """The jobs part of one connected wake (agent.wake calls run_pending)."""

    def __init__(self, wake, client):
        self.wake = wake
        self.client = client
        self.cfg = wake.cfg
        self.state = load_state()
        self.status_topic = "mpf/v1/%s/jobs/status" % wake.device_id

    # --- reporting ---------------------------------------------------------
    def publish(self, status):
        self.client.publish(self.status_topic, json.dumps(status), qos=1)

    def flush_outbox(self):
        if self.state["out"]:
            for status in self.state["out"]:
                self.publish(status)
            self.state["out"] = []
            save_state(self.state)

    def save(self):
        save_state(self.state)

    def finish(self, job, status, detail=None):
        """Record a final status durably, then publish it."""
        record_final(self.state, job, status, detail)
        save_state(self.state)
        print("job", job["id"], status)
        self.flush_outbox()

    def reject_unattributed(self, text, reason):
        """An envelope whose seq cannot be trusted: report it once, by digest."""
        digest = _digest(text)
        if digest in self.state["rej"]:
            return
        self.state["rej"] = (self.state["rej"] + [digest])[-_REJ_KEEP:]
        self.state["out"].append(_status("envelope:" + digest, None, REJECTED, reason, 1))
        save_state(self.state)
        self.flush_outbox()

    # --- the queue ---------------------------------------------------------
    def read_queue(self):
        wake = self.wake
        raw = wake.jobs_message
        wake.jobs_message = None
        if not raw:
            return []
        try:
            queue = json.loads(raw)
        except ValueError:
            print("jobs: queue is not JSON")
            return []
        finally:
            raw = None
            gc.collect()
        if isinstance(queue, dict):
            queue = queue.get("jobs", [])
        return queue if isinstance(queue, list) else []

    def drop_oversized(self, queue):
        """Reject envelopes over the size limit first, so that their memory is free
        before anything is verified (a long one would otherwise sit in the heap
        through every signature check)."""
        limit = self.cfg["limits"]["job_max_bytes"]
        for i in range(len(queue)):
            text = queue[i]
            if not isinstance(text, str) or len(text) > limit:
                queue[i] = None
                if isinstance(text, str):
                    self.reject_unattributed(text, "envelope of %d bytes is over the limit of %d" % (len(text), limit))
                text = None
                gc.collect()

    def verify(self, text):
        """The verified job dict, None to skip silently, or Rejected."""
        cfg = self.cfg
        from agent import envelope  # unloaded again once the queue is verified

        kid, signed, payload_b64, sig_b64 = envelope.split(text, cfg["limits"]["job_max_bytes"])
        peek = envelope.peek_payload(payload_b64)
        if peek is not None and [kid, peek.get("seq")] in self.state["done"]:
            return None  # finished here; the host has not dropped it from the queue yet
        if peek is not None and self.state["cur"] and self.state["cur"]["kid"] == kid \
                and self.state["cur"]["seq"] == peek.get("seq"):
            return None  # in progress (resumed separately)
        envelope.check_signature(kid, signed, sig_b64, cfg["trusted_keys"])
        payload = envelope.decode_payload(payload_b64)
        # From here the payload is authentic: a rejection names the job.
        try:
            envelope.check_targets(payload, self.wake.device_id, cfg["groups"])
            seq = payload.get("seq")
            if not isinstance(seq, int):
                raise Rejected("schema: seq must be a positive integer")
            if seq <= self.state["last"].get(kid, 0):
                raise Rejected("replay: seq %d is not above %d, the last executed for key %s"
                               % (seq, self.state["last"].get(kid, 0), kid))
            now = time.time()
            envelope.check_time(payload, now, now >= _CLOCK_KNOWN_AFTER)
            envelope.check_schema(payload)
        except Rejected as e:
            raise Rejected(e.args[0], kid, payload)
        payload["kid"] = kid
        return payload

    def run_pending(self):
        self.flush_outbox()
        self.resume()
        queue = self.read_queue()
        self.drop_oversized(queue)
        verified = []
        for i in range(len(queue)):
            text = queue[i]
            if text is None:
                continue
            queue[i] = None  # each envelope's memory goes as soon as it is handled
            gc.collect()
            try:
                job = self.verify(text)
            except Rejected as e:
                self.reject(text, e.args)
                continue
            except MemoryError:
                # Not the envelope's fault: it and everything after it (the host
                # sends the queue in seq order) wait for a later wake. Going on
                # would run or reject higher seqs first, and this job would then
                # be refused as a replay.
                text = None
                queue = None
                gc.collect()
                print("jobs: out of memory verifying a job; it and the rest retry next wake")
                self.wake.request_upload()
                break
            if job is not None:
                verified.append(job)
        verified.sort(key=lambda j: j["seq"])
        if verified:
            # The verifier's code is not needed to run them: its memory goes to the
            # jobs (an update's buffers). A later verify imports it again.
            import agent

            agent.unload("envelope", "ed25519", "sha512")
            gc.collect()
        canceled = []
        for job in verified:
            if job["type"] == "cancel" and isinstance(job.get("params", {}).get("job"), str):
                canceled.append(job["params"]["job"])
        for job in verified:
            if job["id"] in canceled and job["type"] != "cancel":
                # Never started: the cancel job reports it; the host marks it CANCELED.
                record_final(self.state, job, None, None)  # no status of its own: the host sets CANCELED
                save_state(self.state)
                continue
            if self.wake.budget_left_ms() < _JOB_MIN_BUDGET_MS:
                print("jobs: wake budget spent; the rest continue next wake")
                self.wake.request_upload()
                return
            if self.state["cur"] is not None:
                return  # a job is waiting for a reboot or a trial: one at a time
            self.start(job)

    def reject(self, text, args):
        """Report a rejection once. An authentic job (its signature verified) is
        named and its seq used up; anything else is reported by digest."""
        reason = args[0]
        payload = args[2] if len(args) > 2 else None
        job_id = payload.get("id") if isinstance(payload, dict) else None
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if reason.startswith("replay") or not isinstance(job_id, str) or not isinstance(seq, int) or seq < 1:
            # A replay must not move the floor, and an unauthentic or seq-less
            # envelope cannot: report it once by its digest.
            self.reject_unattributed(text, reason)
            return
        self.finish({"id": job_id, "kid": args[1], "seq": seq, "attempt": 1}, REJECTED, reason)

    # --- running -----------------------------------------------------------
    def start(self, job):
        cur = {"id": job["id"], "kid": job["kid"], "seq": job["seq"], "type": job["type"],
               "params": job.get("params", {}), "phase": "start", "attempt": 1, "data": None}
        self.state["cur"] = cur
        save_state(self.state)
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, None, 1))
        self.run(cur)

    def resume(self):
        """A job that was in progress when the device reset or lost power."""
        cur = self.state["cur"]
        if cur is None:
            return
        if cur["type"] == "reboot" and cur["phase"] == "rebooting":
            detail = {"boots": self.wake.stage.wake_count, "reset_cause": machine.reset_cause(),
                      "before": cur["data"]}
            self.finish(cur, SUCCEEDED, detail)
            return
        if cur["type"] == "config" and cur["phase"] == "trial":
            return  # decided by on_connected / on_upload_failed
        if cur["type"] in ("ota", "app"):
            # Resumable by design (download offset, switch phase): no attempt count.
            self.run(cur)
            return
        if cur["type"] == "exec":
            self.finish(cur, FAILED, "interrupted by a reset (watchdog or power) while running; not re-run")
            return
        if cur["attempt"] >= _MAX_ATTEMPTS:
            self.finish(cur, FAILED, "interrupted %d times" % cur["attempt"])
            return
        cur["attempt"] += 1
        save_state(self.state)
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "resumed", cur["attempt"]))
        self.run(cur)

    def run(self, cur):
        handler = getattr(self, "do_" + cur["type"], None)
        if handler is None:
            self.finish(cur, REJECTED, "job type %s is not supported by this agent" % cur["type"])
            return
        if self.wake.over_usb and cur["type"] in ("ota", "app", "reboot", "upload"):
            self.finish(cur, REJECTED, "a %s job needs the network: it cannot run over USB" % cur["type"])
            return
        try:
            handler(cur)
        except (OSError, ValueError, TypeError, KeyError) as e:
            self.finish(cur, FAILED, "%s: %s" % (type(e).__name__, e))

    # --- handlers ----------------------------------------------------------
    def do_diag(self, cur):
        import gc
        import esp32

        from agent.wake import running_firmware

        version, slot = running_firmware()
        fs = os.statvfs("/")
        gc.collect()
        log = self.wake.open_log().stats()
        detail = {
            "fw": version, "slot": slot, "app": self.wake.app_version(),
            "heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(),
            "fs_free": fs[0] * fs[3], "fs_total": fs[0] * fs[2],
            "reset_cause": machine.reset_cause(), "wake_reason": machine.wake_reason(),
            "wakes": self.wake.stage.wake_count, "log": log, "staged": self.wake.stage.staged,
            "rssi": self.wake.rssi, "time": time.time(),
            "boot_slot": esp32.Partition(esp32.Partition.BOOT).info()[4],
        }
        self.finish(cur, SUCCEEDED, detail)

    def do_upload(self, cur):
        sent = self.wake.send_backlog(self.client)
        left = self.wake.stage.log_backlog + self.wake.stage.staged
        self.finish(cur, SUCCEEDED, {"sent_upto": sent, "acked": self.wake.acked, "backlog": left})

    def do_reboot(self, cur):
        cur["phase"] = "rebooting"
        cur["data"] = {"boots": self.wake.stage.wake_count}
        save_state(self.state)
        self.wake.request_upload()  # the rebooted device connects to report
        self.wake.stage.flags |= FLAG_JOBS
        self.wake.stage.save()
        self.client.disconnect()
        machine.reset()

    def do_sample(self, cur):
        from agent import sensors

        p = cur["params"]
        sensor = None
        for s in self.cfg["sensors"]:
            if s["name"] == p.get("sensor"):
                sensor = s
        rate = p.get("rate_hz")
        duration = p.get("duration_s")
        if sensor is None:
            raise ValueError("no sensor %s" % p.get("sensor"))
        if not isinstance(rate, (int, float)) or not 0 < rate <= 50:
            raise ValueError("rate_hz must be in (0, 50]")
        if not isinstance(duration, (int, float)) or not 0 < duration * rate <= _MAX_BURST:
            raise ValueError("rate_hz * duration_s must be at most %d readings" % _MAX_BURST)
        n = int(duration * rate)
        period_ms = int(1000 / rate)
        scale = sensors.scale_of(sensor)
        values = []
        t0 = time.time()
        next_at = time.ticks_ms()
        for _ in range(n):
            try:
                values.append(int(round(sensors.read_one(sensor) * 10 ** scale)))
            except OSError:
                values.append(None)
            self.wake.wdt.feed()
            next_at = time.ticks_add(next_at, period_ms)
            wait = time.ticks_diff(next_at, time.ticks_ms())
            if wait > 0:
                time.sleep_ms(wait)
        self.finish(cur, SUCCEEDED, {"sensor": sensor["name"], "rate_hz": rate, "t0": t0, "scale": scale,
                                     "values": values})

    def do_cancel(self, cur):
        target = cur["params"].get("job")
        if not isinstance(target, str):
            raise ValueError("cancel needs params.job")
        self.finish(cur, SUCCEEDED, {"canceled": target})

    def do_exec(self, cur):
        if not self.cfg["exec_allowed"]:
            self.finish(cur, REJECTED, "exec is not allowed by this device's config (exec_allowed)")
            return
        code = cur["params"].get("code")
        if not isinstance(code, str):
            raise ValueError("exec needs params.code")
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
            self.finish(cur, FAILED, {"error": "%s: %s" % (type(e).__name__, e), "output": "".join(out)})
            return
        self.finish(cur, SUCCEEDED, {"output": "".join(out), "truncated": size[0] > limit})

    def do_ota(self, cur):
        from agent import ota

        ota.run(self, cur)

    def do_app(self, cur):
        from agent import appupdate

        appupdate.run(self, cur)

    def do_config(self, cur):
        from agent import config

        p = cur["params"]
        sets = p.get("set", {})
        unsets = p.get("unset", [])
        if not isinstance(sets, dict) or not isinstance(unsets, list):
            raise ValueError("config needs params.set (object) and/or params.unset (list)")
        current, _ = config._read(config.CONFIG_PATH)
        new = json.loads(json.dumps(current or {}))
        for key in sets:
            _set_dotted(new, key, sets[key])
        for key in unsets:
            _unset_dotted(new, key)
        _, problems = config.validate(new, None, self.wake.mac_id)
        if problems:
            self.finish(cur, FAILED, "invalid config: " + "; ".join(problems))
            return
        connectivity = False
        for key in list(sets) + list(unsets):
            if key.startswith("wifi") or key.startswith("broker") or key == "device_id":
                connectivity = True
        if connectivity:
            _write_json(config.CONFIG_PATH + ".prev", current or {})
        _write_json(config.CONFIG_PATH, new)
        if not connectivity:
            self.finish(cur, SUCCEEDED, {"applied": sorted(list(sets) + list(unsets))})
            return
        trial_wakes = p.get("trial_wakes", _DEFAULT_TRIAL_WAKES)
        cur["phase"] = "trial"
        self.wake.stage.flags |= FLAG_TRIAL
        cur["data"] = {"wakes_left": trial_wakes if isinstance(trial_wakes, int) and trial_wakes > 0
                       else _DEFAULT_TRIAL_WAKES}
        save_state(self.state)
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "trial: connecting with the new settings",
                             cur["attempt"]))
        self.wake.request_upload()


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


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


# --- hooks the wake calls around its connection --------------------------------
_UPDATE_TRIAL_PHASES = ("switch", "rebooting", "trial", "rollback")


def trial_active():
    """A trial that needs a connection at this boot: a connectivity config, or an
    OTA/app update that switched and must pass its self-test."""
    return _on_trial(load_state()["cur"])


def _on_trial(cur):
    if cur is None:
        return False
    if cur["type"] == "config":
        return cur["phase"] == "trial"
    return cur["type"] in ("ota", "app") and cur["phase"] in _UPDATE_TRIAL_PHASES


def on_connected(wake, client):
    """The broker was reached: a connectivity trial succeeded."""
    state = load_state()
    cur = state["cur"]
    if cur is None or cur["type"] != "config" or cur["phase"] != "trial":
        return
    try:
        os.remove("/config.json.prev")
    except OSError:
        pass
    wake.stage.flags &= ~FLAG_TRIAL
    runner = Runner(wake, client)
    runner.finish(cur, SUCCEEDED, "connected with the new settings")


def on_upload_failed(wake):
    """The broker was not reached: count the trial down, revert at zero."""
    state = load_state()
    cur = state["cur"]
    if cur is not None and cur["type"] in ("ota", "app") and cur["phase"] in _UPDATE_TRIAL_PHASES:
        if cur["type"] == "ota":
            from agent import ota as update
        else:
            from agent import appupdate as update
        update.on_upload_failed(wake, state, cur, wake.last_error)
        return
    if cur is None or cur["type"] != "config" or cur["phase"] != "trial":
        wake.stage.flags &= ~FLAG_TRIAL
        return
    cur["data"]["wakes_left"] -= 1
    if cur["data"]["wakes_left"] > 0:
        save_state(state)
        return
    try:
        os.rename("/config.json.prev", "/config.json")
    except OSError:
        pass
    record_final(state, cur, FAILED, "could not reach the broker with the new settings; reverted")
    save_state(state)
    wake.stage.flags &= ~FLAG_TRIAL
    wake.stage.flags |= FLAG_JOBS
    wake.request_upload()  # report the failure with the old settings next wake
    print("jobs: config trial failed, previous settings restored")


def run_pending(wake, client):
    runner = Runner(wake, client)
    try:
        runner.run_pending()
    finally:
        if runner.client is not client:
            try:
                runner.client.disconnect()  # a connection an update's download made
            except OSError:
                pass
        st = runner.state
        if not _on_trial(st["cur"]):
            wake.stage.flags &= ~FLAG_TRIAL
        if st["cur"] is not None or st["out"]:
            wake.stage.flags |= FLAG_JOBS
        else:
            wake.stage.flags &= ~FLAG_JOBS
