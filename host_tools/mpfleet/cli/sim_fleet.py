"""`mpfleet sim fleet`: provision and run many virtual boards at once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import DB, GROUP, JSON, KEYS_DIR, TOPIC_ROOT, broker_option
from mpfleet.cli.render import print_json

console = Console()


def _stats_line(s: dict) -> Text:
    reasons = " ".join(f"{k}={v}" for k, v in sorted(s["exit_reasons"].items()))
    return Text(f"{s['elapsed_s']:7.1f}s  boots {s['boots']:6d}  {s['boots_per_s']:7.2f}/s  "
                f"per device {s['boots_per_device_min']}-{s['boots_per_device_max']}  "
                f"running {s['running']}/{s['devices']}  in flight {s['in_flight']}  "
                f"stopped {len(s['stopped'])}  looping {len(s['looping'])}  {reasons}",
                no_wrap=True, overflow="ellipsis")


def _summary(s: dict) -> Table:
    table = Table(title=f"fleet: {s['devices']} devices, {s['mode']}, clock x{s['clock_scale']:g}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("elapsed (s)", f"{s['elapsed_s']:.1f}"),
        ("workers", str(s["workers"])),
        ("boots", str(s["boots"])),
        ("boots per second", f"{s['boots_per_s']:.2f}"),
        ("mean boot (s)", str(s["mean_boot_s"])),
        ("boots per device (min / max)", f"{s['boots_per_device_min']} / {s['boots_per_device_max']}"),
    ]
    rows += [(f"exit: {k}", str(v)) for k, v in sorted(s["exit_reasons"].items())]
    rows.append(("stopped devices", str(len(s["stopped"]))))
    rows.append(("looping devices", str(len(s["looping"]))))
    for row in rows:
        table.add_row(*row)
    return table


def _overrides(awake: bool, topic_root: str) -> dict | None:
    """What the boards' config gets beyond provisioning: the awake cadence, a topic root."""
    from mpfleet.protocol.topics import TOPIC_ROOT as DEFAULT_ROOT
    from mpfleet.sim.fleet import AWAKE_CONFIG

    overrides = dict(AWAKE_CONFIG) if awake else {}
    if topic_root != DEFAULT_ROOT:
        overrides["broker"] = {"topic_root": topic_root}
    return overrides or None


@click.command("fleet")
@click.option("--devices", "count", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of devices (when provisioning).")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Fleet directory; provisioned when it holds no fleet yet.")
@broker_option("The broker the devices upload to (written into their config when provisioning)", "broker")
@click.option("--awake/--sleeping", default=True, show_default=True,
              help="Awake: wake every second, upload and poll jobs every wake. "
                   "Sleeping: normal intervals on a scaled clock.")
@click.option("--scale", type=float, default=None,
              help="Device seconds per real second while asleep (default 1 awake, 60 sleeping).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Boots at a time.")
@click.option("--prefix", default="sim", show_default=True, help="Device id prefix (when provisioning).")
@click.option("--group", "groups", type=GROUP, multiple=True,
              help="Group of every device (when provisioning). Repeatable.")
@click.option("--credentials/--no-credentials", default=None,
              help="Give each device its own broker account (default: when `mpfleet broker config` has been run).")
@TOPIC_ROOT
@click.option("--provision-only", is_flag=True,
              help="Provision the boards (database records, keys, broker accounts) and exit without running them.")
@DB
@KEYS_DIR
@JSON
def sim_fleet(count: int, root: Path, broker, awake: bool, scale: float | None, duration: float | None,
              workers: int | None, prefix: str, groups: tuple[str, ...], credentials: bool | None,
              topic_root: str, provision_only: bool, db: str | None, keys_dir: str | None, as_json: bool) -> None:
    """Run many virtual devices at once (provisioning them first if ROOT is empty).

    Provisioning is what a real device gets: it is registered in the database, trusts
    the host's signing keys, and (with a secured broker) gets its own broker account.
    A run needs the broker listening: without it the command fails at once.

    \b
      mpfleet keys init
      mpfleet sim fleet --devices 100 --root /tmp/fleet --broker mqtt://127.0.0.1:1883 --provision-only
      mpfleet sim fleet --root /tmp/fleet --broker mqtt://127.0.0.1:1883 --duration 60
      mpfleet serve --broker mqtt://127.0.0.1:1883      # in another terminal
    """
    from mpfleet.broker.config import host_credentials
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.sim.fleet import (FLEET_FILE, FleetRunner, check_broker_listening, load_fleet,
                                   provision_sim_fleet)
    from mpfleet.db.store import Store

    if not provision_only:
        check_broker_listening(broker)
    if (root / FLEET_FILE).exists():
        boards = load_fleet(root)
        console.print(f"loaded {len(boards)} devices from {root}", highlight=False)
        if provision_only:
            console.print(f"provisioned {len(boards)} devices (already, in {root})", highlight=False)
            return
    else:
        started = time.perf_counter()
        with Store(db) as store:
            ring = KeyRing(store, keys_dir)
            if not ring.trusted_keys():
                console.print("[yellow]no signing key yet[/]: these devices will reject every job "
                              "(run `mpfleet keys init` before provisioning)", highlight=False)
            authority = None
            if broker.tls:
                from mpfleet.cli.ca import fleet_ca

                authority = fleet_ca(keys_dir, store)
                credentials = False  # each device's certificate is its account
            if credentials is None:
                credentials = host_credentials(store) is not None
            boards = provision_sim_fleet(store, ring, root, count, broker, prefix=prefix,
                                         groups_fn=(lambda i, d: list(groups)) if groups else None,
                                         with_credentials=credentials,
                                         config_overrides=_overrides(awake, topic_root), ca=authority)
            if authority is not None:
                console.print(f"each device has its own certificate from the fleet CA in {authority.dir} "
                              "(subject: its id); the broker needs `mpfleet broker config`'s TLS listener",
                              highlight=False)
            if credentials:
                console.print("each device has its own broker account: run `mpfleet broker config` to write "
                              "the password file and ACL that admit them", highlight=False)
        took = time.perf_counter() - started
        console.print(f"provisioned {count} devices in {root} in {took:.1f} s "
                      f"({took / count * 1000:.1f} ms per device)", highlight=False)
        if provision_only:
            return
    runner = FleetRunner(boards, mode="awake" if awake else "sleeping", clock_scale=scale, workers=workers)
    deadline = None if duration is None else time.monotonic() + duration
    live = sys.stdout.isatty() and not as_json
    runner.start()
    try:
        if live:
            with Live(_stats_line(runner.stats()), console=console, refresh_per_second=4) as view:
                while deadline is None or time.monotonic() < deadline:
                    time.sleep(0.25)
                    view.update(_stats_line(runner.stats()))
        else:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        runner.stop()
    stats = runner.stats()
    if as_json:
        print_json(stats)
        return
    console.print(_summary(stats))
    for dev, reason in sorted(stats["stopped"].items()):
        console.print(f"[red]stopped[/] {dev}: {reason} {stats['errors'].get(dev, '')}", highlight=False)
    for dev in stats["looping"]:
        console.print(f"[yellow]looping[/] {dev}", highlight=False)
