"""The records of a rollout: the options a job is created with, the job as stored, and
what `mpfleet job status` shows of it.

Which room: the fleet. Split from rollout.py, which is the engine (bookkeeping over
SQLite, signing, targeting): these records are what its callers hold (the CLI, serve,
the demo, the USB tools, the benchmarks), and they need no database, key or registry to
be built, checked or read. Imports only `mpfleet.errors` and `mpfleet.protocol`.

- `Devices`: a stage given as a number of devices (`--stages 1,10%,100%`: one device,
  then 10 %, then all); `stage_sizes()` resolves a job's stages against its targets.
- `RolloutOptions`: every rollout option with its default and its check, in one place
  (the engine's rules for them: rollout.py's docstring). Made by the caller; a bad value
  is refused when the object is made, naming the option (`RolloutError`).
  `from_json` takes a mapping (the CLI's options, a job's stored `options_json`): an
  unknown name is refused, a None is the default.
- `Job`: one row of the `jobs` table, as the engine reads it.
- `JobStatus`, `ExecutionRow`, `StuckExecution`, `HeldDevice`, `CancelJob`,
  `UnattributedReject`: what `RolloutEngine.job_status()` and `stuck()` return.
  `to_json()` is the `--json` output's shape (docs/dispatch.md): the same keys and
  values the command has always printed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from mpfleet.errors import MpfleetError
from mpfleet.protocol.signing import KID_RE

# ---------------------------------------------------------------- states
QUEUED, IN_PROGRESS = "QUEUED", "IN_PROGRESS"
SUCCEEDED, FAILED, REJECTED = "SUCCEEDED", "FAILED", "REJECTED"
TIMED_OUT, CANCELED, REMOVED = "TIMED_OUT", "CANCELED", "REMOVED"
EXECUTION_STATES = (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, REJECTED, TIMED_OUT, CANCELED, REMOVED)
PENDING = (QUEUED, IN_PROGRESS)
FAILURES = (FAILED, REJECTED, TIMED_OUT)
RETRIABLE = (FAILED, TIMED_OUT)
COUNTED = (SUCCEEDED, *FAILURES)  # the executions the abort fraction is taken over
DEVICE_STATES = (IN_PROGRESS, SUCCEEDED, FAILED, REJECTED)
FINAL_STATES = (SUCCEEDED, FAILED, REJECTED)  # what a device reports last

ACTIVE, COMPLETED, ABORTED = "ACTIVE", "COMPLETED", "ABORTED"
JOB_STATES = (ACTIVE, COMPLETED, ABORTED, CANCELED)

# What a job came to (JobStatus.outcome): a COMPLETED job ran to its end, which is
# not the same as succeeding; `mpfleet job status` exits with OUTCOME_EXIT[outcome].
OUTCOMES = ("succeeded", "failures", "empty", "aborted", "canceled", "running", "stuck")
OUTCOME_EXIT = {"succeeded": 0, "aborted": 3, "canceled": 3, "stuck": 4, "failures": 5, "empty": 5, "running": 6}

# The note an execution canceled while IN_PROGRESS carries until its device reports
# (RolloutEngine.cancel): what the device says next decides what is recorded.
CANCELED_RUNNING = "canceled while in progress"

# A `cert` job carries the device's new private key in its params (identity) and in
# each envelope signed from them. Once the job is done with it (no execution pending,
# none to be signed), the database replaces it: the params' identity becomes null
# beside `scrubbed` (the Unix time), each envelope becomes SCRUBBED_ENVELOPE (schema
# migration 4, db/schema.py). The certificate itself stays in `certificates`.
SCRUBBED_ENVELOPE = "scrubbed"
SCRUBBED_TEXT = ("job {job}'s private key was removed from the database once the job ended: nothing can be "
                 "signed from it again; renew the certificate instead (`mpfleet devices cert renew {device}`)")


def is_scrubbed(params: Mapping) -> bool:
    """Whether a job's params are those of a `cert` job scrubbed of its key."""
    return params.get("scrubbed") is not None and params.get("identity") is None


UPDATE_TYPES = {"ota": "fw", "app": "app"}  # job type -> the state key a device reports its version in

# A QUEUED execution older than this is flagged stuck (option queued_timeout_s).
# Devices connect every sample_interval_s x upload_every_wakes (60 s x 30 = 30 min by
# default) or sooner when a job asks: two hours is four such intervals.
QUEUED_TIMEOUT_DEFAULT_S = 7200.0


# The highest rate_per_min a job takes: 100,000 devices started a minute (AWS IoT Jobs
# allows 1,000); more is a typo, and a rate that high is no limit at all.
RATE_MAX_PER_MIN = 100_000


class RolloutError(MpfleetError):
    """A job could not be created or changed; the message names the bad option."""


# ---------------------------------------------------------------- options
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


@dataclass(frozen=True)
class Devices:
    """A stage that covers this many devices (at most all targets), not a fraction of
    them. In `options_json` and `--json`: ``{"devices": n}``; a bare number there is
    a fraction (1 is 100 %)."""

    n: int

    def __post_init__(self) -> None:
        _number("stages: a device count", self.n, 1, integer=True)

    def to_json(self) -> dict:
        return {"devices": self.n}

    def __str__(self) -> str:
        return f"{self.n} device{'s' if self.n != 1 else ''}"


def stage_text(stage) -> str:
    """A stage for people: '10%' or '1 device'."""
    return str(stage) if isinstance(stage, Devices) else f"{stage * 100:g}%"


def stage_sizes(stages, n: int) -> list[int]:
    """How many of n ranked targets each stage covers, cumulatively: a fraction covers
    ceil(f x n) (at least one), a Devices stage min(count, n); never fewer than an
    earlier stage covers (a count that the targets outgrew stays where it was)."""
    out: list[int] = []
    for stage in stages:
        if n <= 0:
            size = 0
        elif isinstance(stage, Devices):
            size = min(n, stage.n)
        else:
            size = min(n, max(1, math.ceil(stage * n - 1e-9)))
        out.append(max(size, out[-1]) if out else size)
    return out


def check_stage_growth(stages, n: int) -> None:
    """RolloutError when a stage would cover fewer of the n targets than an earlier one
    (a device count before a fraction that the targets make smaller: `5,10%` of 20
    devices is 5, then 2). Equal sizes are fine: a stage that adds nobody passes at once."""
    if n <= 0:
        return
    best, at = 0, -1
    for i, stage in enumerate(stages):
        size = stage_sizes([stage], n)[0]
        if size < best:
            raise RolloutError(
                f"stages must grow: of the {n} target device(s), stage {i + 1} ({stage_text(stage)}) covers "
                f"{size}, fewer than stage {at + 1} ({stage_text(stages[at])}) with {best}")
        if size > best:
            best, at = size, i


def _stage(i: int, value):
    """A stage as given (a fraction, Devices, or {"devices": n} from JSON), checked."""
    if isinstance(value, Devices):
        return value
    if isinstance(value, Mapping):
        if set(value) != {"devices"}:
            raise RolloutError(f"stages[{i}] must be a fraction or {{'devices': n}}, not {dict(value)!r}")
        return Devices(value["devices"])
    _number(f"stages[{i}]", value, 0, 1, lo_open=True)
    return float(value)


@dataclass(frozen=True)
class KeyRotation:
    """The key rotation a `keys` job carries out (RolloutEngine.create_rotation_job):
    when every target applied it, the `old` key is removed from the devices and retired."""

    old: str
    new: str

    def to_json(self) -> dict:
        return {"old": self.old, "new": self.new}


@dataclass(frozen=True)
class RolloutOptions:
    """How a job rolls out (rollout.py's docstring: the rules). Checked when made:
    RolloutError names the first bad option. Times are Unix seconds, durations seconds."""

    rate_per_min: int | None = None          # devices started (first attempts) in any 60 s; None: no limit
    stages: tuple = (1.0,)                   # cumulative: fractions of the targets or Devices(n), ending at 1.0
    success_threshold: float = 1.0           # a stage advances when this share of its devices SUCCEEDED
    abort_threshold: float | None = None     # abort when this share of finished executions failed
    abort_min_finished: int = 1              # ... once at least this many finished
    timeout_s: float | None = None           # IN_PROGRESS longer than this: TIMED_OUT
    queued_timeout_s: float | None = None    # QUEUED longer than this: flagged stuck (None: the default)
    retries: int = 0                         # new attempts after FAILED or TIMED_OUT, per device
    start_at: float | None = None            # nothing is queued before
    end_at: float | None = None              # QUEUED executions are REMOVED and the job completes after
    continuous: bool = False                 # devices that join the targets later get the job too
    sign_kid: str | None = None              # sign with this key while it is active (default: the fleet key)
    rotation: KeyRotation | None = None      # a key rotation (create_rotation_job)

    def __post_init__(self) -> None:
        if self.rate_per_min is not None:
            _number("rate_per_min", self.rate_per_min, 1, RATE_MAX_PER_MIN, integer=True)
        stages = self.stages
        if not isinstance(stages, (list, tuple)) or not stages:
            raise RolloutError(f"stages must be a non-empty list of fractions such as [0.05, 0.25, 1.0], "
                               f"not {stages!r}")
        stages = [_stage(i, f) for i, f in enumerate(stages)]
        # fractions increase among themselves, counts among themselves; how a count
        # and a fraction compare depends on the targets (check_stage_growth)
        for kind in (float, Devices):
            mine = [(i, f) for i, f in enumerate(stages) if isinstance(f, kind)]
            for (_, a), (i, b) in zip(mine, mine[1:]):
                if (b.n <= a.n) if kind is Devices else (b <= a):
                    raise RolloutError(f"stages must increase: stages[{i}] = {stage_text(b)} is not above "
                                       f"{stage_text(a)}")
        if stages[-1] != 1:
            raise RolloutError(f"stages must end at 1.0 (100%, the whole target set), not {stage_text(stages[-1])}")
        object.__setattr__(self, "stages", tuple(stages))  # frozen: set once, here
        _number("success_threshold", self.success_threshold, 0, 1)
        if self.abort_threshold is not None:
            _number("abort_threshold", self.abort_threshold, 0, 1, lo_open=True)
        _number("abort_min_finished", self.abort_min_finished, 1, integer=True)
        if self.timeout_s is not None:
            _number("timeout_s", self.timeout_s, 0, lo_open=True)
        if self.queued_timeout_s is not None:
            _number("queued_timeout_s", self.queued_timeout_s, 0, lo_open=True)
        _number("retries", self.retries, 0, 100, integer=True)
        for name in ("start_at", "end_at"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0)
        if self.start_at is not None and self.end_at is not None and self.end_at <= self.start_at:
            raise RolloutError(f"end_at ({self.end_at}) must be after start_at ({self.start_at})")
        if not isinstance(self.continuous, bool):
            raise RolloutError(f"continuous must be true or false, not {self.continuous!r}")
        if self.sign_kid is not None and not (isinstance(self.sign_kid, str) and KID_RE.match(self.sign_kid)):
            raise RolloutError(f"sign_kid must be a key id (16 hex digits), not {self.sign_kid!r}")
        rot = self.rotation
        if rot is not None and not (isinstance(rot, KeyRotation) and all(
                isinstance(k, str) and KID_RE.match(k) for k in (rot.old, rot.new))):
            shown = rot.to_json() if isinstance(rot, KeyRotation) else rot
            raise RolloutError(f"rotation must be {{'old': kid, 'new': kid}}, not {shown!r}")

    @classmethod
    def from_json(cls, options: Mapping) -> RolloutOptions:
        """The options named in `options` (as to_json() writes them), the others at their
        defaults; a None is the default too. RolloutError for an unknown name or a bad value."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise RolloutError(f"unknown rollout option {unknown[0]!r} (known: {', '.join(known)})")
        given = {k: v for k, v in options.items() if v is not None}
        rot = given.get("rotation")
        if isinstance(rot, Mapping) and set(rot) == {"old", "new"}:
            given["rotation"] = KeyRotation(rot["old"], rot["new"])
        return cls(**given)

    def to_json(self) -> dict:
        """Every option, by name: what a job's `options_json` holds and `--json` shows."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stages"] = [f.to_json() if isinstance(f, Devices) else f for f in self.stages]
        out["rotation"] = self.rotation.to_json() if self.rotation is not None else None
        return out

    @property
    def queued_limit_s(self) -> float:
        """How long an execution may stay QUEUED before it is flagged stuck."""
        return self.queued_timeout_s or QUEUED_TIMEOUT_DEFAULT_S


# ---------------------------------------------------------------- the job as stored
@dataclass
class Job:
    """One row of the `jobs` table. `targets` is the targets spec as create_job normalized
    it: {"all": bool, "ids": [...], "groups": [...], "query": str | None}. `resolved`:
    when the targets were first resolved (None: not yet). `rowid` orders jobs created in
    the same second (one device's order, rollout.py)."""

    id: str
    type: str
    params: dict
    targets: dict
    options: RolloutOptions
    status: str = ACTIVE
    stage: int = 0
    resolved: float | None = None
    created: float = 0.0
    updated: float = 0.0
    finished: float | None = None
    reason: str | None = None
    rowid: int = 0


# ---------------------------------------------------------------- what job status shows
@dataclass(frozen=True)
class StuckExecution:
    """A QUEUED execution flagged stuck (RolloutEngine.stuck(): the kinds and their reasons)."""

    job: str
    device: str
    attempt: int
    seq: int
    kind: str                    # "too_large", "passed", "not_taken" or "offline"
    reason: str
    queued: float
    queued_for_s: float
    bound_s: float
    last_report: float | None    # when the device last reported (None: never)
    in_queue: bool               # whether the envelope is in the device's queue now

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ExecutionRow:
    """One execution (attempt) of a job on one device, as `job status` shows it."""

    device: str
    attempt: int
    seq: int
    status: str
    stage: int
    queued: float
    started: float | None
    finished: float | None
    device_attempt: int | None       # the device's resume counter within this execution
    detail: object                   # the device's detail of its last status (JSON), or None
    note: str | None                 # the host's note (why it was removed, timed out...)
    progress: dict | None            # an update's download progress, as last reported
    stuck: StuckExecution | None = None
    running: str | None = None       # update jobs: the version the device reports running now

    def to_json(self, with_running: bool = False) -> dict:
        """`with_running`: for an update job's rows (the key is absent from the others)."""
        out = {"device": self.device, "attempt": self.attempt, "seq": self.seq, "status": self.status,
               "stage": self.stage, "queued": self.queued, "started": self.started, "finished": self.finished,
               "device_attempt": self.device_attempt, "detail": self.detail, "note": self.note,
               "progress": self.progress}
        if with_running:
            out["running"] = self.running
        out["stuck"] = self.stuck.to_json() if self.stuck is not None else None
        return out


@dataclass(frozen=True)
class HeldDevice:
    """A target the job waits for: an earlier job of its type may still sign there."""

    device: str
    behind: str  # that earlier job

    def to_json(self) -> dict:
        return {"device": self.device, "behind": self.behind}


@dataclass(frozen=True)
class CancelJob:
    """A signed `cancel` job sent to a device that was running the canceled job."""

    device: str
    id: str
    type: str
    seq: int
    status: str

    def to_json(self) -> dict:
        return {"device": self.device, "id": self.id, "type": self.type, "seq": self.seq, "status": self.status}


@dataclass(frozen=True)
class UnattributedReject:
    """An envelope a device rejected before it could name the job (`envelope:<digest>`)
    and that matches none of the host's executions."""

    device: str
    ref: str
    detail: object
    at: float

    def to_json(self) -> dict:
        return {"device": self.device, "ref": self.ref, "detail": self.detail, "at": self.at}


@dataclass(frozen=True)
class JobStatus:
    """Everything `mpfleet job status` shows of one job (RolloutEngine.job_status)."""

    id: str
    type: str
    params: dict
    targets: dict                     # the targets spec (Job.targets)
    options: RolloutOptions
    status: str
    reason: str | None
    created: float
    finished: float | None
    stage: int                        # the current stage (index into options.stages)
    stage_size: int                   # how many targets the current stage covers
    target_count: int
    not_started: int                  # targets with no execution yet
    counts: dict[str, int]            # state -> devices, by their latest execution
    attempt_counts: dict[str, int]    # state -> executions, every attempt
    devices: list[ExecutionRow]       # every execution, by device then attempt
    stuck: list[StuckExecution]
    held: list[HeldDevice]
    cancel_jobs: list[CancelJob]
    unattributed_rejects: list[UnattributedReject]
    succeeded_targets: int = 0        # current targets whose latest execution SUCCEEDED
    failures: list[ExecutionRow] = field(init=False)  # the FAILED, REJECTED and TIMED_OUT of `devices`

    def __post_init__(self) -> None:
        object.__setattr__(self, "failures", [r for r in self.devices if r.status in FAILURES])

    @property
    def stages(self) -> tuple:
        return self.options.stages

    @property
    def outcome(self) -> str:
        """One of OUTCOMES: "succeeded" only for a COMPLETED job whose every target
        SUCCEEDED; "failures" for a COMPLETED job where some did not (FAILED, REJECTED,
        TIMED_OUT, REMOVED, CANCELED or never reached), "empty" for one that had no
        target; "aborted", "canceled"; "stuck" or "running" while ACTIVE."""
        if self.status == ABORTED:
            return "aborted"
        if self.status == CANCELED:
            return "canceled"
        if self.status == ACTIVE:
            return "stuck" if self.stuck else "running"
        if self.target_count == 0:
            return "empty"
        return "succeeded" if self.succeeded_targets == self.target_count else "failures"

    @property
    def outcome_text(self) -> str:
        """The outcome for people, e.g. 'every target SUCCEEDED (5)' or '3 of 5 targets
        did not succeed'."""
        o, n = self.outcome, self.target_count
        if o == "succeeded":
            return f"every target SUCCEEDED ({n})"
        if o == "empty":
            return "no target devices: nothing ran"
        if o == "failures" or (o in ("aborted", "canceled") and n):
            return f"{n - self.succeeded_targets} of {n} targets did not succeed"
        if o == "stuck":
            return f"running; {len(self.stuck)} execution(s) stuck"
        return "running" if o == "running" else o

    @property
    def queued_timeout_s(self) -> float:
        """The job's bound on QUEUED (its queued_timeout_s, else the default)."""
        return self.options.queued_limit_s

    def to_json(self) -> dict:
        running = self.type in UPDATE_TYPES
        return {
            "id": self.id, "type": self.type, "params": self.params, "targets": self.targets,
            "options": self.options.to_json(), "status": self.status, "reason": self.reason,
            "created": self.created, "finished": self.finished,
            "stage": self.stage, "stages": self.options.to_json()["stages"], "stage_size": self.stage_size,
            "target_count": self.target_count, "not_started": self.not_started,
            "counts": dict(self.counts), "attempt_counts": dict(self.attempt_counts),
            "failures": [r.to_json(running) for r in self.failures],
            "devices": [r.to_json(running) for r in self.devices],
            "stuck": [s.to_json() for s in self.stuck], "queued_timeout_s": self.queued_timeout_s,
            "held": [h.to_json() for h in self.held], "cancel_jobs": [c.to_json() for c in self.cancel_jobs],
            "unattributed_rejects": [r.to_json() for r in self.unattributed_rejects],
        }
