# The `ota` job: a new MicroPython firmware into the other app slot, switched
# A/B with the bootloader's rollback. docs/ota.md walks through every power-loss
# point; in short, the job's phase in /jobs.json (agent.jobs) says what to do at
# each boot:
#
#   download  image -> get_next_update(), progress saved every `persist` bytes
#             (block-aligned: the blocks above it are erased again on resume)
#   (checks)  size, chip, secure_version, SHA-256 read back from flash;
#             failure: REJECTED/FAILED, set_boot never called
#   (confirm) right before set_boot the device asks the host for one chunk
#             more: a job canceled meanwhile is refused as canceled, and the
#             job ends FAILED {"stopped": "canceled"} with set_boot never called
#   switch    saved, then set_boot(); a reset here finds the old image running
#             and simply switches again
#   rebooting saved after set_boot(), then machine.reset() (never deep sleep:
#             a deep-sleep wake skips the bootloader's otadata state machine)
#   trial     the new image runs and reached the broker: its self-test, then
#             mark_app_valid_cancel_rollback() and SUCCEEDED. A failed self-test
#             saves the reason (phase rollback) and resets into the rollback.
#
# Found running the old image in phase rebooting, trial or rollback, the agent
# knows the new one did not confirm itself: the bootloader rolled back, and the
# old image reports FAILED with the reason. SUCCEEDED is only ever sent by the
# new image, after its self-test, so the host never sees it for a device that
# is not running that image.
#
# Cancel: the host refuses the chunks of a canceled execution as "canceled"
# (agent.otastream.Canceled). Seen during the download or at the confirm, the
# job ends there, FAILED with {"stopped": "canceled", ...}: the other slot
# holds a partial or unused image and the bootloader is never told to boot it.
# After set_boot the cancel is too late: the device finishes and reports what
# its trial boot decides.

import gc
import json

import esp32
import machine
from micropython import const

from agent import otacheck
from agent.otastream import Canceled, Puller, Refused, check_chunk_size

_BLOCK = const(4096)
_PERSIST = const(65536)
_MAX_RECONNECTS = const(3)
_MAX_STALLED_WAKES = const(5)
_MAX_SWITCHES = const(3)

SWITCH_PHASES = ("switch", "rebooting", "trial", "rollback")


# --- the link and the reset, for `ota` and `app` ----------------------------------
def progress(runner, cur, done, total):
    """Download progress for `mpfleet job status` (QoS 0: a lost one costs nothing)."""
    from agent.jobs import IN_PROGRESS, _status

    status = _status(cur["id"], cur["seq"], IN_PROGRESS, None, cur["attempt"], {"bytes": done, "total": total})
    runner.client.publish(runner.status_topic, json.dumps(status))


def reconnect(runner):
    close_link(runner)
    runner.client = runner.ctx.connect()


def close_link(runner):
    try:
        runner.client.disconnect()
    except OSError:
        pass


def reboot_into_trial(runner):
    """Hard reset into an update's trial boot, which must connect at once (its
    self-test). Never deep sleep: a deep-sleep wake skips the bootloader's
    otadata state machine."""
    from agent.rtcstage import FLAG_JOBS, FLAG_TRIAL

    stage = runner.ctx.stage
    stage.flags |= FLAG_TRIAL | FLAG_JOBS
    runner.ctx.request_upload()
    stage.save()
    close_link(runner)
    machine.reset()


# --- shared by `ota` and `app` (agent.appupdate) --------------------------------
def stream_params(p):
    """Size, SHA-256 and stream tuning of an artifact job; ValueError when malformed."""
    size, sha = p.get("size"), p.get("sha256")
    if not isinstance(size, int) or size <= 0:
        raise ValueError("params.size must be a positive integer")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError("params.sha256 must be 64 hex digits")
    chunk = p.get("chunk", _BLOCK)
    check_chunk_size(chunk)
    window = p.get("window", 8)
    if not isinstance(window, int) or not 2 <= window <= 64:
        raise ValueError("params.window must be 2..64")
    return size, sha, chunk, window


def canceled_detail(e, at, size):
    """The FAILED detail of an update the host refused as canceled (the host keeps
    the execution CANCELED and notes that the device stopped)."""
    return {"stopped": "canceled", "reason": str(e), "at": at, "size": size}


def still_wanted(runner, cur, rx):
    """Right before the point of no return, ask the host once more (Puller.confirm):
    None to go on, or the FAILED detail of a job canceled meanwhile. A host that
    cannot be reached, or no longer serves the artifact, does not stop an update
    that is downloaded and checked: only a cancel does."""
    size, _, chunk, window = stream_params(cur["params"])
    ctx = runner.ctx
    puller = Puller(ctx.device_id, cur["id"], size, chunk, window, ctx.cfg["broker"]["timeout_ms"], 1, rx)
    try:
        puller.confirm(runner.client, ctx.feed, ctx.on_message)
    except Canceled as e:
        return canceled_detail(e, size, size)
    except (Refused, OSError) as e:
        print("ota: the host did not confirm (%s); going on" % e)
    return None


def download(runner, cur, sink, offset, saved, rx, end=None, persist=_PERSIST):
    """Stream [offset, end or size) of the job's artifact into sink(offset, mv), through
    the receive buffer `rx` (8 + chunk bytes).

    `saved(offset)` makes progress durable (called every `persist` bytes and when
    the link fails). A dropped connection is reconnected up to 3 times; if the link
    stays down, OSError goes to the caller with the progress saved. Returns the
    Puller (its counters), or raises Refused when the host cannot serve the job.
    """
    size, _, chunk, window = stream_params(cur["params"])
    ctx = runner.ctx
    timeout = ctx.cfg["broker"]["timeout_ms"]
    puller = Puller(ctx.device_id, cur["id"], size, chunk, window, timeout, rx=rx)
    puller._high = offset
    reconnects = 0
    end = size if end is None else min(end, size)
    try:
        while offset < end:
            until = min(end, (offset // persist + 1) * persist)
            try:
                offset = puller.pull(runner.client, offset, sink, ctx.feed, ctx.on_message, until)
                saved(offset)
                progress(runner, cur, offset, size)
            except OSError as e:
                offset = puller.offset
                saved(offset)
                reconnects += 1
                print("ota: link lost at %d of %d (%s)" % (offset, size, e))
                if reconnects > _MAX_RECONNECTS:
                    raise
                reconnect(runner)
    finally:
        # How the link behaved, for the job's final detail (summed over wakes).
        link = cur["data"].setdefault("link", {"reconnects": 0, "reasked": 0, "ignored": 0})
        link["reconnects"] += reconnects
        link["reasked"] += puller.reasked
        link["ignored"] += puller.ignored * chunk
    return puller


class SlotWriter:
    """sink() for a flash partition: erases each 4 KiB block as the stream enters
    it, then programs without erasing (3-argument writeblocks)."""

    def __init__(self, part):
        self.part = part

    def __call__(self, off, mv):
        end = off + len(mv)
        block = (off + _BLOCK - 1) // _BLOCK
        while block * _BLOCK < end:
            self.part.ioctl(6, block)
            block += 1
        self.part.writeblocks(off // _BLOCK, mv, off % _BLOCK)


def running_version():
    from agent.wake import running_firmware

    return running_firmware()


# --- the `ota` job --------------------------------------------------------------
def run(runner, cur):
    p = cur["params"]
    if cur["phase"] in SWITCH_PHASES:
        after_switch(runner, cur)
        return
    size, sha, _, _ = stream_params(p)
    version = p.get("version")
    if not isinstance(version, str) or not version:
        raise ValueError("params.version must name the image's version")
    running = esp32.Partition(esp32.Partition.RUNNING)
    target = running.get_next_update()
    slot = target.info()[4]
    data = cur["data"]
    if cur["phase"] != "download" or not isinstance(data, dict) or data.get("slot") != slot:
        try:
            otacheck.check_fits(target, size)
        except otacheck.Rejected as e:
            runner.finish(cur, "REJECTED", str(e))
            return
        fw, _ = running_version()
        cur["phase"] = "download"
        cur["data"] = data = {"slot": slot, "at": 0, "from": fw, "stalls": 0}
        runner.save()
    start = data["at"]

    def saved(offset):
        offset -= offset % _BLOCK  # the block above is erased again on resume
        if offset != data["at"]:
            data["at"] = offset
            data["stalls"] = 0
            runner.save()

    # One buffer for the whole job: chunks arrive in it, the checks read flash into it.
    rx = bytearray(8 + max(p.get("chunk", _BLOCK), _BLOCK))
    scratch = memoryview(rx)[:_BLOCK]
    allow = p.get("allow_downgrade") is True
    if start < size:
        print("ota: %s -> %s from byte %d of %d" % (data["from"], slot, start, size))
        writer = SlotWriter(target)
        try:
            if start == 0:
                # The first block decides chip and anti-rollback before the rest is fetched.
                start = download(runner, cur, writer, 0, lambda o: None, rx, _BLOCK).offset
                try:
                    otacheck.check_header(target, running, allow, scratch)
                except otacheck.Rejected as e:
                    runner.finish(cur, "REJECTED", str(e))
                    return
            download(runner, cur, writer, start, saved, rx)
        except OSError:
            stalled(runner, cur, start, data["at"])
            return
        except Canceled as e:
            runner.finish(cur, "FAILED", canceled_detail(e, data["at"], size))
            return
        except Refused as e:
            runner.finish(cur, "FAILED", "the host refused the download: %s" % e)
            return
    gc.collect()
    try:
        got = otacheck.check(target, running, size, sha, allow, runner.ctx.feed, scratch)
    except otacheck.Rejected as e:
        runner.finish(cur, "FAILED", str(e))
        return
    if got != version:
        runner.finish(cur, "FAILED", "the image says version %s, the job asked for %s" % (got, version))
        return
    stop = still_wanted(runner, cur, rx)
    if stop is not None:
        runner.finish(cur, "FAILED", stop)
        return
    switch(runner, cur, target)


def stalled(runner, cur, start, reached):
    """The link failed for good in this wake: continue next wake, unless wake after
    wake brings nothing."""
    data = cur["data"]
    if reached <= start:
        data["stalls"] = data.get("stalls", 0) + 1
        if data["stalls"] >= _MAX_STALLED_WAKES:
            runner.finish(cur, "FAILED", "download stalled at byte %d for %d wakes" % (reached, data["stalls"]))
            return
    else:
        data["stalls"] = 0
    runner.save()
    runner.ctx.request_upload()


def switch(runner, cur, target):
    data = cur["data"]
    data["switches"] = data.get("switches", 0) + 1
    if data["switches"] > _MAX_SWITCHES:
        runner.finish(cur, "FAILED", "the new image never started after %d switches" % _MAX_SWITCHES)
        return
    cur["phase"] = "switch"
    runner.save()
    try:
        target.set_boot()
    except OSError as e:
        runner.finish(cur, "FAILED", "set_boot refused the image: %s" % e)
        return
    cur["phase"] = "rebooting"
    runner.save()
    print("ota: booting", data["slot"])
    reboot_into_trial(runner)


def after_switch(runner, cur):
    """At a boot after the switch, connected to the broker (agent.jobs resume)."""
    data = cur["data"]
    fw, slot = running_version()
    if slot != data["slot"]:
        phase = cur["phase"]
        if phase == "switch":
            # Reset before or during set_boot: check the image again and switch.
            running = esp32.Partition(esp32.Partition.RUNNING)
            target = running.get_next_update()
            p = cur["params"]
            try:
                otacheck.check(target, running, p["size"], p["sha256"], p.get("allow_downgrade") is True,
                               runner.ctx.feed, bytearray(_BLOCK))
            except otacheck.Rejected as e:
                runner.finish(cur, "FAILED", str(e))
                return
            switch(runner, cur, target)
            return
        reason = data.get("reason") or (
            "the new image did not start (crash or reset before its self-test); the bootloader rolled back"
            if phase == "rebooting" else "the new image was reset during its self-test; the bootloader rolled back")
        runner.finish(cur, "FAILED", {"reason": reason, "fw": fw, "slot": slot,
                                      "version": cur["params"].get("version")})
        return
    if cur["phase"] == "rollback":
        rollback(runner, cur, None)  # reset before the rollback took effect
        return
    cur["phase"] = "trial"
    runner.save()
    problem = self_test(runner, cur["params"].get("version"), fw)
    if problem is not None:
        rollback(runner, cur, problem)
        return
    esp32.Partition.mark_app_valid_cancel_rollback()
    runner.finish(cur, "SUCCEEDED", {"fw": fw, "slot": slot, "from": data.get("from"), "link": data.get("link")})


def self_test(runner, want_version, got_version):
    """None if the running image is fit to keep, else why not. Reaching here means
    the config loaded, the agent started and the broker answered."""
    if got_version != want_version:
        return "self-test: running version %s, the job asked for %s" % (got_version, want_version)
    if not runner.ctx.cfg.get("device_id"):
        return "self-test: the config did not load"
    return None


def rollback(runner, cur, reason):
    """Save why, then let the bootloader roll back: the old image reports FAILED."""
    if reason is not None:
        cur["phase"] = "rollback"
        cur["data"]["reason"] = reason
        runner.save()
    print("ota: rolling back:", cur["data"].get("reason"))
    close_link(runner)
    esp32.Partition.mark_app_invalid_rollback_and_reboot()


def on_upload_failed(ctx, state, cur, error):
    """The trial boot of a new image could not reach the broker: roll back."""
    from agent import jobs

    _, slot = running_version()
    if cur["phase"] in ("switch", "rebooting", "trial") and slot == cur["data"]["slot"]:
        cur["phase"] = "rollback"
        cur["data"]["reason"] = "self-test: cannot reach the broker: %s" % error
        jobs.save_state(state)
        print("ota: rolling back:", cur["data"]["reason"])
        esp32.Partition.mark_app_invalid_rollback_and_reboot()
    # Running the old image: report at the next wake that connects.
    ctx.request_upload()
