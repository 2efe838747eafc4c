"""`mpfleet sim load`: a protocol-level device fleet, thousands of devices in one process."""

from __future__ import annotations

import asyncio
import math
import signal
import time

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DB, GROUP, JSON, KEYS_DIR, TOPIC_ROOT, broker_option
from mpfleet.cli.render import print_json

console = Console()


class Number(click.FloatRange):
    """A click.FloatRange that also refuses nan and inf: float() takes them, and nan
    passes every bound."""

    name = "number"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Count(click.IntRange):
    """A click.IntRange that says "whole number" when the text is none."""

    name = "whole number"


PROBABILITY = Number(0.0, 1.0)
DEFAULT_JITTER_S = 5.0  # or half of --interval, when that is less


def _check_schedule(ctx: click.Context, interval: float, jitter: float | None) -> float:
    """The jitter to use: --jitter, at most --interval (more would put a wake before the
    one it follows, and the schedule would become a burst); given none, 5 s or half the
    interval, so that a short --interval alone is not refused for a jitter never given."""
    if jitter is None:
        return min(DEFAULT_JITTER_S, interval / 2)
    if jitter > interval:
        raise click.BadParameter(f"{jitter:g} is more than --interval ({interval:g}): a wake may come at most "
                                 "one interval early or late.", ctx=ctx, param_hint="'--jitter'")
    return jitter


def _check_prefix(ctx: click.Context, prefix: str, count: int) -> None:
    from mpfleet.protocol.ids import DEVICE_ID_RULE, is_device_id
    from mpfleet.sim.load import device_ids

    last = device_ids(count, prefix)[-1]  # the longest
    if not prefix or not is_device_id(last):
        raise click.BadParameter(f"{prefix!r} makes device ids such as {last!r}, which are not {DEVICE_ID_RULE}."
                                 if prefix else "the prefix is empty: device ids would begin with '-'.",
                                 ctx=ctx, param_hint="'--prefix'")


def _summary(s: dict, devices: int, elapsed: float) -> Table:
    table = Table(title=f"load fleet: {devices} devices, {elapsed:.1f} s")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [("wakes", str(s["wakes"])), ("wakes per second", f"{s['wakes'] / elapsed:.1f}" if elapsed else "-"),
            ("mean wake (s)", str(s["mean_wake_s"])), ("wake errors", str(s["wake_errors"])),
            ("frames", str(s["frames"])), ("samples sent", str(s["samples_sent"])),
            ("acks taken / lost", f"{s['acks_taken']} / {s['acks_lost']}"),
            ("duplicate statuses sent", str(s["duplicate_statuses_sent"])),
            ("devices that never wake", str(s["never_wake"])), ("CPU (s)", f"{s['cpu_s']:.1f}")]
    rows += [(f"status: {k}", str(v)) for k, v in sorted(s["statuses"].items())]
    rows += [(f"error: {k}", str(v)) for k, v in sorted(s["errors"].items())]
    for row in rows:
        table.add_row(*row)
    return table


@click.command("load")
@click.option("--devices", "count", type=Count(min=1), default=1000, show_default=True,
              help="Number of devices, at least 1: PREFIX-0001 ... (the same ids when provisioning and running).")
@click.option("--prefix", default="load", show_default=True,
              help="Device id prefix: PREFIX-0001 must be a device id (a-z, 0-9, _ and -; 64 at most).")
@broker_option("The broker the devices connect to", "broker")
@click.option("--interval", type=Number(min=0.1), metavar="SECONDS", default=60.0, show_default=True,
              help="Seconds between a device's wakes, at least 0.1.")
@click.option("--jitter", type=Number(min=0.0), metavar="SECONDS", default=None,
              show_default=f"{DEFAULT_JITTER_S:g}, or half of --interval when less",
              help="Each wake comes up to this many seconds earlier or later (seeded RNG): 0 up to --interval.")
@click.option("--duration", type=Number(min=0.0), metavar="SECONDS", default=None,
              help="Stop after this many seconds, 0 or more (default: Ctrl-C). Wakes under way finish first.")
@click.option("--seed", type=int, default=0, show_default=True, help="RNG seed: schedules and faults.")
@click.option("--concurrency", type=Count(min=1), default=512, show_default=True,
              help="Wakes (connections) under way at once, at most (1 or more).")
@click.option("--provision", is_flag=True,
              help="Register the devices in the database first (like `sim fleet --provision-only`), "
                   "with broker accounts when the broker has passwords (--credentials).")
@click.option("--provision-only", is_flag=True, help="Register the devices and exit without running them.")
@click.option("--group", "groups", type=GROUP, multiple=True, help="Group of every device (when provisioning).")
@click.option("--credentials/--no-credentials", default=None,
              help="Each device its own broker account (default: when `mpfleet broker config` has been run).")
@click.option("--lost-ack", type=PROBABILITY, metavar="P", default=0.0, show_default=True,
              help="Probability, 0 to 1, that a wake never hears the host's sample ack (its samples are sent again).")
@click.option("--duplicate-status", type=PROBABILITY, metavar="P", default=0.0, show_default=True,
              help="Probability, 0 to 1, that a job status is published twice.")
@click.option("--never-wake", type=PROBABILITY, metavar="P", default=0.0, show_default=True,
              help="Probability, 0 to 1, that a device never wakes at all.")
@TOPIC_ROOT
@DB
@KEYS_DIR
@JSON
@click.pass_context
def sim_load(ctx: click.Context, count: int, prefix: str, broker, interval: float, jitter: float | None,
             duration: float | None, seed: int, concurrency: int, provision: bool, provision_only: bool,
             groups: tuple[str, ...], credentials: bool | None, lost_ack: float, duplicate_status: float,
             never_wake: float, topic_root: str, db: str | None, keys_dir: str | None, as_json: bool) -> None:
    """Run a protocol-level device fleet: thousands of devices in one process.

    Each wake does on the wire what the agent's connected wake does: state, samples
    and their ack, the retained job queue verified against the host's keys (refused
    with the agent's reasons), jobs run once each, statuses. No MicroPython, no flash,
    no power cuts: for loading `mpfleet serve`, not for proving the device
    (docs/sim-load.md). Config, diag, upload, sample, reboot and cancel jobs succeed;
    the others FAIL "not supported by the load fleet".

    \b
      mpfleet keys init
      mpfleet sim load --devices 5000 --provision-only
      mpfleet serve &
      mpfleet sim load --devices 5000 --interval 60 --duration 600
    """
    from mpfleet.broker.config import host_credentials
    from mpfleet.db.store import Store
    from mpfleet.errors import MpfleetError
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.sim.fleet import check_broker_listening
    from mpfleet.sim.load import Faults, LoadDevice, LoadFleet, device_ids, provision_load_fleet

    jitter = _check_schedule(ctx, interval, jitter)
    _check_prefix(ctx, prefix, count)
    if broker.tls:
        raise MpfleetError("the load fleet speaks plaintext MQTT only: give an mqtt:// broker")
    if not provision_only:
        check_broker_listening(broker)
    with Store(db) as store:
        ring = KeyRing(store, keys_dir)
        if not ring.trusted_keys():
            console.print("[yellow]no signing key yet[/]: these devices will reject every job "
                          "(run `mpfleet keys init`)", highlight=False)
        if provision or provision_only:
            if credentials is None:
                credentials = host_credentials(store) is not None
            devices = provision_load_fleet(store, ring, count, prefix, list(groups), credentials, topic_root)
            if not as_json or provision_only:
                console.print(f"provisioned {count} devices {devices[0].id} ... {devices[-1].id}", highlight=False)
            if provision_only:
                return
        else:
            trusted = ring.trusted_keys()
            devices = []
            for d in device_ids(count, prefix):
                known = store.device(d)
                if known is None:
                    raise MpfleetError(f"device {d} is not registered: run with --provision first")
                c = store.credentials(d)
                devices.append(LoadDevice(d, trusted, known.get("groups") or [],
                                          (c["username"], c["password"]) if c else None, topic_root))
    fleet = LoadFleet(devices, broker.host, broker.port, interval_s=interval, jitter_s=jitter,
                      faults=Faults(lost_ack=lost_ack, duplicate_status=duplicate_status, never_wake=never_wake),
                      seed=seed, concurrency=concurrency)
    started, cpu0 = time.monotonic(), time.process_time()

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await fleet.run(duration, stop)

    asyncio.run(main())
    elapsed = time.monotonic() - started
    stats = fleet.stats.to_json() | {"devices": count, "elapsed_s": round(elapsed, 2),
                                     "cpu_s": round(time.process_time() - cpu0, 2)}
    if as_json:
        print_json(stats)
        return
    console.print(_summary(stats, count, elapsed))
