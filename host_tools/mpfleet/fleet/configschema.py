"""The device's config schema, read on the host from its one owner, the firmware.

Which room: the fleet (no click, no rich). `firmware/lib/agent/config.py` holds the
schema a device checks its config against (SCHEMA: section, key, check, default) and
the rule for which keys a `config` job may touch (change_problem). A device that is
sent `sample_interval_s = "fast"` keeps its last good value and reports the problem:
`mpfleet job create config` refuses such a value at once instead, by running the
firmware's own checks here, not a copy of them.

The firmware module is plain Python that MicroPython and CPython both run; it imports
`agent.jsonfile`, which is given to it here without putting the firmware's `agent`
package on sys.path (the host has no business importing the agent at large).
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import json
import types

from mpfleet.errors import MpfleetError
from mpfleet.images.firmware import FIRMWARE_DIR

CONFIG_SOURCE = FIRMWARE_DIR / "lib" / "agent" / "config.py"


class ConfigValueError(MpfleetError):
    """A `config` job would set a key the device does not know, or a value it refuses."""


@functools.lru_cache(maxsize=1)
def firmware_config() -> types.ModuleType:
    """firmware/lib/agent/config.py, loaded under a private name."""
    jsonfile_path = CONFIG_SOURCE.with_name("jsonfile.py")
    jsonfile = _load("mpfleet._firmware_agent_jsonfile", jsonfile_path, {})
    return _load("mpfleet._firmware_agent_config", CONFIG_SOURCE, {"agent.jsonfile": jsonfile})


def _load(name: str, path, provided: dict) -> types.ModuleType:
    real_import = builtins.__import__

    def _import(mod, globals=None, locals=None, fromlist=(), level=0):
        if mod in provided:
            return provided[mod]
        return real_import(mod, globals, locals, fromlist, level)

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    module.__builtins__ = {**builtins.__dict__, "__import__": _import}
    spec.loader.exec_module(module)
    return module


def _describe(check) -> str:
    """What a firmware check accepts, from the check itself (its factory's arguments)."""
    name = getattr(check, "__qualname__", "")
    cells = [c.cell_contents for c in (getattr(check, "__closure__", None) or ())]
    if name.startswith("_int_in.") and len(cells) == 2:
        return f"an integer {min(cells)}..{max(cells)}"
    if name.startswith(("_str_upto.", "_opt_str_upto.")) and len(cells) == 1:
        return f"text of at most {cells[0]} characters"
    return {"_is_bool": "true or false", "_host_name": "a host name (1..253 characters)",
            "_is_device_id": "a device id ([a-z0-9_-], 1..64)",
            "_is_group_list": "a list of at most 16 group names",
            "_is_sensor_list": "a list of at most 8 sensors ({name, kind, pin, ...})"}.get(name, "a valid value")


def check_config_values(params: dict) -> None:
    """ConfigValueError unless every key a config job sets or unsets is one the device
    knows and every value set passes the device's own check for it."""
    config = firmware_config()
    sets = params.get("set", {}) if isinstance(params.get("set", {}), dict) else {}
    unsets = params.get("unset", []) if isinstance(params.get("unset", []), list) else []
    schema = {(section, key): check for section, key, check, _default in config.SCHEMA}
    sections = {section for section, _key in schema if section is not None}
    protected = set(config.SECURITY_KEYS)  # refused by the engine (keys.check_config_params), with the way out
    sets = {k: v for k, v in sets.items() if str(k).split(".")[0] not in protected}
    unsets = [k for k in unsets if str(k).split(".")[0] not in protected]
    for key in [*sets, *unsets]:
        problem = config.change_problem(key)
        if problem:
            known = sorted(k if s is None else f"{s}.{k}" for s, k in schema if k not in config.SECURITY_KEYS)
            raise ConfigValueError(f"config: {problem} (the device's keys: {', '.join(known)})")
    for key, value in sets.items():
        head, _, rest = key.partition(".")
        if not rest and head in sections:
            if not isinstance(value, dict):
                raise ConfigValueError(f"config: {key} is a section: set it to an object, or set {key}.KEY")
            items = [(f"{key}.{k}", (head, k), v) for k, v in value.items()]
        else:
            items = [(key, (head, rest) if rest else (None, head), value)]
        for name, where, v in items:
            check = schema.get(where)
            if check is None:
                raise ConfigValueError(f"config: unknown config key {name}")
            if not check(v):
                raise ConfigValueError(f"config: {name} = {json.dumps(v)[:40]} is refused by the device: it must "
                                       f"be {_describe(check)} (firmware/lib/agent/config.py)")
