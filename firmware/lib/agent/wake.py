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

from agent import rtcstage

AGENT_VERSION = "0.1.0"
_MIN_SLEEP_MS = const(1000)
_MAX_SKIP_WAKES = const(63)
# An RTC earlier than this has not been set since the last power loss
# (agent.upload.CLOCK_SET_AFTER).
_CLOCK_SET_AFTER = const(1577836800)  # 2020-01-01
_APP_DESC_OFFSET = const(0x20)
_WDT_RESET = const(3)  # machine.WDT_RESET
CRASH_PATH = "/last_crash.txt"  # written by main.py when a wake raised
# Why the broker could not be reached, kept until a connected wake has reported
# it (the state's `last_failure`): {"error", "since", "wake"}. Written when a
# failure's cause is new (the first failure after a report, or a different
# cause), not at every failed wake: one write per outage, one removal after it.
FAILURE_PATH = "/failure.json"
_FAILURE_TEXT = const(160)


def _file_exists(path):
    import os

    try:
        os.stat(path)
        return True
    except OSError:
        return False


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
        import agent
        from agent import config

        self.cfg, self.problems = config.load(self.mac_id)
        from agent import topics
        topics.set_root(self.cfg["broker"]["topic_root"])
        # The schema's code is needed again only by a config job: its memory goes
        # to the rest of the wake. What the wake still needs of it, it keeps.
        self.config_files = (config.CONFIG_PATH, config.GOOD_PATH)
        agent.unload("config")
        # Armed once: re-creating the task watchdog with a new timeout is not
        # portable across ESP32 ports. Reading the config cannot hang.
        self.wdt = machine.WDT(timeout=self.cfg["wdt_timeout_ms"]) if watchdog else _Unwatched()
        self.device_id = self.cfg["device_id"]
        self.stage = rtcstage.Stage()
        self.rtc_valid = self.stage.load()
        self.log = None
        self.sensor_failures = 0
        self.last_error = None
        self.last_failure = None
        self.rssi = None
        self.crash = None
        self._uploader = None
        self.pending_queue = None
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
        from agent.sensors import scale_of

        return [scale_of(s) for s in self.cfg["sensors"]]

    # ------------------------------------------------------------ the wake
    def run(self):
        stage = self.stage
        if not self.rtc_valid:
            self.recover_after_power_loss()
            if _file_exists("/jobs.json"):
                from agent import wakehooks

                if wakehooks.trial_active():
                    stage.flags |= rtcstage.FLAG_TRIAL
        self.note_crash()
        stage.wake_count += 1
        self.sample()
        # The new sample's seq is durable (RTC memory) before anything that can
        # crash (network, jobs): a crash never hands the same seq out twice.
        stage.save()
        if self.upload_due():
            self.upload()
        self.sleep()

    def note_crash(self):
        """Did the last wake crash (main.py noted an exception, or the watchdog
        fired)? Count it, tell the job it was running, report it in the state."""
        import os

        try:
            with open(CRASH_PATH) as f:
                reason = f.read(200)
        except OSError:
            reason = None
        if reason is None and machine.reset_cause() == _WDT_RESET:
            reason = "watchdog reset"
        if reason is None:
            return
        self.crash = reason
        self.stage.crashes += 1
        print("the last wake crashed (%d in a row): %s" % (self.stage.crashes, reason))
        if _file_exists("/jobs.json"):
            from agent import wakehooks

            wakehooks.note_crash(reason)
            self.stage.flags |= rtcstage.FLAG_JOBS
        try:
            os.remove(CRASH_PATH)
        except OSError:
            pass

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
        from agent.sensors import read_all

        values, self.sensor_failures = read_all(self.cfg["sensors"])
        most = self.cfg["limits"]["stage_max_samples"]
        if not self.stage.room_for(len(values)) or (most and self.stage.staged >= most):
            self.flush()
        self.stage.add(time.time(), values)

    def upload_due(self):
        stage = self.stage
        if not self.cfg["wifi"]["ssid"]:
            return False
        if stage.flags & (rtcstage.FLAG_UPLOAD_REQUESTED | rtcstage.FLAG_TRIAL):
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
        from agent.samplerec import encode

        batch = Batch()
        for seq, t, values in stage.samples():
            if seq < next_seq:
                continue  # already in the log: a reset came between a flush and the RTC save
            if not batch.n and seq > next_seq:
                log.advance(seq)  # the host acked the seqs in between while they were staged
                next_seq = seq
            n = encode(t, values, self._rec)
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
        if not ntp_cfg["host"] or (time.time() >= _CLOCK_SET_AFTER
                                   and not self.stage.flags & rtcstage.FLAG_CLOCK_FLOOR):
            return
        from agent import ntp

        try:
            seconds = ntp.query(ntp_cfg["host"], ntp_cfg["port"])
        except OSError as e:
            print("ntp:", e)
            return
        self.set_clock(seconds)
        print("ntp: clock set")

    def connect_mqtt(self):
        from agent.mqtt import MQTTClient

        b = self.cfg["broker"]
        params = self.tls_params() if b["tls"] else None
        client = MQTTClient(self.device_id, b["host"], b["port"], user=b["user"], password=b["password"],
                            keepalive_s=b["keepalive_s"], tls=b["tls"], tls_params=params,
                            timeout_ms=b["timeout_ms"])
        client.connect()
        return client

    def tls_params(self):
        """The CA, the identity (the renewal while a `cert` job has it on trial)
        and the broker's name (agent.tlsid). With the clock unset (a power
        loss), the clock first moves forward to the earliest time these
        certificates allow: on the ESP32 mbedTLS checks validity against the RTC."""
        from agent import tlsid

        trial = False
        if self.stage.flags & rtcstage.FLAG_TRIAL:
            from agent import wakehooks

            trial = wakehooks.cert_on_trial()
        b = self.cfg["broker"]
        params = tlsid.tls_params(b["host"], b["tls_hostname"], trial)
        if time.time() < _CLOCK_SET_AFTER:
            floor = tlsid.clock_floor(params["cadata"], params.get("cert"))
            if floor > time.time():
                self.set_clock(floor)
                # Only a floor: the host's time (the ack) may still correct it.
                self.stage.flags |= rtcstage.FLAG_CLOCK_FLOOR
                print("tls: clock set forward to its floor", floor)
        import agent

        tlsid = None
        agent.unload("tlsid")  # its code is needed again only by a cert job or the next connect
        return params

    def uploader(self):
        if self._uploader is None:
            from agent.upload import Uploader

            self._uploader = Uploader(self.device_id, self.cfg, self.stage, self.open_log, self.scales,
                                      self.wdt.feed, self.budget_left_ms, self.set_clock)
        return self._uploader

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
            # Reached the broker with the config this wake loaded: it is the last
            # good one now (agent.config's rule, without loading the schema
            # again). Before a trial's hook, which may write a new config.json.
            if not self.problems:
                from agent.jsonfile import copy_if_changed

                copy_if_changed(*self.config_files)
            if stage.flags & rtcstage.FLAG_TRIAL:
                from agent import wakehooks

                wakehooks.on_connected(self.job_context(client))
            self.last_failure = self.unreported_failure()
            self.uploader().exchange(client, self.state())
            if self.last_failure is not None:
                from agent.jsonfile import remove

                remove(FAILURE_PATH)  # the broker holds the state that reports it
                self.last_failure = None
            self.run_jobs(client)
        except OSError as e:
            self.last_error = str(e)
            self.note_failure(self.last_error)
            print("upload failed:", e)
            stage.backoff_level = min(stage.backoff_level + 1, 6)
            stage.skip_wakes = min((1 << stage.backoff_level) - 1, _MAX_SKIP_WAKES)
            if stage.flags & rtcstage.FLAG_TRIAL:
                from agent import wakehooks

                wakehooks.on_upload_failed(self.job_context(None), self.last_error)
        finally:
            if client is not None:
                try:
                    client.disconnect()
                except OSError:
                    pass

    def unreported_failure(self):
        """The failure record no connected wake has reported yet, or None."""
        if not _file_exists(FAILURE_PATH):
            return None
        from agent.jsonfile import read_json

        record, _ = read_json(FAILURE_PATH)
        return record if isinstance(record, dict) else {"error": "unreadable failure record"}

    def note_failure(self, error):
        """Keep why this upload failed for the next state (agent.wake.FAILURE_PATH):
        the first failure of an outage, and each change of cause, is written."""
        error = error[:_FAILURE_TEXT]
        record = self.last_failure if self.last_failure is not None else self.unreported_failure()
        if record is not None and record.get("error") == error:
            return
        from agent.jsonfile import write_json

        try:
            write_json(FAILURE_PATH, {"error": error, "since": time.time(), "wake": self.stage.wake_count})
        except OSError as e:
            print("failure record:", e)  # a full flash: the wake goes on; only the report is lost

    def set_clock(self, seconds):
        """Set the RTC from an unauthenticated source (the host's ack, NTP):
        forward only, so a forged time can never make an expired job valid again
        (docs/security.md). The staged samples taken on the unset clock move by
        the same amount: the RTC ran on through every deep sleep since they were
        taken (a power loss would have emptied the stage)."""
        now = time.time()
        delta = int(seconds) - now
        if delta <= 0:
            return
        # Samples staged since a TLS clock floor was set carry floor-based times:
        # they move too (a power loss empties the stage, so none is older).
        before = now + 1 if self.stage.flags & rtcstage.FLAG_CLOCK_FLOOR else _CLOCK_SET_AFTER
        self.stage.flags &= ~rtcstage.FLAG_CLOCK_FLOOR
        tm = time.gmtime(int(seconds))
        machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], 0))
        self.stage.shift_times(delta, before)

    # Kept for agent.usb (the USB field tools use the same upload path).
    @property
    def acked(self):
        return self.uploader().acked

    @acked.setter
    def acked(self, value):
        self.uploader().acked = value

    def apply_ack(self):
        self.uploader().apply_ack()

    def send_backlog(self, client):
        return self.uploader().send_backlog(client)

    # ------------------------------------------------------------ jobs
    def job_context(self, client):
        from agent.jobs import JobContext

        return JobContext(self.device_id, self.cfg, self.stage, client=client, feed=self.wdt.feed,
                          budget_left_ms=self.budget_left_ms, request_upload=self.request_upload,
                          connect=self.connect_mqtt, on_message=self.on_message,
                          app_version=self.app_version, upload=self.upload_now, facts=self.facts,
                          over_usb=self.over_usb, crash=self.crash, take_queue=self.take_queue)

    def take_queue(self):
        msg = self.pending_queue
        self.pending_queue = None
        return msg

    def on_message(self, topic_name, msg, retained):
        self.uploader().on_message(topic_name, msg, retained)

    def upload_now(self, client):
        """The `upload` job: send the backlog now; what it reports."""
        sent = self.send_backlog(client)
        left = self.stage.log_backlog + self.stage.staged
        return {"sent_upto": sent, "acked": self.acked, "backlog": left}

    def facts(self):
        """The `diag` job's report."""
        import esp32
        import os

        version, slot = running_firmware()
        fs = os.statvfs("/")
        gc.collect()
        return {
            "fw": version, "slot": slot, "app": self.app_version(),
            "heap_free": gc.mem_free(), "heap_alloc": gc.mem_alloc(),
            "fs_free": fs[0] * fs[3], "fs_total": fs[0] * fs[2],
            "reset_cause": machine.reset_cause(), "wake_reason": machine.wake_reason(),
            "wakes": self.stage.wake_count, "log": self.open_log().stats(), "staged": self.stage.staged,
            "rssi": self.rssi, "time": time.time(), "crashes": self.stage.crashes, "last_crash": self.crash,
            "boot_slot": esp32.Partition(esp32.Partition.BOOT).info()[4],
        }

    def run_jobs(self, client):
        """Run the pending signed jobs (agent.jobs) within what is left of the budget.

        The job code is loaded only when there is something for it: a queue, a
        job in progress or a status still to send (RTC flag, or after a power
        loss the job state file)."""
        up = self.uploader()
        queue = up.jobs_message
        up.jobs_message = None
        empty = queue is None or (len(queue) < 16 and bytes(queue).strip() in (b"", b"[]"))
        if empty and not (self.stage.flags & rtcstage.FLAG_JOBS):
            if self.rtc_valid or not _file_exists("/jobs.json"):
                return
        self.pending_queue = queue
        queue = None
        # The upload path's code and state go, for the verifier: nothing in them
        # is needed again that cannot be rebuilt (the log and the stage hold the
        # truth; an upload job makes a new Uploader).
        self._uploader = up = None
        self.log = None
        import agent

        agent.unload("codec", "upload", "flashlog", "samplerec", "config", "sensors", "stagerecode")
        gc.collect()
        from agent import jobs

        # From here a crash must find its job noted and the samples' seqs kept.
        self.stage.flags |= rtcstage.FLAG_JOBS
        self.stage.save()
        jobs.run_pending(self.job_context(client))

    # ------------------------------------------------------------ state
    def state(self):
        import os

        version, slot = running_firmware()
        fs = os.statvfs("/")
        gc.collect()
        stage = self.stage
        state = {
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
            # The host refuses at `job create` any envelope larger than this.
            "limits": {"job_max_bytes": self.cfg["limits"]["job_max_bytes"]},
            # After a crash: why, and how many wakes in a row ended in one. The
            # agent then runs one job per wake and ends the job that crashed.
            "crashes": stage.crashes,
            "last_crash": self.crash,
            "safe_mode": stage.crashes > 0,
        }
        if self.last_failure is not None:
            # Why earlier wakes could not reach the broker, reported once (the host
            # keeps it: mpfleet devices show); absent otherwise, not a null every
            # upload connection pays for.
            state["last_failure"] = self.last_failure
        return state

    def sleep(self):
        # This wake ended well. The stage's mark stays: an envelope whose verify
        # ran out of memory is tried once more, next wake (agent.intake).
        self.stage.crashes = 0
        self.stage.save()
        ms = self.cfg["sample_interval_s"] * 1000 - self.elapsed_ms()
        machine.deepsleep(max(ms, _MIN_SLEEP_MS))


def run():
    Wake().run()
