# boot.py: the first file the port runs at every boot, before main.py.
# Deliberately tiny and never replaced by app updates, so that a bad update
# can always be rolled back from here. It picks the agent's app slot
# (docs/ota.md, "App updates"), with test/confirm semantics:
#
#   /app.json {"active": "a"}                   /apps/a/lib first on sys.path
#   {"active": ..., "pending": "b"}             trial: this boot runs b, once
#   {"active": ..., "testing": "b"}             b did not confirm itself in its
#                                               trial boot: back to active
# No /app.json (or an unreadable one): the agent installed in /lib.
import sys


def _app_slot():
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


_slot = _app_slot()
if _slot:
    sys.path.insert(sys.path.index("/lib") if "/lib" in sys.path else len(sys.path), "/apps/%s/lib" % _slot)
del _slot, _app_slot
