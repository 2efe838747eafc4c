# Small JSON files on the flash filesystem, replaced atomically.
#
# write_json writes `<path>.tmp` and renames it over `path`: LittleFS commits
# a rename atomically, so a power cut at any flash operation leaves the old
# file or the new one, never a mix (docs/security.md, "Power loss"). The one
# owner of that rule for the agent: /jobs.json, /config.json,
# /config.good.json, /security.json and /app.json all go through here. (The
# root file appslot.py keeps its own three lines: it runs before an app slot
# is chosen and so imports nothing from lib/.)

import json
import os


def write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.rename(tmp, path)


def read_json(path):
    """(data, None), or (None, why) for a missing or unreadable file."""
    try:
        with open(path) as f:
            return json.load(f), None
    except OSError:
        return None, "missing"
    except (ValueError, MemoryError):
        return None, "not valid JSON"


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def copy_if_changed(src, dst, chunk=256):
    """Make `dst` a copy of `src` (atomically) unless it already is one; compared
    and copied in small chunks, so no JSON is parsed and little memory used."""
    buf_a = bytearray(chunk)
    buf_b = bytearray(chunk)
    try:
        with open(src, "rb") as a, open(dst, "rb") as b:
            while True:
                n = a.readinto(buf_a)
                m = b.readinto(buf_b)
                if n != m or buf_a[:n] != buf_b[:m]:
                    break
                if not n:
                    return False
    except OSError:
        pass
    tmp = dst + ".tmp"
    with open(src, "rb") as a, open(tmp, "wb") as b:
        while True:
            n = a.readinto(buf_a)
            if not n:
                break
            b.write(memoryview(buf_a)[:n])
    os.rename(tmp, dst)
    return True
