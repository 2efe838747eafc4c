# The wire protocol's topic names (docs/protocol.md): one owner.
#
#   mpf/v1/<device-id>/<leaf>
#
# Leaves: state, jobs, jobs/status, samples, samples/ack, ota/get, ota/data.

ROOT = "mpf/v1/"


def topic(device_id, leaf):
    return ROOT + device_id + "/" + leaf
