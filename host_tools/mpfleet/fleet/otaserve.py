"""The host end of the OTA chunk stream: answers devices' `ota/get` from the image store.

Which room: host library, run inside `mpfleet serve` (serve.py). Protocol (docs/ota.md,
docs/protocol.md):

    device -> mpf/v1/<id>/ota/get   {"job": id, "offset": o, "len": chunk, "count": n}
    host   -> mpf/v1/<id>/ota/data  u32 offset, u32 artifact size (little-endian), bytes
                                    offset 0xFFFFFFFF: refused; the second u32 is the kind
                                    (0 refused, 1 canceled), a UTF-8 reason follows

Both QoS 0: the device asks again from its own offset when an answer does not come,
so nothing here keeps per-device state. Requests are handled in paho's network thread
(not the dispatcher's worker, which may be busy with a tick), with a read-only SQLite
connection of their own: a device may fetch the artifact of an `ota` or `app` job that
has an execution for it, unless the job was canceled or the device's execution was
canceled or removed: then every request is refused as *canceled* (kind 1), and the
device stops before its point of no return (set_boot, the app slot switch) and
reports that it stopped (docs/ota.md, "Cancel"). The artifact is read once from the image store, checked
against its SHA-256, and kept for the next requests (a few, least recently used first
out).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mpfleet.db.backend import PgConnection, is_url, normalized, storage_errors
from mpfleet.errors import MpfleetError
from mpfleet.protocol.topics import topic

log = logging.getLogger("mpfleet.ota")

REFUSED = 0xFFFFFFFF
KIND_REFUSED, KIND_CANCELED = 0, 1  # the second header word of a refusal
HEADER = struct.Struct("<II")
MAX_CHUNK = 16384
MAX_COUNT = 64
ARTIFACT_JOBS = ("ota", "app")


@dataclass
class StreamStats:
    requests: int = 0
    chunks: int = 0
    bytes: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "chunks": self.chunks, "bytes": self.bytes, "refused": self.refused}


class Refusal(MpfleetError):
    """A request this host will not serve; the reason goes back to the device."""

    kind = KIND_REFUSED


class Canceled(Refusal):
    """The job was canceled on this device: the device stops its download (kind 1)."""

    kind = KIND_CANCELED


class ArtifactServer:
    """`handle(device, payload)` answers one `ota/get`; `publish(topic, bytes)` sends."""

    def __init__(self, db_path: str | Path, images_dir: str | Path | None,
                 publish: Callable[[str, bytes], None], cache_size: int = 4):
        from mpfleet.images.store import default_images_dir

        self.db_path = normalized(db_path)
        self.images_dir = Path(images_dir) if images_dir else default_images_dir()
        self.publish = publish
        self.cache_size = cache_size
        self.stats = StreamStats()
        self._cache: OrderedDict[str, bytes] = OrderedDict()  # job id -> artifact
        self._local = threading.local()

    def _db(self):
        """This thread's read-only connection (a SQLite file opened read-only; a PostgreSQL
        session whose transactions are read-only)."""
        db = getattr(self._local, "db", None)
        if db is not None and is_url(self.db_path) and db.raw.closed:
            db = None  # the server went away: a new session
        if db is None:
            if is_url(self.db_path):
                db = PgConnection(str(self.db_path))
                db.execute("SET default_transaction_read_only = on")
            else:
                db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def handle(self, device: str, payload: bytes) -> None:
        with self.stats.lock:
            self.stats.requests += 1
        out = topic(device, "ota/data")
        try:
            job, offset, length, count = parse_request(payload)
            try:
                artifact = self.artifact(device, job)
            except storage_errors() as e:
                raise Refusal(f"the host cannot read its database: {e}") from None
        except Refusal as e:
            with self.stats.lock:
                self.stats.refused += 1
            log.warning("ota/get from %s refused: %s", device, e)
            self.publish(out, HEADER.pack(REFUSED, e.kind) + str(e).encode()[:200])
            return
        size = len(artifact)
        sent = chunks = 0
        for at in range(offset, min(size, offset + count * length), length):
            piece = artifact[at:at + length]
            self.publish(out, HEADER.pack(at, size) + piece)
            sent += len(piece)
            chunks += 1
        with self.stats.lock:
            self.stats.chunks += chunks
            self.stats.bytes += sent

    def artifact(self, device: str, job_id: str) -> bytes:
        cached = self._cache.get(job_id)
        db = self._db()
        row = db.execute("SELECT type, params_json FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise Refusal(f"no job {job_id}")
        if row[0] not in ARTIFACT_JOBS:
            raise Refusal(f"job {job_id} is a {row[0]} job, which has nothing to download")
        latest = db.execute("SELECT e.status, j.status FROM executions e JOIN jobs j ON j.id = e.job "
                            "WHERE e.job = ? AND e.device = ? ORDER BY e.attempt DESC LIMIT 1",
                            (job_id, device)).fetchone()
        if latest is None:
            raise Refusal(f"job {job_id} is not for {device}")
        if latest[1] == "CANCELED" or latest[0] in ("CANCELED", "REMOVED"):
            what = "canceled" if latest[1] == "CANCELED" or latest[0] == "CANCELED" else "removed"
            raise Canceled(f"canceled: job {job_id} was {what} on {device} by the operator; stop before switching")
        if cached is not None:
            self._cache.move_to_end(job_id)
            return cached
        params = json.loads(row[1])
        ref = params.get("image") or params.get("bundle")
        found = db.execute("SELECT sha256 FROM images WHERE id = ?", (ref,)).fetchone() if ref else None
        if found is None:
            raise Refusal(f"job {job_id} names no artifact in the host's image store ({ref})")
        data = self._read(found[0])
        self._cache[job_id] = data
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return data

    def _read(self, sha256: str) -> bytes:
        # The store's own read and check; the refusal goes to the device, so it
        # names the artifact, not the host's path.
        from mpfleet.images.store import StoredImageChanged, StoredImageMissing, read_stored

        try:
            return read_stored(self.images_dir, sha256)
        except StoredImageMissing as e:
            raise Refusal(f"artifact {sha256[:12]} is not in the host's image store ({e.reason})") from None
        except StoredImageChanged:
            raise Refusal(f"artifact {sha256[:12]} in the host's image store is corrupted") from None


def parse_request(payload: bytes) -> tuple[str, int, int, int]:
    try:
        req = json.loads(payload)
        job, offset, length, count = req["job"], req["offset"], req["len"], req.get("count", 1)
    except (ValueError, KeyError, TypeError):
        raise Refusal("malformed ota/get: want {job, offset, len, count}") from None
    if not isinstance(job, str) or not all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in (offset, length, count)):
        raise Refusal("malformed ota/get: job must be a string, offset/len/count integers")
    if offset < 0 or not 0 < length <= MAX_CHUNK or not 0 < count <= MAX_COUNT:
        raise Refusal(f"ota/get out of range: offset >= 0, 0 < len <= {MAX_CHUNK}, 0 < count <= {MAX_COUNT}")
    return job, offset, length, count
