# Signed jobs: read the retained queue, verify, run in seq order within the
# wake's budget, resume across resets, report each final status.
#
# The promises (docs/security.md): a signed job runs at most once per (kid,
# seq) and nothing unsigned or untargeted runs; no job leaves the device
# unable to reach its broker; a bad envelope is REJECTED once and never stops
# the rest of the queue.
#
# The job state lives in /jobs.json (agent.jsonfile: write, then rename), so a
# reset or a power cut at any point finds it as it was before or after a step:
#
#   last   {kid: seq}  the replay floor per key: the highest seq started. It
#                      moves in the same write that makes a job current, so
#                      a job never starts twice, and only for an envelope that
#                      targets this device and passed every check
#   tfloor             the newest signed iat verified: the device never
#                      believes a time earlier than this (agent.envelope)
#   done   [digest]    envelopes finished here, skipped silently while the
#                      host still lists them
#   rej    [digest]    envelopes rejected, never checked or reported again;
#                      it holds more than a queue can (_QUEUE_MAX), so
#                      garbage left in a queue costs no flash after one wake
#   cur    the job in progress: id, kid, seq, digest, type, params, phase,
#          attempt, data, crash (why the last wake crashed while running it)
#   out    final statuses not yet published (published, then cleared)
#
# A digest is the first 8 bytes of the envelope text's SHA-256, in hex: it
# identifies an envelope before anything in it is trusted.
#
# A final status is written to `out` in the same state write that finishes
# the job, then published: it reaches the host at least once, and the host
# keys it by (job, attempt). Nothing that failed a check runs.

import gc
import json
import time

import machine
from micropython import const

from agent.envelope import Rejected
from agent.jsonfile import read_json, write_json
from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL
from agent.topics import topic

STATE_PATH = "/jobs.json"
_DONE_KEEP = const(16)
_REJ_KEEP = const(48)
# Envelopes of one queue looked at per wake: the host's capped queue (6 KiB,
# docs/dispatch.md) holds about 20; the rest of a longer one waits.
_QUEUE_MAX = const(32)
_QUEUE_MAX_BYTES = const(12288)
_MAX_ATTEMPTS = const(3)
_JOB_MIN_BUDGET_MS = const(500)
_DEFAULT_TRIAL_WAKES = const(3)
_CLOCK_KNOWN_AFTER = const(1577836800)
_MAX_BURST = const(600)
_MAX_EXEC_OUTPUT = const(4096)

QUEUED = "QUEUED"
IN_PROGRESS = "IN_PROGRESS"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
REJECTED = "REJECTED"


class JobContext:
    """What the job runner may use of its wake, filled in by agent.wake. Data
    flows one way: jobs (and the update modules) never reach into the wake.

    device_id, cfg        who this is and its config
    stage                 the RTC stage: FLAG_* bits, wake_count, set_mark, save
    client                the MQTT connection (None when the wake has none)
    feed()                the watchdog
    budget_left_ms()      what is left of the wake's time
    request_upload()      connect at the next wake
    connect()             a new MQTT connection (an update's reconnect)
    on_message            the wake's handler for messages that are not chunks
    app_version()         the running agent's version
    take_queue()          the retained queue message, handed over once (None after)
    upload(client)        send the sample backlog now: a detail dict
    facts()               diag's report: firmware, slots, log, heap, ...
    crash                 why the previous wake crashed, or None
    """

    def __init__(self, device_id, cfg, stage, client=None, feed=None, budget_left_ms=None,
                 request_upload=None, connect=None, on_message=None, app_version=None, upload=None,
                 facts=None, over_usb=False, crash=None, take_queue=None):
        self.device_id = device_id
        self.cfg = cfg
        self.stage = stage
        self.client = client
        self.feed = feed
        self.budget_left_ms = budget_left_ms
        self.request_upload = request_upload
        self.connect = connect
        self.on_message = on_message
        self.app_version = app_version
        self.upload = upload
        self.facts = facts
        self.over_usb = over_usb
        self.crash = crash
        self.take_queue = take_queue


def _empty_state():
    return {"last": {}, "tfloor": 0, "done": [], "rej": [], "cur": None, "out": []}


def load_state():
    state, _ = read_json(STATE_PATH)
    fresh = _empty_state()
    if not isinstance(state, dict):
        return fresh
    for key in fresh:
        if not isinstance(state.get(key), type(fresh[key])) and not (key == "cur" and isinstance(state.get(key), dict)):
            state[key] = fresh[key]
    # Entries of an older format ([kid, seq] pairs) are not digests: dropped.
    state["done"] = [d for d in state["done"] if isinstance(d, str)]
    return state


def save_state(state):
    write_json(STATE_PATH, state)


def digest_of(text):
    """An envelope's digest: the first 8 bytes of the SHA-256 of its text, in hex."""
    import binascii
    import hashlib

    if isinstance(text, str):
        text = text.encode()
    return binascii.hexlify(hashlib.sha256(text).digest()[:8]).decode()


def _mark_of(digest):
    import binascii

    return binascii.unhexlify(digest)


def _skip_space(raw, i, n):
    while i < n and raw[i] in (32, 9, 10, 13):
        i += 1
    return i


def list_spans(raw, most):
    """(start, end) of each entry of the JSON list in `raw`, the first `most` of
    them, without parsing any entry: one pass, no recursion and no memory per
    level, whatever an entry holds. ValueError if `raw` is not one JSON list."""
    n = len(raw)
    i = _skip_space(raw, 0, n)
    if i >= n or raw[i] != 91:  # [
        raise ValueError("not a list")
    i = _skip_space(raw, i + 1, n)
    spans = []
    if i < n and raw[i] == 93:  # ]
        i += 1
    else:
        while True:
            start = i
            depth = 0
            in_string = False
            escaped = False
            while i < n:
                c = raw[i]
                if in_string:
                    if escaped:
                        escaped = False
                    elif c == 92:
                        escaped = True
                    elif c == 34:
                        in_string = False
                elif c == 34:
                    in_string = True
                elif c == 91 or c == 123:
                    depth += 1
                elif c == 93 or c == 125:
                    if depth == 0:
                        break
                    depth -= 1
                elif c == 44 and depth == 0:
                    break
                i += 1
            if i >= n or depth:
                raise ValueError("truncated")
            end = i
            while end > start and raw[end - 1] in (32, 9, 10, 13):
                end -= 1
            if end == start:
                raise ValueError("an empty entry")
            if len(spans) < most:
                spans.append((start, end))
            if raw[i] == 93:
                i += 1
                break
            i = _skip_space(raw, i + 1, n)
    if _skip_space(raw, i, n) != n:
        raise ValueError("text after the list")
    return spans


def record_final(state, job, status, detail):
    """A job's end in the state: remembered as done, no longer current, and its
    status (unless None) in the outbox. The caller saves the state."""
    kid, seq = job["kid"], job["seq"]
    if seq > state["last"].get(kid, 0):
        state["last"][kid] = seq
    if job.get("digest"):
        state["done"] = (state["done"] + [job["digest"]])[-_DONE_KEEP:]
    if state["cur"] is not None and state["cur"]["id"] == job["id"]:
        state["cur"] = None
    if status is not None:
        state["out"].append(_status(job["id"], seq, status, detail, job.get("attempt", 1)))


def _status(job_id, seq, status, detail=None, attempt=1, progress=None):
    return {"job": job_id, "seq": seq, "status": status, "progress": progress, "detail": detail,
            "attempt": attempt, "ts": time.time()}


def _trusted_time(state):
    """(now, known): the RTC, never earlier than the newest signed iat seen."""
    now = time.time()
    floor = state.get("tfloor", 0)
    if floor > now:
        now = floor
    return now, now >= _CLOCK_KNOWN_AFTER


class Runner:
    """The jobs part of one connected wake (agent.wake calls run_pending)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.client = ctx.client
        self.cfg = ctx.cfg
        self.state = load_state()
        self.status_topic = topic(ctx.device_id, "jobs/status")
        self.dirty = False  # rejections recorded but not yet saved

    # --- reporting ---------------------------------------------------------
    def publish(self, status):
        self.client.publish(self.status_topic, json.dumps(status), qos=1)

    def flush_outbox(self):
        if self.state["out"]:
            for status in self.state["out"]:
                self.publish(status)
            self.state["out"] = []
            self.dirty = True
        if self.dirty:
            save_state(self.state)
            self.dirty = False

    def save(self):
        save_state(self.state)
        self.dirty = False

    def finish(self, job, status, detail=None):
        """Record a final status durably, then publish it."""
        record_final(self.state, job, status, detail)
        self.save()
        print("job", job["id"], status)
        self.flush_outbox()

    def reject_unattributed(self, digest, reason):
        """An envelope that cannot be named (not authentic, not for this device,
        or a replay): report it once, by digest. Published now, saved with the
        wake's other rejections in one write: a power cut before that write only
        means it is reported again."""
        if digest in self.state["rej"]:
            return
        self.state["rej"] = (self.state["rej"] + [digest])[-_REJ_KEEP:]
        self.publish(_status("envelope:" + digest, None, REJECTED, reason, 1))
        self.dirty = True

    def reject_named(self, digest, payload, kid, reason):
        """An authentic envelope for this device that failed a later check (time,
        schema): named, so the host's record ends, but its seq stays unused."""
        if digest in self.state["rej"]:
            return
        self.state["rej"] = (self.state["rej"] + [digest])[-_REJ_KEEP:]
        self.publish(_status(payload["id"], payload["seq"], REJECTED, reason, 1))
        self.dirty = True

    # --- the queue ---------------------------------------------------------
    def read_queue(self):
        """The queue message and the spans of its first _QUEUE_MAX entries; (None, [])
        with the message rejected by digest when it is not a JSON list."""
        raw = self.ctx.take_queue()  # the only reference to the message from here
        if not raw or (len(raw) < 16 and bytes(raw).strip() in (b"", b"[]")):
            return None, []
        try:
            if len(raw) > _QUEUE_MAX_BYTES:
                raise ValueError("%d bytes, over the limit of %d" % (len(raw), _QUEUE_MAX_BYTES))
            spans = list_spans(raw, _QUEUE_MAX)
        except ValueError as e:
            digest = digest_of(raw)
            raw = None
            gc.collect()
            self.reject_unattributed(digest, "job queue is not a JSON list of envelopes: %s" % e)
            return None, []
        return raw, spans

    def screen(self, raw, spans):
        """Each entry's envelope text, or None when it needs no check (finished,
        in progress, already rejected, not a string, over the size limit)."""
        limit = self.cfg["limits"]["job_max_bytes"]
        cur = self.state["cur"]
        known = self.state["done"] + self.state["rej"]
        out = []
        for start, end in spans:
            entry = memoryview(raw)[start:end]
            digest = digest_of(entry)
            text = None
            if digest in known or (cur is not None and cur.get("digest") == digest):
                pass
            elif end - start < 2 or raw[start] != 34 or raw[end - 1] != 34 or b"\\" in bytes(entry):
                self.reject_unattributed(digest, "envelope is not a string of base64url and dots")
            elif end - start - 2 > limit:
                self.reject_unattributed(digest, "envelope of %d bytes is over the limit of %d"
                                         % (end - start - 2, limit))
            else:
                try:
                    text = bytes(entry[1:-1]).decode()
                except UnicodeError:
                    self.reject_unattributed(digest, "envelope is not ASCII")
            out.append(text)
        return out

    def verify(self, text, digest):
        """The verified job dict, or Rejected with (reason[, kid, payload])."""
        from agent import envelope  # unloaded again once the queue is verified

        kid, signed, payload_b64, sig_b64 = envelope.split(text, self.cfg["limits"]["job_max_bytes"])
        envelope.check_signature(kid, signed, sig_b64, self.cfg["trusted_keys"])
        payload = envelope.decode_payload(payload_b64)
        # From here the payload is authentic. Targeting first: another device's
        # job is none of this device's business (never named, never a floor).
        envelope.check_targets(payload, self.ctx.device_id, self.cfg["groups"])
        seq = payload.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise Rejected("schema: seq must be a positive integer", kid, payload)
        floor = self.state["last"].get(kid, 0)
        if seq <= floor:
            raise Rejected("replay: seq %d is not above %d, the last started for key %s" % (seq, floor, kid))
        try:
            now, known = _trusted_time(self.state)
            envelope.check_time(payload, now, known)
            envelope.check_schema(payload)
        except Rejected as e:
            raise Rejected(e.args[0], kid, payload)
        payload["kid"] = kid
        payload["digest"] = digest
        return payload

    def run_pending(self):
        self.flush_outbox()
        self.resume()
        raw, spans = self.read_queue()
        queue = self.screen(raw, spans) if spans else []
        raw = spans = None
        gc.collect()
        verified = []
        stage = self.ctx.stage
        for i in range(len(queue)):
            text = queue[i]
            if text is None:
                continue
            queue[i] = None  # each envelope's memory goes as soon as it is handled
            gc.collect()
            digest = digest_of('"' + text + '"')
            if stage.mark == _mark_of(digest):
                # The last wake crashed while checking this one: never again.
                text = None
                self.reject_unattributed(digest, "the agent crashed while checking it: %s" % (self.ctx.crash,))
                continue
            stage.set_mark(_mark_of(digest))
            try:
                job = self.verify(text, digest)
            except Rejected as e:
                self.reject(digest, e.args)
                continue
            except MemoryError:
                # Not the envelope's fault: it and everything after it (the host
                # sends the queue in seq order) wait for a later wake. Going on
                # would run or reject higher seqs first, and this job would then
                # be refused as a replay. A second wake out of memory on it is
                # a crash of its own (the mark stays): then it is rejected.
                text = None
                queue = None
                gc.collect()
                print("jobs: out of memory verifying a job; it and the rest retry next wake")
                self.ctx.request_upload()
                break
            finally:
                text = None
            stage.set_mark(None)
            if self.duplicate(job, verified):
                self.reject_unattributed(digest, "duplicate: another envelope in this queue has seq %d of key %s"
                                         % (job["seq"], job["kid"]))
                continue
            verified.append(job)
        self.flush_outbox()  # the rejections, in one write
        verified.sort(key=lambda j: j["seq"])
        if verified:
            # The verifier's code is not needed to run them: its memory goes to the
            # jobs (an update's buffers). A later verify imports it again.
            import agent

            agent.unload("envelope", "ed25519", "sha512")
            gc.collect()
        canceled = []
        for job in verified:
            if job["type"] == "cancel":
                canceled.append(job["params"]["job"])
        ran = 0
        for job in verified:
            if self.state["cur"] is not None:
                return  # a job is waiting for a reboot or a trial: one at a time
            if job["seq"] <= self.state["last"].get(job["kid"], 0):
                # Re-checked right before it starts: an earlier job of this wake may
                # have moved the floor.
                self.reject_unattributed(job["digest"], "replay: seq %d of key %s already started"
                                         % (job["seq"], job["kid"]))
                continue
            if job["id"] in canceled and job["type"] != "cancel":
                # Never started: the cancel job reports it; the host marks it CANCELED.
                record_final(self.state, job, None, None)
                self.save()
                continue
            if self.ctx.budget_left_ms() < _JOB_MIN_BUDGET_MS:
                print("jobs: wake budget spent; the rest continue next wake")
                self.ctx.request_upload()
                return
            if stage.crashes and ran:
                print("jobs: after a crash, one job per wake; the rest continue next wake")
                self.ctx.request_upload()
                return
            ran += 1
            self.start(job)

    def duplicate(self, job, verified):
        for other in verified:
            if other["kid"] == job["kid"] and other["seq"] == job["seq"]:
                return True
        return False

    def reject(self, digest, args):
        """Report a rejection once. An authentic job for this device is named;
        anything else is reported by digest. No rejection moves the floor."""
        reason = args[0]
        payload = args[2] if len(args) > 2 else None
        if isinstance(payload, dict) and isinstance(payload.get("id"), str) and len(payload["id"]) <= 64 \
                and isinstance(payload.get("seq"), int) and not isinstance(payload.get("seq"), bool):
            self.reject_named(digest, payload, args[1], reason)
            return
        self.reject_unattributed(digest, reason)

    # --- running -----------------------------------------------------------
    def start(self, job):
        cur = {"id": job["id"], "kid": job["kid"], "seq": job["seq"], "digest": job["digest"],
               "type": job["type"], "params": job.get("params", {}), "phase": "start", "attempt": 1,
               "data": None}
        state = self.state
        state["cur"] = cur
        # The floor moves in the same write that makes the job current: from here
        # no envelope with this seq (this one again, or another payload) can start.
        state["last"][job["kid"]] = job["seq"]
        iat = job.get("iat")
        if isinstance(iat, int) and iat > state.get("tfloor", 0):
            state["tfloor"] = iat
        self.save()
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, None, 1))
        self.run(cur)

    def resume(self):
        """A job that was in progress when the device reset, crashed or lost power."""
        cur = self.state["cur"]
        if cur is None:
            return
        crash = cur.get("crash")
        if crash and (cur["type"] not in ("ota", "app")
                      or (cur["phase"] not in _UPDATE_TRIAL_PHASES and self.ctx.stage.crashes >= 2)):
            # An update's own trial logic judges a crash of the new code; anything
            # else that crashed the agent is not run again.
            self.finish(cur, FAILED, "the agent crashed while running it: %s" % crash)
            return
        if cur["type"] == "reboot" and cur["phase"] == "rebooting":
            detail = {"boots": self.ctx.stage.wake_count, "reset_cause": machine.reset_cause(),
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
        self.save()
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "resumed", cur["attempt"]))
        self.run(cur)

    def run(self, cur):
        handler = getattr(self, "do_" + cur["type"], None)
        if handler is None:
            self.finish(cur, REJECTED, "job type %s is not supported by this agent" % cur["type"])
            return
        if self.ctx.over_usb and cur["type"] in ("ota", "app", "reboot", "upload"):
            self.finish(cur, REJECTED, "a %s job needs the network: it cannot run over USB" % cur["type"])
            return
        try:
            handler(cur)
        except Exception as e:  # noqa: BLE001 - no handler's failure may escape: it is the job's result
            gc.collect()
            if self.state["cur"] is not None and self.state["cur"]["id"] == cur["id"]:
                self.finish(cur, FAILED, "%s: %s" % (type(e).__name__, e))
            else:
                raise

    # --- handlers ----------------------------------------------------------
    def do_diag(self, cur):
        self.finish(cur, SUCCEEDED, self.ctx.facts())

    def do_upload(self, cur):
        self.finish(cur, SUCCEEDED, self.ctx.upload(self.client))

    def do_reboot(self, cur):
        cur["phase"] = "rebooting"
        cur["data"] = {"boots": self.ctx.stage.wake_count}
        self.save()
        self.ctx.request_upload()  # the rebooted device connects to report
        stage = self.ctx.stage
        stage.flags |= FLAG_JOBS
        stage.save()
        self.client.disconnect()
        machine.reset()

    def do_sample(self, cur):
        from agent import sensors

        p = cur["params"]
        sensor = None
        for s in self.cfg["sensors"]:
            if s["name"] == p["sensor"]:
                sensor = s
        if sensor is None:
            self.finish(cur, FAILED, "no sensor %s in this device's config" % p["sensor"])
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
            self.ctx.feed()
            next_at = time.ticks_add(next_at, period_ms)
            wait = time.ticks_diff(next_at, time.ticks_ms())
            if wait > 0:
                time.sleep_ms(wait)
        self.finish(cur, SUCCEEDED, {"sensor": sensor["name"], "rate_hz": rate, "t0": t0, "scale": scale,
                                     "values": values})

    def do_cancel(self, cur):
        self.finish(cur, SUCCEEDED, {"canceled": cur["params"]["job"]})

    def do_exec(self, cur):
        if not self.cfg["exec_allowed"]:
            self.finish(cur, REJECTED, "exec is not allowed on this device (exec_allowed, set only over USB)")
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
            self.finish(cur, FAILED, {"error": "%s: %s" % (type(e).__name__, e), "output": "".join(out)})
            return
        self.finish(cur, SUCCEEDED, {"output": "".join(out), "truncated": size[0] > limit})

    def do_ota(self, cur):
        from agent import ota

        ota.run(self, cur)

    def do_app(self, cur):
        from agent import appupdate

        appupdate.run(self, cur)

    def do_keys(self, cur):
        """Key rotation: the trusted set changes only here, never to an empty set;
        the envelope was signed by a key of the current set."""
        from agent import config

        p = cur["params"]
        keys = dict(self.cfg["trusted_keys"])
        for kid in p.get("remove", []):
            keys.pop(kid, None)
        add = p.get("add", {})
        for kid in add:
            keys[kid] = add[kid]
        if not keys:
            self.finish(cur, REJECTED, "a keys job may not leave the device without a trusted key")
            return
        if len(keys) > 8:
            self.finish(cur, REJECTED, "a device trusts at most 8 keys")
            return
        settings = config.security_settings(self.cfg)
        settings["trusted_keys"] = keys
        config.write_security(settings)
        self.cfg["trusted_keys"] = keys
        self.finish(cur, SUCCEEDED, {"trusted": sorted(keys)})

    def do_config(self, cur):
        from agent import config

        p = cur["params"]
        sets = p.get("set", {})
        unsets = p.get("unset", [])
        current, _ = read_json(config.CONFIG_PATH)
        new = apply_change(current, p)
        _, problems = config.validate(new, None, self.ctx.device_id)
        if problems:
            self.finish(cur, FAILED, "invalid config: " + "; ".join(problems))
            return
        connectivity = False
        for key in list(sets) + list(unsets):
            if config.is_connectivity(key):
                connectivity = True
        if not connectivity:
            write_json(config.CONFIG_PATH, new)
            self.finish(cur, SUCCEEDED, {"applied": sorted(list(sets) + list(unsets))})
            return
        # A connectivity change is on trial from before the file changes: a power
        # cut anywhere after this write finds a trial that reverts to the config
        # the device last connected with (config.good.json) if the broker stays
        # out of reach.
        trial_wakes = p.get("trial_wakes", _DEFAULT_TRIAL_WAKES)
        cur["phase"] = "trial"
        cur["data"] = {"wakes_left": trial_wakes}
        self.ctx.stage.flags |= FLAG_TRIAL
        self.save()
        write_json(config.CONFIG_PATH, new)
        self.publish(_status(cur["id"], cur["seq"], IN_PROGRESS, "trial: connecting with the new settings",
                             cur["attempt"]))
        self.ctx.request_upload()


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


def note_crash(reason):
    """The previous wake crashed: remember why with the job it was running (if
    any), so that the job ends FAILED with that reason instead of running again."""
    state, _ = read_json(STATE_PATH)
    if isinstance(state, dict) and isinstance(state.get("cur"), dict) and not state["cur"].get("crash"):
        state["cur"]["crash"] = reason
        save_state(state)


def on_connected(ctx):
    """The broker was reached: a connectivity trial succeeded."""
    state = load_state()
    cur = state["cur"]
    if cur is None or cur["type"] != "config" or cur["phase"] != "trial":
        return
    from agent import config

    current, _ = read_json(config.CONFIG_PATH)
    wanted = apply_change(current, cur["params"])
    if wanted != current:
        # A power cut came between the trial's start and the new file: this
        # connection used the old settings. Apply them now; the trial goes on.
        write_json(config.CONFIG_PATH, wanted)
        ctx.request_upload()
        return
    ctx.stage.flags &= ~FLAG_TRIAL
    runner = Runner(ctx)
    runner.finish(cur, SUCCEEDED, "connected with the new settings")


def on_upload_failed(ctx, error):
    """The broker was not reached: count the trial down, revert at zero."""
    state = load_state()
    cur = state["cur"]
    if cur is not None and cur["type"] in ("ota", "app") and cur["phase"] in _UPDATE_TRIAL_PHASES:
        if cur["type"] == "ota":
            from agent import ota as update
        else:
            from agent import appupdate as update
        update.on_upload_failed(ctx, state, cur, error)
        return
    if cur is None or cur["type"] != "config" or cur["phase"] != "trial":
        ctx.stage.flags &= ~FLAG_TRIAL
        return
    cur["data"]["wakes_left"] -= 1
    if cur["data"]["wakes_left"] > 0:
        save_state(state)
        return
    from agent import config

    config.restore_good()
    record_final(state, cur, FAILED, "could not reach the broker with the new settings (%s); reverted" % error)
    save_state(state)
    ctx.stage.flags &= ~FLAG_TRIAL
    ctx.stage.flags |= FLAG_JOBS
    ctx.request_upload()  # report the failure with the old settings next wake
    print("jobs: config trial failed, previous settings restored")


def run_pending(ctx):
    runner = Runner(ctx)
    try:
        runner.run_pending()
    finally:
        if runner.client is not ctx.client:
            try:
                runner.client.disconnect()  # a connection an update's download made
            except OSError:
                pass
        st = runner.state
        if not _on_trial(st["cur"]):
            ctx.stage.flags &= ~FLAG_TRIAL
        if st["cur"] is not None or st["out"]:
            ctx.stage.flags |= FLAG_JOBS
        else:
            ctx.stage.flags &= ~FLAG_JOBS

