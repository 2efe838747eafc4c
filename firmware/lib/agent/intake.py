# The intake of a job queue: from the retained message to the jobs that may
# run, in the order of docs/security.md ("Intake order"). Loaded by
# agent.jobs for the verification and unloaded before any job runs.
#
#   message <= 12 KiB -> split into entries without parsing them (list_spans)
#   -> per entry: finished here? its final status again; rejected? skip
#   -> a string within job_max_bytes
#   -> agent.envelope: format, trusted kid, signature, bounded parse,
#      targeting, replay floor, time, schema -> duplicates of (kid, seq) out
#
# Nothing here runs a job or moves a floor; rejections are reported through
# the Runner (once each, by digest unless the envelope is authentic and for
# this device).

import gc

from micropython import const

from agent.envelope import Rejected
from agent.jobs import _trusted_time, digest_of, done_digests

# Envelopes of one queue looked at per wake: the host's capped queue (6 KiB,
# docs/dispatch.md) holds about 20; the rest of a longer one waits.
QUEUE_MAX = const(32)
_QUEUE_MAX_BYTES = const(12288)


def verified_jobs(runner):
    """The queue's jobs that passed every check, in ascending seq."""
    raw, spans = read_queue(runner)
    try:
        queue, digests = screen(runner, raw, spans) if spans else ([], [])
    except MemoryError:
        # The heap, not the queue: this wake leaves the queue to the next one.
        raw = spans = None
        gc.collect()
        print("jobs: no memory to screen the queue; it waits for the next wake")
        runner.ctx.request_upload()
        return []
    raw = spans = None
    gc.collect()
    verified = []
    stage = runner.ctx.stage
    for i in range(len(queue)):
        text = queue[i]
        if text is None:
            continue
        queue[i] = None  # each envelope's memory goes as soon as it is handled
        gc.collect()
        digest = digests[i]  # taken in place by screen(): no copy of the text with its quotes
        mark = _mark_of(digest)
        retry = stage.mark == mark
        if retry and runner.ctx.crash:
            # The last wake crashed while checking this one: never again.
            text = None
            runner.reject_unattributed(digest, "the agent crashed while checking it: %s" % runner.ctx.crash)
            stage.set_mark(None)
            continue
        stage.set_mark(mark)
        try:
            job = verify(runner, text, digest)
        except Rejected as e:
            stage.set_mark(None)
            reject(runner, digest, e.args)
            continue
        except MemoryError:
            text = None
            gc.collect()
            if retry:
                # Out of memory on it a second wake running: it never fits.
                stage.set_mark(None)
                runner.reject_unattributed(digest, "does not fit in the memory a verify has")
                continue
            # Not the envelope's fault (yet): it and everything after it (the
            # host sends the queue in seq order) wait for the next wake, which
            # finds it marked and tries once more. Going on would run or reject
            # higher seqs first, and this job would then be refused as a replay.
            queue = None
            gc.collect()
            print("jobs: out of memory verifying a job; it and the rest retry next wake")
            runner.ctx.request_upload()
            break
        finally:
            text = None
        stage.set_mark(None)
        if duplicate(job, verified):
            runner.reject_unattributed(digest, "duplicate: another envelope in this queue has seq %d of key %s"
                                       % (job["seq"], job["kid"]))
            continue
        verified.append(job)
    verified.sort(key=lambda j: j["seq"])
    return verified


def _has_backslash(raw, start, end):
    for i in range(start, end):
        if raw[i] == 92:
            return True
    return False


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


def read_queue(runner):
    """The queue message and the spans of its first QUEUE_MAX entries; (None, [])
    with the message rejected by digest when it is not a JSON list."""
    raw = runner.ctx.take_queue()  # the only reference to the message from here
    if isinstance(raw, str):
        raw = raw.encode()  # over USB the queue comes as text; the scan reads bytes
    if not raw or (len(raw) < 16 and bytes(raw).strip() in (b"", b"[]")):
        return None, []
    try:
        if len(raw) > _QUEUE_MAX_BYTES:
            raise ValueError("%d bytes, over the limit of %d" % (len(raw), _QUEUE_MAX_BYTES))
        spans = list_spans(raw, QUEUE_MAX)
    except ValueError as e:
        digest = digest_of(raw)
        raw = None
        gc.collect()
        runner.reject_unattributed(digest, "job queue is not a JSON list of envelopes: %s" % e)
        return None, []
    return raw, spans


def screen(runner, raw, spans):
    """Each entry's envelope text, or None when it needs no check (finished,
    in progress, already rejected, not a string, over the size limit); and
    each entry's digest, taken over the message in place."""
    limit = runner.cfg["limits"]["job_max_bytes"]
    cur = runner.state["cur"]
    done = runner.state["done"]
    finished = done_digests(runner.state)
    rejected = runner.state["rej"]
    out = []
    digests = []
    for start, end in spans:
        entry = memoryview(raw)[start:end]
        digest = digest_of(entry)
        text = None
        if digest in finished:
            # The host still lists a job that ended here: it may never have
            # heard how. Say it again; nothing runs.
            runner.report_again(done[finished.index(digest)])
        elif digest in rejected or (cur is not None and cur.get("digest") == digest):
            pass
        elif end - start - 2 > limit:
            # Before anything copies it: an oversized entry is only ever looked at
            # in place (a copy of one is what ran a fragmented heap out).
            runner.reject_unattributed(digest, "envelope of %d bytes is over the limit of %d"
                                       % (end - start - 2, limit))
        elif end - start < 2 or raw[start] != 34 or raw[end - 1] != 34 or _has_backslash(raw, start, end):
            runner.reject_unattributed(digest, "envelope is not a string of base64url and dots")
        else:
            try:
                text = bytes(entry[1:-1]).decode()
            except UnicodeError:
                runner.reject_unattributed(digest, "envelope is not ASCII")
        out.append(text)
        digests.append(digest)
    return out, digests


def verify(runner, text, digest):
    """The verified job dict, or Rejected with (reason[, kid, payload])."""
    from agent import envelope  # unloaded again once the queue is verified

    kid, signed, payload_b64, sig_b64 = envelope.split(text, runner.cfg["limits"]["job_max_bytes"])
    envelope.check_signature(kid, signed, sig_b64, runner.cfg["trusted_keys"])
    payload = envelope.decode_payload(payload_b64)
    # From here the payload is authentic. Targeting first: another device's
    # job is none of this device's business (never named, never a floor).
    envelope.check_targets(payload, runner.ctx.device_id, runner.cfg["groups"])
    seq = payload.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise Rejected("schema: seq must be a positive integer", kid, payload)
    floor = runner.state["last"].get(kid, 0)
    if seq <= floor:
        raise Rejected("replay: seq %d is not above %d, the last started for key %s" % (seq, floor, kid))
    try:
        now, known = _trusted_time(runner.state)
        envelope.check_time(payload, now, known)
        envelope.check_schema(payload)
    except Rejected as e:
        raise Rejected(e.args[0], kid, payload)
    payload["kid"] = kid
    payload["digest"] = digest
    return payload


def duplicate(job, verified):
    for other in verified:
        if other["kid"] == job["kid"] and other["seq"] == job["seq"]:
            return True
    return False


def reject(runner, digest, args):
    """Report a rejection once. An authentic job for this device is named;
    anything else is reported by digest. No rejection moves the floor."""
    reason = args[0]
    payload = args[2] if len(args) > 2 else None
    if isinstance(payload, dict) and isinstance(payload.get("id"), str) and len(payload["id"]) <= 64 \
            and isinstance(payload.get("seq"), int) and not isinstance(payload.get("seq"), bool):
        runner.reject_named(digest, payload, args[1], reason)
        return
    runner.reject_unattributed(digest, reason)
