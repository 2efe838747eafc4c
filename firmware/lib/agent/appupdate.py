# The `app` job: a new version of the agent's own code (lib/), without touching
# the MicroPython firmware. Two app slots on the filesystem, /apps/a and
# /apps/b; boot.py (never replaced by an app update) puts the chosen one first
# on sys.path, with test/confirm semantics (docs/ota.md, "App updates"):
#
#   download  the bundle (mpfleet.images.appbundle) -> /apps/<slot>.mpfa, the slot not
#             running; the file's size is the durable offset (LittleFS commits a
#             file atomically at each flush). The manifest in the first chunk is
#             checked before anything is written: .mpy the firmware cannot load
#             is REJECTED.
#   unpack    SHA-256 of the whole bundle as the signed job says; the slot
#             emptied, each file written and checked against the manifest,
#             /apps/<slot>/app.json names the version. Safe to repeat.
#   switch    saved, then /app.json gets "pending": slot (boot.py runs it once)
#   rebooting saved, machine.reset()
#   trial     the new app runs (its code loaded from the slot) and reached the
#             broker: /app.json {"active": slot}, SUCCEEDED.
# Any other end of the trial boot (an exception at import, a watchdog reset, a
# failed self-test, a power cut) brings the previous app back, through boot.py
# or the self-test, and the previous app reports FAILED with the reason.

import binascii
import gc
import hashlib
import json
import os
import sys

import machine
from micropython import const

from agent import ota
from agent.otastream import Canceled, Refused

_HEAD = const(9)
_IO = const(1024)
_FREE_MARGIN = const(16384)
SELECT_PATH = "/app.json"
CRASH_PATH = "/last_crash.txt"


def running_slot():
    """The app slot the agent was loaded from ("a", "b"), or None for /lib."""
    for p in sys.path:
        if p.startswith("/apps/"):
            return p.split("/")[2]
    return None


def read_select():
    try:
        with open(SELECT_PATH) as f:
            sel = json.load(f)
        if isinstance(sel, dict):
            return sel
    except (OSError, ValueError):
        pass
    return {}


def write_select(sel):
    from agent.jsonfile import write_json

    write_json(SELECT_PATH, sel)


def loadable(mpy, device):
    """Can firmware whose sys.implementation._mpy is `device` load this .mpy?"""
    if (device & 0xFF) != mpy.get("version"):
        return False
    return mpy.get("arch") == 0 or (mpy.get("arch") == device >> 10 and mpy.get("sub") == (device >> 8) & 3)


def _manifest(head):
    """The manifest from the bundle's first bytes, None if they do not hold all of it."""
    if len(head) < _HEAD or bytes(head[0:4]) != b"MPFA" or head[4] != 1:
        raise ValueError("not an app bundle (magic or format)")
    mlen = head[5] | (head[6] << 8) | (head[7] << 16) | (head[8] << 24)
    if _HEAD + mlen > len(head):
        return None, mlen
    return json.loads(memoryview(head)[_HEAD:_HEAD + mlen]), mlen


def _check_manifest(manifest, version):
    mpy = manifest.get("mpy") or {}
    device = getattr(sys.implementation, "_mpy", 0)
    if not loadable(mpy, device):
        return "the bundle's .mpy (version %s, arch %s) cannot be loaded by this firmware (_mpy 0x%x)" % (
            mpy.get("version"), mpy.get("arch"), device)
    if manifest.get("version") != version:
        return "the bundle is version %s, the job says %s" % (manifest.get("version"), version)
    return None


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove_tree(path):
    try:
        entries = list(os.ilistdir(path))
    except OSError:
        try:
            os.remove(path)
        except OSError:
            pass
        return
    for entry in entries:
        child = path + "/" + entry[0]
        if entry[1] == 0x4000:
            _remove_tree(child)
        else:
            os.remove(child)
    os.rmdir(path)


def _makedirs(path):
    part = ""
    for name in path.split("/")[1:]:
        part += "/" + name
        if not _exists(part):
            os.mkdir(part)


class _BundleRefused(Exception):
    pass


class _BundleWriter:
    """sink() appending to the bundle file. The first chunk's manifest is checked
    before anything is written; the file is created by the first chunk taken."""

    def __init__(self, path, version):
        self.path = path
        self.version = version
        self.f = None

    def __call__(self, off, mv):
        if off == 0:
            try:
                manifest, _ = _manifest(mv)
            except ValueError as e:
                raise _BundleRefused(str(e))
            problem = _check_manifest(manifest, self.version) if manifest is not None else None
            manifest = None
            if problem is not None:
                raise _BundleRefused(problem)
        if self.f is None:
            self.f = open(self.path, "ab" if off else "wb")
        self.f.write(mv)

    def flush(self, offset=None):
        if self.f is not None:
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return 0


def run(runner, cur):
    p = cur["params"]
    if cur["phase"] in ota.SWITCH_PHASES:
        after_switch(runner, cur)
        return
    size, sha, chunk, _ = ota.stream_params(p)
    version = p.get("version")
    if not isinstance(version, str) or not version:
        raise ValueError("params.version must name the app version")
    rx = bytearray(8 + chunk)  # first: one buffer for the whole job
    data = cur["data"]
    if cur["phase"] not in ("download", "unpack") or not isinstance(data, dict):
        slot = "b" if running_slot() == "a" else "a"
        fs = os.statvfs("/")
        free = fs[0] * fs[3]
        if free < 2 * size + _FREE_MARGIN:
            runner.finish(cur, "REJECTED", "not enough flash for a %d-byte bundle: %d bytes free" % (size, free))
            return
        _makedirs("/apps")
        _remove_tree(_bundle_path(slot))
        cur["phase"] = "download"
        cur["data"] = data = {"slot": slot, "from": runner.ctx.app_version()}
        runner.save()
    slot = data["slot"]
    path = _bundle_path(slot)
    if cur["phase"] == "download":
        start = _size(path)
        if start < size:
            sink = _BundleWriter(path, version)
            try:
                ota.download(runner, cur, sink, start, sink.flush, rx)
            except _BundleRefused as e:
                sink.close()
                _remove_tree(path)
                runner.finish(cur, "REJECTED", str(e))
                return
            except OSError:
                sink.close()
                ota.stalled(runner, cur, start, _size(path))
                return
            except Canceled as e:
                sink.close()
                detail = ota.canceled_detail(e, _size(path), size)
                _remove_tree(path)
                runner.finish(cur, "FAILED", detail)
                return
            except Refused as e:
                sink.close()
                runner.finish(cur, "FAILED", "the host refused the download: %s" % e)
                return
            sink.close()
        cur["phase"] = "unpack"
        runner.save()
    gc.collect()
    problem = unpack(path, slot, size, sha, version, runner.ctx.feed, rx)
    if problem is not None:
        _remove_tree(path)
        _remove_tree("/apps/" + slot)
        runner.finish(cur, "FAILED", problem)
        return
    _remove_tree(path)
    stop = ota.still_wanted(runner, cur, rx)
    if stop is not None:
        _remove_tree("/apps/" + slot)
        runner.finish(cur, "FAILED", stop)
        return
    switch(runner, cur)


def _bundle_path(slot):
    return "/apps/%s.mpfa" % slot


def unpack(path, slot, size, sha, version, feed, buf):
    """Check the downloaded bundle and write its files into /apps/<slot>; None or the problem."""
    whole = memoryview(buf)
    mv = whole[:_IO]
    h = hashlib.sha256()
    total = 0
    with open(path, "rb") as f:
        while True:
            n = f.readinto(mv)
            if not n:
                break
            h.update(mv[:n])
            total += n
    if total != size:
        return "the downloaded bundle is %d bytes, the job says %d" % (total, size)
    got = binascii.hexlify(h.digest()).decode()
    if got != sha:
        return "SHA-256 of the downloaded bundle is %s, the job says %s" % (got[:16], sha[:16])
    root = "/apps/" + slot
    _remove_tree(root)
    with open(path, "rb") as f:
        f.readinto(whole[:_HEAD])
        mlen = buf[5] | (buf[6] << 8) | (buf[7] << 16) | (buf[8] << 24)
        if mlen > len(buf):
            return "the bundle's manifest (%d bytes) is larger than this device reads" % mlen
        f.readinto(whole[:mlen])  # parsed from the buffer the chunks came in: no copy
        manifest = json.loads(whole[:mlen])
        problem = _check_manifest(manifest, version)
        if problem is not None:
            return problem
        for entry in manifest["files"]:
            name = entry["path"]
            if not name.startswith("/lib/") or ".." in name:
                return "bad path in the bundle: %s" % name
            target = root + name
            _makedirs(target[:target.rfind("/")])
            left = entry["size"]
            h = hashlib.sha256()
            with open(target, "wb") as out:
                while left > 0:
                    n = f.readinto(mv[:min(left, _IO)])
                    if not n:
                        return "the bundle ends inside %s" % name
                    h.update(mv[:n])
                    out.write(mv[:n])
                    left -= n
            if binascii.hexlify(h.digest()).decode() != entry["sha256"]:
                return "%s does not match its SHA-256 in the manifest" % name
            feed()
    with open(root + "/app.json", "w") as f:
        json.dump({"version": version}, f)
    return None


def switch(runner, cur):
    data = cur["data"]
    cur["phase"] = "switch"
    runner.save()
    write_select({"active": read_select().get("active"), "pending": data["slot"]})
    cur["phase"] = "rebooting"
    runner.save()
    try:
        os.remove(CRASH_PATH)
    except OSError:
        pass
    print("app: trial boot of", data["slot"])
    ota.reboot_into_trial(runner)


def after_switch(runner, cur):
    data = cur["data"]
    slot = data["slot"]
    wake_mod = sys.modules.get("agent.wake")
    loaded_from = getattr(wake_mod, "__file__", "") or ""
    if running_slot() != slot:
        sel = read_select()
        if cur["phase"] == "switch" and slot not in (sel.get("pending"), sel.get("testing"), sel.get("failed")):
            switch(runner, cur)  # reset before /app.json named the trial
            return
        if sel.get("pending") == slot:
            machine.reset()  # the trial was named but boot.py has not run it yet
            return
        reason = data.get("reason")
        if reason is None:
            crash = cur.get("crash")  # noted by the wake from main.py's /last_crash.txt
            reason = ("the new app raised at its trial boot: %s" % crash) if crash else \
                "the new app did not confirm itself in its trial boot (reset or watchdog)"
        _remove_tree("/apps/" + slot)
        runner.finish(cur, "FAILED", {"reason": reason + "; previous app restored",
                                      "app": runner.ctx.app_version(), "version": cur["params"].get("version")})
        return
    if cur["phase"] == "rollback":
        rollback(runner, cur, None)
        return
    cur["phase"] = "trial"
    runner.save()
    problem = ota.self_test(runner, cur["params"].get("version"), runner.ctx.app_version())
    if problem is None and not loaded_from.startswith("/apps/%s/" % slot):
        problem = "self-test: the agent was loaded from %s, not from slot %s" % (loaded_from, slot)
    if problem is not None:
        rollback(runner, cur, problem)
        return
    write_select({"active": slot})
    runner.finish(cur, "SUCCEEDED", {"app": runner.ctx.app_version(), "slot": slot, "from": data.get("from"),
                                     "link": data.get("link")})


def rollback(runner, cur, reason):
    if reason is not None:
        cur["phase"] = "rollback"
        cur["data"]["reason"] = reason
        runner.save()
    sel = read_select()
    if sel.get("testing") == cur["data"]["slot"]:
        sel["failed"] = sel.pop("testing")
        write_select(sel)
    print("app: rolling back:", cur["data"].get("reason"))
    ota.close_link(runner)
    machine.reset()


def on_upload_failed(ctx, state, cur, error):
    from agent import jobs

    if cur["phase"] in ("switch", "rebooting", "trial") and running_slot() == cur["data"]["slot"]:
        cur["phase"] = "rollback"
        cur["data"]["reason"] = "self-test: cannot reach the broker: %s" % error
        jobs.save_state(state)
        sel = read_select()
        if sel.get("testing") == cur["data"]["slot"]:
            sel["failed"] = sel.pop("testing")
            write_select(sel)
        print("app: rolling back:", cur["data"]["reason"])
        machine.reset()
    ctx.request_upload()
