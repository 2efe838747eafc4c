# The agent's app slot for this boot (A/B app updates, docs/ota.md), chosen by
# boot.py before anything else runs. Lives at the filesystem root, like boot.py
# and main.py, so that app updates (which replace lib/ only) never touch it;
# deployed compiled, so that no boot spends heap compiling it.
#
#   /app.json {"active": "a"}                   /apps/a/lib first on sys.path
#   {"active": ..., "pending": "b"}             trial: this boot runs b, once
#   {"active": ..., "testing": "b"}             b did not confirm itself in its
#                                               trial boot: back to active
# No /app.json (or an unreadable one): the agent installed in /lib.

import sys


def _choose():
    import json
    import os

    try:
        with open("/app.json") as f:
            sel = json.load(f)
        slot = sel.get("active")
    except (OSError, ValueError, AttributeError):
        return None
    if sel.get("pending"):
        slot = sel["testing"] = sel.pop("pending")
    elif sel.get("testing"):
        sel["failed"] = sel.pop("testing")
    else:
        return slot
    with open("/app.json.tmp", "w") as f:
        json.dump(sel, f)
    os.rename("/app.json.tmp", "/app.json")
    return slot


def select():
    """Put the chosen slot's lib/ before /lib on sys.path; returns the slot or None."""
    slot = _choose()
    if slot:
        sys.path.insert(sys.path.index("/lib") if "/lib" in sys.path else len(sys.path), "/apps/%s/lib" % slot)
    return slot
