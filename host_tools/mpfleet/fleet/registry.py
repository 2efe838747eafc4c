"""The device registry: which devices the host knows, their groups, and what they last reported.

Which room: host library (the CLI is mpfleet.cli.devices; `job create --targets` uses
`parse_query`). Rows live in the Store's `devices` table. A device joins the fleet in
two ways only, so that a broker shared with other fleets never adds anyone:

- provisioned: `Registry.add` (from `mpfleet devices add`, `deploy`, `sim fleet`: the
  provisioning flow), before it has ever connected, so `last_seen` is None;
- accepted: `Registry.accept` (`mpfleet devices accept ID`), a device id seen on the
  broker that nobody provisioned here. Until then it is a stranger (`pending()`, the
  `strangers` table): counted, its last state kept, never targeted, given an account,
  stored or acked.

A device record is a dict: ``{"id", "board", "groups", "first_seen", "last_seen",
"reported_at", "state"}`` with times in seconds since 1970 and ``state`` the last
`state` payload (docs/protocol.md, "State") or None. ``last_seen`` is when the host
last received a live message from it; ``reported_at`` the device's own time of its
last report (fleet/ingest.py, "Liveness"). `liveness()` says whether that report is
stale: older than STALE_AFTER_INTERVALS of the device's expected upload interval.

Query language (``parse_query``), conditions joined by commas, all of which must hold::

    fw<v1.25.0   fw=v1.24.0   app>=0.3     versions: numeric per dotted part
    board=virtual   id!=dev-7   slot=ota_1  text: equal / not equal
    group=pumps  group!=canary              membership in the device's groups
    backlog>100  dropped>0  rssi<-80        numbers from the reported state
    last_seen<2h  last_seen>=1d             age of the device's last report (its own time,
                                            last_report()); protocol.times, unit required
    received<10m                            age of the host's last receipt of a live message

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


# The firmware's defaults (firmware/lib/agent/config.py), for a device whose state does
# not say how often it reports: it uploads every upload_every_wakes wakes of
# sample_interval_s each.
DEFAULT_SAMPLE_INTERVAL_S = 60
DEFAULT_UPLOAD_EVERY_WAKES = 30
# A report is stale when older than this many expected intervals: one missed upload
# (a failed connection, then the agent's backoff) is not yet alarming, two are.
STALE_AFTER_INTERVALS = 2


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9


def expected_interval_s(device: Device) -> float:
    """Seconds between the device's reports: its state's `sample_interval_s` x
    `upload_every_wakes` (each taken from the firmware's defaults when the state
    does not carry it)."""
    state = device.get("state") or {}
    interval = state.get("sample_interval_s")
    every = state.get("upload_every_wakes")
    return (float(interval) if _positive(interval) else DEFAULT_SAMPLE_INTERVAL_S) * \
        (float(every) if _positive(every) else DEFAULT_UPLOAD_EVERY_WAKES)


def last_report(device: Device) -> float | None:
    """When the device last reported, by its own clock (`reported_at`); for a record
    made before that was kept, the host's receipt time; None if it never reported."""
    at = device.get("reported_at")
    return at if at is not None else device.get("last_seen")


def liveness(device: Device, now: float | None = None) -> dict:
    """{"reported_at", "expected_interval_s", "stale"}: stale is True when the last
    report is older than STALE_AFTER_INTERVALS expected intervals, None when the
    device never reported."""
    now = time.time() if now is None else now
    at = last_report(device)
    interval = expected_interval_s(device)
    return {"reported_at": at, "expected_interval_s": interval,
            "stale": None if at is None else now - at > STALE_AFTER_INTERVALS * interval}


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
            self.store.forget_stranger(device_id)  # provisioned: a member now
        return self.get(device_id)

    def pending(self) -> list[dict]:
        """The strangers: device ids seen on the broker that are not in the fleet, most
        recently seen first, each {"id", "first_seen", "last_seen", "times", "state"}."""
        return self.store.strangers()

    def accept(self, device_ids: Iterable[str], groups: Iterable[str] = ()) -> list[Device]:
        """Make the strangers `device_ids` members (each one's last state and board kept),
        all or none; from their next report on they are stored, acked and targetable.
        Only a pending device can be accepted: one never seen is provisioned (`add`), one
        already a member is refused."""
        device_ids = list(dict.fromkeys(check_name(d) for d in device_ids))
        groups = sorted({check_name(g, "group name") for g in groups})
        with self.store.transaction():
            for device_id in device_ids:
                if self.store.device(device_id) is not None:
                    raise RegistryError(f"{device_id} is already in the fleet (nothing was accepted)")
                stranger = self.store.stranger(device_id)
                if stranger is None:
                    pending = [s["id"] for s in self.store.strangers()[:10]]
                    raise UnknownDeviceError(
                        f"no pending device {device_id} (pending: {', '.join(pending) or 'none'}; nothing was "
                        f"accepted); to register a device that has not been seen, use `mpfleet devices add`")
                state = stranger["state"] if isinstance(stranger["state"], dict) else None
                board = (state or {}).get("board")
                board = board if isinstance(board, str) and 0 < len(board) <= 64 else None
                # what it reported while pending is kept; it was not received from a
                # member, so last_seen and reported_at wait for its next report
                self.store.add_device(device_id, board=board, groups=groups, state=state)
                self.store.forget_stranger(device_id)
        return [self.get(d) for d in device_ids]

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
        return UnknownDeviceError(f"no device {device_id} in {self.store.shown} (known: {shown or 'none'})")


# ---------------------------------------------------------------- query language

_EXPR_RE = re.compile(r"\s*([a-z_]+)\s*(<=|>=|!=|=|<|>)\s*(\S.*?)\s*\Z")
_VERSION_RE = re.compile(r"v?(\d+(?:\.\d+)*)(?:-(.+))?\Z")

_VERSION_FIELDS = ("fw", "app")
_TEXT_FIELDS = ("id", "board", "slot")
_NUMBER_FIELDS = ("backlog", "staged", "dropped", "heap_free", "fs_free", "wakes", "rssi", "reset_cause")
_AGE_FIELDS = ("last_seen", "first_seen", "received")
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
            # last_seen is what the operator means by it: when the device last reported
            # (its own time); received is the host's receipt of a live message
            at = last_report(device) if field == "last_seen" else device.get(
                "last_seen" if field == "received" else field)
            return at is not None and compare(now() - at, want_s)
        return age_test

    raise bad(f"unknown field {field!r} (fields: {', '.join(FIELDS)})")
