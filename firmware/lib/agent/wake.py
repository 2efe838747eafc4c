# One wake of the device: sample, stage, maybe upload, sleep.
#
#   sample -> stage in RTC memory (CRC-protected)
#          -> flush to the flash log when the stage is full (one batch write)
#          -> every N wakes, or when the backlog passes the watermark, or when
#             asked: Wi-Fi, MQTT, publish state, upload the flash backlog and
#             the staged samples, take the host's ack, trim what it committed
#          -> run pending jobs (agent.jobs, when present) within the budget
#          -> deep sleep for the rest of the interval
#
# Samples acked while still staged never touch the flash at all; samples that
# cannot be uploaded go to flash in batches. Network failures back off: the
# next 1, 3, 7, ... wakes skip the upload (capped), so a dead access point
# costs the battery little. The watchdog is armed first thing; any exception
# ends in main.py's deep sleep, never at the REPL.

import gc
import json
import time

import machine
from micropython import const

from agent import config, rtcstage, samplerec, sensors

AGENT_VERSION = "0.1.0"
_MIN_SLEEP_MS = const(1000)
_MAX_SKIP_WAKES = const(63)
_RETAINED_WAIT_MS = const(300)
_ACK_WAIT_MS = const(3000)
_CLOCK_WAIT_MS = const(1500)
_FLAG_TRIAL = const(2)  # agent.jobs.FLAG_TRIAL
_FLAG_JOBS = const(4)  # agent.jobs.FLAG_JOBS: a job in progress or a status to send

_BUDGET_RESERVE_MS = const(1500)
# An RTC earlier than this has not been set since the last power loss.
_CLOCK_SET_AFTER = const(1577836800)  # 2020-01-01
_APP_DESC_OFFSET = const(0x20)


def _file_exists(path):
    import os

    try:
        os.stat(path)
        return True
    except OSError:
        return False


def topic(device_id, leaf):
    return "mpf/v1/%s/%s" % (device_id, leaf)


def running_firmware():
    """(version, slot) of the running firmware image, from its esp_app_desc_t."""
    import esp32

    part = esp32.Partition(esp32.Partition.RUNNING)
    buf = bytearray(80)
    part.readblocks(0, buf, _APP_DESC_OFFSET)
    version = bytes(buf[16:48])
    end = version.find(b"\x00")
    return (version[:end] if end >= 0 else version).decode(), part.info()[4]


class _Unwatched:
    """Stands in for the watchdog when a person is at the USB cable (agent.usb):
    an armed WDT would reset the board at the REPL between two commands."""

    def feed(self):
        pass


class Wake:
    def __init__(self, watchdog=True):
        self.started = time.ticks_ms()
        self.mac_id = "".join("%02x" % b for b in machine.unique_id())
        self.cfg, self.problems = config.load(self.mac_id)
        # Armed once: re-creating the task watchdog with a new timeout is not
        # portable across ESP32 ports. Reading the config cannot hang.
        self.wdt = machine.WDT(timeout=self.cfg["wdt_timeout_ms"]) if watchdog else _Unwatched()
        self.device_id = self.cfg["device_id"]
        self.stage = rtcstage.Stage()
        self.rtc_valid = self.stage.load()
        self.log = None
        self.sensor_failures = 0
        self.last_error = None
        self.rssi = None
        self.acked = -1
        self.jobs_message = None
        self.clock_provisional = False
        self.over_usb = not watchdog
        self._rec = bytearray(6 + 10 * 8)

    # ------------------------------------------------------------ helpers
    def elapsed_ms(self):
        return time.ticks_diff(time.ticks_ms(), self.started)

    def budget_left_ms(self):
        return self.cfg["wake_budget_ms"] - self.elapsed_ms()

    def open_log(self):
        if self.log is None:
            from agent.flashlog import FlashLog

            self.log = FlashLog("/log", max_segments=max(2, self.cfg["limits"]["log_max_bytes"] // 4096))
        return self.log

    def request_upload(self):
        """Connect at the next wake whatever the cadence (a job asked)."""
        self.stage.flags |= rtcstage.FLAG_UPLOAD_REQUESTED

    def app_version(self):
        """The agent's version: the app slot's (agent.appupdate) when boot.py chose one."""
        import sys

        for p in sys.path:
            if p.startswith("/apps/"):
                try:
                    with open(p[:p.rfind("/")] + "/app.json") as f:
                        return json.load(f)["version"]
                except (OSError, ValueError, KeyError):
                    return AGENT_VERSION + "+" + p.split("/")[2]
        return AGENT_VERSION

    def scales(self):
        return [sensors.scale_of(s) for s in self.cfg["sensors"]]

    # ------------------------------------------------------------ the wake
    def run(self):
        stage = self.stage
        if not self.rtc_valid:
            self.recover_after_power_loss()
            if _file_exists("/jobs.json"):
                from agent import jobs

                if jobs.trial_active():
                    stage.flags |= _FLAG_TRIAL
        stage.wake_count += 1
        self.sample()
        if self.upload_due():
            self.upload()
        self.sleep()

    def recover_after_power_loss(self):
        """RTC memory is gone: continue numbering after what flash holds.

        Samples that were sent from RTC memory (their seqs reserved in the log)
        but not yet acked are lost with it; they go into the log as empty
        records, which upload as samples without readings, so the host knows
        those seqs will never come and its ack can pass them."""
        log = self.open_log()
        stats = log.stats()
        lost = stats["reserved"] - stats["next_seq"] + 1
        if lost > 0:
            log.append([b""] * lost)
            stats = log.stats()
        self.stage.next_seq = stats["next_seq"]
        self.stage.log_backlog = stats["backlog"]

    def sample(self):
        values, self.sensor_failures = sensors.read_all(self.cfg["sensors"])
        most = self.cfg["limits"]["stage_max_samples"]
        if not self.stage.room_for(len(values)) or (most and self.stage.staged >= most):
            self.flush()
        self.stage.add(time.time(), values)

    def upload_due(self):
        stage = self.stage
        if not self.cfg["wifi"]["ssid"]:
            return False
        if stage.flags & (rtcstage.FLAG_UPLOAD_REQUESTED | _FLAG_TRIAL):
            return True  # asked for, or a config trial that must try every wake
        if stage.skip_wakes:
            stage.skip_wakes -= 1
            return False
        if stage.wake_count % self.cfg["upload_every_wakes"] == 0:
            return True
        return stage.log_backlog + stage.staged >= self.cfg["upload_watermark"]

    def flush(self):
        """Move the staged samples into the flash log, as few appends as possible."""
        log = self.open_log()
        stage = self.stage
        next_seq = log.stats()["next_seq"]
        from agent.flashlog import Batch

        batch = Batch()
        for seq, t, values in stage.samples():
            if seq < next_seq:
                continue  # already in the log: a reset came between a flush and the RTC save
            if not batch.n and seq > next_seq:
                log.advance(seq)  # the host acked the seqs in between while they were staged
                next_seq = seq
            n = samplerec.encode(t, values, self._rec)
            if not batch.fits(n):
                log.append(batch)
                batch.clear()
            batch.add(memoryview(self._rec)[:n])
            next_seq += 1
        if batch.n:
            log.append(batch)
        if next_seq > stage.first_seq:
            print("flushed", stage.first_seq, next_seq - 1)
        stage.clear_samples()
        stage.log_backlog = log.stats()["backlog"]

    # ------------------------------------------------------------ network
    def connect_wifi(self):
        import network

        wifi = self.cfg["wifi"]
        wlan = network.WLAN(network.STA_IF)
        wlan.active(True)
        if not wlan.isconnected():
            wlan.connect(wifi["ssid"], wifi["password"])
            deadline = time.ticks_add(time.ticks_ms(), wifi["connect_timeout_ms"])
            while not wlan.isconnected():
                status = wlan.status()
                if status in (network.STAT_WRONG_PASSWORD, network.STAT_NO_AP_FOUND):
                    raise OSError("wifi %s: status %d" % (wifi["ssid"], status))
                if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
                    raise OSError("wifi %s: no connection within %d ms" % (wifi["ssid"], wifi["connect_timeout_ms"]))
                time.sleep_ms(20)
        try:
            self.rssi = wlan.status("rssi")
        except OSError:
            self.rssi = None
        return wlan

    def sync_clock_if_unset(self):
        """NTP, when configured and the RTC was lost with the power; a failure
        only means the host's time (samples/ack) is used instead."""
        ntp_cfg = self.cfg["ntp"]
        if not ntp_cfg["host"] or time.time() >= _CLOCK_SET_AFTER:
            return
        from agent import ntp

        before = time.time()
        try:
            delta = ntp.sync(ntp_cfg["host"], ntp_cfg["port"])
        except OSError as e:
            print("ntp:", e)
            return
        self.stage.shift_times(int(delta), _CLOCK_SET_AFTER)
        print("ntp: clock set (was %d)" % before)

    def connect_mqtt(self):
        from agent.mqtt import MQTTClient

        b = self.cfg["broker"]
        client = MQTTClient(self.device_id, b["host"], b["port"], user=b["user"], password=b["password"],
                            keepalive_s=b["keepalive_s"], tls=b["tls"], timeout_ms=b["timeout_ms"])
        client.connect()
        return client

    def upload(self):
        stage = self.stage
        client = None
        try:
            self.connect_wifi()
            self.wdt.feed()
            self.sync_clock_if_unset()
            client = self.connect_mqtt()
            stage.backoff_level = 0
            stage.skip_wakes = 0
            # Cleared now: whatever asks for another upload during this one sets it again.
            stage.flags &= ~rtcstage.FLAG_UPLOAD_REQUESTED
            if stage.flags & _FLAG_TRIAL:
                from agent import jobs

                jobs.on_connected(self, client)
            self.exchange(client)
        except OSError as e:
            self.last_error = str(e)
            print("upload failed:", e)
            stage.backoff_level = min(stage.backoff_level + 1, 6)
            stage.skip_wakes = min((1 << stage.backoff_level) - 1, _MAX_SKIP_WAKES)
            if stage.flags & _FLAG_TRIAL:
                from agent import jobs

                jobs.on_upload_failed(self)
        finally:
            if client is not None:
                try:
                    client.disconnect()
                except OSError:
                    pass

    def _on_message(self, topic_name, msg, retained):
        leaf = topic_name[len(topic(self.device_id, "")):]
        if leaf == b"samples/ack":
            try:
                ack = json.loads(msg)
                upto = ack["upto"]
            except (ValueError, KeyError, TypeError):
                print("ignoring malformed ack")
                return
            if isinstance(upto, int) and upto > self.acked:
                self.acked = upto
            host_time = ack.get("time") if isinstance(ack, dict) else None
            if isinstance(host_time, (int, float)) and (time.time() < _CLOCK_SET_AFTER or self.clock_provisional):
                # A retained ack may be hours old: use it, but let a fresh one
                # (the host answers a state with an unset clock) correct it.
                self.set_clock(host_time)
                self.clock_provisional = retained
        elif leaf == b"jobs":
            self.jobs_message = msg

    def set_clock(self, seconds):
        """Set the RTC from the host and move the staged samples taken on the
        unset clock by the same amount: the RTC ran on through every deep sleep
        since they were taken (a power loss would have emptied the stage)."""
        delta = int(seconds) - time.time()
        tm = time.gmtime(int(seconds))
        machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], 0))
        self.stage.shift_times(delta, _CLOCK_SET_AFTER)

    def exchange(self, client):
        did = self.device_id
        client.set_callback(self._on_message)
        # Both are retained state, re-read on every wake: QoS 0 (no PUBACKs) and one
        # SUBSCRIBE for the two (one round trip).
        client.subscribe([topic(did, "samples/ack"), topic(did, "jobs")], 0)
        clock_unset = time.time() < _CLOCK_SET_AFTER
        client.publish(topic(did, "state"), json.dumps(self.state()), qos=1, retain=True)
        # The retained ack arrives at once; with the clock unset, also wait
        # (briefly) for the host's fresh answer carrying its time.
        deadline = time.ticks_add(time.ticks_ms(), _CLOCK_WAIT_MS if clock_unset else _RETAINED_WAIT_MS)
        while time.ticks_diff(deadline, time.ticks_ms()) > 0:
            client.wait_msg(time.ticks_diff(deadline, time.ticks_ms()))
            if self.acked >= 0 and not (clock_unset and (self.clock_provisional or time.time() < _CLOCK_SET_AFTER)):
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
        self.run_jobs(client)

    def apply_ack(self):
        upto = self.acked
        if upto < 0:
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

        did = self.device_id
        samples_topic = topic(did, "samples")
        enc = FrameEncoder(did, self.scales(), max_frame=1024, prescaled=True)
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
                yield seq, t, [None] * nchan  # lost with RTC memory (recover_after_power_loss)
                continue
            try:
                t, values = samplerec.decode(rec)
            except ValueError:
                continue  # the log's CRC makes this unreachable; never send garbage
            yield seq, t, values

    def _publish(self, client, name, enc):
        client.publish(name, enc.finish(), qos=1)
        self.wdt.feed()

    def run_jobs(self, client):
        """Run the pending signed jobs (agent.jobs) within what is left of the budget.

        The job code is loaded only when there is something for it: a queue, a
        job in progress or a status still to send (RTC flag, or after a power
        loss the job state file)."""
        # The retained queue follows the subscription at once (a slow broker:
        # raise broker.queue_wait_ms).
        deadline = time.ticks_add(time.ticks_ms(), self.cfg["broker"]["queue_wait_ms"])
        while self.jobs_message is None and time.ticks_diff(deadline, time.ticks_ms()) > 0:
            client.wait_msg(time.ticks_diff(deadline, time.ticks_ms()))
        queue = self.jobs_message
        if (queue is None or bytes(queue).strip() in (b"", b"[]")) and not (self.stage.flags & _FLAG_JOBS):
            if self.rtc_valid or not _file_exists("/jobs.json"):
                return
        import agent

        agent.unload("codec")  # the frame encoder's memory, for the verifier
        gc.collect()
        from agent import jobs

        jobs.run_pending(self, client)

    # ------------------------------------------------------------ state
    def state(self):
        import os

        version, slot = running_firmware()
        fs = os.statvfs("/")
        gc.collect()
        stage = self.stage
        return {
            "device": self.device_id,
            "fw": version,
            "app": self.app_version(),
            "slot": slot,
            "reset_cause": machine.reset_cause(),
            "wakes": stage.wake_count,
            "rtc_lost": not self.rtc_valid,
            "heap_free": gc.mem_free(),
            "fs_free": fs[0] * fs[3],
            "backlog": stage.log_backlog + stage.staged,
            "staged": stage.staged,
            "dropped": self.open_log().stats()["dropped"],
            "sensor_failures": self.sensor_failures,
            "channels": [s["name"] for s in self.cfg["sensors"]],
            "scales": self.scales(),
            "config_problems": self.problems,
            "rssi": self.rssi,
            "time": time.time(),
            "last_error": self.last_error,
        }

    def sleep(self):
        self.stage.save()
        ms = self.cfg["sample_interval_s"] * 1000 - self.elapsed_ms()
        machine.deepsleep(max(ms, _MIN_SLEEP_MS))


def run():
    Wake().run()
