"""`mpfleet serve` and `mpfleet ingest`: the long-running processes (libraries:
mpfleet.fleet.serve, mpfleet.fleet.ingest).

Both run a worker until Ctrl-C or SIGTERM, print progress, and end with exit 1 when the
worker stopped on its own (a damaged database, a lost broker it cannot get back): a
process that stopped working never exits as if all were well.
"""

from __future__ import annotations

import signal
import time

import click
from rich.console import Console

from mpfleet.cli.options import BROKER, DB, IMAGES_DIR, KEYS_DIR, TOPIC_ROOT

console = Console()

_SERVE_CLIENT_ID_HELP = (
    "MQTT client id (default mpfleet-serve-<host>-<8 hex of the database path and topic root>: the same at "
    "every restart, different for every fleet). The session is persistent, so what devices sent while serve "
    "was down arrives. On a broker from `mpfleet broker config` the client id is the account's username (one "
    "connection per account: give each process its own, `broker config --host-account`).")
_INGEST_CLIENT_ID_HELP = (
    "MQTT client id (default: one unique to this process, with a clean session; a given id keeps a persistent "
    "session, so what devices sent while ingest was down arrives).")


def _database(db: str | None):
    """The database (a file's path or a URL); checked when the worker starts, never created before the check."""
    from mpfleet.cli.options import database_path

    return database_path(db)


def _log_to_stderr(quiet: bool) -> None:
    """The library's log (mpfleet.*: cancels carried out, connections lost and regained,
    messages dropped) on stderr with the time: INFO and up, WARNING and up with --quiet."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mpfleet")
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


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
@TOPIC_ROOT
@click.option("--client-id", help=_SERVE_CLIENT_ID_HELP)
@click.option("--tick", type=click.FloatRange(min=0.01), default=0.25, show_default=True,
              help="Seconds between rollout decisions.")
@click.option("--quiet", is_flag=True, help="Only errors; no progress lines.")
@click.option("--worker", metavar="NAME",
              help="PostgreSQL only: this worker's name (default 1), one per running serve of the fleet, the same "
                   "at each restart (its broker session keeps what it had not acknowledged). Workers share the "
                   "devices' messages; one of them leads (docs/scale.md).")
@DB
@KEYS_DIR
@IMAGES_DIR
def serve(broker, topic_root, client_id, tick, quiet, db, keys_dir, images_dir, worker):
    """The dispatcher: roll out jobs, keep device queues, collect statuses and samples.

    Runs until Ctrl-C or SIGTERM. All state is in the database, so it can be stopped
    (or killed) and started again at any time: a rollout continues where it was and
    no device runs a job twice. Exit 1 when it stopped on its own (see the last line).

    On a mutual-TLS broker (mqtts://) it presents KEYS_DIR/clients/<user>.crt (user:
    the URL's, else mpfleet-host) and trusts KEYS_DIR/ca.crt, unless the URL names
    ?cert=, ?key=, ?ca=.

    Only devices in this fleet (provisioned, or accepted with `mpfleet devices accept`)
    are served; others seen under the topic root are listed by `mpfleet devices pending`.
    Cancels and lost or regained broker connections are logged on stderr.

    \b
    Several workers (--db postgresql://..., docs/scale.md):
      mpfleet serve --db postgresql://mpfleet@db1/fleet --worker a &
      mpfleet serve --db postgresql://mpfleet@db1/fleet --worker b &
    The leader ticks the rollouts and publishes the queues; when it dies another
    takes over."""
    from mpfleet.broker.link import with_client_identity
    from mpfleet.fleet.keys import default_keys_dir
    from mpfleet.fleet.serve import Dispatcher, ServeError

    path = _database(db)
    broker = with_client_identity(broker, keys_dir or default_keys_dir())
    _log_to_stderr(quiet)

    def on_event(kind: str, data: dict) -> None:
        if (quiet and kind != "error") or kind == "canceled":  # a cancel is logged in full (stderr)
            return
        stamp = time.strftime("%H:%M:%S")
        text = " ".join(f"{k}={v}" for k, v in data.items())
        style = {"error": "red", "aborted": "red", "completed": "green", "advanced": "cyan"}.get(kind, "")
        console.print(f"{stamp} [{style}]{kind}[/] {text}" if style else f"{stamp} {kind} {text}", highlight=False)

    from mpfleet.db.backend import shown

    dispatcher = Dispatcher(broker, path, keys_dir=keys_dir, client_id=client_id, tick_s=tick, on_event=on_event,
                            images_dir=images_dir, root=topic_root, worker=worker)
    dispatcher.start()
    # click.echo, not rich: a line rich wraps at 80 columns would cut the client id in two
    as_worker = f", worker {dispatcher.worker}" if dispatcher.worker else ""
    click.echo(f"serving {shown(path)} on {broker.url()}, topics {topic_root}/..., client id "
               f"{dispatcher.client_id}{as_worker} (Ctrl-C stops)")
    _run_until_stopped(dispatcher, 0.5)
    stats = dispatcher.stats.as_dict()
    if not quiet:
        console.print(f"stopped: {stats['statuses']} statuses, {stats['queue_publishes']} queue updates, "
                      f"{stats['ingest']['samples_new']} new samples, {stats['errors']} errors", highlight=False)
    if dispatcher.failure is not None:
        raise ServeError(f"serve stopped: {dispatcher.failure}")


@click.command("ingest")
@BROKER
@TOPIC_ROOT
@DB
@click.option("--client-id", help=_INGEST_CLIENT_ID_HELP)
@KEYS_DIR
def ingest(broker, topic_root: str, db: str | None, client_id: str | None, keys_dir: str | None) -> None:
    """Store the devices' samples in the database and ack them, until Ctrl-C or SIGTERM.

    The samples half of `serve`, for a host that only collects data. On a mutual-TLS
    broker it presents KEYS_DIR/clients/<user>.crt (user: the URL's, else mpfleet-host;
    `mpfleet ca host-cert mpfleet-ingest` makes one). Exit 1 when it
    stopped on its own (see the last line). Only devices in this fleet are stored and
    acked; others are counted (`strangers`, `mpfleet devices pending`)."""
    from mpfleet.broker.link import with_client_identity
    from mpfleet.errors import MpfleetError
    from mpfleet.fleet.ingest import Ingester
    from mpfleet.fleet.keys import default_keys_dir

    path = _database(db)
    broker = with_client_identity(broker, keys_dir or default_keys_dir())
    _log_to_stderr(False)
    ingester = Ingester(broker, path, client_id=client_id, root=topic_root)
    ingester.start()
    click.echo(f"ingesting {topic_root}/... from {broker.url()} into {path}, client id {ingester.client_id} "
               "(Ctrl-C stops)")

    def report() -> None:
        stats = ingester.stats.as_dict()
        console.print(f"frames {stats['frames']}  new samples {stats['samples_new']}  "
                      f"duplicates {stats['duplicates']}  corrupt {stats['corrupt']}  "
                      f"quarantined {stats['quarantined']}  strangers {stats['strangers']}  "
                      f"waiting for the database {ingester.messages.as_dict()['held']}", highlight=False)

    _run_until_stopped(ingester, 5, report)
    if ingester.failure is not None:
        raise MpfleetError(f"ingest stopped: {ingester.failure}")
