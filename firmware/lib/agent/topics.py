# The wire protocol's topic names (docs/protocol.md): one owner.
#
#   <root>/<device-id>/<leaf>        root: config broker.topic_root, "mpf/v1" by default
#
# Leaves: state, jobs, jobs/status, samples, samples/ack, ota/get, ota/data.

ROOT = "mpf/v1/"


def set_root(root):
    """Use `root` (checked by the config schema) for every topic from now on: the wake
    calls it once, right after loading the config."""
    global ROOT
    ROOT = root + "/"


def topic(device_id, leaf):
    return ROOT + device_id + "/" + leaf
