"""The USB field commands as library calls: deploy and provision, run a job, collect samples.

Which room: host library, usb/, behind `mpfleet deploy`, `mpfleet usb run` and `mpfleet
usb collect` (cli/usb.py). Layered as mpremote is: a transport moves bytes
(usb/transport.py: LinkPool, one link per port), the board's commands are built on it
(usb/device.py), and this module composes them; it prints nothing. Every function
works on many ports in phases: the boards are talked to in parallel
(usb/ports.each_port), the database is read and written only here, between the
phases, by the calling thread.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mpfleet.images.appbundle import mpy_header
from mpfleet.errors import MpfleetError
from mpfleet.images.firmware import firmware_tree
from mpfleet.fleet.ingest import FrameError, ingest_frame
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import BrokerConfig
from mpfleet.fleet.provision import TLS_CA_PATH, TLS_IDENTITY_PATH, register_devices, tls_files
from mpfleet.fleet.jobs_model import FINAL_STATES
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.db.store import Store
from mpfleet.usb.device import (hashes, identify, read_backlog, read_config, run_envelopes, running_code_problems,
                               self_check, send_ack, sync_files, sync_tree)
from mpfleet.usb.ports import PortResult, Progress, each_port
from mpfleet.usb.transport import CATCH_S, LinkPool, UsbError

# The steps of each command, in order: on_progress(port, done, total) counts the steps a
# board has finished of len(steps); steps[done] is the one it is in (total: finished).
DEPLOY_STEPS = ("connecting", "copying", "provisioning", "self-check")
RUN_STEPS = ("connecting", "running")
COLLECT_STEPS = ("connecting", "reading samples", "acknowledging")

_Step = Callable[[str, str], None]  # (port, the step it starts, or "done")


def _steps(on_progress: Progress | None, steps: tuple[str, ...]) -> _Step:
    """Inside a command, progress by step name; outside, on_progress(port, done, total)."""
    def step(port: str, name: str) -> None:
        if on_progress is not None:
            on_progress(port, len(steps) if name == "done" else steps.index(name), len(steps))
    return step


def _phase(pool: LinkPool, ports: list[str], work: Callable[[str], PortResult],
           failed: dict[str, PortResult]) -> dict[str, PortResult]:
    """Run one parallel phase on the ports that have not failed yet; failures are kept."""
    todo = [p for p in ports if p not in failed]
    out = {}
    for result in each_port(todo, work):
        if result.error is not None:
            failed[result.port] = result
        else:
            out[result.port] = result
    return out


def _identified(pool: LinkPool, ports: list[str], failed: dict[str, PortResult], progress: _Step,
                need_id: bool = True) -> dict[str, PortResult]:
    def work(port: str) -> PortResult:
        progress(port, "connecting")
        info = identify(pool.get(port))
        device = info["device_id"]
        if need_id and not device:
            raise UsbError(f"{port}: the board has no /config.json with a device id: run `mpfleet deploy` first")
        return PortResult(port, device=device, detail=info)

    return _phase(pool, ports, work, failed)


def _results(ports: list[str], ok: dict[str, PortResult], failed: dict[str, PortResult]) -> list[PortResult]:
    return [ok.get(p) or failed[p] for p in ports]


# ---------------------------------------------------------------- deploy
@dataclass
class DeploySettings:
    """What a deploy sets on every board; None (and no groups) keeps what the board's
    /config.json has (docs/usb.md, "What a redeploy keeps")."""

    board: str
    broker: BrokerConfig | None = None  # None: each board keeps its broker; a board without one fails
    topic_root: str | None = None  # None: each board keeps its broker.topic_root
    wifi_ssid: str | None = None
    wifi_password: str | None = None
    groups: list[str] = field(default_factory=list)
    with_credentials: bool = False
    ca: object | None = None  # the fleet CA (mpfleet.fleet.certs.FleetCA) when the broker is mqtts://
    transport: str = "mpremote"
    wait_s: float = CATCH_S


class NoBroker(UsbError):
    """Deploy was given no --broker and the board's config names none either."""


def deploy(store: Store, keyring: KeyRing, ports: list[str], settings: DeploySettings,
           on_progress: Progress | None = None, files: dict[str, bytes] | None = None) -> list[PortResult]:
    """Make each board hold the agent as deployed (copy what differs, remove what is stale,
    usb/device.sync_tree), provision it (id, keys, Wi-Fi, broker account, registry entry)
    and check that the code it runs is the code deployed. One result per port, in order.
    `on_progress(port, done, total)` counts DEPLOY_STEPS."""
    progress = _steps(on_progress, DEPLOY_STEPS)
    files = files if files is not None else firmware_tree()
    mpy = next((mpy_header(d, p)[0] for p, d in files.items() if p.endswith(".mpy")), None)
    failed: dict[str, PortResult] = {}
    configs: dict[str, dict] = {}  # kept out of the results: they hold passwords
    held: dict[str, dict] = {}  # port -> the hashes of the /tls files the board has
    with LinkPool(settings.transport, settings.wait_s) as pool:
        found = _identified(pool, ports, failed, progress, need_id=False)

        def copy(port: str) -> PortResult:
            info = found[port].detail
            if mpy is not None and info["mpy"] & 0xFF != mpy:
                raise UsbError(f"{port}: the board's MicroPython {info['release']} loads .mpy version "
                               f"{info['mpy'] & 0xFF}, this mpfleet compiles version {mpy}: flash MicroPython "
                               f"1.22 or later first (mpfleet flash)")
            current = read_config(pool.get(port))
            if settings.broker is None and not (current.get("broker") or {}).get("host"):
                raise NoBroker(f"{port}: the board's /config.json names no broker and no --broker was given: "
                               f"give --broker mqtt://HOST[:PORT] (nothing was changed on the board)")
            configs[port] = current
            if _uses_tls(current, settings):
                held[port] = hashes(pool.get(port), [TLS_CA_PATH, TLS_IDENTITY_PATH])
            progress(port, "copying")
            sync = sync_tree(pool.get(port), files)
            device = info["device_id"] or info["mac"]
            return PortResult(port, device=device, detail={**info, "written": sync.written, "removed": sync.removed,
                                                           "removed_dirs": sync.removed_dirs,
                                                           "skipped": sync.skipped})

        copied = _phase(pool, ports, copy, failed)
        devices = [r.device for r in copied.values()]
        if len(set(devices)) != len(devices):
            raise UsbError(f"two boards claim the same device id: {sorted(devices)}")
        creds = register_devices(store, devices, settings.board, lambda d: settings.groups,
                                 settings.with_credentials)
        trusted = keyring.trusted_keys()
        # In this thread (the store's): a certificate for each TLS board that needs one.
        identities = {port: _tls_identity(store, held[port], copied[port].device, settings.ca)
                      for port in copied if port in held}

        def provision(port: str) -> PortResult:
            r = copied[port]
            progress(port, "provisioning")
            link = pool.get(port)
            cfg = _merge_config(configs[port], r.device, settings, trusted, creds.get(r.device))
            # The security settings too: on the device they change only over USB
            # (exec permission) or through keys jobs, never by a config job.
            security = {"trusted_keys": cfg["trusted_keys"], "exec_allowed": cfg.get("exec_allowed") is True}
            written, _ = sync_files(link, {"/config.json": json.dumps(cfg, sort_keys=True).encode(),
                                           "/security.json": json.dumps(security, sort_keys=True).encode(),
                                           **identities.get(port, {})})
            progress(port, "self-check")
            check = self_check(link, files)
            problems = _check_problems(check, r.device, trusted, files)
            if problems:
                more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
                raise UsbError(f"{port}: self-check failed: {'; '.join(problems[:_SHOWN])}{more}")
            detail = dict(r.detail, config_written=bool(written), app=check["app"],
                          running={name: loaded for name, (loaded, _) in check["running"].items()},
                          broker=f"{cfg['broker']['host']}:{cfg['broker'].get('port', 1883)}")
            progress(port, "done")
            return PortResult(port, ok=True, device=r.device, detail=detail)

        done = _phase(pool, list(copied), provision, failed)
    return _results(ports, done, failed)


_SHOWN = 3  # problems named in a failed self-check's one line
_MONTH = 30 * 86400


def _uses_tls(current: dict, s: DeploySettings) -> bool:
    """The board will talk TLS: the --broker is mqtts://, or, with none given, its own config says so."""
    if s.broker is not None:
        return s.broker.tls
    return (current.get("broker") or {}).get("tls") is True


def _tls_identity(store: Store, held: dict, device: str, ca) -> dict[str, bytes]:
    """The /tls files a board on a TLS broker gets: none when it holds the fleet CA and an
    identity, and the device has a certificate that is neither revoked nor within a
    month of its end (a redeploy keeps it); else a new certificate and key
    (docs/security.md). The host keeps the certificate; the key goes to the board only."""
    if ca is None:
        raise UsbError(f"{device}: the broker is TLS (mqtts://) but there is no fleet CA: run `mpfleet ca init`")
    current = [c for c in store.certificates(device) if not c["revoked"] and c["not_after"] > time.time() + _MONTH]
    if held.get(TLS_IDENTITY_PATH) and held.get(TLS_CA_PATH) == hashlib.sha256(ca.ca_der()).hexdigest() and current:
        return {}
    return tls_files(ca, device)


def _check_problems(check: dict, device: str, trusted: dict, files: dict[str, bytes]) -> list[str]:
    """Why a board's self-check failed: the config it loads, then the code it runs."""
    problems = [f"config {p}" for p in check["problems"]]
    if check["device_id"] != device:
        problems.append(f"the agent loads device id {check['device_id']!r}, deploy wrote {device!r}")
    if check["keys"] != sorted(trusted):
        problems.append(f"the agent trusts keys {check['keys']}, deploy wrote {sorted(trusted)}")
    return problems + running_code_problems(check, files)


def _merge_config(current: dict, device: str, s: DeploySettings, trusted: dict,
                  creds: tuple[str, str] | None) -> dict:
    """The board's config with what this deploy sets; everything else it has is kept.

    The broker: host, port and TLS from s.broker when given (its user and password
    too, when the URL has them), else the board's own; a provisioned account
    (`creds`) replaces the user and password. Wi-Fi: a new SSID takes s.wifi_password
    ("" for an open network); the same SSID, or none given, keeps the board's password
    unless s.wifi_password is given."""
    cfg = dict(current)
    cfg["device_id"] = device
    cfg["trusted_keys"] = dict(trusted)
    if s.groups:
        cfg["groups"] = sorted(set(cfg.get("groups") or []) | set(s.groups))
    wifi = dict(cfg.get("wifi") or {})
    if s.wifi_ssid is not None and s.wifi_ssid != wifi.get("ssid"):
        wifi.update(ssid=s.wifi_ssid, password=s.wifi_password or "")
    elif s.wifi_password is not None:
        wifi["password"] = s.wifi_password
    if wifi:
        cfg["wifi"] = wifi
    broker = dict(cfg.get("broker") or {})
    if s.broker is not None:
        broker.update(host=s.broker.host, port=s.broker.port, tls=s.broker.tls)
        if s.broker.user:
            broker.update(user=s.broker.user, password=s.broker.password)
    if s.topic_root is not None:
        broker["topic_root"] = s.topic_root
    if creds:
        broker["user"], broker["password"] = creds
    cfg["broker"] = broker
    return cfg


# ---------------------------------------------------------------- usb run
def run_job(engine: RolloutEngine, ports: list[str], job_id: str, transport: str = "mpremote",
            on_progress: Progress | None = None, wait_s: float = CATCH_S) -> list[PortResult]:
    """Carry `job_id`'s signed envelope to each board and record what it reports, in the
    job's records (`mpfleet job status`). `on_progress(port, done, total)` counts RUN_STEPS."""
    progress = _steps(on_progress, RUN_STEPS)
    failed: dict[str, PortResult] = {}
    with LinkPool(transport, wait_s) as pool:
        found = _identified(pool, ports, failed, progress)
        envelopes = {}
        for port, r in found.items():
            try:
                envelopes[port] = engine.usb_envelope(job_id, r.device)
            except MpfleetError as e:
                failed[port] = PortResult(port, device=r.device, error=f"{port} ({r.device}): {e}")

        def run(port: str) -> PortResult:
            progress(port, "running")
            statuses = run_envelopes(pool.get(port), [envelopes[port]])
            progress(port, "done")
            return PortResult(port, device=found[port].device, detail={"statuses": statuses})

        ran = _phase(pool, list(envelopes), run, failed)
    done = {}
    for port, r in ran.items():
        for status in r.detail["statuses"]:
            engine.on_status(r.device, status)
        mine = [s for s in r.detail["statuses"] if s.get("job") == job_id]
        final = next((s for s in reversed(mine) if s.get("status") in FINAL_STATES), None)
        if final is None:
            failed[port] = PortResult(port, device=r.device, error=f"{port} ({r.device}): no final status "
                                                                  f"for {job_id} (reported {mine})")
            continue
        done[port] = PortResult(port, ok=final["status"] == "SUCCEEDED", device=r.device,
                                error=None if final["status"] == "SUCCEEDED" else
                                f"{final['status']}: {final.get('detail')}",
                                detail={"status": final["status"], "detail": final.get("detail")})
    engine.tick()  # what serve would do next: stages, aborts, completion
    return _results(ports, done, failed)


# ---------------------------------------------------------------- usb collect
def collect(store: Store, ports: list[str], transport: str = "mpremote",
            on_progress: Progress | None = None, wait_s: float = CATCH_S) -> list[PortResult]:
    """Pull each board's unacked samples into SQLite, then let the board trim what was
    stored (the same end-to-end ack as over MQTT). `on_progress(port, done, total)`
    counts COLLECT_STEPS."""
    progress = _steps(on_progress, COLLECT_STEPS)
    failed: dict[str, PortResult] = {}
    with LinkPool(transport, wait_s) as pool:
        found = _identified(pool, ports, failed, progress)
        host_ack = {port: store.ack_point(r.device) for port, r in found.items()}

        def pull(port: str) -> PortResult:
            progress(port, "reading samples")
            frames, sent = read_backlog(pool.get(port), host_ack[port])
            return PortResult(port, device=found[port].device, detail={"frames": frames, "sent": sent})

        pulled = _phase(pool, list(found), pull, failed)
        acks = {}
        for port, r in pulled.items():
            new = duplicates = 0
            ack = host_ack[port]
            for frame in r.detail["frames"]:
                try:
                    result = ingest_frame(store, r.device, frame)
                except FrameError as e:
                    store.record_ingest_error(r.device, f"over USB: {e}")
                    continue
                new += result.new
                duplicates += result.duplicates
                ack = max(ack, result.ack)
            acks[port] = ack
            r.detail = {"new": new, "duplicates": duplicates, "frames": len(r.detail["frames"]), "acked": ack}

        def trim(port: str) -> PortResult:
            progress(port, "acknowledging")
            send_ack(pool.get(port), acks[port])
            progress(port, "done")
            r = pulled[port]
            return PortResult(port, ok=True, device=r.device, detail=r.detail)

        done = _phase(pool, list(acks), trim, failed)
    return _results(ports, done, failed)
