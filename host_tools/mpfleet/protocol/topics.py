"""Topic names (docs/protocol.md, "Topics"): the host's one owner, as
firmware/lib/agent/topics.py is the device's.

    <root>/<device-id>/<leaf>          root: TOPIC_ROOT ("mpf/v1") unless configured

Each leaf has one direction; the broker's ACL (mpfleet.broker.config) grants a device
exactly these, and host accounts everything under the root.

The root is configurable (`--topic-root`, the device's config `broker.topic_root`), so
that fleets sharing one broker never see each other's devices: every function here
takes it as `root=` (default TOPIC_ROOT), and a topic under another root is not ours.
"""

from __future__ import annotations

import re

from mpfleet.errors import MpfleetError
from mpfleet.protocol.ids import DEVICE_ID_RE

TOPIC_ROOT = "mpf/v1"

# A topic root: 1..8 levels of [A-Za-z0-9_-] joined by "/", at most 64 characters. No
# wildcards (+ #), no "$" (broker-internal topics), no empty level, no leading or
# trailing "/": the root travels unquoted into ACL lines and the device's config.
TOPIC_ROOT_RE = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+){0,7}")
TOPIC_ROOT_RULE = "1 to 8 levels of A-Z, a-z, 0-9, _ and - joined by '/', at most 64 characters"


class TopicRootError(MpfleetError, ValueError):
    """A topic root that breaks TOPIC_ROOT_RULE."""


def check_topic_root(root: str) -> str:
    """`root` if it is a valid topic root (TOPIC_ROOT_RULE), else TopicRootError."""
    if not isinstance(root, str) or len(root) > 64 or not TOPIC_ROOT_RE.fullmatch(root):
        raise TopicRootError(f"topic root {root!r} is not valid: {TOPIC_ROOT_RULE}")
    return root
DEVICE_READS = ("jobs", "samples/ack", "ota/data")            # host -> device
DEVICE_WRITES = ("state", "jobs/status", "samples", "ota/get")  # device -> host


def topic(device: str, leaf: str, root: str = TOPIC_ROOT) -> str:
    """The topic of `device`'s `leaf` under `root`; `device` may be the MQTT wildcard "+"."""
    return f"{root}/{device}/{leaf}"


def everything(root: str = TOPIC_ROOT) -> str:
    """The filter of every topic under `root` (a host account's ACL line)."""
    return f"{root}/#"


def device_from_topic(name: str, root: str = TOPIC_ROOT) -> tuple[str, str] | None:
    """(device id, leaf) of an mpfleet topic under `root`, or None for anything else."""
    if not name.startswith(root + "/"):
        return None
    parts = name[len(root) + 1:].split("/", 1)
    if len(parts) != 2 or not parts[1] or not DEVICE_ID_RE.match(parts[0]):
        return None
    return parts[0], parts[1]


def reroot(name: str, root: str) -> str:
    """A topic under TOPIC_ROOT moved under `root` (for code that names topics with the
    default root); any other topic unchanged."""
    parsed = device_from_topic(name)
    return name if parsed is None or root == TOPIC_ROOT else topic(parsed[0], parsed[1], root)
