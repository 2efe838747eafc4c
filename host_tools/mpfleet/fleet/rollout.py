"""The dispatcher's rollout engine: jobs, per-device executions, stages, rates, retries.

Which room: the fleet, driven by `serve` (MQTT is not touched here). The engine is
pure bookkeeping over the Store's SQLite connection plus the KeyRing (signing) and the
Registry (targeting); everything it decides is persisted before it returns, so a new
`RolloutEngine` on the same database continues a rollout exactly where it stopped. Its
tables are created by the store (db/schema.py). The records it takes and returns
(RolloutOptions, Job, JobStatus and its rows, the state names) are in jobs_model.py,
split from here so that the callers hold typed records without the engine's machinery.

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
  are retried (a new attempt) while the device's FAILED + TIMED_OUT attempts number at
  most `retries` (attempts the operator replaced do not count); REJECTED never is;
- the job COMPLETES when every target device is final (a continuous job stays ACTIVE
  until `end_at`); past `end_at` QUEUED executions become REMOVED and the job completes.

One device's order (issue 13): jobs of one ORDERED_TYPES type run on a device in the
order they begin (created, or `start_at` when later; then creation). The device runs
its queue in ascending seq and a seq is taken when an envelope is signed, so a later
job is not signed for a device while an earlier job of its type may still sign one
there: the earlier has no execution on it yet (a later stage, the rate), or its latest
may fail and be retried. Such a device is *held* (job_status "held"); the later job's
stage waits for it. diag, upload, sample and reboot change nothing a later job builds
on: they are neither held nor hold.

Stuck executions: a QUEUED execution whose envelope is over the limit the device
reports, or that is older than `queued_timeout_s` (default
jobs_model.QUEUED_TIMEOUT_DEFAULT_S), is *flagged* with the reason (stuck(), job_status
"stuck"); flagging changes no state, so a device that wakes late still takes it. The
operator acts: retry() signs a new attempt (replacing a stuck QUEUED one), remove()
makes a QUEUED execution REMOVED. A device whose latest execution the operator REMOVED
does not count toward its stage's success threshold.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from mpfleet.fleet.jobs_model import (ABORTED, ACTIVE, CANCELED, CANCELED_RUNNING, COMPLETED, COUNTED, DEVICE_STATES,
                                     EXECUTION_STATES, FAILURES, IN_PROGRESS, PENDING, QUEUED, REJECTED,
                                     REMOVED, RETRIABLE, SCRUBBED_ENVELOPE, SCRUBBED_TEXT, SUCCEEDED, TIMED_OUT,
                                     UPDATE_TYPES, CancelJob, ExecutionRow,
                                     HeldDevice, Job, JobStatus, KeyRotation, RolloutError, RolloutOptions,
                                     StuckExecution, UnattributedReject, check_stage_growth, is_scrubbed, stage_sizes,
                                     stage_text)
from mpfleet.fleet.keys import (JOB_MAX_BYTES_DEFAULT, MAX_TRUSTED_KEYS, KeyRing, KeyringError, check_cert_params,
                          check_config_params, check_keys_params, envelope_bytes)
from mpfleet.fleet.registry import QueryError, Registry, parse_query
from mpfleet.protocol.ids import DEVICE_ID_MAX_LEN
from mpfleet.protocol.signing import JOB_TYPES
from mpfleet.db.store import Store

NETWORK_JOBS = ("ota", "app", "reboot", "upload")  # the agent refuses them over USB
QUEUE_MAX_BYTES = 6144  # the retained `jobs` payload of one device, bytes (docs/dispatch.md)
ENVELOPE_MAX_BYTES = QUEUE_MAX_BYTES - 4  # the largest envelope a queue can carry: '["' + envelope + '"]'
LONGEST_DEVICE_ID = "x" * DEVICE_ID_MAX_LEN  # the longest id: a job's targets before any device is known
# Job types that change what a device keeps: a device runs those of one type in the
# order the jobs begin (module docstring). The others are not ordered.
ORDERED_TYPES = ("config", "keys", "ota", "app", "exec")
STUCK_CHECK_S = 5.0  # tick() looks for newly stuck executions at most this often

JOB_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,48}\Z")  # leaves room for "cancel-" in a 64-char id


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
    # (job, device, reason) of executions newly flagged stuck: a warning, not a change
    # of state, so not counted by bool()
    stuck: list[tuple[str, str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.devices or self.advanced or self.completed or self.aborted)


# ---------------------------------------------------------------- helpers

def _rank(job_id: str, device: str) -> str:
    return hashlib.sha256(f"{job_id}\0{device}".encode()).hexdigest()


def _allowed(stages, stage: int, n: int) -> int:
    """How many of the n ranked targets stages 0..stage cover (at least one):
    jobs_model.stage_sizes (a fraction or a device count, never fewer than before)."""
    if n <= 0 or stage < 0:
        return 0
    return stage_sizes(stages[:stage + 1], n)[stage]


def _span(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 2 h 5 min, 3 d 4 h."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min" if s % 3600 >= 60 else f"{s // 3600} h"
    return f"{s // 86400} d {s % 86400 // 3600} h" if s % 86400 >= 3600 else f"{s // 86400} d"


_THEN = "; then: "  # what a device reported after a cancel, appended to CANCELED_RUNNING's note


def _awaits_word(e: dict) -> bool:
    """An execution canceled while in progress whose device has not reported since."""
    note = e["note"] or ""
    return e["status"] == CANCELED and note.startswith(CANCELED_RUNNING) and _THEN not in note


def envelope_digest(envelope: str) -> str:
    """The digest a device names an envelope by (`envelope:<digest>` statuses): the first
    8 bytes of the SHA-256 of the queue entry, quotes included (agent.jobs.digest_of)."""
    return hashlib.sha256(f'"{envelope}"'.encode()).hexdigest()[:16]


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
        self.db = store.db  # its tables: jobs, job_targets, executions, job_controls, job_rejects (db/schema.py)
        self._stuck_seen: set[tuple[str, str, int]] = set()  # reported by tick() in Changes.stuck
        self._stuck_next = -math.inf
        # Whether on_status also does what a final status may call for at once (an abort,
        # a retry). serve's workers that do not lead leave it to the leader's next tick,
        # which does the same: a job's aborts and retries are then decided in one place.
        self.follow_up = True
        self.job_ended = False  # set when this engine ends a job; serve clears it
        self._limits: dict[str, tuple[int, tuple[int, str]]] = {}  # _limit_of's: hash of the state text, limit

    # ------------------------------------------------------------ jobs
    def create_job(self, type: str, params: dict | None, targets, job_id: str | None = None, *,
                   options: RolloutOptions | None = None) -> str:
        """Record a new ACTIVE job; nothing is queued before the next `tick()`.

        `targets`: "*", a dict ``{"ids": [...], "groups": [...], "query": "fw<v1.25"}``
        (ids and groups are united, then narrowed by the query; a query alone selects from
        every device), or a list of names ("*", a known device id, else a group name).
        `options`: how it rolls out (None: RolloutOptions(), one stage, no limits).
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
        if type == "cert":
            try:
                check_cert_params(params, spec)
            except KeyringError as e:
                raise RolloutError(str(e)) from None
        opts = RolloutOptions() if options is None else options
        if job_id is None:
            job_id = f"j-{secrets.token_hex(5)}"
        if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            raise RolloutError(f"job id {job_id!r} must be 1..48 of A-Z, a-z, 0-9, '_', '.', '-'")
        now = self.clock()
        try:
            params_json = json.dumps(params, sort_keys=True)
        except (TypeError, ValueError) as e:
            raise RolloutError(f"params must be JSON: {e}") from None
        job = Job(job_id, type, params, spec, opts, created=now, updated=now)
        check_stage_growth(opts.stages, len(self._resolve(spec)))
        self._check_size(job, now)
        with self.store.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone():
                raise RolloutError(f"a job {job_id} exists already")
            db.execute("INSERT INTO jobs (id, type, params_json, targets_json, options_json, status, stage, "
                       "created, updated) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                       (job_id, type, params_json, json.dumps(spec), json.dumps(opts.to_json()), ACTIVE, now, now))
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

    def _limit_of(self, device: str, state_json: str | None) -> tuple[int, str]:
        """job_max_bytes() from the device's stored state text, parsed again only when it changed."""
        key = hash(state_json)
        cached = self._limits.get(device)
        if cached is not None and cached[0] == key:
            return cached[1]
        state = _loads(state_json) if state_json else None
        found = self.job_max_bytes(device, state if isinstance(state, dict) else {})
        self._limits[device] = (key, found)
        return found

    def _check_size(self, job: Job, now: float) -> None:
        """RolloutError unless the job's envelope fits every device it targets now (or, with
        none yet, any device), measured as signed in the worst case (keys.envelope_bytes)."""
        states = {d["id"]: d.get("state") or {} for d in self.store.devices()}
        worst: dict[tuple[int, str], str] = {}  # (limit, source) -> the longest device id it applies to
        for device in self._resolve(job.targets):
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

    def unmatched_targets(self, targets) -> list[str]:
        """What in `targets` (as create_job takes them) selects no registered device now,
        one phrase each: a name that is neither a device id nor a group any device is in,
        a query that matches none of the devices it narrows; [] when every part matches."""
        spec = self._normalize_targets(targets)
        devices = self.registry.list()
        groups = {g for d in devices for g in d["groups"]}
        out = [f"{g!r} is neither a registered device id nor a group any device is in"
               for g in spec["groups"] if g not in groups]
        if spec["query"]:
            narrowed = self._resolve({**spec, "query": None}) if (spec["ids"] or spec["groups"]) \
                else [d["id"] for d in devices]
            if narrowed and not self._resolve(spec):
                out.append(f"the query {spec['query']!r} matches none of the {len(narrowed)} device(s) it was "
                           f"tried on")
            elif not narrowed and not out:
                out.append(f"the query {spec['query']!r} has no device to match: the registry is empty")
        if not out and not self._resolve(spec):
            out.append("'*' selects no device: the registry is empty" if spec["all"]
                       else "the targets select no device")
        return out

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

    def _job(self, job_id: str) -> Job:
        row = self.db.execute("SELECT id, type, params_json, targets_json, options_json, status, stage, resolved, "
                              "created, updated, finished, reason, rowid FROM jobs WHERE id = ?",
                              (job_id,)).fetchone()
        if row is None:
            raise RolloutError(f"no job {job_id}")
        # options_json holds every option create_job knew of (a job from before an
        # option was added lacks it: from_json gives it its default)
        return Job(id=row[0], type=row[1], params=json.loads(row[2]), targets=json.loads(row[3]),
                   options=RolloutOptions.from_json(json.loads(row[4])), status=row[5], stage=row[6],
                   resolved=row[7], created=row[8], updated=row[9], finished=row[10], reason=row[11], rowid=row[12])

    def jobs(self, status: str | None = None) -> list[str]:
        if status:
            return [r[0] for r in self.db.execute("SELECT id FROM jobs WHERE status = ? ORDER BY created, id",
                                                  (status,))]
        return [r[0] for r in self.db.execute("SELECT id FROM jobs ORDER BY created, id")]

    # ------------------------------------------------------------ executions
    _EXEC_COLS = ("id", "job", "device", "attempt", "seq", "kid", "envelope", "status", "stage", "queued",
                  "started", "finished", "updated", "device_attempt", "detail_json", "note", "progress_json",
                  "by_operator")

    def _executions(self, job_id: str, device: str | None = None) -> list[dict]:
        q = f"SELECT {', '.join(self._EXEC_COLS)} FROM executions WHERE job = ?"
        args: list = [job_id]
        if device is not None:
            q += " AND device = ?"
            args.append(device)
        rows = self.db.execute(q + " ORDER BY device, attempt", args)
        return [dict(zip(self._EXEC_COLS, r)) for r in rows]

    def _latest(self, job_id: str) -> dict[str, dict]:
        return self._attempts(job_id)[0]

    def _attempts(self, job_id: str, device: str | None = None) -> tuple[dict[str, dict], dict[str, int]]:
        """({device: latest execution}, {device: FAILED + TIMED_OUT attempts}): the second
        is what the `retries` budget is spent on."""
        latest: dict[str, dict] = {}
        failures: dict[str, int] = {}
        for e in self._executions(job_id, device):
            latest[e["device"]] = e  # ordered by attempt: the last one wins
            if e["status"] in RETRIABLE:
                failures[e["device"]] = failures.get(e["device"], 0) + 1
        return latest, failures

    def _current_targets(self, job: Job) -> list[str]:
        """The job's targets now, without resolving anything (a job not resolved yet: what
        its spec selects)."""
        if job.resolved is None:
            return self._resolve(job.targets)
        return [r[0] for r in self.db.execute("SELECT device FROM job_targets WHERE job = ? AND left_at IS NULL "
                                              "ORDER BY rank, device", (job.id,))]

    @staticmethod
    def _payload(job: Job, device: str, now: float) -> dict:
        """The job as signed for `device` (without the seq, which sign() adds)."""
        payload = {"id": job.id, "type": job.type, "params": job.params, "targets": [device],
                   "iat": int(now)}
        opts = job.options
        if opts.timeout_s is not None:
            payload["timeout"] = int(math.ceil(opts.timeout_s))
        if opts.end_at is not None:
            payload["exp"] = int(opts.end_at)
        return payload

    def _queue(self, job: Job, device: str, attempt: int, stage: int, now: float, changes: Changes | None,
               replace: tuple[int, str] | None = None, by_operator: bool = False) -> bool:
        """Sign and record one execution (attempt) of `job` on `device`. A seq is taken per
        call; the UNIQUE (job, device, attempt) keeps a second engine from queueing twice.
        `replace` = (execution id, note): that QUEUED execution becomes REMOVED in the same
        transaction (an operator's retry); if it is no longer QUEUED nothing is recorded.
        `by_operator`: the operator's retry, which is never retried by itself.

        An envelope larger than the device takes (a device that joined a continuous job
        or reported a smaller limit after create_job checked) is never queued: the device
        would drop it without a status. It is recorded REJECTED, with the sizes as note.

        Nothing is signed for a `cert` job whose key was scrubbed (schema migration 4:
        the job was done with it); False."""
        if job.type == "cert" and self._scrubbed(job.id):
            return False
        signed, envelope = self.keyring.sign(self._payload(job, device, now), kid=self._signing_kid(job))
        kid = envelope.split(".")[1]
        limit, source = self.job_max_bytes(device)
        status, finished, note = QUEUED, None, None
        if len(envelope) > limit:
            status, finished = REJECTED, now
            note = f"not sent: the envelope is {len(envelope)} bytes, over the limit of {limit} bytes ({source})"
        insert = ("INSERT INTO executions (job, device, attempt, seq, kid, envelope, status, stage, queued, "
                  "updated, finished, note, by_operator) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                  "ON CONFLICT DO NOTHING",
                  (job.id, device, attempt, signed["seq"], kid, envelope, status, stage, now, now, finished, note,
                   int(by_operator)))
        if replace is None:
            cur = self.db.execute(*insert)
        else:
            # the new attempt is recorded before the old one ends: ended first, a cert job
            # would be done for a moment, and its key scrubbed (schema migration 4)
            with self.store.transaction() as db:
                cur = None
                if db.execute("SELECT 1 FROM executions WHERE id = ? AND status = ?",
                              (replace[0], QUEUED)).fetchone():
                    cur = db.execute(*insert)
                    db.execute("UPDATE executions SET status = ?, finished = ?, updated = ?, note = ? "
                               "WHERE id = ? AND status = ?", (REMOVED, now, now, replace[1], replace[0], QUEUED))
            if cur is None:
                return False  # no longer QUEUED: nothing recorded
            if changes is not None:
                changes.removed.append((job.id, device))
        if cur.rowcount != 1:
            return False  # someone queued it first; the seq taken is simply unused
        if changes is not None and status == QUEUED:
            changes.devices.add(device)
            changes.queued.append((job.id, device, attempt))
        return True

    def _scrubbed(self, job_id: str) -> bool:
        """Whether the job's params were scrubbed (a `cert` job done with its key), as stored
        now: a Job read earlier may still hold them."""
        row = self.db.execute("SELECT params_json FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and is_scrubbed(json.loads(row[0]))

    def _signing_kid(self, job: Job) -> str:
        """The job's own key while it is active, else the fleet key (the oldest active one)."""
        wanted = job.options.sign_kid
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
        self.job_ended = True  # its running executions leave every queue (serve publishes them all)
        db.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, reason = ? WHERE id = ? AND status = ?",
                   (status, now, now, reason, job_id, ACTIVE))

    def _outcome(self, job_id: str, targets: list[str], latest: dict | None = None) -> str:
        """What a finished job came to, as its reason: 'every target SUCCEEDED (5)' or
        '3 of 5 targets did not succeed: FAILED 2, never reached 1'."""
        latest = self._latest(job_id) if latest is None else latest
        if not targets:
            return "no target devices"
        missed: dict[str, int] = {}
        for d in targets:
            st = latest[d]["status"] if d in latest else "never reached"
            if st != SUCCEEDED:
                missed[st] = missed.get(st, 0) + 1
        if not missed:
            return f"every target SUCCEEDED ({len(targets)})"
        return (f"{sum(missed.values())} of {len(targets)} targets did not succeed: "
                + ", ".join(f"{k} {v}" for k, v in sorted(missed.items())))

    def _abort_reason(self, job: Job) -> str | None:
        opts = job.options
        if opts.abort_threshold is None:
            return None
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM executions WHERE job = ? GROUP BY status",
                                      (job.id,)).fetchall())
        finished = sum(counts.get(s, 0) for s in COUNTED)
        failed = sum(counts.get(s, 0) for s in FAILURES)
        if finished >= opts.abort_min_finished and failed / finished >= opts.abort_threshold:
            return (f"abort threshold reached: {failed} of {finished} finished executions failed "
                    f"({failed / finished:.0%} >= {opts.abort_threshold:.0%})")
        return None

    def _abort(self, job_id: str, reason: str, now: float, changes: Changes | None) -> None:
        with self.store.transaction() as db:
            self._remove_queued(db, job_id, REMOVED, now, "job aborted", changes)
            self._finish_job(db, job_id, ABORTED, now, reason)
        if changes is not None:
            changes.aborted.append(job_id)

    def _retry_if_allowed(self, job: Job, last: dict, now: float, changes: Changes | None,
                          failures: int | None = None, held: dict[str, str] | None = None) -> bool:
        """Queue the next attempt after a FAILED or TIMED_OUT one while the `retries` budget
        (FAILED + TIMED_OUT attempts beyond the first) lasts, unless an earlier job holds
        the device (the tick retries once it no longer does)."""
        opts = job.options
        if last["status"] not in RETRIABLE or last["by_operator"]:
            return False
        if failures is None:
            failures = self._attempts(job.id, last["device"])[1].get(last["device"], 0)
        if failures > opts.retries:
            return False
        if opts.end_at is not None and now >= opts.end_at:
            return False
        if held is None:
            held = self._holds(job, now, [last["device"]])
        if last["device"] in held:
            return False
        return self._queue(job, last["device"], last["attempt"] + 1, last["stage"], now, changes)

    # ------------------------------------------------------------ one device's order
    def _order(self, job: Job) -> tuple[float, int]:
        """Where `job` stands in a device's order: when it begins (created, or start_at
        when later), then creation (the jobs table's rowid)."""
        start = job.options.start_at
        return (job.created if start is None else max(job.created, start), job.rowid)

    @staticmethod
    def _settled(job: Job, latest: dict | None, failures: int, now: float) -> bool:
        """True when `job` will sign no further envelope for this device by itself: its
        latest execution is final and not about to be retried, or pending with no retry
        left should it fail (an operator's retry is never retried)."""
        if latest is None:
            return False
        if latest["by_operator"]:
            return True
        opts = job.options
        may_retry = opts.end_at is None or now < opts.end_at
        if latest["status"] in PENDING:
            return not (may_retry and failures + 1 <= opts.retries)
        return not (may_retry and latest["status"] in RETRIABLE and failures <= opts.retries)

    def _unsettled(self, job: Job, now: float, devices: Iterable[str] | None = None) -> set[str]:
        """The target devices (of `devices`) `job` may still sign an envelope for."""
        targets = set(self._current_targets(job))
        if devices is not None:
            targets &= set(devices)
        if not targets:
            return set()
        latest, failures = self._attempts(job.id)
        return {d for d in targets if not self._settled(job, latest.get(d), failures.get(d, 0), now)}

    def _holds(self, job: Job, now: float, devices: Iterable[str] | None = None) -> dict[str, str]:
        """{device: the earliest job holding it} for `job`'s devices (of `devices`): ACTIVE
        jobs of the same ordered type that begin before it and may still sign for them."""
        if job.type not in ORDERED_TYPES:
            return {}
        devices = None if devices is None else list(devices)
        mine = self._order(job)
        earlier = [o for o in (self._job(j) for j in self.jobs(ACTIVE) if j != job.id)
                   if o.type == job.type and self._order(o) < mine
                   and (o.options.start_at is None or o.options.start_at <= now)]
        held: dict[str, str] = {}
        for other in sorted(earlier, key=self._order):
            for d in self._unsettled(other, now, devices):
                held.setdefault(d, other.id)
        return held

    # ------------------------------------------------------------ tick
    def tick(self, now: float | None = None) -> Changes:
        """Advance every ACTIVE job; returns what changed (and whose queues)."""
        now = self.clock() if now is None else now
        changes = Changes()
        # In each device's order (_order), so that an earlier job's devices are known to
        # the later jobs of its type before they queue anything (module docstring).
        jobs = sorted((self._job(j) for j in self.jobs(ACTIVE)), key=self._order)
        kinds = [j.type for j in jobs]
        held: dict[str, dict[str, str]] = {}  # type -> {device: earliest job that may still sign for it}
        for i, job in enumerate(jobs):
            ahead = held.setdefault(job.type, {})
            self._tick_job(job, now, changes, ahead if job.type in ORDERED_TYPES else {})
            if job.type in ORDERED_TYPES and job.type in kinds[i + 1:]:
                ticked = self._job(job.id)  # as the tick left it
                if ticked.status == ACTIVE and (ticked.options.start_at is None
                                                   or ticked.options.start_at <= now):
                    for d in self._unsettled(ticked, now):
                        ahead.setdefault(d, ticked.id)
        if now >= self._stuck_next:
            self._stuck_next = now + STUCK_CHECK_S
            for s in self.stuck(now=now):
                key = (s.job, s.device, s.attempt)
                if key not in self._stuck_seen:
                    self._stuck_seen.add(key)
                    changes.stuck.append((s.job, s.device, s.reason))
        return changes

    def _targets(self, job: Job, now: float, changes: Changes) -> list[str]:
        """The job's current target devices in rank order (resolving as the options say)."""
        job_id = job.id
        if job.resolved is None or job.options.continuous:
            current = set(self._resolve(job.targets))
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
                if job.resolved is None:
                    db.execute("UPDATE jobs SET resolved = ?, updated = ? WHERE id = ?", (now, now, job_id))
                    job.resolved = now
        return [r[0] for r in self.db.execute("SELECT device FROM job_targets WHERE job = ? AND left_at IS NULL "
                                              "ORDER BY rank, device", (job_id,))]

    def _tick_job(self, job: Job, now: float, changes: Changes, held: dict[str, str]) -> None:
        """One job's step; `held`: the devices earlier jobs of its type may still sign for,
        which this one must not sign for yet."""
        job_id, opts = job.id, job.options
        if opts.start_at is not None and now < opts.start_at:
            return
        if opts.end_at is not None and now >= opts.end_at:
            with self.store.transaction() as db:
                self._remove_queued(db, job_id, REMOVED, now, "job end_at passed", changes)
                self._finish_job(db, job_id, COMPLETED, now, "end_at passed")
            changes.completed.append(job_id)
            return
        ranked = self._targets(job, now, changes)

        # per-device timeouts
        if opts.timeout_s is not None:
            with self.store.transaction() as db:
                late = [r[0] for r in db.execute(
                    "SELECT device FROM executions WHERE job = ? AND status = ? AND started <= ?",
                    (job_id, IN_PROGRESS, now - opts.timeout_s))]
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

        # retries of failed / timed-out attempts (also catches up after a restart, and
        # after an earlier job stopped holding the device)
        latest, failures = self._attempts(job_id)
        targeted = set(ranked)
        for d, last in latest.items():
            if d in targeted and self._retry_if_allowed(job, last, now, changes, failures.get(d, 0), held):
                latest[d] = self._executions(job_id, d)[-1]

        # stages
        stages, n = opts.stages, len(ranked)
        if n == 0:
            if not opts.continuous:
                with self.store.transaction() as db:
                    self._finish_job(db, job_id, COMPLETED, now, "no target devices")
                changes.completed.append(job_id)
            return
        stage = min(job.stage, len(stages) - 1)
        allowed = _allowed(stages, stage, n)
        covered = ranked[:allowed]
        stage_done = all(d in latest and latest[d]["status"] not in PENDING for d in covered)
        if stage_done and stage < len(stages) - 1:
            # a device the operator removed (remove()) is out of the count
            own = [d for d in ranked[_allowed(stages, stage - 1, n) if stage else 0:allowed]
                   if latest[d]["status"] not in (REMOVED, CANCELED)]
            ok = sum(1 for d in own if latest[d]["status"] == SUCCEEDED)
            frac = ok / len(own) if own else 1.0
            if frac + 1e-9 < opts.success_threshold:
                self._abort(job_id, f"stage {stage} ({stage_text(stages[stage])}) succeeded on {ok} of "
                                    f"{len(own)} devices, below success_threshold {opts.success_threshold:.0%}",
                            now, changes)
                return
            stage += 1
            self.db.execute("UPDATE jobs SET stage = ?, updated = ? WHERE id = ?", (stage, now, job_id))
            changes.advanced.append((job_id, stage))
            allowed = _allowed(stages, stage, n)
        elif stage_done and not opts.continuous:
            # a rotation's follow-up is recorded before the job shows COMPLETED (with the outcome as reason)
            note = self._finish_rotation(job, [latest[d] for d in ranked]) if opts.rotation else None
            with self.store.transaction() as db:
                self._finish_job(db, job_id, COMPLETED, now, note or self._outcome(job_id, ranked, latest))
            changes.completed.append(job_id)
            return

        # start new devices, within the stage and the rate, unless an earlier job holds them
        fresh = [d for d in ranked[:allowed] if d not in latest and d not in held]
        if not fresh:
            return
        room = len(fresh)
        if opts.rate_per_min is not None:
            started = self.db.execute("SELECT COUNT(*) FROM executions WHERE job = ? AND attempt = 1 AND queued > ?",
                                      (job_id, now - 60)).fetchone()[0]
            room = min(room, max(0, opts.rate_per_min - started))
        for d in fresh[:room]:
            self._queue(job, d, 1, stage, now, changes)

    # ------------------------------------------------------------ key rotation
    def create_rotation_job(self, targets="*", job_id: str | None = None, *,
                            options: RolloutOptions | None = None) -> tuple[str, str]:
        """Make a new signing key and roll out the `keys` job ``{"add": {new kid: public}}``,
        signed by the current fleet key. Returns (job id, new kid). `options`: how it rolls
        out; its sign_kid and rotation are set here.

        When every target device SUCCEEDED, tick() rolls out the follow-up `keys` job
        ``{"remove": [old kid]}``, signed by the new key, and retires the old key. If some
        did not, the old key stays active and the job's reason says so: fix those devices
        and retire by hand (`mpfleet keys retire`)."""
        old = self.keyring.fleet_key()
        self.keyring.load(old.kid)  # the old key must be usable before a new one is made
        # what create_job would refuse, refused before a key is made for nothing
        self._normalize_targets(targets)
        options = RolloutOptions() if options is None else options
        if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
            raise RolloutError(f"job id {job_id!r} must be 1..48 of A-Z, a-z, 0-9, '_', '.', '-'")
        active = [k.kid for k in self.keyring.list() if k.active]
        if len(active) >= MAX_TRUSTED_KEYS:
            raise RolloutError(f"{len(active)} keys are active and a device trusts at most {MAX_TRUSTED_KEYS}: "
                               f"retire one first (`mpfleet keys retire`)")
        new = self.keyring.add_key()
        job_id = job_id or f"key-add-{new.kid[:8]}-{secrets.token_hex(2)}"
        self.create_job("keys", {"add": {new.kid: new.public_b64}}, targets, job_id=job_id,
                        options=replace(options, sign_kid=old.kid, rotation=KeyRotation(old.kid, new.kid)))
        return job_id, new.kid

    def _finish_rotation(self, job: Job, latest: list[dict]) -> str:
        """What a finished rotation job leads to, as the job's reason. When every device
        applied it: the `keys` job removing the old key (one per rotation, its id derived
        from the rotation's, so a tick interrupted here and run again adds no second one),
        then the old key retired."""
        rot = job.options.rotation
        missing = [e["device"] for e in latest if e["status"] != SUCCEEDED]
        if missing:
            return (f"key rotation incomplete: {len(missing)} device(s) did not apply it "
                    f"(first: {', '.join(missing[:5])}); key {rot.old} stays active")
        retire_id = f"key-retire-{rot.old[:8]}-{hashlib.sha256(job.id.encode()).hexdigest()[:4]}"
        exists = self.db.execute("SELECT 1 FROM jobs WHERE id = ?", (retire_id,)).fetchone()
        if not exists:
            try:
                # the job first: should it be refused, the old key stays active and signing
                self.create_job("keys", {"remove": [rot.old]}, job.targets, job_id=retire_id,
                                options=RolloutOptions(sign_kid=rot.new))
            except RolloutError as e:
                return f"key rotation applied everywhere, but the job removing key {rot.old} was refused: {e}"
        if self.keyring.get(rot.old).active:
            self.keyring.store.retire_key(rot.old)
        return f"key rotation applied everywhere: key {rot.old} retired, job {retire_id} removes it"

    # ------------------------------------------------------------ USB delivery
    def usb_envelope(self, job_id: str, device: str) -> str:
        """The signed envelope that carries `job_id` to `device` over USB (`mpfleet usb run`).

        The same execution records as the network path: a pending execution's envelope is
        reused (its seq, so the device never runs it twice), else a new attempt is signed.
        Stages and rate do not apply: the operator at the cable chose the boards. The
        device's status comes back through on_status like any other."""
        job = self._job(job_id)
        if job.status != ACTIVE:
            raise RolloutError(f"job {job_id} is {job.status}: there is nothing to run")
        if job.type in NETWORK_JOBS:
            raise RolloutError(f"a {job.type} job needs the network: it cannot run over USB")
        if device not in self._targets(job, self.clock(), Changes()):
            raise RolloutError(f"{device} is not a target of job {job_id}")
        latest = self._latest(job_id).get(device)
        if latest is not None and latest["status"] in PENDING:
            return latest["envelope"]
        if latest is not None and latest["status"] not in RETRIABLE:
            raise RolloutError(f"job {job_id} already ended on {device}: {latest['status']}")
        if is_scrubbed(job.params):
            raise RolloutError(SCRUBBED_TEXT.format(job=job_id, device=device))
        behind = self._holds(job, self.clock(), [device]).get(device)
        if behind is not None:
            raise RolloutError(f"job {job_id} waits for job {behind}, created before it, to reach {device}: "
                               f"run {behind} there first (jobs of one type run in creation order)")
        attempt = latest["attempt"] + 1 if latest else 1
        self._queue(job, device, attempt, job.stage, self.clock(), None)
        return self._latest(job_id)[device]["envelope"]

    # ------------------------------------------------------------ device statuses
    def on_status(self, device: str, message: dict) -> bool:
        """Apply one `jobs/status` message from `device`; True if it changed anything.

        Matched by (job, device, seq); duplicates, statuses of older attempts, statuses
        of unknown jobs and anything arriving after a final status change nothing. A
        rejection by digest (`envelope:<digest>`) is matched to the device's execution
        with that envelope (envelope_digest), else kept in job_rejects.
        """
        if not isinstance(message, dict):
            return False
        job_id, status = message.get("job"), message.get("status")
        if not isinstance(job_id, str) or status not in DEVICE_STATES:
            return False
        now = self.clock()
        detail = message.get("detail")
        if job_id.startswith("envelope:"):
            # Refused before the device could name it (too large, an untrusted key...): if
            # it is one of ours, that execution is REJECTED; else it is kept for the operator.
            e = self._by_digest(device, job_id[len("envelope:"):])
            if e is not None and status == REJECTED and isinstance(detail, str) and detail.startswith("replay"):
                return self._refused_as_replay(e, detail, now)
            if e is not None:
                return status == REJECTED and self._apply_status(e, status, detail, None, now)
            cur = self.db.execute("INSERT INTO job_rejects (device, ref, detail_json, at) VALUES (?, ?, ?, ?) "
                                  "ON CONFLICT DO NOTHING", (device, job_id, json.dumps(detail), now))
            return cur.rowcount == 1
        seq = message.get("seq")
        control = self._control_status(device, job_id, seq, status, detail, now)
        if control is not None:
            return control
        if isinstance(seq, bool) or not isinstance(seq, int):
            return False
        row = self.db.execute(f"SELECT {', '.join(self._EXEC_COLS)} FROM executions "
                              "WHERE job = ? AND device = ? AND seq = ?", (job_id, device, seq)).fetchone()
        if row is None:
            return False
        dev_attempt = message.get("attempt") if isinstance(message.get("attempt"), int) else None
        return self._apply_status(dict(zip(self._EXEC_COLS, row)), status, detail, dev_attempt, now,
                                  message.get("progress"))

    def _refused_as_replay(self, e: dict, detail: str, now: float) -> bool:
        """The device refused one of our envelopes as a replay: it has started this seq or
        a later one of the key, so it ran this job before (its final status lost, and
        too long ago for it to report again) or passed over it. Which, the host cannot
        tell: the execution keeps its state, the device's word is kept as its detail, and
        stuck() flags it for the operator (kind "passed")."""
        if e["status"] not in PENDING or e["detail_json"] is not None:
            return False
        self.db.execute("UPDATE executions SET detail_json = ?, updated = ? WHERE id = ?",
                        (json.dumps({"refused_as_replay": detail}), now, e["id"]))
        return True

    def _by_digest(self, device: str, digest: str) -> dict | None:
        """The execution on `device` whose envelope the device names by `digest`."""
        for row in self.db.execute(f"SELECT {', '.join(self._EXEC_COLS)} FROM executions WHERE device = ? "
                                   "ORDER BY id DESC", (device,)):
            e = dict(zip(self._EXEC_COLS, row))
            if e["envelope"] != SCRUBBED_ENVELOPE and envelope_digest(e["envelope"]) == digest:
                return e
        return None

    def _apply_status(self, e: dict, status: str, detail, dev_attempt: int | None, now: float,
                      progress=None) -> bool:
        """One device status for execution `e`; True if it changed anything.

        A final status is applied once, from QUEUED as well as IN_PROGRESS (the
        IN_PROGRESS may have been lost): the UPDATE takes it only from a pending state,
        so a repeat, which the device sends for a job it still sees in its retained
        queue, changes nothing, and neither does a different final word later."""
        if e["status"] == CANCELED and status != IN_PROGRESS and _awaits_word(e):
            return self._after_cancel(e, status, detail, dev_attempt, now)
        if e["status"] not in PENDING:
            # final is final; a device's final word on an attempt the host gave up on (timed out,
            # canceled, removed) is kept as a note for the operator, and changes nothing else
            if e["status"] in (TIMED_OUT, CANCELED, REMOVED) and status != IN_PROGRESS:
                late = f"device later reported {status}"
                if late not in (e["note"] or ""):
                    self.db.execute("UPDATE executions SET note = ? WHERE id = ?",
                                    (f"{e['note']}; {late}" if e["note"] else late, e["id"]))
            return False
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
            "UPDATE executions SET status = ?, finished = ?, updated = ?, "
            "device_attempt = COALESCE(?, device_attempt), detail_json = ? WHERE id = ? AND status IN (?, ?)",
            (status, now, now, dev_attempt, json.dumps(detail), e["id"], QUEUED, IN_PROGRESS))
        if cur.rowcount != 1:
            return False
        if not self.follow_up:
            return True
        job = self._job(e["job"])
        job_id = job.id
        if job.status == ACTIVE:
            reason = self._abort_reason(job)
            if reason:
                self._abort(job_id, reason, now, None)
            else:
                e["status"] = status
                self._retry_if_allowed(job, e, now, None)
        return True

    def _after_cancel(self, e: dict, status: str, detail, dev_attempt: int | None, now: float) -> bool:
        """The device's first final word on an execution canceled while it ran: the record
        says what happened. SUCCEEDED: it was past its point of no return (an update
        after set_boot, a config applied), so it is SUCCEEDED, noted that the cancel came
        too late. Anything else: it stays CANCELED, with the device's detail and a note
        saying whether it stopped for the cancel (an update refused as canceled before
        set_boot) or ended otherwise."""
        if status == SUCCEEDED:
            note = (f"{e['note']}{_THEN}SUCCEEDED: the cancel came too late, the device was past its point of "
                    f"no return")
            cur = self.db.execute(
                "UPDATE executions SET status = ?, finished = ?, updated = ?, detail_json = ?, note = ?, "
                "device_attempt = COALESCE(?, device_attempt) WHERE id = ? AND status = ? AND note = ?",
                (SUCCEEDED, now, now, json.dumps(detail), note, dev_attempt, e["id"], CANCELED, e["note"]))
        else:
            stopped = isinstance(detail, dict) and detail.get("stopped") == "canceled"
            if stopped:
                at, size = detail.get("at"), detail.get("size")
                where = f" at byte {at} of {size}" if isinstance(at, int) and isinstance(size, int) else ""
                word = f"the device stopped{where}, before its point of no return"
            else:
                word = f"the device reported {status}"
            cur = self.db.execute(
                "UPDATE executions SET updated = ?, detail_json = ?, note = ? WHERE id = ? AND status = ? AND note = ?",
                (now, json.dumps(detail if detail is not None else {"status": status}), f"{e['note']}{_THEN}{word}",
                 e["id"], CANCELED, e["note"]))
        if cur.rowcount != 1:
            return False
        if not self.follow_up:
            return True
        job = self._job(e["job"])
        if job.status == ACTIVE and status == SUCCEEDED:
            reason = self._abort_reason(job)
            if reason:
                self._abort(job.id, reason, now, None)
        return True

    def _control_status(self, device: str, control_id: str, seq, status: str, detail, now: float) -> bool | None:
        """None if this is no control job's status, else whether it changed anything."""
        row = self.db.execute("SELECT job, type, status FROM job_controls WHERE device = ? AND control_id = ? "
                              "AND seq = ?", (device, control_id, seq)).fetchone()
        if row is None:
            return None
        if row[2] != QUEUED or status == IN_PROGRESS:
            return False  # known control job: consumed, nothing to change
        self.db.execute("UPDATE job_controls SET status = ?, finished = ?, detail_json = ? WHERE job = ? AND "
                        "device = ? AND type = ?", (status, now, json.dumps(detail), row[0], device, row[1]))
        return True

    # ------------------------------------------------------------ cancel
    def cancel(self, job_id: str, reason: str = "canceled") -> Changes:
        """CANCEL the job: QUEUED executions become CANCELED (never started); IN_PROGRESS
        ones become CANCELED too, noted CANCELED_RUNNING: their device is told to stop
        (a `cancel` job, see cancel_envelopes, and the artifact server refuses an
        update's chunks as canceled), and what it reports next decides the record
        (_apply_status): SUCCEEDED if it was past its point of no return, else CANCELED
        with its word that it stopped."""
        job = self._job(job_id)
        if job.status != ACTIVE:
            raise RolloutError(f"job {job_id} is {job.status}, only an ACTIVE job can be canceled")
        now = self.clock()
        changes = Changes()
        with self.store.transaction() as db:
            self._cancel_executions(db, job_id, None, now, changes)
            db.execute("UPDATE jobs SET status = ?, finished = ?, updated = ?, reason = ? WHERE id = ?",
                       (CANCELED, now, now, reason, job_id))
        return changes

    def cancel_devices(self, job_id: str, devices: Iterable[str]) -> Changes:
        """Cancel `job_id` on `devices` only (the operator's per-execution cancel); the rest
        of the rollout goes on. A QUEUED execution becomes CANCELED and leaves the
        queue; an IN_PROGRESS one as in cancel(), its device told to stop. A canceled
        device does not count toward its stage's success threshold. Refused for all when
        one has no execution of the job yet or its latest already ended."""
        job = self._job(job_id)
        if job.status != ACTIVE:
            raise RolloutError(f"job {job_id} is {job.status}: only an ACTIVE job's executions can be canceled")
        chosen = list(dict.fromkeys(devices))
        if not chosen:
            raise RolloutError("say which devices to cancel the job on")
        latest = self._latest(job_id)
        targets = set(self._current_targets(job))
        for d in chosen:
            e = latest.get(d)
            if e is None:
                where = "is not a target of" if d not in targets else "has not been sent to"
                raise RolloutError(f"{d} {where} job {job_id}: there is nothing to cancel there"
                                   + (" yet (`mpfleet job cancel` cancels the whole job)" if d in targets else ""))
            if e["status"] not in PENDING:
                raise RolloutError(f"job {job_id} already ended on {d}: {e['status']}")
        now = self.clock()
        changes = Changes()
        with self.store.transaction() as db:
            self._cancel_executions(db, job_id, chosen, now, changes)
        return changes

    def _cancel_executions(self, db, job_id: str, devices: list[str] | None, now: float, changes: Changes) -> None:
        self._remove_queued(db, job_id, CANCELED, now, "canceled before the device started it", changes, devices)
        running = [r[0] for r in db.execute("SELECT device FROM executions WHERE job = ? AND status = ?",
                                            (job_id, IN_PROGRESS))]
        for d in running:
            if devices is not None and d not in devices:
                continue
            db.execute("UPDATE executions SET status = ?, finished = ?, updated = ?, note = ? "
                       "WHERE job = ? AND device = ? AND status = ?",
                       (CANCELED, now, now, f"{CANCELED_RUNNING}: the device is told to stop (a cancel job; an "
                                            f"update's download is refused); it may still finish if past its "
                                            f"point of no return", job_id, d, IN_PROGRESS))
            changes.devices.add(d)

    def cancel_envelopes(self, job_id: str) -> dict[str, str]:
        """{device: envelope} of signed `cancel` jobs for every device whose execution was
        canceled while in progress (a canceled job, or cancel_devices()). Signed once per
        such execution and stored (calling again returns the same envelopes);
        device_queue() carries them until the device reports them final."""
        job = self._job(job_id)
        now = self.clock()
        rows = self.db.execute(
            "SELECT device, MAX(finished) FROM executions WHERE job = ? AND status = ? AND started IS NOT NULL "
            "AND note LIKE ? GROUP BY device ORDER BY device", (job_id, CANCELED, f"{CANCELED_RUNNING}%")).fetchall()
        control_id = f"cancel-{job_id}"
        for d, canceled_at in rows:
            old = self.db.execute("SELECT status, created FROM job_controls WHERE job = ? AND device = ? "
                                  "AND type = 'cancel'", (job_id, d)).fetchone()
            if old is not None and (old[0] == QUEUED or old[1] >= canceled_at):
                continue  # this cancel's job exists already
            signed, envelope = self.keyring.sign({"id": control_id, "type": "cancel", "targets": [d],
                                                  "params": {"job": job_id}, "iat": int(now)},
                                                 kid=self._signing_kid(job))
            # one row per (job, device): a later cancel (of a retried attempt) replaces a finished one
            self.db.execute("INSERT INTO job_controls (job, device, control_id, type, seq, envelope, status, "
                            "created) VALUES (?, ?, ?, 'cancel', ?, ?, ?, ?) ON CONFLICT (job, device, type) "
                            "DO UPDATE SET control_id = excluded.control_id, seq = excluded.seq, "
                            "envelope = excluded.envelope, status = excluded.status, created = excluded.created, "
                            "finished = NULL, detail_json = NULL",
                            (job_id, d, control_id, signed["seq"], envelope, QUEUED, now))
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT device, envelope FROM job_controls WHERE job = ? AND type = 'cancel' ORDER BY device",
            (job_id,))}

    # ------------------------------------------------------------ stuck executions, the operator's hand
    def stuck(self, job_id: str | None = None, now: float | None = None) -> list[StuckExecution]:
        """The QUEUED executions of ACTIVE jobs (of `job_id`) flagged stuck. `kind`:

        - "too_large": the envelope is over the limit the device reports now (it drops
          it unread, so it never takes it), flagged at once;
        - "passed": the device refused it as a replay (it ran it before and lost the
          status, or passed over it: _refused_as_replay), flagged at once;
        - "not_taken": QUEUED longer than the bound although the device reported (state
          or samples) after it was queued;
        - "offline": QUEUED longer than the bound and the device has not reported since.

        Reading only: a flag changes no state (a device that wakes late still takes
        the job); retry() and remove() are the operator's."""
        now = self.clock() if now is None else now
        # each device's last report and state in the same rows; a state is parsed once while
        # its text stays the same (stuck() runs every STUCK_CHECK_S over every QUEUED execution)
        q = ("SELECT e.job, e.device, e.attempt, e.seq, e.envelope, e.queued, e.detail_json, d.last_seen, "
             "d.state_json FROM executions e JOIN jobs j ON j.id = e.job LEFT JOIN devices d ON d.id = e.device "
             "WHERE e.status = ? AND j.status = ?")
        args: list = [QUEUED, ACTIVE]
        if job_id is not None:
            q += " AND e.job = ?"
            args.append(job_id)
        rows = self.db.execute(q + " ORDER BY e.job, e.device, e.attempt", args).fetchall()
        jobs: dict[str, Job] = {}
        out = []
        for job, device, attempt, seq, envelope, queued, detail_json, last, state_json in rows:
            if job not in jobs:
                jobs[job] = self._job(job)
            bound = jobs[job].options.queued_limit_s
            age = now - queued
            limit, source = self._limit_of(device, state_json)
            detail = _loads(detail_json)
            if isinstance(detail, dict) and "refused_as_replay" in detail:
                kind = "passed"
                reason = (f"{device} refused it as a replay ({detail['refused_as_replay']}): it ran this job before "
                          f"and its status was lost, or passed over it; the host cannot tell which")
            elif len(envelope) > limit:
                kind = "too_large"
                reason = (f"never taken: the envelope is {len(envelope)} bytes, over the limit of {limit} bytes "
                          f"({source}), so {device} drops it unread")
            elif age <= bound:
                continue
            elif last is not None and last > queued:
                kind = "not_taken"
                reason = (f"queued {_span(age)} ago, longer than its bound of {_span(bound)} (queued_timeout_s), "
                          f"and not taken although {device} reported {_span(now - last)} ago")
            else:
                kind = "offline"
                seen = "never" if last is None else f"{_span(now - last)} ago"
                reason = (f"queued {_span(age)} ago, longer than its bound of {_span(bound)} (queued_timeout_s); "
                          f"{device} has not reported since it was queued (last report: {seen})")
            in_queue = envelope in self.device_queue(device)
            if not in_queue and kind in ("not_taken", "offline"):
                reason += (f"; not in its queue yet: earlier envelopes fill the {QUEUE_MAX_BYTES} bytes "
                           f"one queue carries")
            out.append(StuckExecution(job=job, device=device, attempt=attempt, seq=seq, kind=kind, reason=reason,
                                      queued=queued, queued_for_s=age, bound_s=bound, last_report=last,
                                      in_queue=in_queue))
        return out

    def retry(self, job_id: str, devices: Iterable[str] | None = None) -> Changes:
        """The operator's retry: a new attempt (a new envelope, a new seq) of `job_id` on
        each of `devices`, or, by default, on every target whose latest execution FAILED,
        was REJECTED or TIMED_OUT, or is flagged stuck. The `retries` budget neither
        limits it nor retries it (should it fail, so that a later job of the type signed
        after it stays after it). A stuck QUEUED execution is replaced (REMOVED, noted); a COMPLETED job is
        ACTIVE again until the new attempts end.

        Refused, naming the device and why, for all of them when one cannot be retried:
        not a target, never sent there, SUCCEEDED, IN_PROGRESS, QUEUED but not stuck, the
        job ABORTED, CANCELED or past its end; held by an earlier job of its type; or a
        later job of its type has already run (or is running) there, which the retry
        would undo. A later job's execution still QUEUED on the device is signed again
        after the retry, so that the device keeps the jobs' order."""
        job = self._job(job_id)
        now = self.clock()
        if job.status in (ABORTED, CANCELED):
            raise RolloutError(f"job {job_id} is {job.status}: create a new job to run it again")
        if is_scrubbed(job.params):
            raise RolloutError(SCRUBBED_TEXT.format(job=job_id, device=", ".join(self._current_targets(job))))
        if job.options.end_at is not None and now >= job.options.end_at:
            raise RolloutError(f"job {job_id} ended at its end_at: create a new job to run it again")
        targets = set(self._current_targets(job))
        latest = self._latest(job_id)
        stuck = {s.device for s in self.stuck(job_id, now)}
        if devices is None:
            chosen = sorted(d for d in targets if d in latest and (latest[d]["status"] in FAILURES or d in stuck))
            if not chosen:
                raise RolloutError(f"job {job_id} has nothing to retry: no execution failed, was rejected, "
                                   f"timed out or is stuck")
        else:
            chosen = list(dict.fromkeys(devices))
            if not chosen:
                raise RolloutError("say which devices to retry")
        held = self._holds(job, now, chosen)
        for d in chosen:
            e = latest.get(d)
            if d not in targets:
                raise RolloutError(f"{d} is not a target of job {job_id}")
            if d in held:
                raise RolloutError(f"job {job_id} waits for job {held[d]}, created before it, to reach {d}: "
                                   f"it goes there once that one has")
            if e is None:
                raise RolloutError(f"job {job_id} has not been sent to {d} yet: its rollout gets there")
            if e["status"] == SUCCEEDED:
                raise RolloutError(f"job {job_id} already SUCCEEDED on {d}")
            if e["status"] == IN_PROGRESS:
                raise RolloutError(f"job {job_id} is IN_PROGRESS on {d}: wait for its final status or its timeout, "
                                   f"or cancel the job")
            if _awaits_word(e):
                raise RolloutError(f"job {job_id} was canceled on {d} while in progress and {d} has not reported "
                                   f"since: it may still finish; retry once `job status {job_id}` shows its word")
            if e["status"] == QUEUED and d not in stuck:
                raise RolloutError(f"job {job_id} is QUEUED on {d} and not stuck: {d} has had "
                                   f"{_span(now - e['queued'])} of its {_span(job.options.queued_limit_s)} "
                                   f"(queued_timeout_s) to take it")
        for d in chosen:
            self._after(job, d)  # RolloutError when a later job of the type ran there
        changes = Changes()
        if job.status == COMPLETED:
            self.db.execute("UPDATE jobs SET status = ?, finished = NULL, updated = ?, reason = ? WHERE id = ?",
                            (ACTIVE, now, f"reopened: retried on {len(chosen)} device(s)", job_id))
        for d in chosen:
            e = latest[d]
            replace = (e["id"], f"replaced by attempt {e['attempt'] + 1}, retried by the operator") \
                if e["status"] == QUEUED else None
            if not self._queue(job, d, e["attempt"] + 1, e["stage"], now, changes, replace, by_operator=True):
                continue  # the device took the stuck one meanwhile, or another process retried it
            seq = self._executions(job_id, d)[-1]["seq"]
            # looked at again now the new seq is taken: a later job a running `serve`
            # queued there meanwhile is signed again after it too
            for later, le in self._after(job, d, strict=False):
                if le["seq"] < seq:
                    self._queue(later, d, le["attempt"] + 1, le["stage"], now, changes,
                                (le["id"], f"replaced by attempt {le['attempt'] + 1}: signed again after the "
                                           f"retry of {job_id}, which comes first"))
        return changes

    def _after(self, job: Job, device: str, strict: bool = True) -> list[tuple[Job, dict]]:
        """The later jobs of `job`'s type whose latest execution on `device` is QUEUED (to be
        signed again after a retry of `job`), in order, with that execution; if one has run
        there: RolloutError (`strict`), else it is left out."""
        if job.type not in ORDERED_TYPES:
            return []
        mine = self._order(job)
        later = [o for o in (self._job(r[0]) for r in self.db.execute(
                     "SELECT DISTINCT e.job FROM executions e JOIN jobs j ON j.id = e.job "
                     "WHERE e.device = ? AND j.type = ? AND e.job != ?", (device, job.type, job.id)))
                 if self._order(o) > mine]
        out = []
        for other in sorted(later, key=self._order):
            execs = self._executions(other.id, device)
            ran = [e for e in execs if e["status"] in (IN_PROGRESS, SUCCEEDED)
                   or (e["status"] in (TIMED_OUT, CANCELED, REMOVED) and e["started"] is not None)]
            if ran and not strict:
                continue
            if ran:
                raise RolloutError(f"job {other.id}, which comes after {job.id}, has already run on {device} "
                                   f"({ran[-1]['status']}): a retry of {job.id} would run after it and undo it")
            if execs[-1]["status"] == QUEUED:
                out.append((other, execs[-1]))
        return out

    def remove(self, job_id: str, devices: Iterable[str], note: str = "removed by the operator") -> Changes:
        """The operator takes `job_id`'s QUEUED executions on `devices` away: REMOVED (a
        host state, final), out of the devices' queues; the device no longer holds the
        job's stage (it does not count toward the success threshold) nor later jobs of
        its type. Refused for all when one is not QUEUED there."""
        job = self._job(job_id)
        if job.status != ACTIVE:
            raise RolloutError(f"job {job_id} is {job.status}: only an ACTIVE job's executions can be removed")
        chosen = list(dict.fromkeys(devices))
        if not chosen:
            raise RolloutError("say which devices to remove the job from")
        latest = self._latest(job_id)
        for d in chosen:
            e = latest.get(d)
            if e is None:
                raise RolloutError(f"job {job_id} has no execution on {d}")
            if e["status"] == IN_PROGRESS:
                raise RolloutError(f"job {job_id} is IN_PROGRESS on {d}: wait for its final status or its timeout, "
                                   f"or cancel the job (a running device gets a cancel job)")
            if e["status"] != QUEUED:
                raise RolloutError(f"job {job_id} already ended on {d}: {e['status']}")
        now = self.clock()
        changes = Changes()
        with self.store.transaction() as db:
            self._remove_queued(db, job_id, REMOVED, now, note, changes, chosen)
        return changes

    # ------------------------------------------------------------ views
    def _queues(self, device: str | Iterable[str] | None = None) -> dict[str, list[str]]:
        """{device: queue} of `device` (None: of every device with a non-empty queue): the
        one place a queue is computed. A queue is the envelopes the device's retained
        `jobs` topic must carry now: QUEUED and IN_PROGRESS executions of ACTIVE jobs plus
        unfinished cancel jobs, ascending seq, the oldest first and only as many as fit in
        QUEUE_MAX_BYTES once encoded (encode_queue): a device parses its whole queue in a
        128 KiB heap; the rest follow as these finish. An envelope no queue can carry
        (only an old database holds one: _queue never records it QUEUED) is left out
        rather than block the ones behind it."""
        some = () if device is None else (device,) if isinstance(device, str) else tuple(device)
        marks = ", ".join("?" * len(some))
        only = "" if device is None else f"AND e.device IN ({marks}) "
        only_c = "" if device is None else f"AND device IN ({marks}) "
        args = (QUEUED, IN_PROGRESS, ACTIVE, *some, QUEUED, *some)
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

    def queues_of(self, devices: Iterable[str], chunk: int = 400) -> dict[str, list[str]]:
        """device_queue() of each of `devices` whose queue is not empty, a few hundred
        devices a query."""
        devices = sorted(set(devices))
        out: dict[str, list[str]] = {}
        for i in range(0, len(devices), chunk):
            out.update(self._queues(devices[i:i + chunk]))
        return out

    def all_queues(self) -> dict[str, list[str]]:
        """device_queue() of every device whose queue is not empty, in one query: what
        serve publishes."""
        return self._queues()

    def job_status(self, job_id: str) -> JobStatus:
        """Everything `mpfleet job status` shows: the job, counts per state (latest attempt
        per device, and over every attempt), failures with reasons, per-device rows (each
        with its `stuck` flag or None), the executions flagged stuck (see stuck()), and
        the devices `held` behind an earlier job of its type."""
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
        stuck = self.stuck(job_id)
        flags = {(f.device, f.attempt): f for f in stuck}
        version_key = UPDATE_TYPES.get(job.type)  # what each device runs by its latest report (after a reboot)
        rows = [ExecutionRow(device=e["device"], attempt=e["attempt"], seq=e["seq"], status=e["status"],
                             stage=e["stage"], queued=e["queued"], started=e["started"], finished=e["finished"],
                             device_attempt=e["device_attempt"], detail=_loads(e["detail_json"]), note=e["note"],
                             progress=_loads(e["progress_json"]), stuck=flags.get((e["device"], e["attempt"])),
                             running=self._running(e["device"], version_key) if version_key else None)
                for e in execs]
        held: dict[str, str] = {}
        if job.status == ACTIVE:
            waiting = [d for d in targets if d not in latest or latest[d]["status"] in RETRIABLE]
            held = self._holds(job, self.clock(), waiting) if waiting else {}
        stages = job.options.stages
        succeeded = sum(1 for d in targets if d in latest and latest[d]["status"] == SUCCEEDED)
        rejects = [UnattributedReject(device=r[0], ref=r[1], detail=_loads(r[2]), at=r[3]) for r in self.db.execute(
            "SELECT device, ref, detail_json, at FROM job_rejects ORDER BY at, device")]
        controls = [CancelJob(device=r[0], id=r[1], type=r[2], seq=r[3], status=r[4]) for r in self.db.execute(
            "SELECT device, control_id, type, seq, status FROM job_controls WHERE job = ? ORDER BY device", (job_id,))]
        return JobStatus(
            id=job_id, type=job.type, params=job.params, targets=job.targets, options=job.options,
            status=job.status, reason=job.reason, created=job.created, finished=job.finished, stage=job.stage,
            stage_size=_allowed(stages, min(job.stage, len(stages) - 1), len(targets)),
            target_count=len(targets), not_started=len([d for d in targets if d not in latest]),
            counts=counts, attempt_counts=attempts, devices=rows, stuck=stuck,
            held=[HeldDevice(device=d, behind=held[d]) for d in sorted(held)],
            cancel_jobs=controls, unattributed_rejects=rejects, succeeded_targets=succeeded,
        )

    def _running(self, device: str, version_key: str):
        """The version `device` reports running (its state's `fw` or `app`), or None."""
        state = (self.store.device(device) or {}).get("state") or {}
        return state.get(version_key)
