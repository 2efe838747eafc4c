"""A structure-aware fuzzer of the job path, on the real agent at the 128 KiB heap.

Each generated retained queue mixes valid signed jobs (exec jobs whose only side
effect is a line in /trace.txt, config, diag) with what an attacker holding broker
credentials, or a careless host, could put there: bad signatures, unknown and
impersonated kids, the same envelope twice, two payloads under one kid and seq,
hundreds of nested lists (in a payload, signed and unsigned, and in the queue
message itself), oversized envelopes, the wrong type in every field, truncation,
authentic envelopes for other devices with a high seq, config jobs reaching for
trusted_keys or exec_allowed, expired and not-yet-valid jobs, replays of earlier
jobs, and things that are not envelopes at all.

Every queue is run through wakes of a virtual board (real mosquitto, real
ingester) and checked with the shared invariant checker (tests/invariants.py),
and against an oracle that knows what each envelope is: every valid, targeted,
in-window job with a fresh seq ends SUCCEEDED or FAILED exactly once (one per
kid and seq), in ascending seq order, so the replay floor never blocks a
legitimate job; nothing else runs; security settings are not config.

Reproducible: queue i of a run with seed S is generated from Random(f"{S}:{i}");
the seed is in every assertion message. MPFLEET_FUZZ_SEED picks another seed,
MPFLEET_FUZZ_QUEUES overrides the count. Queues share devices (QUEUES_PER_DEVICE
queues per device lifetime) so that the full count is feasible in `make stress`.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import pytest
from agent_harness import make_device
from conftest import STRESS, stress_count
from invariants import (
    Run,
    check_crashes,
    check_erases,
    check_reachable,
    check_runs,
    check_samples,
    check_statuses,
    read_files,
    trace_code,
    watched_host,
)

from mpfleet.protocol.signing import SigningKey, b64url, b64url_decode

SEED = int(os.environ.get("MPFLEET_FUZZ_SEED", "20261201"))
# 1,000 whole-wake queues in `make stress` (about 1 to 2 s each); the 10,000 go
# through the job path in tests/e2e/test_promise_intake_fuzz.py, many per interpreter.
QUEUES = int(os.environ.get("MPFLEET_FUZZ_QUEUES", "0")) or stress_count(quick=24, full=1000)
# Reproduce a late violation without the queues before it: MPFLEET_FUZZ_FIRST starts at
# the first queue of the device it falls on.
FIRST = int(os.environ.get("MPFLEET_FUZZ_FIRST", "0"))
# Devices are reused for many queues (a new board costs about a second); fewer
# per device in `make test`, so that one queue that ruins a device (issue 12:
# a config job emptying trusted_keys) does not hide the other cases.
QUEUES_PER_DEVICE = 50 if STRESS else 8
MAX_WAKES_PER_QUEUE = 4
JOB_MAX_BYTES = 4096  # the device's default limits.job_max_bytes
# The device looks at queue messages of at most 12 KiB and at their first 32
# entries (agent/intake.py); the host sends at most 6 KiB (docs/dispatch.md).
QUEUE_MAX_BYTES = 12288
QUEUE_MAX_ENTRIES = 32
# Filesystem erases per wake, whatever the queue holds: a base for the wake's own
# writes, plus some for each job that legitimately runs (a job writes the job
# state when it starts and ends; littlefs erases a block for each new file
# version and when a metadata pair compacts). Garbage must not add to it (issue
# 12: ~40 for 20 envelopes from an unknown key). The worst seen per number of
# legitimate jobs is printed with the summary and written in docs/benchmarks.md.
ERASE_BASE = 12
ERASE_PER_JOB = 3


@pytest.fixture(scope="module")
def world(mosquitto, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    with watched_host(mosquitto, root, "fuzz") as (host, log):
        yield mosquitto, host, log, root


# What the oracle expects of an envelope.
RUN = "run"  # valid, targeted, in window, fresh seq: ends SUCCEEDED or FAILED exactly once (per kid+seq)
NEVER = "never"  # must not run: no running status, no trace line
REJECT = "reject"  # authentic but forbidden (security settings): must end REJECTED, not applied
FAIL_OK = "fail-ok"  # authentic, well-formed, bad content: FAILED or REJECTED, never SUCCEEDED
ANY = "any"  # may run or not, at most once


@dataclass
class Env:
    text: object  # what goes into the queue (usually an envelope string)
    expect: str
    job_id: str | None = None
    kid: str | None = None
    seq: int | None = None
    what: str = ""
    signed: bool = False  # validly signed by a trusted key and targeting this device
    runnable: bool = False  # may appear in /trace.txt


@dataclass
class Device:
    """One device lifetime and the host's model of it."""

    vb: object
    run: Run
    device_id: str
    keys: list  # trusted: [main, second, junk]
    trusted: dict
    next_seq: dict = field(default_factory=dict)
    ids: int = 0
    envs: dict = field(default_factory=dict)  # job id -> Env, every envelope with an id
    old: list = field(default_factory=list)  # (Env, payload) that ran: material for replays
    floor: dict = field(default_factory=dict)  # kid -> highest seq that ended SUCCEEDED/FAILED
    config: dict = field(default_factory=dict)  # expected values of what legit config jobs set
    runnable: dict = field(default_factory=dict)
    signed: set = field(default_factory=set)
    reported: set = field(default_factory=set)  # violations of lasting state, reported once


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


class Gen:
    """Generates one queue for a device from a seeded Random."""

    STRANGER = SigningKey.generate()

    def __init__(self, rng: random.Random, dev: Device):
        self.rng = rng
        self.dev = dev
        self.clock = int(dev.vb.clock_s)
        self.main, self.second, self.junk = dev.keys

    def new_id(self, tag: str) -> str:
        self.dev.ids += 1
        return f"{tag}-{self.dev.ids}"

    def seq(self, key) -> int:
        n = self.dev.next_seq.get(key.kid, 1)
        self.dev.next_seq[key.kid] = n + 1
        return n

    def payload(self, type_: str, job_id: str, seq, params=None, targets=None, **extra) -> dict:
        p = {"id": job_id, "seq": seq, "type": type_, "params": params if params is not None else {},
             "targets": targets if targets is not None else [self.dev.device_id], "iat": self.clock - 120}
        p.update(extra)
        return p

    def legit(self, key=None) -> tuple[Env, dict]:
        key = key or self.rng.choice([self.main, self.main, self.second])
        kind = self.rng.choice(["exec", "exec", "config", "diag"])
        job_id = self.new_id(kind)
        if kind == "exec":
            params = {"code": trace_code(job_id)}
        elif kind == "config":
            name = self.rng.choice(["upload_watermark", "sample_interval_s"])
            value = self.rng.randint(200, 900) if name == "upload_watermark" else self.rng.randint(55, 70)
            params = {"set": {name: value}}
        else:
            params = {}
        extra = {}
        if self.rng.random() < 0.3:
            extra["exp"] = self.clock + 30 * 86400
        if self.rng.random() < 0.2:
            extra["nbf"] = self.clock - 3600
        seq = self.seq(key)
        p = self.payload(kind, job_id, seq, params, **extra)
        env = Env(key.sign(p), RUN, job_id, key.kid, seq, f"valid {kind}", signed=True, runnable=True)
        return env, p

    def exec_never(self, what: str, key=None, **kw) -> tuple[dict, str]:
        job_id = self.new_id("x")
        p = self.payload("exec", job_id, kw.pop("seq", None) or self.seq(key or self.main),
                         {"code": trace_code(job_id)}, **kw)
        return p, job_id

    def queue(self) -> tuple[list[Env], str, bool]:
        """(envelopes, the queue message, opaque): opaque when the message itself
        carries nesting that a bounded parser may refuse as a whole."""
        rng = self.rng
        envs: list[Env] = []
        legit = [self.legit() for _ in range(rng.randint(0, 3))]
        envs += [e for e, _ in legit]
        for _ in range(rng.randint(1, 6)):
            envs += self.hostile(legit)
        # Another device's authentic high-seq envelope first, then this device's
        # lower-seq job must still run.
        if rng.random() < 0.25:
            p, job_id = self.exec_never("other device", seq=self.dev.next_seq.get(self.main.kid, 1) + 50,
                                        targets=[rng.choice(["someone-else", "other-group"])])
            envs.insert(0, Env(self.main.sign(p), NEVER, job_id, self.main.kid, p["seq"], "other device's job"))
            env, _ = self.legit(self.main)
            envs.append(env)
        rng.shuffle(envs)
        opaque = False
        parts = [json.dumps(e.text) for e in envs]
        r = rng.random()
        if r < 0.03:
            opaque = True
            parts.insert(rng.randrange(len(parts) + 1), _nested(rng.choice([300, 2000, 6000])))
        text = "[" + ",".join(parts) + "]"
        if r > 0.97:
            opaque = True
            text = _nested(rng.choice([600, 5000, 6800]))  # the message itself: no jobs at all
            envs = []
        elif 0.94 < r <= 0.97:
            opaque = True
            text = text[: rng.randrange(1, len(text))]  # a truncated queue message
        while (len(text) > QUEUE_MAX_BYTES or len(envs) > QUEUE_MAX_ENTRIES) and envs:
            envs.pop()
            text = "[" + ",".join(json.dumps(e.text) for e in envs) + "]"
        return envs, text, opaque

    def hostile(self, legit: list) -> list[Env]:
        rng = self.rng
        main = self.main
        # Nesting stops today's agent for the rest of its queue: a lower weight lets
        # the other cases show in the same slice.
        pick = rng.choices(range(17), weights=[1, 1, 1.5, 1.5, 0.4] + [1] * 12)[0]
        if pick == 0:  # bad signature
            p, job_id = self.exec_never("bad sig")
            env = main.sign(p)
            head, sig = env.rsplit(".", 1)
            raw = bytearray(b64url_decode(sig))
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            return [Env(head + "." + b64url(bytes(raw)), NEVER, job_id, what="bad signature")]
        if pick == 1:  # unknown kid, and a trusted kid claimed by another key
            p, job_id = self.exec_never("stranger")
            forged = self.STRANGER.sign(p)
            if rng.random() < 0.5:
                parts = forged.split(".")
                parts[1] = main.kid
                forged = ".".join(parts)
                return [Env(forged, NEVER, job_id, what="trusted kid, another key's signature")]
            return [Env(forged, NEVER, job_id, what="unknown kid")]
        if pick == 2 and legit:  # the same envelope twice
            env = rng.choice(legit)[0]
            return [Env(env.text, RUN, env.job_id, env.kid, env.seq, "duplicate envelope", True, True)]
        if pick == 3 and legit:  # another payload under the same kid and seq
            first, p = rng.choice(legit)
            key = main if first.kid == main.kid else self.second
            job_id = self.new_id("twin")
            q = self.payload("exec", job_id, p["seq"], {"code": trace_code(job_id)})
            return [Env(key.sign(q), RUN, job_id, first.kid, first.seq, "same kid+seq, other payload", True, True)]
        if pick == 4:  # deep nesting inside a payload, signed or not
            depth = rng.choice([200, 300, 600, 1000])
            job_id = self.new_id("deep")
            body = ('{"id":"%s","seq":%d,"type":"exec","targets":["%s"],"params":{"code":%s,"x":%s}}'
                    % (job_id, self.seq(main), self.dev.device_id, json.dumps(trace_code(job_id)), _nested(depth)))
            signed = f"mpf1.{main.kid}.{b64url(body.encode())}"
            if rng.random() < 0.5:
                text = signed + "." + b64url(main.private.sign(signed.encode()))
                # Authentic, but deeper than a bounded parser takes: refused or run, it
                # must not crash the agent or stop the queue.
                return [Env(text, ANY, job_id, main.kid, None, f"signed payload nested {depth} deep", True, True)]
            kid = rng.choice([self.STRANGER.kid, main.kid])
            text = f"mpf1.{kid}.{b64url(body.encode())}." + b64url(bytes(64))
            return [Env(text, NEVER, job_id, what=f"unsigned payload nested {depth} deep")]
        if pick == 5:  # oversized
            p, job_id = self.exec_never("oversized")
            p["params"]["pad"] = "x" * rng.randint(JOB_MAX_BYTES, JOB_MAX_BYTES + 1500)
            return [Env(main.sign(p), NEVER, job_id, what="oversized envelope", signed=True)]
        if pick == 6:  # wrong types in envelope fields: authentic, must not run
            job_id = self.new_id("type")
            seq = self.seq(main)
            p = self.payload("exec", job_id, seq, {"code": trace_code(job_id)})
            field_, value = rng.choice([
                ("seq", str(seq)), ("seq", float(seq)), ("seq", -seq), ("seq", 0), ("seq", True), ("seq", None),
                ("targets", self.dev.device_id), ("targets", {self.dev.device_id: 1}), ("targets", None),
                ("params", [trace_code(job_id)]), ("params", "code"), ("id", 5), ("id", ""), ("id", "i" * 65),
                ("type", 5), ("type", "selfdestruct"), ("type", ["exec"]), ("exp", "never"), ("nbf", 1.5),
                ("iat", "now"), ("timeout", -5), ("timeout", "x"),
            ])
            if value is None:
                p.pop(field_)
            else:
                p[field_] = value
            return [Env(main.sign(p), NEVER, job_id, what=f"{field_} = {json.dumps(value)}", signed=True)]
        if pick == 7:  # huge seq on a key used for nothing else
            job_id = self.new_id("huge")
            p = self.payload("exec", job_id, rng.choice([2**31, 2**53 + 1, 2**64, 10**30]),
                             {"code": trace_code(job_id)})
            return [Env(self.junk.sign(p), ANY, job_id, self.junk.kid, p["seq"], "huge seq", True, True)]
        if pick == 8:  # config content of the wrong type: authentic, must not apply
            job_id = self.new_id("badcfg")
            params = rng.choice([
                {"unset": [5]}, {"unset": "wifi"}, {"unset": [None]}, {"set": []}, {"set": {"wifi.ssid": 5}},
                {"set": {"sample_interval_s": "60"}}, {"set": {"upload_watermark": -1}},
                {"set": {"sensors": [{"kind": "adc", "name": "a", "pin": "x"}]}}, {"set": {5: 1}},
                {"set": {"broker": 7}}, {"set": {"wifi": "lab"}}, {"set": {"limits.job_max_bytes": 10**9}},
            ])
            seq = self.seq(main)
            try:
                text = main.sign(self.payload("config", job_id, seq, params))
            except TypeError:
                text = main.sign(self.payload("config", job_id, seq, {"set": {"5": 1}}))
            return [Env(text, FAIL_OK, job_id, main.kid, seq, f"config {json.dumps(params)[:60]}", True)]
        if pick == 9:  # security settings through config: must be REJECTED
            job_id = self.new_id("sec")
            params = rng.choice([
                {"set": {"exec_allowed": False}}, {"set": {"exec_allowed": True}}, {"unset": ["exec_allowed"]},
                {"set": {"trusted_keys": {}}}, {"unset": ["trusted_keys"]},
                {"set": {f"trusted_keys.{self.STRANGER.kid}": self.STRANGER.public_b64}},
                {"set": {"trusted_keys": {self.STRANGER.kid: self.STRANGER.public_b64}}},
                {"unset": [f"trusted_keys.{main.kid}"]},
            ])
            seq = self.seq(main)
            return [Env(main.sign(self.payload("config", job_id, seq, params)), REJECT, job_id, main.kid, seq,
                        f"config {json.dumps(params)[:60]}", True)]
        if pick == 10:  # outside its time window
            if rng.random() < 0.5:
                p, job_id = self.exec_never("expired", exp=self.clock - rng.randint(60, 86400 * 30))
                what = "expired"
            else:
                p, job_id = self.exec_never("not yet", nbf=self.clock + rng.randint(86400, 86400 * 30))
                what = "not yet valid"
            return [Env(main.sign(p), NEVER, job_id, what=what, signed=True)]
        if pick == 11:  # truncated
            p, job_id = self.exec_never("truncated")
            env = main.sign(p)
            return [Env(env[: rng.randrange(1, len(env) - 1)], NEVER, job_id, what="truncated envelope")]
        if pick == 12 and self.dev.old:  # a replay of a job that ran
            env, _ = rng.choice(self.dev.old)
            return [Env(env.text, ANY, env.job_id, env.kid, env.seq, "replay of a finished job", True, True)]
        if pick == 13 and self.dev.old:  # an old seq with a new payload
            env, p = rng.choice(self.dev.old)
            job_id = self.new_id("stale")
            key = main if env.kid == main.kid else self.second
            q = self.payload("exec", job_id, p["seq"], {"code": trace_code(job_id)})
            return [Env(key.sign(q), NEVER, job_id, env.kid, env.seq, "stale seq, new payload", signed=True)]
        if pick == 14:  # not envelopes
            return [Env(rng.choice([None, 5, 1.5, True, [], {}, "", "mpf1", "mpf1...", "mpf1.a.b.c",
                                    "." * rng.randint(1, 9), "\x00\xff"]), NEVER, what="not an envelope")]
        if pick == 15:  # a part of an envelope not base64url
            p, job_id = self.exec_never("b64")
            head, _ = main.sign(p).rsplit(".", 1)
            return [Env(head + ".!!not*base64!!", NEVER, job_id, what="signature not base64url")]
        # A legit job of a kind whose queue slot is otherwise wasted.
        env, p = self.legit()
        legit.append((env, p))
        return [env]


def _again(status: dict) -> bool:
    """A final status the device sends again because the host still lists the job."""
    detail = status.get("detail")
    return isinstance(detail, dict) and detail.get("reported_again") is True


class Fuzz:
    def __init__(self, world, seed: int):
        self.broker, self.host, self.log, self.root = world
        self.seed = seed
        self.devices = 0
        self.wakes = 0
        self.envelopes = 0
        self.worst_erases: dict[int, int] = {}  # legitimate jobs in a queue -> most erases in one of its wakes

    def new_device(self, index: int) -> Device:
        keys = [SigningKey.generate() for _ in range(3)]
        trusted = {k.kid: k.public_b64 for k in keys}
        device_id = f"fz-{self.seed}-{index}"
        vb = make_device(self.root / device_id, self.broker.port, device_id=device_id, trusted_keys=trusted,
                         exec_allowed=True, upload_every_wakes=1, groups=["pumps"])
        self.devices += 1
        return Device(vb, Run(vb), device_id, keys, trusted)

    def where(self, i: int, dev: Device) -> str:
        return f"seed {self.seed}, queue {i} (MPFLEET_FUZZ_SEED={self.seed}), device {dev.device_id}"

    def plan(self, i: int, dev: Device):
        """Queue i for `dev`, entered into the device's model: (rng, envelopes, the
        queue message, opaque, must: {(kid, seq): ids of which exactly one must end})."""
        rng = random.Random(f"{self.seed}:{i}")
        gen = Gen(rng, dev)
        floor = dict(dev.floor)  # seqs at or below these have run (the model's replay floor per kid)
        envs, text, opaque = gen.queue()
        self.envelopes += len(envs)
        for e in envs:
            if e.job_id is not None:
                dev.envs.setdefault(e.job_id, e)
            if e.signed and e.job_id is not None:
                dev.signed.add(e.job_id)
            if e.runnable:
                dev.runnable[e.job_id] = (e.kid, e.seq)
        must = {}
        for e in envs:
            if e.expect == RUN and not opaque and e.seq > floor.get(e.kid, 0):
                must.setdefault((e.kid, e.seq), set()).add(e.job_id)
        return rng, envs, text, opaque, must

    def one(self, i: int, dev: Device) -> list[str]:
        rng, envs, text, opaque, must = self.plan(i, dev)
        owed = set() if opaque else {e.job_id for e in envs if e.expect == REJECT and e.job_id}
        self.log.publish_queue(dev.device_id, text)
        before = len(self.log.statuses_of(dev.device_id))
        n_boots = len(dev.run.boots)
        queue_clock = dev.vb.clock_s
        wakes = 0
        while wakes < MAX_WAKES_PER_QUEUE:
            t0 = int(dev.vb.clock_s)
            dev.run.boot()
            wakes += 1
            self.log.flush()
            done = set(self.log.final(dev.device_id))
            # Stop once everything owed an outcome has one (a wake that ran out of its
            # time budget, as on a loaded machine, leaves the rest to the next wake).
            if all(ids & done for ids in must.values()) and owed <= done and (wakes > 1 or rng.random() < 0.7):
                break
        self.wakes += wakes
        out = []
        connected = any(isinstance(s, dict) and s.get("time", 0) >= t0 for s in self.log.states_of(dev.device_id))
        if not connected:
            out += check_reachable(dev.run, self.log, self.host.store, dev.device_id, max_wakes=4)
        files = read_files(dev.vb, ["/trace.txt", "/last_crash.txt", "/config.json"])
        statuses = self.log.statuses_of(dev.device_id)
        out += check_runs(files["/trace.txt"], dev.runnable)
        out += check_statuses(statuses, dev.signed)
        # This queue's boots, and its samples (those taken from the queue's first boot on).
        recent = Run(dev.vb, since_clock=queue_clock, boots=dev.run.boots[n_boots:])
        lasting = check_crashes(Run(dev.vb, boots=[]), files["/last_crash.txt"])
        lasting += check_samples(recent, self.host.store, dev.device_id)
        out += [v for v in lasting if v not in dev.reported]
        dev.reported.update(lasting)
        out += check_crashes(recent, None)
        # The jobs that ran: those owed a run, and any other validly signed job that
        # legitimately ran (one the plan did not owe an outcome, e.g. in a queue
        # message the device may refuse whole).
        ran = {s.get("job") for s in statuses[before:] if isinstance(s, dict) and not _again(s)
               and s.get("status") in ("SUCCEEDED", "FAILED") and s.get("job") in dev.signed}
        jobs = max(len(must), len(ran))
        out += check_erases(recent, ERASE_BASE + ERASE_PER_JOB * jobs)
        worst = max((b.vfs_erases for b in recent.boots), default=0)
        self.worst_erases[jobs] = max(self.worst_erases.get(jobs, 0), worst)
        out += self.oracle(dev, envs, must, statuses[before:], statuses, files["/config.json"], opaque)
        self.learn(dev, envs, statuses)
        return out

    def learn(self, dev: Device, envs, statuses) -> None:
        """After a queue: the model's replay floor, and material for replays."""
        ran = {s.get("job") for s in statuses if isinstance(s, dict) and s.get("status") in ("SUCCEEDED", "FAILED")}
        junk = dev.keys[2].kid  # the huge-seq key: its floor is not modelled
        for e in envs:
            if e.signed and e.job_id in ran and isinstance(e.seq, int) and e.kid != junk:
                dev.floor[e.kid] = max(dev.floor.get(e.kid, 0), e.seq)
                if e.expect == RUN:
                    dev.old.append((e, json.loads(b64url_decode(e.text.split(".")[2]))))
        dev.old = dev.old[-20:]

    def oracle(self, dev: Device, envs, must, new_statuses, statuses, config_raw, opaque=False) -> list[str]:
        """What must hold after one queue. `opaque`: the queue message itself was
        malformed (truncated, nested), so the device may refuse it whole and
        nothing in it is owed an outcome."""
        out = []
        by_id: dict[str, list[dict]] = {}
        for s in statuses:
            if isinstance(s, dict) and not _again(s):
                by_id.setdefault(str(s.get("job")), []).append(s)
        # A finished job still in the queue is reported again: only ever what it
        # ended as, never as anything new.
        for s in statuses:
            if isinstance(s, dict) and _again(s):
                first = [(f.get("status"), f.get("seq"), f.get("attempt")) for f in by_id.get(str(s.get("job")), [])
                         if f.get("status") in ("SUCCEEDED", "FAILED", "REJECTED")]
                if (s.get("status"), s.get("seq"), s.get("attempt")) not in first:
                    out.append(f"oracle: {s.get('job')!r} reported again as {s.get('status')} (seq {s.get('seq')}), "
                               f"but it ended {first or 'nowhere'}")
        new_statuses = [s for s in new_statuses if not (isinstance(s, dict) and _again(s))]
        order = []
        for (_kid, seq), ids in must.items():
            ran = [j for j in ids if any(s.get("status") in ("SUCCEEDED", "FAILED") for s in by_id.get(j, []))]
            if len(ran) != 1:
                detail = {j: [s.get("status") + ":" + str(s.get("detail"))[:60] for s in by_id.get(j, [])]
                          for j in sorted(ids)}
                out.append(f"oracle: valid fresh job(s) {sorted(ids)} (seq {seq}) ended SUCCEEDED/FAILED "
                           f"{len(ran)} times, not once: {detail}")
        first_final = {}
        for idx, s in enumerate(new_statuses):
            if isinstance(s, dict) and s.get("status") in ("SUCCEEDED", "FAILED"):
                first_final.setdefault(s.get("job"), idx)
        for (kid, seq), ids in must.items():
            for j in ids:
                if j in first_final:
                    order.append((first_final[j], kid, seq, j))
        order.sort()
        for kid in {o[1] for o in order}:
            seqs = [o[2] for o in order if o[1] == kid]
            if seqs != sorted(seqs):
                out.append(f"oracle: jobs of key {kid} ended in seq order {seqs}, not ascending")
        for e in envs:
            if e.job_id is None:
                continue
            got = {s.get("status") for s in by_id.get(e.job_id, [])}
            if e.expect == NEVER and got & {"SUCCEEDED", "FAILED", "IN_PROGRESS"}:
                out.append(f"oracle: {e.what} {e.job_id!r} must not run, reported {sorted(got)}")
            if e.expect == FAIL_OK and "SUCCEEDED" in got:
                out.append(f"oracle: {e.what} ({e.job_id!r}) is invalid and must not succeed")
            if e.expect == REJECT and (got & {"SUCCEEDED", "FAILED", "IN_PROGRESS"}
                                       or ("REJECTED" not in got and not opaque)):
                out.append(f"security: {e.what} ({e.job_id!r}) must be REJECTED, reported {sorted(got) or 'nothing'}")
        cfg = json.loads(config_raw or b"{}")
        if cfg.get("exec_allowed") is not True:
            out.append(f"security: exec_allowed is {cfg.get('exec_allowed')!r} after the queue (set only over USB)")
        if cfg.get("trusted_keys") != dev.trusted:
            out.append(f"security: trusted_keys changed by the queue: {json.dumps(cfg.get('trusted_keys'))[:120]}")
        wifi = cfg.get("wifi")
        ssid = wifi.get("ssid") if isinstance(wifi, dict) else wifi
        if ssid != "lab":
            out.append(f"config: wifi is {json.dumps(wifi)[:80]}, with ssid {ssid!r}: no valid job changed it")
        # The value of a legit config key follows the last of its jobs that succeeded.
        for e in sorted((e for e in envs if e.expect == RUN and e.job_id and e.job_id.startswith("config")),
                        key=lambda e: e.seq):
            if any(s.get("status") == "SUCCEEDED" for s in by_id.get(e.job_id, [])):
                p = json.loads(b64url_decode(e.text.split(".")[2]))
                dev.config.update(p["params"]["set"])
        for name, value in dev.config.items():
            if cfg.get(name) != value:
                out.append(f"config: {name} is {cfg.get(name)!r}, the last config job that succeeded set {value!r}")
        return out


def test_generated_queues_keep_every_promise(world):
    fuzz = Fuzz(world, SEED)
    started = time.monotonic()
    failures = []
    dev = None
    first = FIRST - FIRST % QUEUES_PER_DEVICE  # a device's queues depend on its earlier ones: from its first
    for i in range(first, QUEUES):
        if i % QUEUES_PER_DEVICE == 0:
            if dev is not None:  # the end of a lifetime: still reachable
                for v in check_reachable(dev.run, fuzz.log, fuzz.host.store, dev.device_id, max_wakes=4):
                    failures.append((i - 1, f"{fuzz.where(i - 1, dev)}: {v}"))
            dev = fuzz.new_device(i // QUEUES_PER_DEVICE)
        for v in fuzz.one(i, dev):
            failures.append((i, f"{fuzz.where(i, dev)}: {v}"))
        if len({q for q, _ in failures}) >= 100:
            break  # enough to act on; the seed reproduces the rest
    if dev is not None:
        for v in check_reachable(dev.run, fuzz.log, fuzz.host.store, dev.device_id, max_wakes=4):
            failures.append((QUEUES, f"{fuzz.where(QUEUES, dev)}: {v}"))
    elapsed = time.monotonic() - started
    summary = {"seed": SEED, "queues": i + 1, "devices": fuzz.devices, "wakes": fuzz.wakes,
               "envelopes": fuzz.envelopes, "seconds": round(elapsed, 1), "violations": len(failures),
               "worst_erases_by_jobs": dict(sorted(fuzz.worst_erases.items())), "stress": STRESS}
    print("fuzz", json.dumps(summary))
    if os.environ.get("MPFLEET_SWEEP_LOG"):
        with open(os.environ["MPFLEET_SWEEP_LOG"], "a") as f:
            f.write(json.dumps({"fuzz": summary}) + "\n")
    kinds: dict[str, list[str]] = {}
    for _, v in failures:
        kinds.setdefault(category(v), []).append(v)
    lines = [f"[{len(vs)}x] {vs[0]}" for vs in sorted(kinds.values(), key=len, reverse=True)]
    assert not failures, (f"{len(failures)} violations in {len({q for q, _ in failures})} queues (seed {SEED}); "
                          f"one of each kind:\n" + "\n".join(lines[:40]))


def category(violation: str) -> str:
    """A violation without its place, ids and numbers: what kind of violation it is."""
    import re

    text = violation.split(": ", 1)[-1]
    text = re.sub(r"\{.*", "", text)
    return re.sub(r"'[^']*'|\[[^]]*\]|\d+", "#", text)[:90]
