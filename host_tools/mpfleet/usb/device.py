"""The commands a board runs for USB field work, built on a transport (usb/transport.py).

Which room: host library, usb/. Each function takes the link first (as esptool v5's
functions take the chip connection first), runs one snippet on the board and returns
typed data; nothing here prints. usb/field.py composes them into deploy, run and collect.

How the snippets are built: the code a board runs is fixed text in this module. The
values it needs (file paths, the JSON queue of signed envelopes, sequence numbers) go
in only as the arguments of the one call at the snippet's end (`_call`), each written
by `_literal`: the repr() of a value checked to be a str, an int or a list of str, a
Python literal that MicroPython reads back as the same value. No value is formatted
into the code as raw text, so a path or an envelope holding quotes or newlines stays
data. (mpremote builds its device code by formatting values into it; this is the
difference.)

What a board answers: one JSON line (identify, hashes, read_config, self_check), or
the agent's marker lines (firmware/lib/agent/usb.py: MPF-STATUS, MPF-FRAME, MPF-SENT,
MPF-ACKED). Anything else is a UsbError naming the port and quoting the answer's tail.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from mpfleet.usb.transport import EXEC_TIMEOUT_S, BoardLink, UsbError

AGENT_CALL_TIMEOUT_S = EXEC_TIMEOUT_S * 5  # a queue of jobs, or a long backlog printed as frames


def _literal(value: str | int | list[str]) -> str:
    """`value` as a Python literal for the board's code (see the module docstring)."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return repr(value)
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return repr(value)
    raise TypeError(f"cannot pass {type(value).__name__} {value!r:.60} to a board")


def _call(code: str, function: str, *args: str | int | list[str]) -> str:
    """`code` (fixed text), then `function(args...)` with every argument a checked literal."""
    return f"{code}\n{function}({', '.join(_literal(a) for a in args)})\n"


def _json_line(link: BoardLink, out: str, what: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise UsbError(f"{link.port}: {what}: unexpected answer {out.strip()[-200:]!r}")


# ---------------------------------------------------------------- what a board says about itself
IDENTIFY = """
import sys, json, machine
try:
    with open('/config.json') as f:
        _id = json.load(f).get('device_id')
except (OSError, ValueError):
    _id = None
_v = sys.implementation.version
print(json.dumps({'mpy': getattr(sys.implementation, '_mpy', 0), 'release': '%d.%d.%d' % _v[:3],
                  'machine': getattr(sys.implementation, '_machine', sys.platform),
                  'mac': ''.join('%02x' % b for b in machine.unique_id()), 'device_id': _id}))
"""


def identify(link: BoardLink) -> dict:
    """mpy version, MicroPython release, board, MAC and the provisioned device id (or None)."""
    return _json_line(link, link.exec(IDENTIFY), "identify")


READ_CONFIG = """
try:
    print(open('/config.json').read())
except OSError:
    print('{}')
"""


def read_config(link: BoardLink) -> dict:
    """The board's /config.json; {} when it has none or it is not a JSON object."""
    out = link.exec(READ_CONFIG)
    try:
        cfg = json.loads(out.strip() or "{}")
    except ValueError:
        return {}  # a broken config is replaced
    return cfg if isinstance(cfg, dict) else {}


# ---------------------------------------------------------------- files
HASHES = """
import json, hashlib, binascii
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(memoryview(b)[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
def _hashes(paths):
    print(json.dumps({p: _h(p) for p in paths}))
"""


def hashes(link: BoardLink, paths: list[str]) -> dict[str, str | None]:
    """Each file's SHA-256 (hex) on the board, None for a file it does not have."""
    return _json_line(link, link.exec(_call(HASHES, "_hashes", list(paths))), "hashes")


MAKE_DIRS = """
import os
def _make_dirs(dirs):
    for d in dirs:
        p = ''
        for part in d.split('/')[1:]:
            p += '/' + part
            try:
                os.mkdir(p)
            except OSError:
                pass
"""


def make_dirs(link: BoardLink, paths: Iterable[str]) -> None:
    """Create the directories the files at `paths` live in (those that exist are kept)."""
    dirs = sorted({p.rsplit("/", 1)[0] for p in paths if p.count("/") > 1})
    if dirs:
        link.exec(_call(MAKE_DIRS, "_make_dirs", dirs))


def sync_files(link: BoardLink, files: dict[str, bytes]) -> tuple[list[str], list[str]]:
    """Write the files whose SHA-256 on the board differs; returns (written, skipped)."""
    have = hashes(link, sorted(files))
    todo = [p for p in sorted(files) if have.get(p) != hashlib.sha256(files[p]).hexdigest()]
    make_dirs(link, todo)
    for path in todo:
        link.write_file(path, files[path])
    return todo, [p for p in sorted(files) if p not in todo]


# ---------------------------------------------------------------- the agent's tree: what is stale
# What deploy owns on a board, and so may remove (docs/usb.md, "What deploy removes"):
#   - every package folder the tree ships under /lib (/lib/agent): whatever is in it
#     and not in the tree goes, a .py beside a shipped .mpy included (MicroPython's
#     import takes X.py before X.mpy in the same folder);
#   - the other form of each root file the tree ships: /appslot.py beside
#     /appslot.mpy, /boot.mpy and /main.mpy beside boot.py and main.py;
#   - the A/B app slots (APP_SLOT_PATHS): deploy installs the agent in /lib and the
#     board must boot what was deployed, so the slot selection and the slots'
#     older code go.
# Never anything else: /config.json, /config.good.json, /security.json,
# /jobs.json, /last_crash.txt, the flash log in /log and every file of the user's.
APP_SLOT_PATHS = ("/app.json", "/app.json.tmp")
APP_SLOTS_DIR = "/apps"
RUN_AT_BOOT = ("/boot.py", "/main.py")  # run as files by the port, never imported

LISTING = """
import os, json
def _walk(d, out):
    try:
        entries = list(os.ilistdir(d))
    except OSError:
        return
    out['dirs'].append(d)
    for e in entries:
        p = d + '/' + e[0]
        if e[1] == 0x4000:
            _walk(p, out)
        else:
            out['files'].append(p)
def _listing(dirs, paths):
    out = {'files': [], 'dirs': [], 'present': []}
    for d in dirs:
        _walk(d, out)
    for p in paths:
        try:
            os.stat(p)
            out['present'].append(p)
        except OSError:
            pass
    print(json.dumps(out))
"""

REMOVE = """
import os, json
def _remove(files, dirs):
    failed = []
    for p in files:
        try:
            os.remove(p)
        except OSError as e:
            failed.append('%s: %s' % (p, e))
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError as e:
            failed.append('%s: %s' % (d, e))
    print(json.dumps({'failed': failed}))
"""


@dataclass
class StalePlan:
    """What deploy removes from a board: files first, then the folders they emptied (deepest first)."""

    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)


def owned_dirs(files: Iterable[str]) -> list[str]:
    """The package folders the tree ships under /lib (/lib/agent): deploy owns what is in them."""
    return sorted({"/lib/" + p.split("/")[2] for p in files if p.startswith("/lib/") and p.count("/") > 2})


def counterparts(files: Iterable[str]) -> list[str]:
    """The other form (.py or .mpy) of each root file the tree ships, when the tree lacks it."""
    shipped = set(files)
    out = set()
    for p in shipped:
        if p.count("/") == 1:
            stem, _, ext = p.rpartition(".")
            other = f"{stem}.{'mpy' if ext == 'py' else 'py'}"
            if ext in ("py", "mpy") and other not in shipped:
                out.add(other)
    return sorted(out)


def stale_plan(files: dict[str, bytes], listing: dict) -> StalePlan:
    """From a board's listing (`_listing`), what the tree no longer has (see above)."""
    shipped = set(files)
    needed_dirs = {p[:i] for p in shipped for i in range(len(p)) if p[i] == "/" and i > 0}
    owned = owned_dirs(files)
    plan = StalePlan()
    for p in listing["files"]:
        in_slots = p.startswith(APP_SLOTS_DIR + "/")
        if in_slots or (p not in shipped and any(p.startswith(d + "/") for d in owned)):
            plan.files.append(p)
    plan.files += [p for p in listing["present"] if p not in shipped]
    for d in listing["dirs"]:
        if d == APP_SLOTS_DIR or d.startswith(APP_SLOTS_DIR + "/") or \
                (d not in needed_dirs and any(d.startswith(o + "/") for o in owned)):
            plan.dirs.append(d)
    plan.files.sort()
    plan.dirs.sort(key=lambda d: (-d.count("/"), d))
    return plan


@dataclass
class SyncReport:
    """What deploy did to a board's files: copied (SHA-256 differed), removed (stale), unchanged."""

    written: list[str]
    removed: list[str]
    skipped: list[str]
    removed_dirs: list[str] = field(default_factory=list)


def sync_tree(link: BoardLink, files: dict[str, bytes]) -> SyncReport:
    """Make the board hold `files` as the tree it deploys: write what differs, then remove
    what is stale (stale_plan). Written first, so a board unplugged halfway still has
    every file it had or got."""
    written, skipped = sync_files(link, files)
    listing = _json_line(link, link.exec(_call(LISTING, "_listing", owned_dirs(files) + [APP_SLOTS_DIR],
                                               counterparts(files) + list(APP_SLOT_PATHS))), "listing")
    plan = stale_plan(files, listing)
    if plan.files or plan.dirs:
        answer = _json_line(link, link.exec(_call(REMOVE, "_remove", plan.files, plan.dirs)), "remove")
        if answer["failed"]:
            raise UsbError(f"{link.port}: could not remove stale files: {'; '.join(answer['failed'])}")
    return SyncReport(written, plan.files, skipped, plan.dirs)


# ---------------------------------------------------------------- the agent
SELF_CHECK = """
import sys, os, json, gc, machine, hashlib, binascii
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(memoryview(b)[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
def _unload(names):
    for n in [n for n in sys.modules if n in names or n == 'agent' or n.startswith('agent.')]:
        del sys.modules[n]
    gc.collect()
def _self_check(modules, files):
    from agent import config, wake
    mac = ''.join('%02x' % b for b in machine.unique_id())
    cfg, problems = config.load(mac)
    out = {'device_id': cfg['device_id'], 'problems': problems, 'app': wake.AGENT_VERSION,
           'keys': sorted(cfg['trusted_keys']), 'broker': cfg['broker']['host'], 'path': sys.path[:],
           'running': {}, 'files': {}}
    cfg = config = wake = None
    _unload(modules)
    cwd = os.getcwd().rstrip('/')
    for name in modules:
        try:
            __import__(name)
            f = getattr(sys.modules[name], '__file__', None)
            if f is None:
                out['running'][name] = [None, 'has no __file__']
            else:
                f = f if f.startswith('/') else cwd + '/' + f
                out['running'][name] = [f, _h(f)]
        except Exception as e:
            out['running'][name] = [None, '%s: %s' % (type(e).__name__, e)]
        _unload(modules)
    for p in files:
        out['files'][p] = _h(p)
    print(json.dumps(out))
"""


def module_name(path: str) -> str | None:
    """The module a deployed file is imported as: /lib/agent/wake.mpy -> agent.wake,
    /lib/agent/__init__.mpy -> agent, /appslot.mpy -> appslot; None for boot.py and main.py,
    which the port runs as files."""
    if path in RUN_AT_BOOT or not path.endswith((".py", ".mpy")):
        return None
    rel = path[len("/lib/"):] if path.startswith("/lib/") else path[1:]
    parts = rel.rsplit(".", 1)[0].split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or None


def self_check(link: BoardLink, files: dict[str, bytes]) -> dict:
    """After a soft reset (boot.py runs, as at every boot, and picks the sys.path a wake
    has): the agent imports and loads its config; every deployed module is imported in
    turn and reported with the file it was loaded from and that file's SHA-256, and so
    are the files the port runs (boot.py, main.py). `running_code_problems` compares."""
    link.soft_reset()
    modules = sorted({m for p in files if (m := module_name(p))})
    run = sorted(p for p in files if p in RUN_AT_BOOT)
    return _json_line(link, link.exec(_call(SELF_CHECK, "_self_check", modules, run), timeout=AGENT_CALL_TIMEOUT_S),
                      "self-check")


def running_code_problems(check: dict, files: dict[str, bytes]) -> list[str]:
    """Each way the code the board runs is not the code deployed, one phrase each."""
    problems = []
    deployed = {m: p for p in files if (m := module_name(p))}
    for name, path in sorted(deployed.items()):
        got = check["running"].get(name)
        if got is None:
            problems.append(f"{name} was not checked")
            continue
        loaded, digest = got
        if loaded is None:
            problems.append(f"{name} does not import: {digest}")
        elif loaded != path:
            problems.append(f"{name} runs from {loaded}, not the deployed {path} (an earlier entry of sys.path "
                            f"{check.get('path')} holds another copy)")
        elif digest != hashlib.sha256(files[path]).hexdigest():
            problems.append(f"{path} on the board is not the file deployed (SHA-256 {str(digest)[:12]}...)")
    for path, digest in sorted(check["files"].items()):
        if digest != hashlib.sha256(files[path]).hexdigest():
            problems.append(f"{path} on the board is not the file deployed" if digest else f"{path} is missing")
    return problems


AGENT_USB = "from agent import usb"


def run_envelopes(link: BoardLink, envelopes: list[str]) -> list[dict]:
    """Run signed envelopes on the board (agent.usb.run_jobs); returns the statuses it reported."""
    out = link.exec(_call(AGENT_USB, "usb.run_jobs", json.dumps(envelopes)), timeout=AGENT_CALL_TIMEOUT_S)
    return [json.loads(line[len("MPF-STATUS "):]) for line in out.splitlines() if line.startswith("MPF-STATUS ")]


def read_backlog(link: BoardLink, host_ack: int) -> tuple[list[bytes], int]:
    """The board's unacked samples as frames (it first trims what the host already holds),
    and the last seq it sent."""
    out = link.exec(_call(AGENT_USB, "usb.collect", host_ack), timeout=AGENT_CALL_TIMEOUT_S)
    frames = [base64.b64decode(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("MPF-FRAME ")]
    sent = [int(line.split()[1]) for line in out.splitlines() if line.startswith("MPF-SENT ")]
    if not sent:
        raise UsbError(f"{link.port}: collect: no end marker in the board's answer {out.strip()[-200:]!r}")
    return frames, sent[0]


def send_ack(link: BoardLink, upto: int) -> None:
    """The host stored everything up to `upto`: the board trims it (and says so)."""
    out = link.exec(_call(AGENT_USB, "usb.ack", upto))
    if f"MPF-ACKED {upto}" not in out:
        raise UsbError(f"{link.port}: the board did not confirm the ack: {out.strip()[-200:]!r}")
