"""What deploy may remove from a board and how it judges the code a board runs
(mpfleet.usb.device: owned_dirs, counterparts, stale_plan, module_name,
running_code_problems), without a board. The same on virtual boards:
tests/sim/test_deploy_truth.py."""

from __future__ import annotations

import hashlib

from mpfleet.images.firmware import firmware_tree
from mpfleet.usb.device import (APP_SLOT_PATHS, APP_SLOTS_DIR, counterparts, module_name, owned_dirs,
                                running_code_problems, stale_plan)

TREE = {"/boot.py": b"b", "/main.py": b"m", "/appslot.mpy": b"a", "/lib/agent/__init__.mpy": b"i",
        "/lib/agent/wake.mpy": b"w"}


def test_deploy_lists_only_the_agents_folder_the_slots_and_the_other_forms_of_its_root_files():
    tree = firmware_tree()
    assert owned_dirs(tree) == ["/lib/agent"]
    assert counterparts(tree) == ["/appslot.py", "/boot.mpy", "/main.mpy"]
    assert (APP_SLOTS_DIR, APP_SLOT_PATHS) == ("/apps", ("/app.json", "/app.json.tmp"))


def test_stale_plan_removes_what_the_tree_lacks_in_the_agents_folder_and_keeps_what_it_ships():
    listing = {"files": ["/lib/agent/__init__.mpy", "/lib/agent/wake.mpy", "/lib/agent/wake.py",
                         "/lib/agent/old/x.mpy", "/apps/b/lib/agent/wake.mpy", "/apps/a.mpfa"],
               "dirs": ["/lib/agent", "/lib/agent/old", "/apps", "/apps/b", "/apps/b/lib", "/apps/b/lib/agent"],
               "present": ["/appslot.py", "/app.json"]}
    plan = stale_plan(TREE, listing)
    assert plan.files == ["/app.json", "/apps/a.mpfa", "/apps/b/lib/agent/wake.mpy", "/appslot.py",
                          "/lib/agent/old/x.mpy", "/lib/agent/wake.py"]
    assert plan.dirs == ["/apps/b/lib/agent", "/apps/b/lib", "/lib/agent/old", "/apps/b", "/apps"]  # deepest first


def test_stale_plan_of_a_board_that_matches_the_tree_removes_nothing():
    listing = {"files": ["/lib/agent/__init__.mpy", "/lib/agent/wake.mpy"], "dirs": ["/lib/agent"], "present": []}
    plan = stale_plan(TREE, listing)
    assert (plan.files, plan.dirs) == ([], [])


def test_each_deployed_file_is_checked_as_the_module_it_is_imported_as():
    assert [module_name(p) for p in sorted(TREE)] == ["appslot", None, "agent", "agent.wake", None]


def _check(running: dict, files: dict | None = None) -> dict:
    return {"running": running, "files": files if files is not None else
            {p: hashlib.sha256(TREE[p]).hexdigest() for p in ("/boot.py", "/main.py")},
            "path": ["", ".frozen", "/lib"]}


def _ran(path: str) -> list:
    return [path, hashlib.sha256(TREE[path]).hexdigest()]


def test_the_code_deployed_running_has_no_problem():
    running = {"agent": _ran("/lib/agent/__init__.mpy"), "agent.wake": _ran("/lib/agent/wake.mpy"),
               "appslot": _ran("/appslot.mpy")}
    assert running_code_problems(_check(running), TREE) == []


def test_a_module_whose_file_differs_from_the_one_deployed_is_named():
    running = {"agent": _ran("/lib/agent/__init__.mpy"), "agent.wake": ["/lib/agent/wake.mpy", "0" * 64],
               "appslot": _ran("/appslot.mpy")}
    assert running_code_problems(_check(running), TREE) == [
        "/lib/agent/wake.mpy on the board is not the file deployed (SHA-256 000000000000...)"]


def test_a_module_that_does_not_import_and_a_missing_main_are_named():
    running = {"agent": _ran("/lib/agent/__init__.mpy"), "agent.wake": [None, "MemoryError: memory allocation failed"],
               "appslot": _ran("/appslot.mpy")}
    files = {"/boot.py": hashlib.sha256(b"b").hexdigest(), "/main.py": None}
    assert running_code_problems(_check(running, files), TREE) == [
        "agent.wake does not import: MemoryError: memory allocation failed", "/main.py is missing"]
