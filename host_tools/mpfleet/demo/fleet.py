"""`make demo`: a fleet of virtual ESP32s, a secured broker, `serve`, and three staged rollouts.

1. an embedded broker: mosquitto with a mutual-TLS listener and the per-device ACL
   (each device may use only its own topics), or amqtt (anonymous, plaintext) where
   mosquitto is missing; `--plaintext`: mosquitto with a password file instead;
2. a signing key, the fleet CA, and 20 virtual devices provisioned like real ones:
   registered, trusting the key, each with its own certificate (subject: its id);
3. the dispatcher (`mpfleet serve`, here in-process) and the fleet, awake;
4. a bad config job (an invalid sample interval) with a 10% canary stage: it fails on
   the canary, the rollout aborts, and the other devices never receive it;
5. a good config job in stages 10% -> 50% -> 100%: every device applies it;
6. an app update (the agent's own code as a bundle, version 0.2.0) with a 10% canary:
   streamed by serve, installed in the other app slot, trial-booted and confirmed;
7. a summary, and where the database, the keys and the fleet are kept.

    python -m mpfleet.demo [--devices 20] [--dir DIR] [--plaintext]

Exit status 0 when the bad job was stopped at the canary and the good config job and
the app update SUCCEEDED everywhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mpfleet.images.appbundle import build_bundle
from mpfleet.broker.local import embedded_broker
from mpfleet.broker.config import conf_lines, generate, host_credentials, tls_listener_lines
from mpfleet.fleet.certs import FleetCA
from mpfleet.images.store import ImageStore
from mpfleet.fleet.keys import KeyRing
from mpfleet.broker.link import BrokerConfig
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.jobs_model import JobStatus, RolloutOptions
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.fleet.serve import Dispatcher
from mpfleet.sim.fleet import AWAKE_CONFIG, FleetRunner, provision_sim_fleet
from mpfleet.db.store import Store
from mpfleet.fleet.updates import app_params

console = Console()
STYLE = {"SUCCEEDED": "green", "FAILED": "red", "ABORTED": "red", "COMPLETED": "green", "ACTIVE": "cyan"}
JOB_TIMEOUT_S = 120
APP_VERSION = "0.2.0"


@dataclass
class DemoResult:
    ok: bool
    workdir: Path
    bad: JobStatus
    good: JobStatus
    app: JobStatus
    samples: int
    broker_kind: str
    tls: bool = False


def _progress(statuses: list[JobStatus]) -> Table:
    table = Table(title="rollouts")
    for col in ("job", "status", "stage", "succeeded", "failed", "in progress", "queued", "not started"):
        table.add_column(col, justify="right" if col not in ("job", "status") else "left")
    for s in statuses:
        c = s.counts
        stage = min(s.stage, len(s.stages) - 1)
        table.add_row(s.id, Text(s.status, style=STYLE.get(s.status, "")),
                      f"{stage + 1}/{len(s.stages)} ({s.stages[stage]:.0%})",
                      str(c["SUCCEEDED"]), str(c["FAILED"] + c["REJECTED"] + c["TIMED_OUT"]),
                      str(c["IN_PROGRESS"]), str(c["QUEUED"]), str(s.not_started))
    return table


def _watch(engine: RolloutEngine, job_ids: list[str], dispatcher: Dispatcher, live: Live | None) -> list[JobStatus]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    last = None
    while True:
        statuses = [engine.job_status(j) for j in job_ids]
        line = [(s.status, s.stage, tuple(s.counts.values())) for s in statuses]
        if live is not None:
            live.update(_progress(statuses))
        elif line != last:
            s = statuses[-1]
            console.print(f"  {s.id}: {s.status} stage {s.stage + 1}/{len(s.stages)}  "
                          f"succeeded {s.counts['SUCCEEDED']}  failed {s.counts['FAILED']}  "
                          f"in progress {s.counts['IN_PROGRESS']}  queued {s.counts['QUEUED']}",
                          highlight=False, soft_wrap=True)
        last = line
        if statuses[-1].status != "ACTIVE" or time.monotonic() > deadline:
            return statuses
        if not dispatcher.running:
            raise RuntimeError(f"the dispatcher stopped: {dispatcher.stats.last_error}")
        time.sleep(0.25)


def run_demo(devices: int = 20, workdir: Path | None = None, broker_kind: str = "auto",
             plaintext: bool = False) -> DemoResult:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mpfleet-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"mpfleet demo: {workdir} is not empty; give an empty or new --dir")
    db, keys_dir = workdir / "mpfleet.db", workdir / "keys"
    store = Store(db)
    ring = KeyRing(store, keys_dir)
    key = ring.init()
    console.print(f"signing key {key.kid} (private key in {keys_dir}, mode 0600)", highlight=False)

    broker = embedded_broker(workdir=workdir / "broker" / "run",
                             prefer="amqtt" if broker_kind == "amqtt" else "mosquitto")
    if broker_kind == "mosquitto" and broker.kind != "mosquitto":
        raise SystemExit("mpfleet demo: mosquitto is not installed (apt-get install mosquitto)")
    secured = broker.kind == "mosquitto"
    tls = secured and not plaintext
    ca = FleetCA(keys_dir, store)
    if tls:
        ca.init()
        console.print(f"fleet CA in {keys_dir} (ca.key mode 0600): a certificate per device, for the broker and "
                      "for serve", highlight=False)
    started = time.perf_counter()

    def groups(i, dev):
        return ["demo", "east" if i % 2 else "west"]

    if not secured:
        console.print("[yellow]mosquitto is not installed: falling back to amqtt, which is known to lose "
                      "messages when many devices connect at once (docs/dispatch.md); the rollouts may stall. "
                      "Install mosquitto (apt-get install mosquitto) for the real demo.[/]", highlight=False)
    boards = provision_sim_fleet(store, ring, workdir / "fleet", devices,
                                 BrokerConfig(broker.host, broker.port, tls=tls), prefix="demo", groups_fn=groups,
                                 with_credentials=secured, config_overrides=AWAKE_CONFIG, ca=ca if tls else None)
    identity = ", each with its own certificate" if tls else ", each with its own broker account" if secured else ""
    console.print(f"provisioned {devices} virtual ESP32s in {time.perf_counter() - started:.1f} s: registered, "
                  f"trusting the key{identity}", highlight=False)
    if tls:
        files = generate(store, workdir / "broker", ca=ca, listen=f"{broker.host}:{broker.port}")
        broker.extra_config = tls_listener_lines(ca, files.acl)
        crt, key = files.host_certs[files.host_user], ca.host_files(files.host_user)[1]
        host_cfg = BrokerConfig(broker.host, broker.port, tls=True, ca_file=str(ca.cert_path), cert_file=str(crt),
                                key_file=str(key))
    elif secured:
        files = generate(store, workdir / "broker")
        broker.extra_config = conf_lines(files.passwd, files.acl)
        host = host_credentials(store)
        host_cfg = BrokerConfig(broker.host, broker.port, host["username"], host["password"])
    else:
        host_cfg = BrokerConfig(broker.host, broker.port)
    samples = 0
    with broker:
        console.print(f"broker: {broker.kind} on {host_cfg.url()}" + (
            " with mutual TLS (the fleet CA, a CRL) and an ACL: each device may use only mpf/v1/<its id>/..."
            if tls else " with a password file and an ACL: each device may use only mpf/v1/<its id>/..." if secured
            else " (amqtt: anonymous; install mosquitto for per-device certificates and ACLs)"), highlight=False)
        engine = RolloutEngine(store, ring, Registry(store))
        images = ImageStore(store, workdir / "images")
        bundle_path = workdir / "agent-0.2.0.mpfa"
        bundle_path.write_bytes(build_bundle(APP_VERSION))
        bundle = images.add_bundle(bundle_path)[0]
        with Dispatcher(host_cfg, db, keys_dir=keys_dir, client_id="mpfleet-demo-serve",
                        images_dir=workdir / "images") as dispatcher, \
                FleetRunner(boards) as runner:
            console.print("serve: running; the fleet: awake (each device wakes every second or two)\n")
            runner.wait_until(lambda s: s["boots_per_device_min"] >= 1, timeout=60)
            canary_first = RolloutOptions(stages=(0.1, 1.0), success_threshold=1.0)
            console.rule("1. a bad config job (sample_interval_s = 0), canary 10% first")
            bad = engine.create_job("config", {"set": {"sample_interval_s": 0}}, ["demo"], job_id="bad-interval",
                                    options=canary_first)
            live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
            if live:
                live.start()
            try:
                bad_status = _watch(engine, [bad], dispatcher, live)[-1]
                console.rule("2. a good config job (wake budget 15 s), stages 10% -> 50% -> 100%")
                good = engine.create_job("config", {"set": {"wake_budget_ms": 15000}}, ["demo"],
                                         job_id="wake-budget-15s",
                                         options=RolloutOptions(stages=(0.1, 0.5, 1.0), success_threshold=0.9,
                                                                abort_threshold=0.2, abort_min_finished=3))
                good_status = _watch(engine, [bad, good], dispatcher, live)[-1]
                console.rule(f"3. an app update: the agent's code as version {APP_VERSION} "
                             f"({bundle.size // 1024} KiB bundle), canary 10% first")
                update = engine.create_job("app", app_params(images, bundle.id)[0], ["demo"], job_id="app-0.2.0",
                                           options=RolloutOptions(stages=(0.1, 1.0), success_threshold=1.0,
                                                                  abort_threshold=0.2))
                app_status = _watch(engine, [bad, good, update], dispatcher, live)[-1]
            finally:
                if live:
                    live.stop()
            samples = store.sample_count()
            serve_stats = dispatcher.stats.as_dict()
            fleet_stats = runner.stats()
    store.close()
    canary = bad_status.stage_size
    bad_reached = len({d.device for d in bad_status.devices})
    ok = (bad_status.status == "ABORTED" and bad_reached <= canary
          and good_status.status == "COMPLETED" and good_status.counts["SUCCEEDED"] == devices
          and app_status.status == "COMPLETED" and app_status.counts["SUCCEEDED"] == devices)
    _summary(bad_status, good_status, app_status, devices, bad_reached, samples, serve_stats, fleet_stats, workdir,
             ok)
    return DemoResult(ok, workdir, bad_status, good_status, app_status, samples, broker.kind, tls)


def _summary(bad: JobStatus, good: JobStatus, app: JobStatus, devices, bad_reached, samples, serve_stats,
             fleet_stats, workdir, ok) -> None:
    table = Table(title="summary")
    table.add_column("")
    table.add_column("")
    reason = bad.failures[0].detail if bad.failures else None
    table.add_row("bad job", Text(f"{bad.status}: reached {bad_reached} of {devices} devices (the canary); "
                                  f"the other {devices - bad_reached} never received it",
                                  style="green" if bad.status == "ABORTED" else "red"))
    if reason:
        table.add_row("  device said", str(reason)[:110])
    table.add_row("  why aborted", str(bad.reason))
    table.add_row("good job", Text(f"{good.status}: {good.counts['SUCCEEDED']}/{devices} SUCCEEDED",
                                   style="green" if good.counts["SUCCEEDED"] == devices else "red"))
    running = sorted({(r.running or "?") for r in app.devices})
    table.add_row("app update", Text(f"{app.status}: {app.counts['SUCCEEDED']}/{devices} SUCCEEDED, "
                                     f"devices now run app {', '.join(running)}; "
                                     f"{serve_stats['ota']['bytes'] // 1024} KiB streamed",
                                     style="green" if app.counts["SUCCEEDED"] == devices else "red"))
    table.add_row("device wakes", f"{fleet_stats['boots']} ({fleet_stats['boots_per_s']:.0f}/s), "
                                  f"{len(fleet_stats['stopped'])} devices stopped")
    table.add_row("serve", f"{serve_stats['statuses']} job statuses, {serve_stats['queue_publishes']} queue updates, "
                           f"{serve_stats['errors']} errors")
    table.add_row("samples stored", str(samples))
    console.print(table)
    env = f"MPFLEET_DB={workdir / 'mpfleet.db'} MPFLEET_KEYS={workdir / 'keys'}"
    console.print(f"""
The data and the job records stay in {workdir}:
  mpfleet.db   SQLite: devices, jobs, executions, samples   keys/   the signing key, the fleet CA
  fleet/       the virtual boards (flash images, boot logs)   broker/ acl (passwd), mosquitto.conf
Look around:
  {env} mpfleet job list
  {env} mpfleet job status wake-budget-15s
  {env} mpfleet job status app-0.2.0
  {env} mpfleet devices list
  {env} mpfleet samples export --format csv | head
""", highlight=False, soft_wrap=True)
    console.print("[green]demo passed[/]" if ok else "[red]demo FAILED: see above[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpfleet.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20, help="fleet size (default 20)")
    parser.add_argument("--dir", type=Path, help="empty directory for the demo's data (default: a new temp dir)")
    parser.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                        help="embedded broker (default: mosquitto when installed, else amqtt)")
    parser.add_argument("--plaintext", action="store_true",
                        help="mosquitto with passwords instead of mutual TLS (to compare; a lab setting)")
    args = parser.parse_args(argv)
    if args.devices < 2:
        parser.error("--devices must be at least 2")
    console.rule("[bold]mpfleet demo: a fleet of virtual ESP32s")
    return 0 if run_demo(args.devices, args.dir, args.broker, args.plaintext).ok else 1


if __name__ == "__main__":
    sys.exit(main())
