"""`mpfleet serve` and `mpfleet ingest`: the long-running processes (libraries:
mpfleet.fleet.serve, mpfleet.fleet.ingest).

Both run a worker until Ctrl-C or SIGTERM, print progress, and end with exit 1 when the
worker stopped on its own (a damaged database, a lost broker it cannot get back): a
process that stopped working never exits as if all were well.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import click
from rich.console import Console

from mpfleet.cli.options import BROKER, DB, IMAGES_DIR, KEYS_DIR

console = Console()

_CLIENT_ID_HELP = ("MQTT client id; the session is persistent, so what devices sent while this was down arrives. "
                   "On a broker from `mpfleet broker config` the client id is the account's username (one "
                   "connection per account: give each process its own, `broker config --host-account`).")


def _database(db: str | None) -> Path:
    """The database path; checked when the worker starts, never created before the check."""
    from mpfleet.db.store import default_db_path

    return Path(db) if db else default_db_path()


def _run_until_stopped(worker, every_s: float, report=None) -> None:
    """Wait while `worker` runs; SIGTERM and Ctrl-C stop it; `report()` every `every_s`."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        while worker.running:
            time.sleep(every_s)
            if report is not None:
                report()
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()


@click.command("serve")
@BROKER
@click.option("--client-id", default="mpfleet-serve", show_default=True, help=_CLIENT_ID_HELP)
@click.option("--tick", type=click.FloatRange(min=0.01), default=0.25, show_default=True,
              help="Seconds between rollout decisions.")
@click.option("--quiet", is_flag=True, help="Only errors; no progress lines.")
@DB
@KEYS_DIR
@IMAGES_DIR
def serve(broker, client_id, tick, quiet, db, keys_dir, images_dir):
    """The dispatcher: roll out jobs, keep device queues, collect statuses and samples.

    Runs until Ctrl-C or SIGTERM. All state is in the database, so it can be stopped
    (or killed) and started again at any time: a rollout continues where it was and
    no device runs a job twice. Exit 1 when it stopped on its own (see the last line)."""
    from mpfleet.fleet.serve import Dispatcher, ServeError

    path = _database(db)

    def on_event(kind: str, data: dict) -> None:
        if quiet and kind != "error":
            return
        stamp = time.strftime("%H:%M:%S")
        text = " ".join(f"{k}={v}" for k, v in data.items())
        style = {"error": "red", "aborted": "red", "completed": "green", "advanced": "cyan"}.get(kind, "")
        console.print(f"{stamp} [{style}]{kind}[/] {text}" if style else f"{stamp} {kind} {text}", highlight=False)

    dispatcher = Dispatcher(broker, path, keys_dir=keys_dir, client_id=client_id, tick_s=tick, on_event=on_event,
                            images_dir=images_dir)
    dispatcher.start()
    console.print(f"serving {path} on {broker.url()} (Ctrl-C stops)", highlight=False)
    _run_until_stopped(dispatcher, 0.5)
    stats = dispatcher.stats.as_dict()
    if not quiet:
        console.print(f"stopped: {stats['statuses']} statuses, {stats['queue_publishes']} queue updates, "
                      f"{stats['ingest']['samples_new']} new samples, {stats['errors']} errors", highlight=False)
    if dispatcher.failure is not None:
        raise ServeError(f"serve stopped: {dispatcher.failure}")


@click.command("ingest")
@BROKER
@DB
@click.option("--client-id", default="mpfleet-ingest", show_default=True, help=_CLIENT_ID_HELP)
def ingest(broker, db: str | None, client_id: str) -> None:
    """Store the devices' samples in the database and ack them, until Ctrl-C or SIGTERM.

    The samples half of `serve`, for a host that only collects data. Exit 1 when it
    stopped on its own (see the last line)."""
    from mpfleet.errors import MpfleetError
    from mpfleet.fleet.ingest import Ingester

    path = _database(db)
    ingester = Ingester(broker, path, client_id=client_id)
    ingester.start()
    console.print(f"ingesting from {broker.url()} into {path} (Ctrl-C stops)")

    def report() -> None:
        stats = ingester.stats.as_dict()
        console.print(f"frames {stats['frames']}  new samples {stats['samples_new']}  "
                      f"duplicates {stats['duplicates']}  corrupt {stats['corrupt']}  "
                      f"quarantined {stats['quarantined']}  "
                      f"waiting for the database {ingester.messages.as_dict()['held']}", highlight=False)

    _run_until_stopped(ingester, 5, report)
    if ingester.failure is not None:
        raise MpfleetError(f"ingest stopped: {ingester.failure}")
