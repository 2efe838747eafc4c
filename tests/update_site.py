"""A host set up for update jobs, shared by tests/e2e/test_ota.py and bench/ota.py: a key,
the rollout engine, an image store, and virtual boards provisioned against a broker."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from mpfleet.images.appbundle import build_bundle
from mpfleet.images.espimage import build_app_image
from mpfleet.images.firmware import FIRMWARE_DIR
from mpfleet.images.store import ID_LEN, ImageRecord, ImageStore
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import parse_broker_url
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.sim.fleet import AWAKE_CONFIG, provision_sim_fleet
from mpfleet.db.store import Store

BASE_FW = "v1.24.0"  # what a provisioned virtual board runs


class UpdateSite:
    def __init__(self, root: Path, broker):
        self.root = root
        self.cfg = parse_broker_url(broker.url)
        self.store = Store(root / "db")
        self.ring = KeyRing(self.store, root / "keys")
        self.ring.init()
        self.engine = RolloutEngine(self.store, self.ring, Registry(self.store))
        self.images = ImageStore(self.store, root / "images")
        self.boards = 0

    def board(self, port: int | None = None, secure_version: int | None = None):
        """A provisioned, awake board; `port`: reach the broker through another port (a proxy)."""
        self.boards += 1
        cfg = self.cfg if port is None else parse_broker_url(f"mqtt://127.0.0.1:{port}")
        board = provision_sim_fleet(self.store, self.ring, self.root / f"b{self.boards}", 1, cfg,
                                    prefix=f"b{self.boards}", with_credentials=False,
                                    config_overrides=AWAKE_CONFIG)[0]
        if secure_version is not None:
            board.write_app_image("ota_0", build_app_image("esp32", BASE_FW, secure_version=secure_version))
        return board

    def image(self, version: str, size: int = 24_000, chip: str = "esp32", **kwargs) -> ImageRecord:
        path = self.root / f"{version}-{chip}-{json.dumps(kwargs, sort_keys=True)}.bin"
        path.write_bytes(build_app_image(chip, version, size=size, **kwargs))
        return self.images.add(path)[0]

    def bundle(self, version: str, raise_at_import: bool = False) -> ImageRecord:
        src = self.root / f"src-{version}"
        if not src.exists():
            shutil.copytree(FIRMWARE_DIR, src)
            if raise_at_import:
                wake = src / "lib/agent/wake.py"
                wake.write_text("raise ImportError('broken build')\n" + wake.read_text())
        path = self.root / f"app-{version}.mpfa"
        path.write_bytes(build_bundle(version, src))
        return self.images.add_bundle(path)[0]

    def raw_artifact(self, data: bytes, version: str, kind: str = "app") -> ImageRecord:
        """Store bytes the image store would refuse (what a corrupted source would serve)."""
        sha = hashlib.sha256(data).hexdigest()
        record = ImageRecord(sha[:ID_LEN], sha, "esp32", version, 0, "test", "v5", len(data), "test", kind,
                             time.time())
        self.images._write(sha, data)
        self.images._insert(record)
        return record

    def job(self, type_: str, params: dict, target, queue_now: bool = False) -> str:
        """A job for one board (or device id); `queue_now`: sign its execution at once
        instead of at serve's next tick."""
        job = self.engine.create_job(type_, params, [getattr(target, "device_id", target)])
        if queue_now:
            self.engine.tick()
        return job
