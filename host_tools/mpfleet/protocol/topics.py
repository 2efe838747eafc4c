"""Topic names (docs/protocol.md, "Topics"): the host's one owner, as
firmware/lib/agent/topics.py is the device's.

    mpf/v1/<device-id>/<leaf>

Each leaf has one direction; the broker's ACL (mpfleet.broker.config) grants a device
exactly these, and host accounts everything under the root.
"""

from __future__ import annotations

from mpfleet.protocol.ids import DEVICE_ID_RE

TOPIC_ROOT = "mpf/v1"
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
