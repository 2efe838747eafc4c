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


# ---------------------------------------------------------------- the agent
SELF_CHECK = """
import json, machine
from agent import config, wake
_mac = ''.join('%02x' % b for b in machine.unique_id())
_cfg, _problems = config.load(_mac)
print(json.dumps({'device_id': _cfg['device_id'], 'problems': _problems, 'app': wake.AGENT_VERSION,
                  'keys': sorted(_cfg['trusted_keys']), 'broker': _cfg['broker']['host']}))
"""


def self_check(link: BoardLink) -> dict:
    """The agent imports, and loads the config it was given without problems."""
    return _json_line(link, link.exec(SELF_CHECK), "self-check")


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
