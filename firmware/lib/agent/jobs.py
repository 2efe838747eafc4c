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
#   tfloor             the newest signed iat of a job started: the device
#                      never believes a time earlier than this (agent.intake)
#   done   [[digest, id, seq, status, attempt]]  envelopes finished here (a
#                      named rejection included): never run again, and while
#                      the host still lists one its final status is reported
#                      again (agent.intake), which heals a status the host
#                      lost (a crash before its commit, a broker restart, a
#                      wiped session): the host's queue is its view of what
#                      is unfinished
#   rej    [digest]    envelopes rejected, never checked or reported again;
#                      it holds more than a wake looks at (agent.intake), so
#                      garbage left in a queue costs no flash after one wake
#   cur    the job in progress: id, kid, seq, digest, type, params, phase,
#          attempt, data, crash (why the last wake crashed while running it)
#   out    final statuses not yet published (published, then cleared)
#
# A digest is the first 8 bytes of the SHA-256 of the queue entry's text (the
# JSON string, quotes included), in hex: it identifies an envelope before
# anything in it is trusted.
#
# A final status is written to `out` in the same state write that finishes
# the job, then published: it reaches the host at least once, and the host
# keys it by (job, attempt). Nothing that failed a check runs.

import gc
import json
import time

from micropython import const

from agent.jsonfile import read_json, write_json
from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL
from agent.topics import topic

STATE_PATH = "/jobs.json"
_DONE_KEEP = const(16)
_REJ_KEEP = const(48)
_CLOCK_KNOWN_AFTER = const(1577836800)

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
    # Entries of an older format (bare digests, [kid, seq] pairs) are dropped:
    # their envelopes meet the replay floor instead.
    state["done"] = [d for d in state["done"] if isinstance(d, list) and len(d) == 5 and isinstance(d[0], str)]
    return state


def done_digests(state):
    return [d[0] for d in state["done"]]


def _remember_done(state, digest, job_id, seq, status, attempt):
    state["done"] = (state["done"] + [[digest, job_id, seq, status, attempt]])[-_DONE_KEEP:]


def save_state(state):
    write_json(STATE_PATH, state)


def digest_of(text):
    """An envelope's digest: the first 8 bytes of the SHA-256 of its text, in hex."""
    import binascii
    import hashlib

    if isinstance(text, str):
        text = text.encode()
    return binascii.hexlify(hashlib.sha256(text).digest()[:8]).decode()


def record_final(state, job, status, detail):
    """A job's end in the state: remembered as done, no longer current, and its
    status (unless None) in the outbox. The caller saves the state."""
    kid, seq = job["kid"], job["seq"]
    if seq > state["last"].get(kid, 0):
        state["last"][kid] = seq
    if job.get("digest"):
        _remember_done(state, job["digest"], job["id"], seq, status, job.get("attempt", 1))
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

    def publish_outbox(self):
        """Publish the final statuses waiting in the outbox and clear it in memory;
        the cleared outbox is saved with the next state write (a power cut before
        that only publishes them again, and the host applies a status once)."""
        if self.state["out"]:
            for status in self.state["out"]:
                self.publish(status)
            self.state["out"] = []
            self.dirty = True

    def flush_outbox(self):
        self.publish_outbox()
        if self.dirty:
            self.save()

    def save(self):
        save_state(self.state)
        self.dirty = False

    def finish(self, job, status, detail=None):
        """Record a final status durably, then publish it: one state write."""
        record_final(self.state, job, status, detail)
        self.save()
        print("job", job["id"], status)
        self.publish_outbox()

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
        if digest in done_digests(self.state):
            return
        _remember_done(self.state, digest, payload["id"], payload["seq"], REJECTED, 1)
        self.publish(_status(payload["id"], payload["seq"], REJECTED, reason, 1))
        self.dirty = True

    def report_again(self, record):
        """A finished envelope the host still lists: its final status once more (not
        saved: the host applies a final status once, and drops the job from the
        queue when it has it). The original detail is not kept on the device."""
        _digest, job_id, seq, status, attempt = record
        if status is not None:
            self.publish(_status(job_id, seq, status, {"reported_again": True}, attempt))

    def run_pending(self):
        """Resume the job in progress, verify the queue, run what passed. The
        intake (and the verifier under it) and the handlers are never in the
        heap together: the verify needs the memory, the jobs too."""
        import agent

        self.flush_outbox()
        if self.state["cur"] is not None:
            from agent import handlers

            handlers.resume(self)
            handlers = None
            agent.unload("handlers")
        from agent import intake

        verified = intake.verified_jobs(self)
        intake = None
        agent.unload("intake", "envelope", "ed25519", "sha512", "config", "jobschema")
        gc.collect()
        if verified:
            from agent import handlers

            handlers.run_verified(self, verified)


_UPDATE_TRIAL_PHASES = ("switch", "rebooting", "trial", "rollback")


def on_trial(cur):
    """Whether the job in progress is a trial that needs a connection at every
    wake: a connectivity config, a TLS certificate renewal, or an OTA/app
    update that switched."""
    if cur is None:
        return False
    if cur["type"] in ("config", "cert"):
        return cur["phase"] in ("trial", "revert")
    return cur["type"] in ("ota", "app") and cur["phase"] in _UPDATE_TRIAL_PHASES


def run_pending(ctx):
    runner = Runner(ctx)
    try:
        runner.run_pending()
    finally:
        if runner.dirty:
            runner.save()  # what this wake reported, in one write at its end
        if runner.client is not ctx.client:
            try:
                runner.client.disconnect()  # a connection an update's download made
            except OSError:
                pass
        st = runner.state
        if not on_trial(st["cur"]):
            ctx.stage.flags &= ~FLAG_TRIAL
        if st["cur"] is not None or st["out"]:
            ctx.stage.flags |= FLAG_JOBS
        else:
            ctx.stage.flags &= ~FLAG_JOBS

