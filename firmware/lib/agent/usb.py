# The agent's side of the USB field tools (mpfleet usb run / collect): the host
# runs these functions through the board's raw REPL. Same code paths as over
# MQTT: jobs go through agent.jobs (signature, key, targeting, replay, the same
# handlers and /jobs.json), samples through Wake.send_backlog and apply_ack,
# with the host's end-to-end ack. What would be published is printed instead,
# one line each, for the host to read back:
#
#   MPF-STATUS <job status JSON>     MPF-FRAME <base64 sample frame>
#   MPF-SENT <last seq sent>         MPF-ACKED <seq the board now trims up to>
#
# No watchdog is armed (a person is at the cable); jobs that need the network
# (ota, app, reboot, upload) are REJECTED.

import binascii

from agent.wake import Wake


class _PrintLink:
    """In place of the MQTT client: each publish becomes one line on the console."""

    def publish(self, topic, msg, qos=0, retain=False):
        if topic.endswith("/jobs/status"):
            print("MPF-STATUS", msg if isinstance(msg, str) else bytes(msg).decode())
        elif topic.endswith("/samples"):
            print("MPF-FRAME", binascii.b2a_base64(msg).decode().strip())

    def disconnect(self):
        pass


def _wake():
    w = Wake(watchdog=False)
    w.cfg["wake_budget_ms"] = 3600000  # no wake budget at the cable
    return w


def run_jobs(queue_json):
    """Verify and run a queue of signed envelopes (a JSON list), as a wake would."""
    from agent import jobs

    w = _wake()
    w.pending_queue = queue_json
    queue_json = None
    jobs.run_pending(w.job_context(_PrintLink()))
    w.stage.save()


def collect(host_ack):
    """Trim what the host already holds, then print every unacked sample as frames."""
    w = _wake()
    w.acked = host_ack
    w.apply_ack()
    last = w.send_backlog(_PrintLink())
    w.stage.save()
    print("MPF-SENT", last)


def ack(upto):
    """The host stored everything up to `upto`: trim it (flash log and RTC stage)."""
    w = _wake()
    w.acked = upto
    w.apply_ack()
    w.stage.save()
    print("MPF-ACKED", upto)
