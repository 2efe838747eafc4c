"""A protocol-level device fleet: thousands of devices in one asyncio loop (docs/sim-load.md).

Each `LoadDevice` does on the wire what the agent's connected wake does
(firmware/lib/agent/wake.py, upload.py, jobs.py, intake.py): connect (client id =
device id, its broker account when it has one), subscribe to `samples/ack` and `jobs`
(QoS 0), publish its retained state, take the retained ack, send its unacked samples
as frames (mpfleet.protocol.codec), wait for the ack, take the retained queue, verify
each envelope against the trusted keys with the agent's checks and reasons, run the
jobs in seq order with the agent's dedup (a replay floor per key, the last 16
finished envelopes reported again, rejected digests never again), publish the
statuses, disconnect.

No MicroPython, no flash, no power cuts: the real-firmware fleet (mpfleet.sim.fleet)
stays the proof of the device. This one is for loading the host.

The MQTT client is a minimal MQTT 3.1.1 client on asyncio streams (CONNECT, SUBSCRIBE,
PUBLISH QoS 0/1 with PUBACK, DISCONNECT), as the device's own agent/mqtt.py is: one
paho Client per device would cost a thread (or paho's external-loop plumbing) each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from mpfleet.protocol.codec import encode_frame
from mpfleet.protocol.signing import PREFIX, b64url_decode, verify_strict
from mpfleet.protocol.topics import TOPIC_ROOT, topic

NOT_SUPPORTED = "not supported by the load fleet"
JOB_TYPES = ("config", "reboot", "upload", "diag", "sample", "ota", "app", "cancel", "exec", "keys", "cert")
CONNECTIVITY = ("wifi.", "broker.", "device_id")
QUEUE_MAX = 32
QUEUE_MAX_BYTES = 12288
JOB_MAX_BYTES = 4096
DONE_KEEP = 16
REJ_KEEP = 48
ACK_WAIT_S = 3.0
RETAINED_WAIT_S = 0.3
QUEUE_WAIT_S = 0.1
SCALES = [1, 1]
CHANNELS = ["temp", "humidity"]


class MqttError(OSError):
    pass


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class MiniMqtt:
    """One MQTT 3.1.1 connection on asyncio streams: what a device needs, nothing more."""

    def __init__(self, on_message):
        self.on_message = on_message
        self.reader = self.writer = None
        self.pid = 0
        self.acks: dict[int, asyncio.Future] = {}
        self.task = None

    async def connect(self, host: str, port: int, client_id: str, user: str | None, password: str | None,
                      timeout: float = 5.0) -> None:
        self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
        body = _str("MQTT") + bytes([4, flags]) + struct.pack("!H", 60) + _str(client_id)
        if user:
            body += _str(user)
        if password:
            body += _str(password)
        self.writer.write(b"\x10" + _remaining_length(len(body)) + body)
        kind, payload = await asyncio.wait_for(self._read_packet(), timeout)
        if kind >> 4 != 2 or len(payload) < 2 or payload[1] != 0:
            raise MqttError(f"broker refused the connection (CONNACK {payload[1:2].hex() or '?'})")
        self.task = asyncio.ensure_future(self._read_loop())

    async def _read_packet(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(1)
        n = mult = 0
        shift = 1
        while True:
            b = (await self.reader.readexactly(1))[0]
            n += (b & 0x7F) * shift
            shift *= 128
            mult += 1
            if not b & 0x80:
                break
        return head[0], (await self.reader.readexactly(n)) if n else b""

    async def _read_loop(self) -> None:
        try:
            while True:
                kind, p = await self._read_packet()
                t = kind >> 4
                if t == 3:  # PUBLISH
                    qos = (kind >> 1) & 3
                    tl = struct.unpack("!H", p[:2])[0]
                    name = p[2:2 + tl].decode()
                    i = 2 + tl
                    if qos:
                        pid = p[i:i + 2]
                        i += 2
                        self.writer.write(b"\x40\x02" + pid)
                    self.on_message(name, p[i:], bool(kind & 1))
                elif t in (4, 9):  # PUBACK, SUBACK
                    fut = self.acks.pop(struct.unpack("!H", p[:2])[0], None)
                    if fut is not None and not fut.done():
                        fut.set_result(p)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            for fut in self.acks.values():
                if not fut.done():
                    fut.set_exception(MqttError("connection lost"))
            self.acks.clear()

    def _next_pid(self) -> tuple[int, asyncio.Future]:
        self.pid = self.pid % 65535 + 1
        fut = asyncio.get_running_loop().create_future()
        self.acks[self.pid] = fut
        return self.pid, fut

    async def subscribe(self, topics: list[str], timeout: float = 5.0) -> None:
        pid, fut = self._next_pid()
        body = struct.pack("!H", pid) + b"".join(_str(t) + b"\x00" for t in topics)
        self.writer.write(b"\x82" + _remaining_length(len(body)) + body)
        await asyncio.wait_for(fut, timeout)

    async def publish(self, name: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float = 5.0) -> None:
        head = 0x30 | (qos << 1) | (1 if retain else 0)
        body = _str(name)
        fut = None
        if qos:
            pid, fut = self._next_pid()
            body += struct.pack("!H", pid)
        body += payload
        self.writer.write(bytes([head]) + _remaining_length(len(body)) + body)
        if fut is not None:
            await asyncio.wait_for(fut, timeout)

    async def disconnect(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"\xe0\x00")
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        if self.task is not None:
            self.task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        self.writer = None


def digest_of(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:16]


class Rejected(Exception):
    """(reason,) or (reason, kid, payload) once the envelope is authentic."""


def list_entries(raw: bytes) -> list[bytes]:
    """The entries of the JSON list `raw` as their raw text (quotes included), as the
    agent's list_spans takes them; ValueError if it is not a JSON list."""
    items = json.loads(raw)
    if not isinstance(items, list):
        raise ValueError("not a list")
    # Entries as the device sees them: serve publishes compact JSON, so re-encoding each
    # entry compactly gives the bytes the device digests.
    return [json.dumps(e, separators=(",", ":")).encode() for e in items]


@dataclass
class Faults:
    lost_ack: float = 0.0        # a wake never hears the host's sample ack (retained or fresh)
    duplicate_status: float = 0.0  # a status is published twice
    never_wake: float = 0.0      # a device never wakes at all

    def __post_init__(self):
        for name in ("lost_ack", "duplicate_status", "never_wake"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:  # nan too
                raise ValueError(f"Faults.{name} is a probability, 0 to 1, not {p!r}")


@dataclass
class LoadStats:
    wakes: int = 0
    wake_errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    duplicates_sent: int = 0
    frames: int = 0
    samples_sent: int = 0
    acks_lost: int = 0
    acks_taken: int = 0
    never_wake: int = 0
    errors: Counter = field(default_factory=Counter)
    wake_s: float = 0.0

    def to_json(self) -> dict:
        return {"wakes": self.wakes, "wake_errors": self.wake_errors, "statuses": dict(self.statuses),
                "duplicate_statuses_sent": self.duplicates_sent, "frames": self.frames,
                "samples_sent": self.samples_sent, "acks_taken": self.acks_taken, "acks_lost": self.acks_lost,
                "never_wake": self.never_wake, "errors": dict(self.errors),
                "mean_wake_s": round(self.wake_s / self.wakes, 4) if self.wakes else None}


class LoadDevice:
    """One protocol-level device: its config, job state and sample backlog, in memory."""

    def __init__(self, device_id: str, trusted_keys: dict[str, str], groups: list[str] | None = None,
                 credentials: tuple[str, str] | None = None, root: str = TOPIC_ROOT):
        self.id = device_id
        self.root = root
        self.credentials = credentials
        self.config: dict = {"device_id": device_id, "groups": list(groups or []),
                             "trusted_keys": dict(trusted_keys), "sample_interval_s": 60}
        self.trusted = {k: b64url_decode(v) for k, v in trusted_keys.items()}
        self.last: dict[str, int] = {}   # replay floor per kid
        self.tfloor = 0
        self.done: list[list] = []       # [digest, id, seq, status, attempt]
        self.rej: list[str] = []
        self.next_seq = 1
        self.backlog: list[tuple[int, int, list]] = []  # (seq, t, values) not acked
        self.acked = 0
        self.wakes = 0
        self.ran: list[tuple[str, str, int, object]] = []  # (job id, status, attempt, detail): what this device did

    def topic(self, leaf: str) -> str:
        return topic(self.id, leaf, self.root)

    def take_sample(self, now: int) -> None:
        v = self.next_seq
        self.backlog.append((self.next_seq, now, [20 + v % 7, 40 + v % 11]))
        self.next_seq += 1

    def state(self, now: int) -> dict:
        return {"device": self.id, "fw": "load-1", "app": "load", "slot": "ota_0", "reset_cause": 4,
                "wakes": self.wakes, "rtc_lost": False, "heap_free": 100000, "fs_free": 1000000,
                "backlog": len(self.backlog), "staged": 0, "dropped": 0, "sensor_failures": [],
                "channels": CHANNELS, "scales": SCALES, "config_problems": [], "rssi": -60, "time": now,
                "last_error": None, "limits": {"job_max_bytes": JOB_MAX_BYTES}, "crashes": 0,
                "last_crash": None, "safe_mode": False,
                "sample_interval_s": self.config.get("sample_interval_s")}

    # ------------------------------------------------------------------ intake
    def verify(self, text: str, digest: str, now: int) -> dict:
        if len(text) > JOB_MAX_BYTES:
            raise Rejected(f"envelope of {len(text)} bytes is over the limit of {JOB_MAX_BYTES}")
        parts = text.split(".")
        if len(parts) != 4 or parts[0] != PREFIX or not all(parts[1:]):
            raise Rejected("malformed envelope (expected mpf1.<kid>.<payload>.<sig>)")
        kid = parts[1]
        key = self.trusted.get(kid)
        if key is None:
            raise Rejected(f"unknown signing key {kid[:16]}")
        try:
            sig = b64url_decode(parts[3])
        except ValueError:
            raise Rejected("malformed base64url in signature or trusted key") from None
        if len(sig) != 64:
            raise Rejected("signature or key has the wrong length")
        if not verify_strict(key, f"{PREFIX}.{kid}.{parts[2]}".encode(), sig):
            raise Rejected("bad signature")
        try:
            payload = json.loads(b64url_decode(parts[2]))
        except ValueError as e:
            raise Rejected(f"payload is not base64url JSON: {e}") from None
        if not isinstance(payload, dict):
            raise Rejected("payload is not a JSON object")
        targets = payload.get("targets")
        if not isinstance(targets, list):
            raise Rejected("schema: targets must be a list")
        if not any(t == "*" or t == self.id or (isinstance(t, str) and t in self.config["groups"])
                   for t in targets):
            raise Rejected("not for this device")
        seq = payload.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise Rejected("schema: seq must be a positive integer", kid, payload)
        floor = self.last.get(kid, 0)
        if seq <= floor:
            raise Rejected(f"replay: seq {seq} is not above {floor}, the last started for key {kid}")
        now = max(now, self.tfloor)
        nbf, exp = payload.get("nbf"), payload.get("exp")
        if isinstance(nbf, int) and now < nbf:
            raise Rejected(f"not yet valid (nbf {nbf}, now {now})", kid, payload)
        if isinstance(exp, int) and now >= exp:
            raise Rejected(f"expired (exp {exp}, now {now})", kid, payload)
        jid = payload.get("id")
        if not isinstance(jid, str) or not 1 <= len(jid) <= 64:
            raise Rejected("schema: id must be a string of 1..64 characters", kid, payload)
        if payload.get("type") not in JOB_TYPES:
            raise Rejected("unknown job type %s" % json.dumps(payload.get("type"))[:40], kid, payload)
        if not isinstance(payload.get("params", {}), dict):
            raise Rejected("schema: params must be an object", kid, payload)
        payload["kid"] = kid
        payload["digest"] = digest
        return payload

    # ------------------------------------------------------------------ jobs
    def run_job(self, job: dict) -> tuple[str, object]:
        kind = job["type"]
        params = job.get("params", {})
        if kind == "config":
            sets, unsets = params.get("set", {}), params.get("unset", [])
            keys = list(sets) + list(unsets)
            if any(k.startswith(CONNECTIVITY) for k in keys):
                return "FAILED", f"connectivity changes are {NOT_SUPPORTED}"
            for k, v in sets.items():
                node = self.config
                *path, last = k.split(".")
                for part in path:
                    node = node.setdefault(part, {}) if isinstance(node.get(part), dict) else node.setdefault(part, {})
                node[last] = v
            for k in unsets:
                node = self.config
                *path, last = k.split(".")
                for part in path:
                    node = node.get(part) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    node.pop(last, None)
            return "SUCCEEDED", {"applied": sorted(keys)}
        if kind == "diag":
            return "SUCCEEDED", {"fw": "load-1", "running": "ota_0", "boot": "ota_0", "app": "load",
                                 "heap_free": 100000, "fs_free": 1000000, "reset_cause": 4, "wakes": self.wakes,
                                 "log": {"backlog": len(self.backlog)}, "rssi": -60, "time": int(time.time())}
        if kind == "upload":
            return "SUCCEEDED", {"sent": 0, "left": len(self.backlog)}
        if kind == "sample":
            n = max(1, min(600, int(float(params.get("rate_hz", 1)) * float(params.get("duration_s", 1)))))
            return "SUCCEEDED", {"sensor": params.get("sensor"), "rate_hz": params.get("rate_hz"),
                                 "t0": int(time.time()), "scale": 1, "values": [200 + i % 5 for i in range(n)]}
        if kind == "reboot":
            return "SUCCEEDED", {"boots": self.wakes, "reset_cause": 2}
        if kind == "cancel":
            return "SUCCEEDED", {"canceled": params.get("job")}
        return "FAILED", f"{kind} jobs are {NOT_SUPPORTED}"

    def remember_done(self, digest, job_id, seq, status, attempt) -> None:
        self.done = (self.done + [[digest, job_id, seq, status, attempt]])[-DONE_KEEP:]


def _status(job_id, seq, status, detail=None, attempt=1) -> dict:
    return {"job": job_id, "seq": seq, "status": status, "progress": None, "detail": detail,
            "attempt": attempt, "ts": int(time.time())}


class LoadFleet:
    """N LoadDevices on their own wake schedules in one asyncio loop."""

    def __init__(self, devices: list[LoadDevice], host: str, port: int, interval_s: float = 60.0,
                 jitter_s: float = 0.0, faults: Faults | None = None, seed: int = 0, concurrency: int = 512,
                 first_wake_s: float | None = None):
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a positive number of seconds, not {interval_s!r}")
        if not 0.0 <= jitter_s <= interval_s:
            raise ValueError(f"jitter_s must be 0 to interval_s ({interval_s!r}), not {jitter_s!r}")
        if first_wake_s is not None and not (math.isfinite(first_wake_s) and first_wake_s >= 0):
            raise ValueError(f"first_wake_s must be 0 or more seconds, not {first_wake_s!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be 1 or more, not {concurrency!r}")
        self.devices = devices
        self.host, self.port = host, port
        self.interval_s = interval_s
        self.jitter_s = jitter_s
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.stats = LoadStats()
        self.concurrency = concurrency
        self.first_wake_s = interval_s if first_wake_s is None else first_wake_s
        self.asleep = {d.id for d in devices if self.rng.random() < self.faults.never_wake}
        self.stats.never_wake = len(self.asleep)
        self._sem: asyncio.Semaphore | None = None

    async def wake(self, dev: LoadDevice) -> None:
        """One connected wake of `dev`, as the agent does it."""
        started = time.perf_counter()
        now = int(time.time())
        dev.wakes += 1
        dev.take_sample(now)
        box: dict = {"ack": None, "jobs": None, "ack_event": asyncio.Event(), "jobs_event": asyncio.Event()}
        ack_topic, jobs_topic = dev.topic("samples/ack"), dev.topic("jobs")

        def on_message(name, payload, retained):
            if name == ack_topic:
                try:
                    upto = json.loads(payload)["upto"]
                except (ValueError, KeyError, TypeError):
                    return
                if isinstance(upto, int) and not isinstance(upto, bool) and upto >= 0:
                    box["ack"] = max(box["ack"] or 0, upto)
                    box["ack_event"].set()
            elif name == jobs_topic:
                box["jobs"] = payload
                box["jobs_event"].set()

        client = MiniMqtt(on_message)
        user, password = dev.credentials or (None, None)
        lose_ack = self.rng.random() < self.faults.lost_ack
        try:
            await client.connect(self.host, self.port, dev.id, user, password)
            await client.subscribe([ack_topic, jobs_topic])
            await client.publish(dev.topic("state"), json.dumps(dev.state(now)).encode(), qos=1, retain=True)
            await _wait(box["ack_event"], RETAINED_WAIT_S)
            self._apply_ack(dev, box["ack"], lose_ack=lose_ack)
            if dev.backlog:
                first = dev.backlog[0][0]
                samples = [(t, v) for _, t, v in dev.backlog]
                frame = encode_frame(dev.id, first, dev.backlog[0][1], SCALES, samples, oldest_seq=first)
                box["ack_event"].clear()
                await client.publish(dev.topic("samples"), frame, qos=1)
                self.stats.frames += 1
                self.stats.samples_sent += len(samples)
                last = dev.backlog[-1][0]
                deadline = time.monotonic() + ACK_WAIT_S
                while (box["ack"] or 0) < last and time.monotonic() < deadline:
                    box["ack_event"].clear()
                    await _wait(box["ack_event"], deadline - time.monotonic())
                self._apply_ack(dev, box["ack"], lose_ack=lose_ack)
            await _wait(box["jobs_event"], QUEUE_WAIT_S)
            await self.run_jobs(dev, client, box["jobs"], now)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            self.stats.wake_errors += 1
            self.stats.errors[type(e).__name__ + ": " + str(e)[:80]] += 1
        finally:
            await client.disconnect()
            self.stats.wakes += 1
            self.stats.wake_s += time.perf_counter() - started

    def _apply_ack(self, dev: LoadDevice, upto, lose_ack: bool) -> None:
        if upto is None:
            return
        if lose_ack:
            self.stats.acks_lost += 1
            return
        if upto > dev.acked:
            dev.acked = upto
            self.stats.acks_taken += 1
        if upto >= dev.next_seq:
            # an earlier life of this id (a new process): renumber what it holds after the
            # host's ack, as agent.upload.rebase does, or the host takes it for duplicates
            dev.backlog = [(upto + 1 + i, t, v) for i, (_, t, v) in enumerate(dev.backlog)]
            dev.next_seq = upto + 1 + len(dev.backlog)
            return
        dev.backlog = [s for s in dev.backlog if s[0] > upto]

    async def publish_status(self, dev: LoadDevice, client: MiniMqtt, status: dict) -> None:
        body = json.dumps(status).encode()
        await client.publish(dev.topic("jobs/status"), body, qos=1)
        self.stats.statuses[status["status"]] += 1
        if self.rng.random() < self.faults.duplicate_status:
            await client.publish(dev.topic("jobs/status"), body, qos=1)
            self.stats.duplicates_sent += 1

    async def reject_unattributed(self, dev, client, digest: str, reason: str) -> None:
        if digest in dev.rej:
            return
        dev.rej = (dev.rej + [digest])[-REJ_KEEP:]
        dev.ran.append(("envelope:" + digest, "REJECTED", 1, reason))
        await self.publish_status(dev, client, _status("envelope:" + digest, None, "REJECTED", reason))

    async def run_jobs(self, dev: LoadDevice, client: MiniMqtt, raw: bytes | None, now: int) -> None:
        """The agent's intake and runner (agent.intake, agent.jobs, agent.handlers)."""
        if not raw or raw.strip() in (b"", b"[]"):
            return
        try:
            if len(raw) > QUEUE_MAX_BYTES:
                raise ValueError(f"{len(raw)} bytes, over the limit of {QUEUE_MAX_BYTES}")
            entries = list_entries(raw)[:QUEUE_MAX]
        except ValueError as e:
            await self.reject_unattributed(dev, client, digest_of(raw),
                                           f"job queue is not a JSON list of envelopes: {e}")
            return
        finished = {d[0]: d for d in dev.done}
        verified = []
        for entry in entries:
            digest = digest_of(entry)
            if digest in finished:
                _, job_id, seq, status, attempt = finished[digest]
                await self.publish_status(dev, client, _status(job_id, seq, status, {"reported_again": True},
                                                               attempt))
                continue
            if digest in dev.rej:
                continue
            if len(entry) - 2 > JOB_MAX_BYTES:
                await self.reject_unattributed(dev, client, digest, f"envelope of {len(entry) - 2} bytes is over "
                                               f"the limit of {JOB_MAX_BYTES}")
                continue
            if not (entry.startswith(b'"') and entry.endswith(b'"')) or b"\\" in entry:
                await self.reject_unattributed(dev, client, digest, "envelope is not a string of base64url and dots")
                continue
            try:
                job = dev.verify(entry[1:-1].decode(), digest, now)
            except Rejected as e:
                payload = e.args[2] if len(e.args) > 2 else None
                if isinstance(payload, dict) and isinstance(payload.get("id"), str) \
                        and isinstance(payload.get("seq"), int):
                    if digest not in finished:
                        dev.remember_done(digest, payload["id"], payload["seq"], "REJECTED", 1)
                        dev.ran.append((payload["id"], "REJECTED", 1, e.args[0]))
                        await self.publish_status(dev, client, _status(payload["id"], payload["seq"], "REJECTED",
                                                                       e.args[0]))
                else:
                    await self.reject_unattributed(dev, client, digest, e.args[0])
                continue
            if any(v["kid"] == job["kid"] and v["seq"] == job["seq"] for v in verified):
                await self.reject_unattributed(dev, client, digest, "duplicate: another envelope in this queue has "
                                               f"seq {job['seq']} of key {job['kid']}")
                continue
            verified.append(job)
        verified.sort(key=lambda j: j["seq"])
        canceled = {j["params"].get("job") for j in verified if j["type"] == "cancel"}
        for job in verified:
            if job["seq"] <= dev.last.get(job["kid"], 0):
                await self.reject_unattributed(dev, client, job["digest"],
                                               f"replay: seq {job['seq']} of key {job['kid']} already started")
                continue
            dev.last[job["kid"]] = job["seq"]
            if isinstance(job.get("iat"), int):
                dev.tfloor = max(dev.tfloor, job["iat"])
            if job["id"] in canceled and job["type"] != "cancel":
                dev.remember_done(job["digest"], job["id"], job["seq"], None, 1)
                continue
            await self.publish_status(dev, client, _status(job["id"], job["seq"], "IN_PROGRESS", None, 1))
            status, detail = dev.run_job(job)
            dev.remember_done(job["digest"], job["id"], job["seq"], status, 1)
            dev.ran.append((job["id"], status, 1, detail))
            await self.publish_status(dev, client, _status(job["id"], job["seq"], status, detail, 1))

    async def _device_loop(self, dev: LoadDevice, stop: asyncio.Event, rng: random.Random) -> None:
        delay = rng.uniform(0, self.first_wake_s)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except asyncio.TimeoutError:
                pass
            async with self._sem:
                await self.wake(dev)
            delay = max(0.0, self.interval_s + rng.uniform(-self.jitter_s, self.jitter_s))

    async def run(self, duration_s: float | None = None, stop: asyncio.Event | None = None) -> LoadStats:
        """Wake every device on its schedule until `duration_s` passes or `stop` is set;
        wakes under way finish first."""
        stop = stop or asyncio.Event()
        self._sem = asyncio.Semaphore(self.concurrency)
        tasks = [asyncio.ensure_future(self._device_loop(d, stop, random.Random(self.rng.random())))
                 for d in self.devices if d.id not in self.asleep]
        try:
            if duration_s is not None:
                try:
                    await asyncio.wait_for(stop.wait(), duration_s)
                except asyncio.TimeoutError:
                    pass
            else:
                await stop.wait()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.stats

    async def wake_all(self) -> LoadStats:
        """One wake of every device (that ever wakes), `concurrency` at a time."""
        self._sem = asyncio.Semaphore(self.concurrency)

        async def one(d):
            async with self._sem:
                await self.wake(d)
        await asyncio.gather(*(one(d) for d in self.devices if d.id not in self.asleep))
        return self.stats


async def _wait(event: asyncio.Event, timeout: float) -> None:
    if timeout <= 0:
        return
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass


def device_ids(count: int, prefix: str) -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def provision_load_fleet(store, keyring, count: int, prefix: str = "load", groups: list[str] | None = None,
                         with_credentials: bool = False, root: str = TOPIC_ROOT) -> list[LoadDevice]:
    """Register `count` devices in the database (mpfleet.fleet.provision.register_devices,
    as `sim fleet` does) trusting the host's keys; their LoadDevices."""
    from mpfleet.fleet.provision import register_devices

    ids = device_ids(count, prefix)
    creds = register_devices(store, ids, "load", lambda d: list(groups or []), with_credentials)
    trusted = keyring.trusted_keys()
    return [LoadDevice(d, trusted, groups, creds.get(d), root) for d in ids]
