"""One device's job history: every execution of every job on it, newest first, as
AWS IoT Jobs lists a thing's job executions (`mpfleet devices show ID`).

Which room: host library (the fleet). Reads, never writes, the tables the rollout
engine (fleet/rollout.py) keeps: `executions` (one row per attempt of a job on a
device) joined with `jobs` for the job's type; and `job_controls` (the cancel jobs
sent to a device for an execution it was running). Imports mpfleet.db only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from mpfleet.db.store import Store


@dataclass(frozen=True)
class ExecutionRecord:
    """One attempt of one job on the device. `when`: its last change (finished, else
    started, else queued); `reason`: what the host noted (a timeout, a cancel, a size
    limit...) or the device's own reason from its final status detail."""

    job: str
    type: str
    attempt: int
    seq: int
    status: str
    queued: float
    started: float | None
    finished: float | None
    when: float
    reason: str | None
    detail: object  # the device's detail as it sent it (any JSON value), or None

    def to_json(self) -> dict:
        return asdict(self)


def _reason(note: str | None, detail) -> str | None:
    device_says = detail if isinstance(detail, str) else None
    if isinstance(detail, dict):
        for key in ("reason", "error", "detail"):
            if isinstance(detail.get(key), str):
                device_says = detail[key]
                break
    parts = [p for p in (note, device_says) if p]
    return "; ".join(parts) or None


def executions(store: Store, device: str, limit: int | None = None) -> list[ExecutionRecord]:
    """The device's executions, newest first (by last change, then attempt)."""
    rows = store.db.execute(
        "SELECT e.job, COALESCE(j.type, '?'), e.attempt, e.seq, e.status, e.queued, e.started, e.finished, "
        "COALESCE(e.finished, e.started, e.queued) AS at, e.note, e.detail_json "
        "FROM executions e LEFT JOIN jobs j ON j.id = e.job WHERE e.device = ? "
        "ORDER BY at DESC, e.id DESC" + (" LIMIT ?" if limit is not None else ""),
        (device, limit) if limit is not None else (device,))
    out = []
    for job, type_, attempt, seq, status, queued, started, finished, at, note, detail_json in rows:
        try:
            detail = json.loads(detail_json) if detail_json else None
        except ValueError:
            detail = {"unreadable": detail_json[:200]}
        out.append(ExecutionRecord(job, type_, attempt, seq, status, queued, started, finished, at,
                                   _reason(note, detail), detail))
    return out
