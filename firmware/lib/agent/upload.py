# The connected part of a wake: state, samples, the host's ack, trim.
#
#   publish state -> take the retained ack (and, with the clock unset, the
#   host's fresh answer carrying its time) -> trim what the host holds ->
#   send the backlog (flash log first, then the RTC stage) -> wait for the ack
#   of what was sent -> trim again
#
# The device deletes samples only after the host's ack says they are
# committed (end to end). The ack is not authenticated: anyone who can
# publish on samples/ack can claim an ack, so what it may do is bounded
# (docs/security.md): it may move the clock forward only (Wake.set_clock).
# Nor is the host always right: one CRC-valid frame of garbage once moved a
# host's ack to 4,294,967,256, the device renumbered after it, and forty wakes
# later its seqs no longer fitted the frame's 32 bits: no upload ever again
# (issue 13). So an ack the device could only follow by renumbering past
# _REBASE_MAX is refused (docs/protocol.md): nothing is trimmed or renumbered,
# every sample is kept and sent again, and the state says why.

import json
import time

from micropython import const

from agent import rtcstage, samplerec
from agent.topics import topic

_RETAINED_WAIT_MS = const(300)
_ACK_WAIT_MS = const(3000)
_CLOCK_WAIT_MS = const(1500)
_BUDGET_RESERVE_MS = const(1500)
_FRAME_MAX = const(1024)
# An RTC earlier than this has not been set since the last power loss.
CLOCK_SET_AFTER = const(1577836800)  # 2020-01-01
# Seqs and times are u32 in the sample frame and the flash log. The highest ack
# this device renumbers after: no device id has numbered 2**31 samples before
# (68 years at one a second, the shortest sample interval), and renumbering
# after it still leaves 2**31 seqs.
_REBASE_MAX = const(0x7FFFFFFF)
# A host time at or after this is not real: 2100-01-01, six years before the
# frame's u32 time runs out (a clock set there would never upload again).
_HOST_TIME_MAX = const(4102444800)


class Uploader:
    """One wake's exchange with the host. Takes what it needs, not the wake."""

    def __init__(self, device_id, cfg, stage, open_log, scales, feed, budget_left_ms, set_clock):
        self.device_id = device_id
        self.cfg = cfg
        self.stage = stage
        self.open_log = open_log
        self.scales = scales
        self.feed = feed
        self.budget_left_ms = budget_left_ms
        self.set_clock = set_clock
        self.acked = -1
        self.refused = None  # the last ack refused this wake (plausible_ack)
        self.jobs_message = None
        self.clock_provisional = False

    def plausible_ack(self, upto):
        """Whether this device may act on a host ack of `upto` (an int >= 0): one
        within the seqs it has numbered, or ahead of them (an earlier life of
        this id: rebase) but not past _REBASE_MAX."""
        return upto < self.stage.next_seq or upto <= _REBASE_MAX

    def refuse_ack(self, upto):
        self.refused = upto
        print("refusing host ack %d: ahead of this device's seqs (next %d) and past %d"
              % (upto, self.stage.next_seq, _REBASE_MAX))

    def on_message(self, topic_name, msg, retained):
        leaf = topic_name[len(topic(self.device_id, "")):]
        if leaf == b"samples/ack":
            try:
                ack = json.loads(msg)
                upto = ack["upto"]
            except (ValueError, KeyError, TypeError, IndexError, MemoryError):
                print("ignoring malformed ack")
                return
            if isinstance(upto, int) and not isinstance(upto, bool) and upto > self.acked:
                if self.plausible_ack(upto):
                    self.acked = upto
                else:
                    self.refuse_ack(upto)
            host_time = ack.get("time") if isinstance(ack, dict) else None
            # (NaN and infinity fail the range check too.)
            if isinstance(host_time, (int, float)) and not isinstance(host_time, bool) \
                    and 0 <= host_time < _HOST_TIME_MAX \
                    and (time.time() < CLOCK_SET_AFTER or self.clock_provisional):
                # A retained ack may be hours old: use it, but let a fresh one
                # (the host answers a state with an unset clock) correct it.
                self.set_clock(host_time)
                self.clock_provisional = retained
        elif leaf == b"jobs":
            self.jobs_message = msg

    def exchange(self, client, state):
        did = self.device_id
        client.set_callback(self.on_message)
        # Both are retained state, re-read on every wake: QoS 0 (no PUBACKs) and one
        # SUBSCRIBE for the two (one round trip).
        client.subscribe([topic(did, "samples/ack"), topic(did, "jobs")], 0)
        clock_unset = time.time() < CLOCK_SET_AFTER
        if self.stage.flags & rtcstage.FLAG_CLOCK_FLOOR:
            # Moved only to a TLS floor (agent.tlsid): the host's time may still set it.
            self.clock_provisional = True
        client.publish(topic(did, "state"), json.dumps(state), qos=1, retain=True)
        # The retained ack arrives at once; with the clock unset, also wait
        # (briefly) for the host's fresh answer carrying its time.
        deadline = time.ticks_add(time.ticks_ms(), _CLOCK_WAIT_MS if clock_unset else _RETAINED_WAIT_MS)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            client.wait_msg(time.ticks_diff(deadline, time.ticks_ms()))
            heard = self.acked >= 0 or self.refused is not None
            if heard and not (clock_unset and (self.clock_provisional or time.time() < CLOCK_SET_AFTER)):
                break
        self.apply_ack()
        sent_upto = self.send_backlog(client)
        if sent_upto > self.acked:
            deadline = time.ticks_add(time.ticks_ms(), _ACK_WAIT_MS)
            while self.acked < sent_upto and time.ticks_diff(deadline, time.ticks_ms()) > 0:
                client.wait_msg(time.ticks_diff(deadline, time.ticks_ms()))
            self.apply_ack()
            if self.acked < sent_upto:
                self.stage.flags |= rtcstage.FLAG_UPLOAD_REQUESTED
        if self.refused is not None:
            # The state went out before the ack came: again, saying why this
            # device keeps samples the host claims to hold.
            state["last_error"] = "refused host ack %d: ahead of this device's seqs and past %d" \
                % (self.refused, _REBASE_MAX)
            client.publish(topic(did, "state"), json.dumps(state), qos=1, retain=True)
        # The retained queue follows the subscription at once (a slow broker:
        # raise broker.queue_wait_ms).
        deadline = time.ticks_add(time.ticks_ms(), self.cfg["broker"]["queue_wait_ms"])
        while self.jobs_message is None and time.ticks_diff(deadline, time.ticks_ms()) > 0:
            client.wait_msg(time.ticks_diff(deadline, time.ticks_ms()))

    def apply_ack(self):
        upto = self.acked
        if upto < 0:
            return
        if not self.plausible_ack(upto):  # set directly (agent.usb), not through on_message
            self.refuse_ack(upto)
            self.acked = -1
            return
        stage = self.stage
        if upto >= stage.next_seq:
            self.rebase(upto)
            return
        log = self.open_log() if (stage.log_backlog or upto >= stage.first_seq) else None
        if log is not None:
            stats = log.stats()
            if upto >= stats["first_seq"] and stats["backlog"]:
                log.trim(upto)
            if upto >= stats["next_seq"]:
                # The host has samples the log never held (acked while staged):
                # persist that, so their seqs are never used again after a power loss.
                log.advance(upto + 1)
            stage.log_backlog = log.stats()["backlog"]
        stage.drop_upto(upto)

    def rebase(self, upto):
        """The host acks beyond every seq this device has numbered: it holds
        samples from an earlier life of this device id (a fresh flash). Number
        everything held after them, or the host would ignore it as duplicates."""
        log = self.open_log()
        log.rebase(upto + 1)
        first = log.stats()["next_seq"]
        print("host ack %d is ahead of this device's seqs: renumbering from %d" % (upto, first))
        self.stage.next_seq = first + self.stage.staged

    def send_backlog(self, client):
        """Publish the unacked samples (flash first, then staged); returns the last seq sent."""
        from agent.codec import FrameEncoder

        samples_topic = topic(self.device_id, "samples")
        enc = FrameEncoder(self.device_id, self.scales(), max_frame=_FRAME_MAX, prescaled=True)
        stage = self.stage
        oldest = stage.first_seq
        last = -1
        started = False
        limit = self.cfg["limits"]["upload_batch"]
        log = self.open_log()
        if stage.log_backlog:
            oldest = log.stats()["first_seq"]
            source = self._log_samples(log, max(self.acked + 1, oldest))
        else:
            source = ()
        if stage.staged:
            # These seqs become public before they are in flash: remember them
            # durably, so that a power loss cannot hand them out twice.
            log.reserve(stage.next_seq - 1)
        for part in (source, stage.samples()):
            for seq, t, values in part:
                if seq <= self.acked or seq <= last:
                    continue
                if len(values) != len(enc.scales):
                    continue  # recorded under another sensor config: sent by its own frames later
                if started and not enc.add(seq, t, values):
                    self._publish(client, samples_topic, enc)
                    started = False
                if not started:
                    enc.begin(seq, t, oldest_seq=oldest)
                    enc.add(seq, t, values)
                    started = True
                last = seq
                if enc.count >= limit or self.budget_left_ms() < _BUDGET_RESERVE_MS:
                    self._publish(client, samples_topic, enc)
                    started = False
                    if self.budget_left_ms() < _BUDGET_RESERVE_MS:
                        self.stage.flags |= rtcstage.FLAG_UPLOAD_REQUESTED
                        if source:
                            source.close()
                        return last
        if started:
            self._publish(client, samples_topic, enc)
        if source:
            source.close()
        return last

    def _log_samples(self, log, from_seq):
        nchan = len(self.cfg["sensors"])
        t = 0
        for seq, rec in log.read(from_seq, max_records=100000):
            if not len(rec):
                yield seq, t, [None] * nchan  # lost with RTC memory (Wake.recover_after_power_loss)
                continue
            try:
                t, values = samplerec.decode(rec)
            except ValueError:
                continue  # the log's CRC makes this unreachable; never send garbage
            yield seq, t, values

    def _publish(self, client, name, enc):
        client.publish(name, enc.finish(), qos=1)
        self.feed()
