"""Device ids (docs/protocol.md): 1..64 of ``a-z``, ``0-9``, ``_`` and ``-``; by
default the device's MAC address in hex.

The host's one owner of that rule. An id travels in topic names (``mpf/v1/<id>/...``),
in the sample frame's id field and in the broker's ACL and password files, so it can
hold no topic wildcard (``+`` ``#``), no separator (``/``), no space and no upper case.
Group names follow the same rule (mpfleet.fleet.registry), for the same reasons.
The device checks the same pattern (firmware/lib/agent/config.py).
"""

from __future__ import annotations

import re

from mpfleet.errors import MpfleetError

DEVICE_ID_MAX_LEN = 64
DEVICE_ID_PATTERN = rf"[a-z0-9_-]{{1,{DEVICE_ID_MAX_LEN}}}"
DEVICE_ID_RULE = f"1..{DEVICE_ID_MAX_LEN} of a-z, 0-9, _ and -"  # the pattern in words, for messages
DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN + r"\Z")
# The sample frame carries the id as bytes: checked before it is decoded as text.
DEVICE_ID_BYTES_RE = re.compile(DEVICE_ID_PATTERN.encode("ascii") + rb"\Z")


class DeviceIdError(MpfleetError):
    """A device id (or a name under the same rule) that breaks the rule; the message quotes it."""


def is_device_id(value) -> bool:
    """True for a str that is a valid device id."""
    return isinstance(value, str) and DEVICE_ID_RE.match(value) is not None


def check_device_id(value, what: str = "device id") -> str:
    """`value` if it is a valid device id, else DeviceIdError naming it (`what`: the
    kind of name checked, e.g. "group name", for the message)."""
    if not is_device_id(value):
        raise DeviceIdError(f"{value!r} is not a valid {what} ({DEVICE_ID_RULE})")
    return value
