"""The device registry: which devices the host knows, their groups, and what they last reported.

Which room: host library (the CLI is mpfleet.cli.devices; `job create --targets` uses
`parse_query`). Rows live in the Store's `devices` table. A device appears in two ways:

- provisioned: `Registry.add` (from `mpfleet devices add`, or the provisioning flow),
  before it has ever connected, so `last_seen` is None;
- first report: ingest stores every retained `state` message (and touches the device on
  each sample frame) through `Store.touch_device`, so a device nobody provisioned here
  still shows up with its board, versions, slot and backlog.

A device record is a dict: ``{"id", "board", "groups", "first_seen", "last_seen", "state"}``
with times in seconds since 1970 and ``state`` the last `state` payload (docs/protocol.md,
"State") or None.

Query language (``parse_query``), conditions joined by commas, all of which must hold::

    fw<v1.25.0   fw=v1.24.0   app>=0.3     versions: numeric per dotted part
    board=virtual   id!=dev-7   slot=ota_1  text: equal / not equal
    group=pumps  group!=canary              membership in the device's groups
    backlog>100  dropped>0  rssi<-80        numbers from the reported state
    last_seen<2h  last_seen>=1d             age of the last report (protocol.times, unit required)

A device lacking the field a condition looks at (never reported, no `fw` yet) does not
match that condition, whatever the operator.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

from mpfleet.errors import MpfleetError
from mpfleet.db.store import Store
from mpfleet.protocol.ids import DEVICE_ID_RULE, is_device_id
from mpfleet.protocol.times import TimeFormatError, parse_duration

Device = dict
Predicate = Callable[[Device], bool]


class RegistryError(MpfleetError):
    """A registry operation was refused (bad id or group name)."""


class UnknownDeviceError(RegistryError):
    """The device id is not in the registry."""


class QueryError(RegistryError):
    """A targeting query could not be read; the message names the bad expression."""


def check_name(value: str, what: str = "device id") -> str:
    """`value` if it is a valid device id (or, `what`, group name): groups follow the
    device id rule (protocol.ids) so they travel in topics and config files unquoted."""
    if not is_device_id(value):
        raise RegistryError(f"{value!r} is not a valid {what} ({DEVICE_ID_RULE})")
    return value


def split_names(lists: Iterable[str]) -> list[str]:
    """The names in comma-separated lists of device ids and group names ("pump-07,pumps",
    "*"), in order, each stripped, empty ones dropped (`--targets` on the command line)."""
    return [name.strip() for text in lists for name in text.split(",") if name.strip()]


class Registry:
    """The devices in one Store."""

    def __init__(self, store: Store):
        self.store = store

    def add(self, device_id: str, board: str | None = None, groups: Iterable[str] = ()) -> Device:
        """Register a device before it first reports (the provisioning path).

        Adding a device that is already known is not an error (provisioning is re-run
        after a reflash): a given board replaces the stored one, groups are added.
        `board` is stored as given; the CLI checks it against boards/*.json first.
        """
        check_name(device_id)
        groups = [check_name(g, "group name") for g in groups]
        with self.store.transaction():
            if not self.store.add_device(device_id, board=board, groups=sorted(set(groups))):
                current = self.store.device(device_id)
                self.store.set_device(device_id, board=board,
                                      groups=sorted(set(current["groups"]) | set(groups)))
        return self.get(device_id)

    def get(self, device_id: str) -> Device:
        device = self.store.device(device_id)
        if device is None:
            raise self._unknown(device_id)
        return device

    def list(self, group: str | None = None, where: str | Predicate | None = None) -> list[Device]:
        """Devices ordered by id, optionally only those in `group` and matching `where`
        (a query string, see parse_query, or a predicate)."""
        match = parse_query(where) if isinstance(where, str) else where
        return [d for d in self.store.devices()
                if (group is None or group in d["groups"]) and (match is None or match(d))]

    def tag(self, device_id: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> Device:
        """Add and remove groups of a device; returns the updated record.

        Groups are what signed jobs target, and a device acts on a job only when its own
        config `groups` match. Changing them here changes the host's view only: the change
        reaches the device later, with a config job carrying the new `groups`.
        Adding a group the device has, or removing one it has not, changes nothing.
        """
        add = [check_name(g, "group name") for g in add]
        remove = [check_name(g, "group name") for g in remove]
        both = set(add) & set(remove)
        if both:
            raise RegistryError(f"cannot both add and remove {', '.join(sorted(both))}")
        with self.store.transaction():
            current = self.store.device(device_id)
            if current is None:
                raise self._unknown(device_id)
            groups = (set(current["groups"]) | set(add)) - set(remove)
            self.store.set_device(device_id, groups=sorted(groups))
        return self.get(device_id)

    def split_ids_and_groups(self, names: Iterable[str]) -> tuple[list[str], list[str]]:
        """(the names that are registered device ids, the others: group names)."""
        known = set(self.store.device_ids())
        names = list(names)
        return [n for n in names if n in known], [n for n in names if n not in known]

    def _unknown(self, device_id: str) -> UnknownDeviceError:
        known = self.store.device_ids()
        shown = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
        return UnknownDeviceError(f"no device {device_id} in {self.store.path} (known: {shown or 'none'})")


# ---------------------------------------------------------------- query language

_EXPR_RE = re.compile(r"\s*([a-z_]+)\s*(<=|>=|!=|=|<|>)\s*(\S.*?)\s*\Z")
_VERSION_RE = re.compile(r"v?(\d+(?:\.\d+)*)(?:-(.+))?\Z")

_VERSION_FIELDS = ("fw", "app")
_TEXT_FIELDS = ("id", "board", "slot")
_NUMBER_FIELDS = ("backlog", "staged", "dropped", "heap_free", "fs_free", "wakes", "rssi", "reset_cause")
_AGE_FIELDS = ("last_seen", "first_seen")
FIELDS = (*_VERSION_FIELDS, *_TEXT_FIELDS, "group", *_NUMBER_FIELDS, *_AGE_FIELDS)

_ORDER = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
          ">=": lambda a, b: a >= b, "=": lambda a, b: a == b, "!=": lambda a, b: a != b}


def version_key(text: str) -> tuple | None:
    """Sort key of a firmware version, or None if `text` is not one.

    Dotted parts compare as numbers (v1.9.0 < v1.10.0), missing parts count as 0
    (v1.25 = v1.25.0), a leading "v" is optional. A suffix after "-" marks a
    pre-release, as in semver and MicroPython's own tags: v1.26.0-preview < v1.26.0;
    two pre-releases of one version compare by their suffix text.
    """
    m = _VERSION_RE.match(text.strip()) if isinstance(text, str) else None
    if m is None:
        return None
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    suffix = m.group(2)
    return (tuple(parts), 0 if suffix else 1, suffix or "")


def parse_query(text: str, now: Callable[[], float] = time.time) -> Predicate:
    """Compile a query ("fw<v1.25.0, group=pumps") into a predicate on device records.

    Raises QueryError naming the expression that could not be read. `now` gives the
    clock for last_seen/first_seen ages (read at each evaluation, so a predicate kept
    by a long-running dispatcher stays right).
    """
    exprs = [e.strip() for e in text.split(",")]
    if not any(exprs):
        raise QueryError("empty query: give conditions such as fw<v1.25.0,group=pumps")
    return _all_of([_condition(e, now) for e in exprs])


def _all_of(conditions: list[Predicate]) -> Predicate:
    return lambda device: all(c(device) for c in conditions)


def _condition(expr: str, now: Callable[[], float]) -> Predicate:
    def bad(why: str) -> QueryError:
        return QueryError(f"bad query expression {expr!r}: {why}")

    if not expr:
        raise bad("empty condition (two commas in a row?)")
    m = _EXPR_RE.match(expr)
    if m is None:
        raise bad("expected FIELD OP VALUE, with OP one of < <= > >= = !=")
    field, op, value = m.groups()
    compare = _ORDER[op]

    if field in _VERSION_FIELDS:
        want = version_key(value)
        if want is None:
            raise bad(f"{value!r} is not a version (like v1.25.0)")

        def version_test(device: Device) -> bool:
            have = version_key((device.get("state") or {}).get(field))
            return have is not None and compare(have, want)
        return version_test

    if field in _TEXT_FIELDS or field == "group":
        if op not in ("=", "!="):
            raise bad(f"{field} is compared with = or != only")
        if field == "group":
            return lambda device: (value in device.get("groups", ())) == (op == "=")

        def text_test(device: Device) -> bool:
            have = device.get(field) if field in ("id", "board") else (device.get("state") or {}).get(field)
            return have is not None and compare(str(have), value)
        return text_test

    if field in _NUMBER_FIELDS:
        try:
            want_n = float(value)
        except ValueError:
            raise bad(f"{value!r} is not a number") from None

        def number_test(device: Device) -> bool:
            have = (device.get("state") or {}).get(field)
            return isinstance(have, (int, float)) and not isinstance(have, bool) and compare(have, want_n)
        return number_test

    if field in _AGE_FIELDS:
        try:
            want_s = parse_duration(value, unit_required=True)
        except TimeFormatError as e:
            raise bad(str(e)) from None

        def age_test(device: Device) -> bool:
            at = device.get(field)
            return at is not None and compare(now() - at, want_s)
        return age_test

    raise bad(f"unknown field {field!r} (fields: {', '.join(FIELDS)})")
