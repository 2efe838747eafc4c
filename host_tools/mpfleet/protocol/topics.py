"""Topic names (docs/protocol.md, "Topics"): the host's one owner, as
firmware/lib/agent/topics.py is the device's.

    mpf/v1/<device-id>/<leaf>

Each leaf has one direction; the broker's ACL (mpfleet.broker.config) grants a device
exactly these, and host accounts everything under the root.
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


def topic(device: str, leaf: str) -> str:
    """The topic of `device`'s `leaf`; `device` may be the MQTT wildcard "+"."""
    return f"{TOPIC_ROOT}/{device}/{leaf}"


def device_from_topic(name: str) -> tuple[str, str] | None:
    """(device id, leaf) of an mpfleet topic, or None for anything else."""
    parts = name.split("/", 3)
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT or not DEVICE_ID_RE.match(parts[2]):
        return None
    return parts[2], parts[3]
