"""The dispatcher's rollout engine: jobs, per-device executions, stages, rates, retries.

Which room: host library, driven by `serve` (MQTT is not touched here). The engine is
pure bookkeeping over the Store's SQLite connection plus the KeyRing (signing) and the
Registry (targeting); everything it decides is persisted before it returns, so a new
`RolloutEngine` on the same database continues a rollout exactly where it stopped.

Model (docs/protocol.md, "Signed jobs"):

- A **job** is what the operator asked for: a type, params, a targets spec and rollout
  options. Its status is ACTIVE, COMPLETED, ABORTED or CANCELED.
- An **execution** is one attempt of a job on one device: its own envelope with its own
  seq (the device rejects a seq at or below the last one it ran, so a retry is a NEW
  envelope with a NEW seq). Statuses: QUEUED, IN_PROGRESS (device), SUCCEEDED, FAILED,
  REJECTED (device), TIMED_OUT, CANCELED, REMOVED (host). Everything but QUEUED and
  IN_PROGRESS is final, and a final status is never overwritten.
- Device statuses arrive at least once; they are matched to an execution by
  (job id, device, seq): the seq names the attempt, so a duplicate, or a late status of
  an older attempt, changes nothing. (The status's own `attempt` field is the device's
  resume counter within one execution; it is kept as `device_attempt`.)

Rollout rules, applied by `tick()`:

- targets are resolved against the registry at the job's first tick (at or after
  `start_at`) and frozen, unless `continuous`: then they are re-resolved every tick,
  devices that join get the job, devices that leave lose their QUEUED execution;
- target devices are ordered by SHA-256(job id, device id): stage k covers the first
  ceil(stages[k] * N) of them, so the canary set is stable across restarts;
- at most `rate_per_min` devices are started (first attempts queued) in any 60 s;
  retries of an already started device are not rate limited;
- the stage advances when every device up to it has a final latest execution and, of the
  stage's own devices, at least `success_threshold` SUCCEEDED; a finished stage below
  the threshold aborts the job;
- the job aborts when at least `abort_min_finished` executions finished and
  (FAILED + REJECTED + TIMED_OUT) / finished >= `abort_threshold` (every execution
  attempt counts); then QUEUED executions become REMOVED;
- an IN_PROGRESS execution older than `timeout_s` becomes TIMED_OUT; FAILED and TIMED_OUT
  are retried (a new attempt) while fewer than `retries` retries were made; REJECTED
  never is;
- the job COMPLETES when every target device is final (a continuous job stays ACTIVE
  until `end_at`); past `end_at` QUEUED executions become REMOVED and the job completes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mpfleet.errors import MpfleetError
from mpfleet.keys import (JOB_MAX_BYTES_DEFAULT, MAX_TRUSTED_KEYS, KeyRing, KeyringError, check_config_params,
                          check_keys_params, envelope_bytes)
from mpfleet.registry import QueryError, Registry, parse_query
from mpfleet.signing import JOB_TYPES, KID_RE
from mpfleet.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    params_json  TEXT NOT NULL,
    targets_json TEXT NOT NULL,
    options_json TEXT NOT NULL,
    status       TEXT NOT NULL,
    stage        INTEGER NOT NULL DEFAULT 0,
    resolved     REAL,
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    finished     REAL,
    reason       TEXT
);
CREATE TABLE IF NOT EXISTS job_targets (
    job         TEXT NOT NULL,
    device      TEXT NOT NULL,
    rank        TEXT NOT NULL,
    added       REAL NOT NULL,
    left_at     REAL,
    PRIMARY KEY (job, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS executions (
    id             INTEGER PRIMARY KEY,
    job            TEXT NOT NULL,
    device         TEXT NOT NULL,
    attempt        INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    kid            TEXT NOT NULL,
    envelope       TEXT NOT NULL,
    status         TEXT NOT NULL,
    stage          INTEGER NOT NULL,
    queued         REAL NOT NULL,
    started        REAL,
    finished       REAL,
    updated        REAL NOT NULL,
    device_attempt INTEGER,
    detail_json    TEXT,
    note           TEXT,
    progress_json  TEXT,
    UNIQUE (job, device, attempt)
);
CREATE INDEX IF NOT EXISTS executions_by_device ON executions (device, status);
CREATE INDEX IF NOT EXISTS executions_by_status ON executions (job, status);
CREATE TABLE IF NOT EXISTS job_controls (
    job         TEXT NOT NULL,
    device      TEXT NOT NULL,
    control_id  TEXT NOT NULL,
    type        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    envelope    TEXT NOT NULL,
    status      TEXT NOT NULL,
    created     REAL NOT NULL,
    finished    REAL,
    detail_json TEXT,
    PRIMARY KEY (job, device, type)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_rejects (
    device      TEXT NOT NULL,
    ref         TEXT NOT NULL,
    detail_json TEXT,
    at          REAL NOT NULL,
    PRIMARY KEY (device, ref)
) WITHOUT ROWID;
"""

QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
TIMED_OUT, CANCELED, REMOVED = "TIMED_OUT", "CANCELED", "REMOVED"
EXECUTION_STATES = (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED, REMOVED)
PENDING = (QUEUED, IN_PROGRESS)
FAILURES = (FAILED, REJECTED, TIMED_OUT)
RETRIABLE = (FAILED, TIMED_OUT)
NETWORK_JOBS = ("ota", "app", "reboot", "upload")  # the agent refuses them over USB
QUEUE_MAX_BYTES = 6144  # the retained `jobs` payload of one device, bytes (docs/dispatch.md)
ENVELOPE_MAX_BYTES = QUEUE_MAX_BYTES - 4  # the largest envelope a queue can carry: '["' + envelope + '"]'
LONGEST_DEVICE_ID = "x" * 64  # mqttlink.DEVICE_ID_RE: a job's targets before any device is known
COUNTED = (SUCCEEDED, *FAILURES)  # the executions the abort fraction is taken over
DEVICE_STATES = (IN_PROGRESS, SUCCEEDED, FAILED, REJECTED)
FINAL_STATES = (SUCCEEDED, FAILED, REJECTED)  # what a device reports last

ACTIVE, COMPLETED, ABORTED = "ACTIVE", "COMPLETED", "ABORTED"
JOB_STATES = (ACTIVE, COMPLETED, ABORTED, CANCELED)

JOB_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,48}\Z")  # leaves room for "cancel-" in a 64-char id

DEFAULTS = {
    "rate_per_min": None,
    "stages": [1.0],
    "success_threshold": 1.0,
    "abort_threshold": None,
    "abort_min_finished": 1,
    "timeout_s": None,
    "retries": 0,
    "start_at": None,
    "end_at": None,
    "continuous": False,
    "sign_kid": None,    # sign with this key while it is active (default: KeyRing.fleet_key())
    "rotation": None,    # {"old": kid, "new": kid}: a key rotation (create_rotation_job)
}


class RolloutError(MpfleetError):
    """A job could not be created or changed; the message names the bad option."""


@dataclass
class Changes:
    """What one `tick()` did. `devices`: the devices whose retained `jobs` queue changed."""

    devices: set[str] = field(default_factory=set)
    queued: list[tuple[str, str, int]] = field(default_factory=list)     # (job, device, attempt)
    timed_out: list[tuple[str, str]] = field(default_factory=list)
    removed: list[tuple[str, str]] = field(default_factory=list)
    advanced: list[tuple[str, int]] = field(default_factory=list)        # (job, new stage)
    completed: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.advanced or self.completed or self.aborted)


# ---------------------------------------------------------------- validation

def _number(name: str, value, lo: float | None = None, hi: float | None = None, integer: bool = False,
            lo_open: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RolloutError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise RolloutError(f"{name} must be finite, not {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RolloutError(f"{name} must be {'>' if lo_open else '>='} {lo}, not {value!r}")
    if hi is not None and value > hi:
        raise RolloutError(f"{name} must be <= {hi}, not {value!r}")
    return value


def validate_options(options: dict) -> dict:
    """The rollout options with defaults filled in; RolloutError names the first bad one."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise RolloutError(f"unknown rollout option {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if o["rate_per_min"] is not None:
        _number("rate_per_min", o["rate_per_min"], 1, integer=True)
    stages = o["stages"]
    if not isinstance(stages, (list, tuple)) or not stages:
        raise RolloutError(f"stages must be a non-empty list of fractions such as [0.05, 0.25, 1.0], not {stages!r}")
    for i, f in enumerate(stages):
        _number(f"stages[{i}]", f, 0, 1, lo_open=True)
        if i and f <= stages[i - 1]:
            raise RolloutError(f"stages must increase: stages[{i}] = {f} is not above {stages[i - 1]}")
    if stages[-1] != 1:
        raise RolloutError(f"stages must end at 1.0 (the whole target set), not {stages[-1]}")
    o["stages"] = [float(f) for f in stages]
    _number("success_threshold", o["success_threshold"], 0, 1)
    if o["abort_threshold"] is not None:
        _number("abort_threshold", o["abort_threshold"], 0, 1, lo_open=True)
    _number("abort_min_finished", o["abort_min_finished"], 1, integer=True)
    if o["timeout_s"] is not None:
        _number("timeout_s", o["timeout_s"], 0, lo_open=True)
    _number("retries", o["retries"], 0, 100, integer=True)
    for name in ("start_at", "end_at"):
        if o[name] is not None:
            _number(name, o[name], 0)
    if o["start_at"] is not None and o["end_at"] is not None and o["end_at"] <= o["start_at"]:
        raise RolloutError(f"end_at ({o['end_at']}) must be after start_at ({o['start_at']})")
    if not isinstance(o["continuous"], bool):
        raise RolloutError(f"continuous must be true or false, not {o['continuous']!r}")
    if o["sign_kid"] is not None and not (isinstance(o["sign_kid"], str) and KID_RE.match(o["sign_kid"])):
        raise RolloutError(f"sign_kid must be a key id (16 hex digits), not {o['sign_kid']!r}")
    rot = o["rotation"]
    if rot is not None and not (isinstance(rot, dict) and set(rot) == {"old", "new"}
                                and all(isinstance(v, str) and KID_RE.match(v) for v in rot.values())):
        raise RolloutError(f"rotation must be {{'old': kid, 'new': kid}}, not {rot!r}")
    return o


def _rank(job_id: str, device: str) -> str:
    return hashlib.sha256(f"{job_id}\0{device}".encode()).hexdigest()


def _allowed(stages: list[float], stage: int, n: int) -> int:
    """How many of the n ranked targets stages 0..stage cover (at least one)."""
    if n <= 0 or stage < 0:
        return 0
    return min(n, max(1, math.ceil(stages[stage] * n - 1e-9)))


def encode_queue(envelopes: list[str]) -> str:
    """A queue as `serve` publishes it on the retained `jobs` topic (compact JSON: its
    length is what _queues() caps at QUEUE_MAX_BYTES)."""
    return json.dumps(envelopes, separators=(",", ":"))


def _loads(text):
    return json.loads(text) if text is not None else None


# ---------------------------------------------------------------- the engine

class RolloutEngine:
    """Rollouts over one Store; `tick()` and `on_status()` are its only moving parts."""

    def __init__(self, store: Store, keyring: KeyRing, registry: Registry,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.keyring = keyring
        self.registry = registry
        self.clock = clock
        self.db = store.db
        self.db.executescript(SCHEMA)
        if "progress_json" not in {r[1] for r in self.db.execute("PRAGMA table_info(executions)")}:
            # databases from before update jobs reported download progress
            self.db.execute("ALTER TABLE executions ADD COLUMN progress_json TEXT")

    # ------------------------------------------------------------ jobs
    def create_job(self, type: str, params: dict | None, targets, job_id: str | None = None,
                   **options) -> str:
        """Record a new ACTIVE job; nothing is queued before the next `tick()`.

        `targets`: "*", a dict ``{"ids": [...], "groups": [...], "query": "fw<v1.25"}``
        (ids and groups are united, then narrowed by the query; a query alone selects from
        every device), or a list of names ("*", a known device id, else a group name).
        """
        if type not in JOB_TYPES:
            raise RolloutError(f"unknown job type {type!r} (one of {', '.join(JOB_TYPES)})")
        if type == "cancel":
            raise RolloutError("cancel jobs are made by cancel()/cancel_envelopes(), not rolled out")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise RolloutError(f"params must be an object, not {params!r}")
        try:
            if type == "config":
                check_config_params(params)
            elif type == "keys":
                check_keys_params(params, [k.kid for k in self.keyring.list() if k.active])
        except KeyringError as e:
            raise RolloutError(str(e)) from None
        spec = self._normalize_targets(targets)
        opts = validate_options(options)
        if job_id is None:
            job_id = f"j-{secrets.token_hex(5)}"
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise RolloutError(f"job id {job_id!r} must be 1..48 of A-Z, a-z, 0-9, '_', '.', '-'")
        now = self.clock()
        try:
            params_json = json.dumps(params, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise RolloutError(f"params must be JSON: {e}") from None
        self._check_size({"id": job_id, "type": type, "params": params, "options": opts}, spec, now)
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                raise RolloutError(f"a job {job_id} exists already")
            db.execute("INSERT INTO jobs (id, type, params_json, targets_json, options_json, status, stage, "
                       "created, updated) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                       (job_id, type, params_json, json.dumps(spec), json.dumps(opts), ACTIVE, now, now))
        return job_id

    def _normalize_targets(self, targets) -> dict:
        known = set(self.store.device_ids())
        if targets == "*":
            return {"all": True, "ids": [], "groups": [], "query": None}
        if isinstance(targets, (list, tuple)):
            if not targets:
                raise RolloutError("targets is empty: give device ids, groups, a query or '*'")
            spec = {"all": False, "ids": [], "groups": [], "query": None}
            for t in targets:
                if not isinstance(t, str):
                    raise RolloutError(f"targets: {t!r} is not a device id or group name")
                if t == "*":
                    spec["all"] = True
                else:
                    spec["ids" if t in known else "groups"].append(t)
            return spec
        if isinstance(targets, dict):
            extra = sorted(set(targets) - {"ids", "groups", "query", "all"})
            if extra:
                raise RolloutError(f"targets: unknown key {extra[0]!r} (ids, groups, query, all)")
            ids = list(targets.get("ids") or [])
            groups = list(targets.get("groups") or [])
            query = targets.get("query")
            for name, values in (("ids", ids), ("groups", groups)):
                if not all(isinstance(v, str) and v for v in values):
                    raise RolloutError(f"targets.{name} must be a list of names, not {values!r}")
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise RolloutError(f"targets.ids: unknown device {unknown[0]} (register it first)")
            if query is not None:
                if not isinstance(query, str):
                    raise RolloutError(f"targets.query must be text, not {query!r}")
                try:
                    parse_query(query, now=self.clock)
                except QueryError as e:
                    raise RolloutError(f"targets.query: {e}") from None
            spec = {"all": bool(targets.get("all")), "ids": ids, "groups": groups, "query": query}
            if not (spec["all"] or ids or groups or query):
                raise RolloutError("targets is empty: give device ids, groups, a query or '*'")
            return spec
        raise RolloutError(f"targets must be '*', a list of names or a dict, not {targets!r}")

    # ------------------------------------------------------------ envelope size
    def job_max_bytes(self, device: str, state: dict | None = None) -> tuple[int, str]:
        """(the largest envelope `device` can take, where that limit comes from): the
        device's `limits.job_max_bytes` as it last reported it, else the default (4096),
        and never more than one queue can carry (ENVELOPE_MAX_BYTES)."""
        if state is None:
            state = (self.store.device(device) or {}).get("state") or {}
        limits = state.get("limits") if isinstance(state.get("limits"), dict) else {}
        limit, source = JOB_MAX_BYTES_DEFAULT, "the devices' default limits.job_max_bytes"
        for value in (limits.get("job_max_bytes"), state.get("job_max_bytes")):
            if isinstance(value, int) and not isinstance(value, bool) and 256 <= value <= 65536:
                limit, source = value, f"the limits.job_max_bytes {device} reports"
                break
        if limit > ENVELOPE_MAX_BYTES:
            return ENVELOPE_MAX_BYTES, "what one device queue carries, QUEUE_MAX_BYTES"
        return limit, source

    def _check_size(self, job: dict, spec: dict, now: float) -> None:
        """RolloutError unless the job's envelope fits every device it targets now (or, with
        none yet, any device), measured as signed in the worst case (keys.envelope_bytes)."""
        states = {d["id"]: d.get("state") or {} for d in self.store.devices()}
        worst: dict[tuple[int, str], str] = {}  # (limit, source) -> the longest device id it applies to
        for device in self._resolve(spec):
            key = self.job_max_bytes(device, states.get(device) or {})
            if len(device) > len(worst.get(key, "")):
                worst[key] = device
        if not worst:
            worst[self.job_max_bytes(LONGEST_DEVICE_ID, {})] = LONGEST_DEVICE_ID
        for (limit, source), device in sorted(worst.items()):
            n = envelope_bytes(self._payload(job, device, now))
            if n > limit:
                raise RolloutError(f"job too large: its signed envelope would be {n} bytes, over the limit of "
                                   f"{limit} bytes ({source}); make its params smaller")

    def resolve_targets(self, targets) -> list[str]:
        """The registered devices `targets` (as create_job takes them) select now."""
        return self._resolve(self._normalize_targets(targets))

    def _resolve(self, spec: dict) -> list[str]:
        match = parse_query(spec["query"], now=self.clock) if spec.get("query") else None
        ids, groups = set(spec["ids"]), set(spec["groups"])
        select_all = spec["all"] or (match is not None and not ids and not groups)
        out = []
        for d in self.registry.list():
            if not (select_all or d["id"] in ids or groups & set(d["groups"])):
                continue
            if match is not None and not match(d):
                continue
            out.append(d["id"])
        return out

    def _job(self, job_id: str) -> dict:
        row = self.db.execute("SELECT id, type, params_json, targets_json, options_json, status, stage, resolved, "
                              "created, updated, finished, reason FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise RolloutError(f"no job {job_id}")
        return {"id": row[0], "type": row[1], "params": json.loads(row[2]), "targets": json.loads(row[3]),
                "options": json.loads(row[4]), "status": row[5], "stage": row[6], "resolved": row[7],
                "created": row[8], "updated": row[9], "finished": row[10], "reason": row[11]}

    def jobs(self, status: str | None = None) -> list[str]:
        if status:
            return [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created, id",
                                                  (status,))]
        return [r[0] for r in self.db.execute("SELECT id FROM jobs ORDER BY created, id")]

    # ------------------------------------------------------------ executions
    _EXEC_COLS = ("id", "job", "device", "attempt", "seq", "kid", "envelope", "status", "stage", "queued",
                  "started", "finished", "updated", "device_attempt", "detail_json", "note", "progress_json")

    def _executions(self, job_id: str, device: str | None = None) -> list[dict]:
        q = f"SELECT {', '.join(self._EXEC_COLS)} FROM executions WHERE job = ?"
        args: list = [job_id]
        if device is not None:
            q += " AND device = ?"
            args.append(device)
        rows = self.db.execute(q + " ORDER BY device, attempt", args)
        return [dict(zip(self._EXEC_COLS, r)) for r in rows]

    def _latest(self, job_id: str) -> dict[str, dict]:
        latest: dict[str, dict] = {}
        for e in self._executions(job_id):
            latest[e["device"]] = e  # ordered by attempt: the last one wins
        return latest

    @staticmethod
    def _payload(job: dict, device: str, now: float) -> dict:
        """The job as signed for `device` (without the seq, which sign() adds)."""
        payload = {"id": job["id"], "type": job["type"], "params": job["params"], "targets": [device],
                   "iat": int(now)}
        opts = job["options"]
        if opts["timeout_s"] is not None:
            payload["timeout"] = int(math.ceil(opts["timeout_s"]))
        if opts["end_at"] is not None:
            payload["exp"] = int(opts["end_at"])
        return payload

    def _queue(self, job: dict, device: str, attempt: int, stage: int, now: float, changes: Changes | None) -> bool:
        """Sign and record one execution (attempt) of `job` on `device`. A seq is taken per
        call; the UNIQUE (job, device, attempt) keeps a second engine from queueing twice.

        An envelope larger than the device takes (a device that joined a continuous job
        or reported a smaller limit after create_job checked) is never queued: the device
        would drop it without a status. It is recorded REJECTED, with the sizes as note."""
        signed, envelope = self.keyring.sign(self._payload(job, device, now), kid=self._signing_kid(job))
        kid = envelope.split(".")[1]
        limit, source = self.job_max_bytes(device)
        status, finished, note = QUEUED, None, None
        if len(envelope) > limit:
            status, finished = REJECTED, now
            note = f"not sent: the envelope is {len(envelope)} bytes, over the limit of {limit} bytes ({source})"
        cur = self.db.execute(
            "INSERT OR IGNORE INTO executions (job, device, attempt, seq, kid, envelope, status, stage, queued, "
            "updated, finished, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job["id"], device, attempt, signed["seq"], kid, envelope, status, stage, now, now, finished, note))
        if cur.rowcount != 1:
            return False  # someone queued it first; the seq taken is simply unused
        if changes is not None and status == QUEUED:
            changes.devices.add(device)
            changes.queued.append((job["id"], device, attempt))
        return True

    def _signing_kid(self, job: dict) -> str:
        """The job's own key while it is active, else the fleet key (the oldest active one)."""
        wanted = job["options"].get("sign_kid")
        if wanted:
            for info in self.keyring.list():
                if info.kid == wanted and info.active:
                    return wanted
        return self.keyring.fleet_key().kid

    def _remove_queued(self, db, job_id: str, status: str, now: float, note: str, changes: Changes | None,
                       devices: Iterable[str] | None = None) -> list[str]:
        q = "SELECT device FROM executions WHERE job = ? AND status = ?"
        rows = [r[0] for r in db.execute(q, (job_id, QUEUED))]
        if devices is not None:
            rows = [d for d in rows if d in set(devices)]
        for d in rows:
            db.execute("UPDATE executions SET status = ?, finished = ?, updated = ?, note = ? "
                       "WHERE job = ? AND device = ? AND status = ?", (status, now, now, note, job_id, d, QUEUED))
            if changes is not None:
                changes.devices.add(d)
                changes.removed.append((job_id, d))
        return rows

    def _finish_job(self, db, job_id: str, status: str, now: float, reason: str | None) -> None:
        db.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, reason = ? WHERE id = ? AND status = ?",
                   (status, now, now, reason, job_id, ACTIVE))

    def _abort_reason(self, job: dict) -> str | None:
        opts = job["options"]
        if opts["abort_threshold"] is None:
            return None
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM executions WHERE job = ? GROUP BY status",
                                      (job["id"],)).fetchall())
        finished = sum(counts.get(s, 0) for s in COUNTED)
        failed = sum(counts.get(s, 0) for s in FAILURES)
        if finished >= opts["abort_min_finished"] and failed / finished >= opts["abort_threshold"]:
            return (f"abort threshold reached: {failed} of {finished} finished executions failed "
                    f"({failed / finished:.0%} >= {opts['abort_threshold']:.0%})")
        return None

    def _abort(self, job_id: str, reason: str, now: float, changes: Changes | None) -> None:
        with self.store.transaction() as db:
            self._remove_queued(db, job_id, REMOVED, now, "job aborted", changes)
            self._finish_job(db, job_id, ABORTED, now, reason)
        if changes is not None:
            changes.aborted.append(job_id)

    def _retry_if_allowed(self, job: dict, last: dict, now: float, changes: Changes | None) -> bool:
        opts = job["options"]
        if last["status"] not in RETRIABLE or last["attempt"] > opts["retries"]:
            return False
        if opts["end_at"] is not None and now >= opts["end_at"]:
            return False
        return self._queue(job, last["device"], last["attempt"] + 1, last["stage"], now, changes)

    # ------------------------------------------------------------ tick
    def tick(self, now: float | None = None) -> Changes:
        """Advance every ACTIVE job; returns what changed (and whose queues)."""
        now = self.clock() if now is None else now
        changes = Changes()
        for job_id in self.jobs(ACTIVE):
            self._tick_job(self._job(job_id), now, changes)
        return changes

    def _targets(self, job: dict, now: float, changes: Changes) -> list[str]:
        """The job's current target devices in rank order (resolving as the options say)."""
        job_id = job["id"]
        if job["resolved"] is None or job["options"]["continuous"]:
            current = set(self._resolve(job["targets"]))
            with self.store.transaction() as db:
                rows = {r[0]: r[1] for r in db.execute("SELECT device, left_at FROM job_targets WHERE job = ?",
                                                       (job_id,))}
                for d in current:
                    if d not in rows:
                        db.execute("INSERT INTO job_targets (job, device, rank, added) VALUES (?, ?, ?, ?)",
                                   (job_id, d, _rank(job_id, d), now))
                    elif rows[d] is not None:
                        db.execute("UPDATE job_targets SET left_at = NULL WHERE job = ? AND device = ?",
                                   (job_id, d))
                gone = [d for d, left in rows.items() if left is None and d not in current]
                for d in gone:
                    db.execute("UPDATE job_targets SET left_at = ? WHERE job = ? AND device = ?", (now, job_id, d))
                if gone:
                    self._remove_queued(db, job_id, REMOVED, now, "no longer targeted", changes, gone)
                if job["resolved"] is None:
                    db.execute("UPDATE jobs SET resolved = ?, updated = ? WHERE id = ?", (now, now, job_id))
                    job["resolved"] = now
        return [r[0] for r in self.db.execute("SELECT device FROM job_targets WHERE job = ? AND left_at IS NULL "
                                              "ORDER BY rank, device", (job_id,))]

    def _tick_job(self, job: dict, now: float, changes: Changes) -> None:
        job_id, opts = job["id"], job["options"]
        if opts["start_at"] is not None and now < opts["start_at"]:
            return
        if opts["end_at"] is not None and now >= opts["end_at"]:
            with self.store.transaction() as db:
                self._remove_queued(db, job_id, REMOVED, now, "job end_at passed", changes)
                self._finish_job(db, job_id, COMPLETED, now, "end_at passed")
            changes.completed.append(job_id)
            return
        ranked = self._targets(job, now, changes)

        # per-device timeouts
        if opts["timeout_s"] is not None:
            with self.store.transaction() as db:
                late = [r[0] for r in db.execute(
                    "SELECT device FROM executions WHERE job = ? AND status = ? AND started <= ?",
                    (job_id, IN_PROGRESS, now - opts["timeout_s"]))]
                for d in late:
                    db.execute("UPDATE executions SET status = ?, finished = ?, updated = ?, "
                               "note = 'no final status within timeout_s' WHERE job = ? AND device = ? AND status = ?",
                               (TIMED_OUT, now, now, job_id, d, IN_PROGRESS))
                    changes.devices.add(d)
                    changes.timed_out.append((job_id, d))

        reason = self._abort_reason(job)
        if reason:
            self._abort(job_id, reason, now, changes)
            return

        # retries of failed / timed-out attempts (also catches up after a restart)
        latest = self._latest(job_id)
        targeted = set(ranked)
        for d, last in latest.items():
            if d in targeted and self._retry_if_allowed(job, last, now, changes):
                latest[d] = self._executions(job_id, d)[-1]

        # stages
        stages, n = opts["stages"], len(ranked)
        if n == 0:
            if not opts["continuous"]:
                with self.store.transaction() as db:
                    self._finish_job(db, job_id, COMPLETED, now, "no target devices")
                changes.completed.append(job_id)
            return
        stage = min(job["stage"], len(stages) - 1)
        allowed = _allowed(stages, stage, n)
        covered = ranked[:allowed]
        stage_done = all(d in latest and latest[d]["status"] not in PENDING for d in covered)
        if stage_done and stage < len(stages) - 1:
            own = ranked[_allowed(stages, stage - 1, n) if stage else 0:allowed]
            ok = sum(1 for d in own if latest[d]["status"] == SUCCEEDED)
            frac = ok / len(own) if own else 1.0
            if frac + 1e-9 < opts["success_threshold"]:
                self._abort(job_id, f"stage {stage} ({stages[stage]:.0%}) succeeded on {ok} of {len(own)} devices, "
                                    f"below success_threshold {opts['success_threshold']:.0%}", now, changes)
                return
            stage += 1
            self.db.execute("UPDATE jobs SET stage = ?, updated = ? WHERE id = ?", (stage, now, job_id))
            changes.advanced.append((job_id, stage))
            allowed = _allowed(stages, stage, n)
        elif stage_done and not opts["continuous"]:
            # a rotation's follow-up is recorded before the job shows COMPLETED (with the outcome as reason)
            note = self._finish_rotation(job, [latest[d] for d in ranked]) if opts.get("rotation") else None
            with self.store.transaction() as db:
                self._finish_job(db, job_id, COMPLETED, now, note)
            changes.completed.append(job_id)
            return

        # start new devices, within the stage and the rate
        fresh = [d for d in ranked[:allowed] if d not in latest]
        if not fresh:
            return
        room = len(fresh)
        if opts["rate_per_min"] is not None:
            started = self.db.execute("SELECT COUNT(*) FROM executions WHERE job = ? AND attempt = 1 AND queued > ?",
                                      (job_id, now - 60)).fetchone()[0]
            room = min(room, max(0, opts["rate_per_min"] - started))
        for d in fresh[:room]:
            self._queue(job, d, 1, stage, now, changes)

    # ------------------------------------------------------------ key rotation
    def create_rotation_job(self, targets="*", job_id: str | None = None, **options) -> tuple[str, str]:
        """Make a new signing key and roll out the `keys` job ``{"add": {new kid: public}}``,
        signed by the current fleet key. Returns (job id, new kid).

        When every target device SUCCEEDED, tick() rolls out the follow-up `keys` job
        ``{"remove": [old kid]}``, signed by the new key, and retires the old key. If some
        did not, the old key stays active and the job's reason says so: fix those devices
        and retire by hand (`mpfleet keys retire`)."""
        old = self.keyring.fleet_key()
        self.keyring.load(old.kid)  # the old key must be usable before a new one is made
        # what create_job would refuse, refused before a key is made for nothing
        self._normalize_targets(targets)
        validate_options({**options, "sign_kid": old.kid})
        if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
            raise RolloutError(f"job id {job_id!r} must be 1..48 of A-Z, a-z, 0-9, '_', '.', '-'")
        active = [k.kid for k in self.keyring.list() if k.active]
        if len(active) >= MAX_TRUSTED_KEYS:
            raise RolloutError(f"{len(active)} keys are active and a device trusts at most {MAX_TRUSTED_KEYS}: "
                               f"retire one first (`mpfleet keys retire`)")
        new = self.keyring.add_key()
        job_id = job_id or f"key-add-{new.kid[:8]}-{secrets.token_hex(2)}"
        self.create_job("keys", {"add": {new.kid: new.public_b64}}, targets, job_id=job_id,
                        sign_kid=old.kid, rotation={"old": old.kid, "new": new.kid}, **options)
        return job_id, new.kid

    def _finish_rotation(self, job: dict, latest: list[dict]) -> str:
        """What a finished rotation job leads to, as the job's reason. When every device
        applied it: the `keys` job removing the old key (one per rotation, its id derived
        from the rotation's, so a tick interrupted here and run again adds no second one),
        then the old key retired."""
        rot = job["options"]["rotation"]
        missing = [e["device"] for e in latest if e["status"] != SUCCEEDED]
        if missing:
            return (f"key rotation incomplete: {len(missing)} device(s) did not apply it "
                    f"(first: {', '.join(missing[:5])}); key {rot['old']} stays active")
        retire_id = f"key-retire-{rot['old'][:8]}-{hashlib.sha256(job['id'].encode()).hexdigest()[:4]}"
        exists = self.db.execute("SELECT 1 FROM jobs WHERE id = ?", (retire_id,)).fetchone()
        if not exists:
            try:
                # the job first: should it be refused, the old key stays active and signing
                self.create_job("keys", {"remove": [rot["old"]]}, job["targets"], job_id=retire_id,
                                sign_kid=rot["new"])
            except RolloutError as e:
                return f"key rotation applied everywhere, but the job removing key {rot['old']} was refused: {e}"
        if self.keyring.get(rot["old"]).active:
            self.keyring.store.retire_key(rot["old"])
        return f"key rotation applied everywhere: key {rot['old']} retired, job {retire_id} removes it"

    # ------------------------------------------------------------ USB delivery
    def usb_envelope(self, job_id: str, device: str) -> str:
        """The signed envelope that carries `job_id` to `device` over USB (`mpfleet usb run`).

        The same execution records as the network path: a pending execution's envelope is
        reused (its seq, so the device never runs it twice), else a new attempt is signed.
        Stages and rate do not apply: the operator at the cable chose the boards. The
        device's status comes back through on_status like any other."""
        job = self._job(job_id)
        if job["status"] != ACTIVE:
            raise RolloutError(f"job {job_id} is {job['status']}: there is nothing to run")
        if job["type"] in NETWORK_JOBS:
            raise RolloutError(f"a {job['type']} job needs the network: it cannot run over USB")
        if device not in self._targets(job, self.clock(), Changes()):
            raise RolloutError(f"{device} is not a target of job {job_id}")
        latest = self._latest(job_id).get(device)
        if latest is not None and latest["status"] in PENDING:
            return latest["envelope"]
        if latest is not None and latest["status"] not in RETRIABLE:
            raise RolloutError(f"job {job_id} already ended on {device}: {latest['status']}")
        attempt = latest["attempt"] + 1 if latest else 1
        self._queue(job, device, attempt, job["stage"], self.clock(), None)
        return self._latest(job_id)[device]["envelope"]

    # ------------------------------------------------------------ device statuses
    def on_status(self, device: str, message: dict) -> bool:
        """Apply one `jobs/status` message from `device`; True if it changed anything.

        Matched by (job, device, seq); duplicates, statuses of older attempts, statuses
        of unknown jobs and anything arriving after a final status change nothing.
        """
        if not isinstance(message, dict):
            return False
        job_id, status = message.get("job"), message.get("status")
        if not isinstance(job_id, str) or status not in DEVICE_STATES:
            return False
        now = self.clock()
        detail = message.get("detail")
        if job_id.startswith("envelope:"):
            cur = self.db.execute("INSERT OR IGNORE INTO job_rejects (device, ref, detail_json, at) "
                                  "VALUES (?, ?, ?, ?)", (device, job_id, json.dumps(detail), now))
            return cur.rowcount == 1
        seq = message.get("seq")
        if self._control_status(device, job_id, seq, status, detail, now):
            return True
        if isinstance(seq, bool) or not isinstance(seq, int):
            return False
        row = self.db.execute(f"SELECT {', '.join(self._EXEC_COLS)} FROM executions "
                              "WHERE job = ? AND device = ? AND seq = ?", (job_id, device, seq)).fetchone()
        if row is None:
            return False
        e = dict(zip(self._EXEC_COLS, row))
        if e["status"] not in PENDING:
            # final is final; a device's final word on an attempt the host gave up on (timed out,
            # canceled, removed) is kept as a note for the operator, and changes nothing else
            if e["status"] in (TIMED_OUT, CANCELED, REMOVED) and status != IN_PROGRESS:
                late = f"device later reported {status}"
                if late not in (e["note"] or ""):
                    self.db.execute("UPDATE executions SET note = ? WHERE id = ?",
                                    (f"{e['note']}; {late}" if e["note"] else late, e["id"]))
            return False
        dev_attempt = message.get("attempt") if isinstance(message.get("attempt"), int) else None
        progress = message.get("progress")
        if status == IN_PROGRESS and isinstance(progress, dict) and e["status"] == IN_PROGRESS:
            # an update's download progress: shown by `job status`, changes no state
            self.db.execute("UPDATE executions SET progress_json = ?, updated = ? WHERE id = ?",
                            (json.dumps(progress), now, e["id"]))
            return False
        if status == IN_PROGRESS:
            if e["status"] == IN_PROGRESS and (dev_attempt is None or dev_attempt <= (e["device_attempt"] or 0)):
                return False  # duplicate
            cur = self.db.execute(
                "UPDATE executions SET status = ?, started = COALESCE(started, ?), updated = ?, device_attempt = ?, "
                "detail_json = COALESCE(?, detail_json) WHERE id = ? AND status IN (?, ?)",
                (IN_PROGRESS, now, now, dev_attempt, json.dumps(detail) if detail is not None else None,
                 e["id"], QUEUED, IN_PROGRESS))
            return cur.rowcount == 1
        cur = self.db.execute(
            "UPDATE executions SET status = ?, finished = ?, updated = ?, device_attempt = COALESCE(?, device_attempt), "
            "detail_json = ? WHERE id = ? AND status IN (?, ?)",
            (status, now, now, dev_attempt, json.dumps(detail), e["id"], QUEUED, IN_PROGRESS))
        if cur.rowcount != 1:
            return False
        job = self._job(job_id)
        if job["status"] == ACTIVE:
            reason = self._abort_reason(job)
            if reason:
                self._abort(job_id, reason, now, None)
            else:
                e["status"] = status
                self._retry_if_allowed(job, e, now, None)
        return True

    def _control_status(self, device: str, control_id: str, seq, status: str, detail, now: float) -> bool:
        row = self.db.execute("SELECT job, type, status FROM job_controls WHERE device = ? AND control_id = ? "
                              "AND seq = ?", (device, control_id, seq)).fetchone()
        if row is None:
            return False
        if row[2] != QUEUED or status == IN_PROGRESS:
            return True  # known control job: consumed, nothing to change
        self.db.execute("UPDATE job_controls SET status = ?, finished = ?, detail_json = ? WHERE job = ? AND "
                        "device = ? AND type = ?", (status, now, json.dumps(detail), row[0], device, row[1]))
        return True

    # ------------------------------------------------------------ cancel
    def cancel(self, job_id: str, reason: str = "canceled") -> Changes:
        """CANCEL the job: QUEUED executions become CANCELED (never started); IN_PROGRESS ones
        become CANCELED too, noted as needing a `cancel` job (see cancel_envelopes)."""
        job = self._job(job_id)
        if job["status"] != ACTIVE:
            raise RolloutError(f"job {job_id} is {job['status']}, only an ACTIVE job can be canceled")
        now = self.clock()
        changes = Changes()
        with self.store.transaction() as db:
            self._remove_queued(db, job_id, CANCELED, now, "job canceled before the device started it", changes)
            running = [r[0] for r in db.execute("SELECT device FROM executions WHERE job = ? AND status = ?",
                                                (job_id, IN_PROGRESS))]
            for d in running:
                db.execute("UPDATE executions SET status = ?, finished = ?, updated = ?, note = ? "
                           "WHERE job = ? AND device = ? AND status = ?",
                           (CANCELED, now, now, "canceled while in progress: send a cancel job (cancel_envelopes)",
                            job_id, d, IN_PROGRESS))
                changes.devices.add(d)
            db.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, reason = ? WHERE id = ?",
                       (CANCELED, now, now, reason, job_id))
        return changes

    def cancel_envelopes(self, job_id: str) -> dict[str, str]:
        """{device: envelope} of signed `cancel` jobs for every device whose execution was in
        progress when the job was canceled. Signed once and stored (calling again returns
        the same envelopes); device_queue() carries them until the device reports them final."""
        job = self._job(job_id)
        if job["status"] != CANCELED:
            raise RolloutError(f"job {job_id} is {job['status']}: cancel() it first")
        now = self.clock()
        devices = [r[0] for r in self.db.execute(
            "SELECT DISTINCT device FROM executions WHERE job = ? AND status = ? AND started IS NOT NULL "
            "ORDER BY device", (job_id, CANCELED))]
        control_id = f"cancel-{job_id}"
        for d in devices:
            if self.db.execute("SELECT 1 FROM job_controls WHERE job = ? AND device = ? AND type = 'cancel'",
                               (job_id, d)).fetchone():
                continue
            signed, envelope = self.keyring.sign({"id": control_id, "type": "cancel", "targets": [d],
                                                  "params": {"job": job_id}, "iat": int(now)},
                                                 kid=self._signing_kid(job))
            self.db.execute("INSERT OR IGNORE INTO job_controls (job, device, control_id, type, seq, envelope, "
                            "status, created) VALUES (?, ?, ?, 'cancel', ?, ?, ?, ?)",
                            (job_id, d, control_id, signed["seq"], envelope, QUEUED, now))
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT device, envelope FROM job_controls WHERE job = ? AND type = 'cancel' ORDER BY device",
            (job_id,))}

    # ------------------------------------------------------------ views
    def _queues(self, device: str | None = None) -> dict[str, list[str]]:
        """{device: queue} of `device` (None: of every device with a non-empty queue): the
        one place a queue is computed. A queue is the envelopes the device's retained
        `jobs` topic must carry now: QUEUED and IN_PROGRESS executions of ACTIVE jobs plus
        unfinished cancel jobs, ascending seq, the oldest first and only as many as fit in
        QUEUE_MAX_BYTES once encoded (encode_queue): a device parses its whole queue in a
        128 KiB heap; the rest follow as these finish. An envelope no queue can carry
        (only an old database holds one: _queue never records it QUEUED) is left out
        rather than block the ones behind it."""
        only = "" if device is None else "AND e.device = ? "
        only_c = "" if device is None else "AND device = ? "
        args = (QUEUED, IN_PROGRESS, ACTIVE, *(() if device is None else (device,)),
                QUEUED, *(() if device is None else (device,)))
        rows = self.db.execute(
            "SELECT e.device, e.seq, e.envelope FROM executions e JOIN jobs j ON j.id = e.job "
            f"WHERE e.status IN (?, ?) AND j.status = ? {only}"
            f"UNION ALL SELECT device, seq, envelope FROM job_controls WHERE status = ? {only_c}ORDER BY 1, 2",
            args)
        out: dict[str, list[str]] = {}
        size: dict[str, int] = {}
        full: set[str] = set()
        for dev, _seq, envelope in rows:
            if dev in full or len(envelope) > ENVELOPE_MAX_BYTES:
                continue
            queue = out.setdefault(dev, [])
            grown = size.get(dev, 2) + len(envelope) + 2 + (1 if queue else 0)  # '"' envelope '"', a ','
            if grown > QUEUE_MAX_BYTES:
                full.add(dev)
                continue
            queue.append(envelope)
            size[dev] = grown
        return {d: q for d, q in out.items() if q}

    def device_queue(self, device: str) -> list[str]:
        """`device`'s queue (see _queues), ascending seq, at most QUEUE_MAX_BYTES encoded."""
        return self._queues(device).get(device, [])

    def all_queues(self) -> dict[str, list[str]]:
        """device_queue() of every device whose queue is not empty, in one query: what
        serve publishes."""
        return self._queues()

    def job_status(self, job_id: str) -> dict:
        """Everything `mpfleet job status` shows: the job, counts per state (latest attempt
        per device, and over every attempt), failures with reasons, per-device rows."""
        job = self._job(job_id)
        execs = self._executions(job_id)
        latest = self._latest(job_id)
        targets = [r[0] for r in self.db.execute("SELECT device FROM job_targets WHERE job = ? AND left_at IS NULL "
                                                 "ORDER BY rank, device", (job_id,))]
        counts = {s: 0 for s in EXECUTION_STATES}
        for e in latest.values():
            counts[e["status"]] += 1
        attempts = {s: 0 for s in EXECUTION_STATES}
        for e in execs:
            attempts[e["status"]] += 1
        rows = [{"device": e["device"], "attempt": e["attempt"], "seq": e["seq"], "status": e["status"],
                 "stage": e["stage"], "queued": e["queued"], "started": e["started"], "finished": e["finished"],
                 "device_attempt": e["device_attempt"], "detail": _loads(e["detail_json"]), "note": e["note"],
                 "progress": _loads(e["progress_json"])}
                for e in execs]
        if job["type"] in ("ota", "app"):
            # what each device runs by its latest report (after an update's reboot)
            key = "fw" if job["type"] == "ota" else "app"
            for r in rows:
                state = (self.store.device(r["device"]) or {}).get("state") or {}
                r["running"] = state.get(key)
        failures = [r for r in rows if r["status"] in FAILURES]
        stages = job["options"]["stages"]
        rejects = [{"device": r[0], "ref": r[1], "detail": _loads(r[2]), "at": r[3]} for r in self.db.execute(
            "SELECT device, ref, detail_json, at FROM job_rejects ORDER BY at, device")]
        controls = [{"device": r[0], "id": r[1], "type": r[2], "seq": r[3], "status": r[4]} for r in self.db.execute(
            "SELECT device, control_id, type, seq, status FROM job_controls WHERE job = ? ORDER BY device", (job_id,))]
        return {
            "id": job_id, "type": job["type"], "params": job["params"], "targets": job["targets"],
            "options": job["options"], "status": job["status"], "reason": job["reason"],
            "created": job["created"], "finished": job["finished"],
            "stage": job["stage"], "stages": stages,
            "stage_size": _allowed(stages, min(job["stage"], len(stages) - 1), len(targets)),
            "target_count": len(targets), "not_started": len([d for d in targets if d not in latest]),
            "counts": counts, "attempt_counts": attempts, "failures": failures, "devices": rows,
            "cancel_jobs": controls, "unattributed_rejects": rejects,
        }
