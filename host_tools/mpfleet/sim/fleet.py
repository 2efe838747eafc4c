"""Many virtual boards at once: provision a fleet, run it on a worker pool.

`provision_sim_fleet` provisions a virtual fleet as the host provisions real devices
(registered, trusting the host's keys, each with its own broker account: the library's
`mpfleet.fleet.provision.register_devices`), then makes the boards with
`provision_fleet`, which knows nothing of the host's database. The boards-only
provisioning is built for hundreds of boards:

1. the firmware tree is compiled once (`firmware_tree()`);
2. one *template* board is created in `root/.template` and gets the firmware
   with a single `fs_put` (LittleFS formatted, files written);
3. every device directory is a copy of the template: `flash.bin` is cloned
   with the FICLONE ioctl (a reflink, on btrfs/XFS) where the filesystem
   supports it, else copied with the kernel's sendfile; it cannot be sparse,
   since erased NOR flash is 0xFF, not zeros;
4. the copy's identity is rewritten on the host (settings.json: device id, MAC;
   state.json and the per-board logs start afresh), and its own /config.json
   is written onto its LittleFS by a short forked MicroPython run (the same
   script `VirtualBoard.fs_put` runs, without the CPython start-up), these in
   parallel on a thread pool;
5. each board is powered on with its RTC at the host's time.

`FleetRunner` boots every board again and again, each boot a forked process,
at most `workers` at a time. A board is booted again when its deep sleep ends
on the runner's real-time clock (`sleep / clock_scale`); a board whose boot
ends in a stopping reason (power cut, REPL, no bootable image, hang, crash) is
taken out of the schedule and reported in `stats()`.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from mpfleet.fleet.provision import register_devices
from mpfleet.sim.board import (
    STOPPING_REASONS,
    BootRecord,
    SimError,
    VirtualBoard,
    _can_fork_interpreter,
    _ForkedInterpreter,
    _write_json,
    clear_rtc_memory,
    fresh_state,
)
from mpfleet.sim.mpy._simfacts import EXIT_DEEPSLEEP

if TYPE_CHECKING:
    from mpfleet.broker.link import BrokerConfig
    from mpfleet.db.store import Store
    from mpfleet.fleet.keys import KeyRing

FLEET_FILE = "fleet.json"
TEMPLATE_DIR = ".template"
DEFAULT_WIFI = {"ssid": "fleet", "password": "fleet-pw"}
# Config for "awake" devices: wake every second, upload (and poll jobs) every wake.
AWAKE_CONFIG = {"sample_interval_s": 1, "upload_every_wakes": 1}
# Files a board directory holds between boots; everything else is per-boot scratch.
_BOARD_FILES = ("board.json", "settings.json", "state.json", "flash.bin", "counters.bin")
_FICLONE = 0x40049409
_reflink_ok: bool | None = None


# ---------------------------------------------------------------- provisioning
def device_ids(count: int, prefix: str = "sim") -> list[str]:
    width = max(4, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def fleet_mac(index: int) -> list[int]:
    """Espressif OUI, the NIC part the board's index (unique within a fleet)."""
    return [0x24, 0x0A, 0xC4, (index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF]


def device_config(device_id: str, broker_host: str, broker_port: int, groups: list[str] | None = None,
                  trusted_keys: dict | None = None, broker_credentials: tuple[str, str] | None = None,
                  wifi: dict | None = None, overrides: dict | None = None) -> dict:
    """A device's /config.json (keys in docs/agent.md); `overrides` merge one level deep."""
    cfg: dict = {
        "device_id": device_id,
        "wifi": dict(wifi or DEFAULT_WIFI, connect_timeout_ms=1000),
        "broker": {"host": broker_host, "port": broker_port, "timeout_ms": 3000},
        "groups": list(groups or []),
        "trusted_keys": dict(trusted_keys or {}),
    }
    if broker_credentials:
        cfg["broker"]["user"], cfg["broker"]["password"] = broker_credentials
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def _copy_file(src: Path, dst: Path) -> None:
    """Reflink when the filesystem can (FICLONE), else a kernel-side copy."""
    global _reflink_ok
    if _reflink_ok is not False:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                _reflink_ok = True
                return
            except OSError:
                _reflink_ok = False
    shutil.copyfile(src, dst)


def _put_files_forked(vb: VirtualBoard, files: dict[str, bytes]) -> None:
    """Write files at the root of the device's LittleFS or one folder down (like fs_put)
    in a forked interpreter; fs_put where forking is unavailable."""
    if not _can_fork_interpreter():
        vb.fs_put(files)
        return
    stage = vb.path / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "out").mkdir(parents=True)
    lines = ["import os"]
    folders = []
    for dest in files:
        if not dest.startswith("/") or dest.count("/") > 2 or "/." in dest or dest.endswith("/"):
            raise SimError(f"only files at the root or one folder down go this way: {dest!r}")
        folder = dest.rpartition("/")[0]
        if folder and folder not in folders:
            folders.append(folder)
            lines += ["try:", f"    os.mkdir({folder!r})", "except OSError:", "    pass"]
    for i, (dest, data) in enumerate(files.items()):
        (stage / f"in{i}").write_bytes(data)
        lines += [f"with open('/.host/in{i}', 'rb') as src, open({dest!r}, 'wb') as dst:",
                  "    dst.write(src.read())"]
    (stage / "_script.py").write_text("\n".join(lines) + "\n")
    vb.prepare_exec(stage)
    proc = _ForkedInterpreter(["micropython"] + vb.command()[1:], vb.environment())
    try:
        proc.wait(timeout=vb.settings.get("boot_timeout_s", 60))  # prints a few bytes at most
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    output = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    vb.check_exec(f"writing {sorted(files)} failed", output)
    shutil.rmtree(stage, ignore_errors=True)


def provision_fleet(root: str | os.PathLike, count: int, broker_host: str, broker_port: int, prefix: str = "sim",
                    groups_fn: Callable[[int, str], list[str]] | None = None, config_overrides: dict | None = None,
                    trusted_keys: dict | None = None, broker_credentials: tuple[str, str] | None = None,
                    wifi: dict | None = None, board: str = "virtual", workers: int | None = None,
                    clock_s: float | None = None,
                    credentials_fn: Callable[[int, str], tuple[str, str] | None] | None = None,
                    files_fn: Callable[[int, str], dict[str, bytes]] | None = None
                    ) -> list[VirtualBoard]:
    """Create `count` boards in `root/<prefix>-0001`..., each with the firmware, its
    own /config.json, its own id and MAC, powered on with the RTC at the host's time.

    `groups_fn(index, device_id)` gives a device's groups (index from 1);
    `config_overrides` merge into every config (e.g. AWAKE_CONFIG);
    `broker_credentials` is (user, password) for every device, `credentials_fn(index,
    device_id)` each device's own (provision_sim_fleet gives each its broker account);
    `files_fn(index, device_id)` further files for a device's filesystem (its /tls
    identity); `wifi` is {"ssid", "password"}."""
    from mpfleet.images.firmware import firmware_tree

    if count < 1:
        raise SimError("a fleet needs at least one device")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wifi = dict(wifi or DEFAULT_WIFI)
    if (root / FLEET_FILE).exists():
        raise SimError(f"{root}: a fleet is already provisioned here ({FLEET_FILE}); load it with load_fleet()")
    ids = device_ids(count, prefix)
    for dev in ids:
        if (root / dev / "settings.json").exists():
            raise SimError(f"{root / dev}: a board already exists there")

    template_dir = root / TEMPLATE_DIR
    shutil.rmtree(template_dir, ignore_errors=True)
    template = VirtualBoard.create(template_dir, board=board, device_id="template", mac=fleet_mac(0))
    template.set_wifi(networks={wifi["ssid"]: {"password": wifi["password"], "rssi": -60}}, connect_ms=10)
    template.fs_put(firmware_tree())
    base_settings = json.loads((template_dir / "settings.json").read_text())
    now = time.time() if clock_s is None else clock_s

    def make(index: int) -> VirtualBoard:
        dev = ids[index - 1]
        path = root / dev
        path.mkdir()
        for name in _BOARD_FILES:
            if name not in ("settings.json", "state.json"):
                _copy_file(template_dir / name, path / name)
        _write_json(path / "settings.json", {**base_settings, "device_id": dev, "mac": fleet_mac(index)})
        _write_json(path / "state.json", fresh_state(seed=index))
        for name in ("boots.jsonl", "console.log"):
            (path / name).write_bytes(b"")
        clear_rtc_memory(path)
        vb = VirtualBoard(path)
        groups = groups_fn(index, dev) if groups_fn else []
        creds = credentials_fn(index, dev) if credentials_fn else broker_credentials
        cfg = device_config(dev, broker_host, broker_port, groups=groups, trusted_keys=trusted_keys,
                            broker_credentials=creds, wifi=wifi, overrides=config_overrides)
        extra = files_fn(index, dev) if files_fn else {}
        _put_files_forked(vb, {"/config.json": json.dumps(cfg).encode(), **extra})
        vb.power_on(clock_s=now)
        return vb

    workers = workers or max(2, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="provision") as pool:
        boards = list(pool.map(make, range(1, count + 1)))
    _write_json(root / FLEET_FILE, {"prefix": prefix, "count": count, "devices": ids,
                                    "broker": {"host": broker_host, "port": broker_port},
                                    "config_overrides": config_overrides or {}, "created": time.time()})
    shutil.rmtree(template_dir, ignore_errors=True)
    return boards


def provision_sim_fleet(store: Store, keyring: KeyRing, root: str | os.PathLike, count: int, broker: BrokerConfig,
                        prefix: str = "sim", groups_fn: Callable[[int, str], list[str]] | None = None,
                        with_credentials: bool = True, config_overrides: dict | None = None,
                        workers: int | None = None, ca=None) -> list[VirtualBoard]:
    """A virtual fleet provisioned like real devices: registered, trusting the host's
    keys, each with its own broker account (`with_credentials`), or, with a TLS broker
    (mqtts://), its own certificate from the fleet CA `ca` (mpfleet.fleet.certs.FleetCA)
    in /tls and no password. Returns the boards."""
    trusted = keyring.trusted_keys()  # none yet: the devices reject every job until a config gives them one
    ids = device_ids(count, prefix)
    index_of = {d: i for i, d in enumerate(ids, 1)}
    groups = (lambda d: groups_fn(index_of[d], d)) if groups_fn else (lambda d: [])
    files_fn = None
    if broker.tls:
        if ca is None:
            raise SimError(f"{broker.url()} is a TLS broker: provisioning needs the fleet CA (`mpfleet ca init`)")
        from mpfleet.fleet.provision import tls_files

        # Issued here, in the store's thread, before any device is made.
        identities = {d: tls_files(ca, d) for d in ids}
        def files_fn(index: int, device: str) -> dict[str, bytes]:
            return identities[device]

        config_overrides = {**(config_overrides or {}),
                            "broker": {**(config_overrides or {}).get("broker", {}), "tls": True}}
        with_credentials = False  # the certificate is the identity: no password
    creds = register_devices(store, ids, "virtual", groups, with_credentials)
    return provision_fleet(Path(root), count, broker.host, broker.port, prefix=prefix,
                           groups_fn=groups_fn, config_overrides=config_overrides, trusted_keys=trusted,
                           credentials_fn=(lambda i, d: creds[d]) if creds else None, workers=workers,
                           files_fn=files_fn)


def check_broker_listening(broker: BrokerConfig, timeout_s: float = 3.0) -> None:
    """SimError unless something accepts a TCP connection at the broker's address: a
    fleet run against a dead broker would otherwise look busy while no device uploads."""
    import socket

    try:
        with socket.create_connection((broker.host, broker.port), timeout=timeout_s):
            pass
    except OSError as e:
        raise SimError(f"no broker at {broker.url()}: {e.strerror or e} "
                       f"(start one there, e.g. `mosquitto -p {broker.port}`, or give --broker)") from None


def load_fleet(root: str | os.PathLike) -> list[VirtualBoard]:
    """The boards of a fleet provisioned in `root` (fleet.json's device list)."""
    root = Path(root)
    manifest = root / FLEET_FILE
    if not manifest.exists():
        raise SimError(f"{root}: no fleet here (no {FLEET_FILE})")
    return [VirtualBoard(root / dev) for dev in json.loads(manifest.read_text())["devices"]]


# ---------------------------------------------------------------- running
@dataclass
class _Slot:
    board: VirtualBoard
    boots: int = 0
    last: BootRecord | None = None
    stopped: str | None = None          # the reason it was taken out of the schedule
    non_sleep_streak: int = 0           # boots in a row that did not end in deep sleep
    boot_starts: list[float] = field(default_factory=list)


class FleetRunner:
    """Runs every board's boots concurrently on `workers` threads (each boot a forked
    MicroPython process).

    mode "awake": a board boots again when its (short) sleep ends in real time,
    `clock_scale` defaulting to 1, and never later than `awake_max_wait_s`;
    provision with AWAKE_CONFIG so the device wakes every second and uploads and
    polls for jobs every wake, like an always-on device.
    mode "sleeping": normal intervals on a scaled clock: a board boots again
    `sleep / clock_scale` real seconds after its boot ended.

    A boot ending in a stopping reason (STOPPING_REASONS) or raising takes the
    board out of the schedule; it is reported in stats()["stopped"]. A board whose
    last `loop_threshold` boots all ended without deep sleep (reset or watchdog
    loops) is reported in stats()["looping"] but kept running.
    """

    def __init__(self, boards: list[VirtualBoard], mode: str = "awake", clock_scale: float | None = None,
                 workers: int | None = None, awake_max_wait_s: float = 2.0, loop_threshold: int = 5,
                 on_boot: Callable[[VirtualBoard, BootRecord], None] | None = None, keep_starts: bool = True):
        if mode not in ("awake", "sleeping"):
            raise SimError(f"mode must be 'awake' or 'sleeping', not {mode!r}")
        self.mode = mode
        self.clock_scale = clock_scale if clock_scale is not None else (1.0 if mode == "awake" else 60.0)
        if self.clock_scale <= 0:
            raise SimError("clock_scale must be positive")
        # A boot spends most of its time waiting (the agent waits ~300 ms for retained
        # messages and ~100 ms for the job queue each upload), so the pool is wider than
        # the cores: 16 per core measured best on 2 cores (see docs/sim-fleet.md).
        self.workers = workers or max(1, min(len(boards), 16 * (os.cpu_count() or 2)))
        self.awake_max_wait_s = awake_max_wait_s
        self.loop_threshold = loop_threshold
        self.on_boot = on_boot
        self.keep_starts = keep_starts
        self._slots = [_Slot(b) for b in boards]
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._reasons: Counter = Counter()
        self._errors: dict[str, str] = {}
        self._boots = 0
        self._busy_s = 0.0
        self._started_at: float | None = None
        self._stopped_at: float | None = None

    # -------------------------------------------------------------- control
    def start(self) -> "FleetRunner":
        if self._threads:
            raise SimError("the fleet is already running")
        now = time.monotonic()
        self._started_at, self._stopped_at, self._stopping = now, None, False
        with self._cond:
            self._heap = []
            for i, slot in enumerate(self._slots):
                if slot.stopped is None:
                    if not slot.board.powered:
                        slot.board.power_on(clock_s=time.time())
                    # Spread the first boots over a short window rather than all at once.
                    heapq.heappush(self._heap, (now + 0.002 * i, i))
        self._threads = [threading.Thread(target=self._worker, name=f"fleet-{n}", daemon=True)
                         for n in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop scheduling and wait for the boots under way to end (each is bounded
        by the board's boot timeout), so no device process is left."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._threads = []
        self._stopped_at = time.monotonic()
        if alive:
            raise SimError(f"boots still under way after {timeout} s: {alive}")

    def __enter__(self) -> "FleetRunner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def wait_until(self, predicate: Callable[[dict], bool], timeout: float, poll_s: float = 0.05) -> bool:
        """Wait until predicate(stats()) is true; False when `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.stats()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    # -------------------------------------------------------------- the pool
    def _worker(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    if self._heap:
                        due, index = self._heap[0]
                        wait = due - time.monotonic()
                        if wait <= 0:
                            heapq.heappop(self._heap)
                            self._in_flight += 1
                            break
                        self._cond.wait(min(wait, 0.5))
                    else:
                        self._cond.wait(0.5)
            slot = self._slots[index]
            started = time.monotonic()
            record, error = None, None
            try:
                record = slot.board.boot(clock_scale=self.clock_scale)
            except Exception as e:  # noqa: BLE001 - one board's failure must not stop the fleet
                error = f"{type(e).__name__}: {e}"
            ended = time.monotonic()
            if record is not None and self.on_boot is not None:
                try:
                    self.on_boot(slot.board, record)
                except Exception as e:  # noqa: BLE001 - the hook's failure is this boot's error
                    error = f"on_boot: {type(e).__name__}: {e}"
            with self._cond:
                self._in_flight -= 1
                self._busy_s += ended - started
                if record is not None:
                    self._boots += 1
                    slot.boots += 1
                    slot.last = record
                    if self.keep_starts:
                        slot.boot_starts.append(started)
                    self._reasons[record.exit_reason] += 1
                    slot.non_sleep_streak = 0 if record.exit_reason == EXIT_DEEPSLEEP else slot.non_sleep_streak + 1
                if error is not None:
                    slot.stopped = "error"
                    self._errors[slot.board.device_id] = error
                elif record.exit_reason in STOPPING_REASONS:
                    slot.stopped = record.exit_reason
                else:
                    heapq.heappush(self._heap, (ended + self._delay(record), index))
                    self._cond.notify()

    def _delay(self, record: BootRecord) -> float:
        if record.exit_reason != EXIT_DEEPSLEEP or not record.sleep_ms:
            return 0.0
        delay = record.sleep_ms / 1000 / self.clock_scale
        return min(delay, self.awake_max_wait_s) if self.mode == "awake" else delay

    # -------------------------------------------------------------- reports
    def stats(self) -> dict:
        with self._cond:
            now = self._stopped_at or time.monotonic()
            elapsed = now - self._started_at if self._started_at is not None else 0.0
            per_device = {s.board.device_id: s.boots for s in self._slots}
            counts = list(per_device.values()) or [0]
            return {
                "mode": self.mode,
                "clock_scale": self.clock_scale,
                "devices": len(self._slots),
                "workers": self.workers,
                "elapsed_s": round(elapsed, 3),
                "boots": self._boots,
                "boots_per_s": round(self._boots / elapsed, 2) if elapsed > 0 else 0.0,
                "mean_boot_s": round(self._busy_s / self._boots, 4) if self._boots else None,
                "in_flight": self._in_flight,
                "boots_per_device": per_device,
                "boots_per_device_min": min(counts),
                "boots_per_device_max": max(counts),
                "exit_reasons": dict(self._reasons),
                "stopped": {s.board.device_id: s.stopped for s in self._slots if s.stopped},
                "looping": sorted(s.board.device_id for s in self._slots
                                  if s.non_sleep_streak >= self.loop_threshold and not s.stopped),
                "errors": dict(self._errors),
                "running": sum(1 for s in self._slots if not s.stopped),
            }

    def boot_starts(self, device_id: str) -> list[float]:
        """Monotonic times at which the device's boots started (for interval checks)."""
        with self._cond:
            for s in self._slots:
                if s.board.device_id == device_id:
                    return list(s.boot_starts)
        raise SimError(f"no device {device_id} in this fleet")
