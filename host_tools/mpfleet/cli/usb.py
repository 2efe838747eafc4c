"""`mpfleet ports`, `mpfleet deploy`, `mpfleet usb run|collect` (libraries: mpfleet.usb.field, mpfleet.usb.ports).

Thin: parse, call the library on every port at once, show one line per board as it
goes and a summary table; exit status 1 when any board failed.
"""

from __future__ import annotations

import sys
import threading

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import DB, KEYS_DIR, JSON, print_json

console = Console()


def usb_ports() -> list[dict]:
    """Serial ports with a USB VID:PID (what a board on a hub looks like), sorted by location."""
    from serial.tools import list_ports

    out = []
    for p in list_ports.comports():
        if p.vid is None:
            continue
        out.append({"port": p.device, "vid_pid": f"{p.vid:04x}:{p.pid:04x}", "serial": p.serial_number,
                    "location": p.location, "description": p.description,
                    "key": p.location or p.serial_number or p.device})
    return sorted(out, key=lambda p: (p["location"] or "", p["port"]))


def choose_ports(ports: tuple[str, ...], all_ports: bool) -> list[str]:
    if ports and all_ports:
        raise click.UsageError("give --port (repeatable) or --all, not both")
    if all_ports:
        found = [p["port"] for p in usb_ports()]
        if not found:
            raise click.ClickException("no USB serial ports found (is the hub plugged in? see `mpfleet ports`)")
        return found
    if not ports:
        raise click.UsageError("which boards? give --port PORT (repeatable) or --all")
    if len(set(ports)) != len(ports):
        raise click.UsageError("a port is given twice")
    return list(ports)


PORTS = click.option("--port", "ports", multiple=True, metavar="PORT", help="A board's serial port. Repeatable.")
ALL = click.option("--all", "all_ports", is_flag=True, help="Every attached USB serial port.")
WAIT = click.option("--wait", "wait_s", type=click.FloatRange(min=1), default=15, show_default=True,
                    help="Seconds to keep interrupting a board until its REPL answers (a board in deep "
                         "sleep answers when it next wakes).")
QUIET = click.option("--quiet", is_flag=True, help="No progress lines.")
TRANSPORT = click.option("--transport", type=click.Choice(["mpremote", "ampy"]), default="mpremote",
                         show_default=True,
                         help="REPL transport: mpremote (raw-paste mode, faster) or ampy (plain raw REPL).")


class _Lines:
    """One line per board and step, printed as the parallel workers report."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.lock = threading.Lock()

    def __call__(self, port: str, what: str) -> None:
        if not self.quiet:
            with self.lock:
                console.print(f"  {port}: {what}", highlight=False)


def _summary(title: str, results, columns: list[tuple[str, callable]]) -> int:
    table = Table(title=title)
    table.add_column("port")
    table.add_column("device")
    table.add_column("result")
    for name, _ in columns:
        table.add_column(name)
    for r in results:
        table.add_row(r.port, r.device or "", Text("ok", style="green") if r.ok else Text(r.error or "failed",
                                                                                          style="red"),
                      *(str(fn(r)) if r.ok else "" for _, fn in columns))
    console.print(table)
    bad = [r for r in results if not r.ok]
    if bad:
        console.print(f"[red]{len(bad)} of {len(results)} boards failed[/]")
    return 1 if bad else 0


def _report(results, as_json: bool, title: str, columns: list[tuple[str, callable]]) -> None:
    """JSON or the summary table; exit status 1 when any board failed."""
    if as_json:
        print_json([{"port": r.port, "ok": r.ok, "device": r.device, "error": r.error,
                     "detail": {k: v for k, v in r.detail.items() if k != "frames"}} for r in results])
        sys.exit(0 if all(r.ok for r in results) else 1)
    sys.exit(_summary(title, results, columns))


# ---------------------------------------------------------------- ports
@click.command("ports")
@click.option("--probe", is_flag=True, help="Ask each board's MicroPython for its version and device id "
                                            "(interrupts what it runs).")
@PORTS
@JSON
def ports(probe, ports, as_json):
    """Attached boards: port, VID:PID, serial number, USB location (the stable key)."""
    from mpfleet.usb.device import identify
    from mpfleet.usb.ports import PortResult, each_port
    from mpfleet.usb.transport import open_link

    found = usb_ports() + [{"port": p, "vid_pid": "", "serial": None, "location": None, "description": "given",
                            "key": p} for p in ports]
    if probe:
        def ask(port: str) -> PortResult:
            with open_link(port) as link:
                return PortResult(port, ok=True, detail=identify(link))

        answers = {r.port: r for r in each_port([p["port"] for p in found], ask)}
        for p in found:
            r = answers[p["port"]]
            p["micropython"] = r.detail if r.ok else None
            p["probe_error"] = r.error
    if as_json:
        print_json(found)
        return
    if not found:
        console.print("no USB serial ports found")
        return
    table = Table(title="attached boards")
    for col in ("port", "VID:PID", "serial", "location", "description") + (("MicroPython", "device id") if probe
                                                                             else ()):
        table.add_column(col)
    for p in found:
        extra = ()
        if probe:
            mp = p.get("micropython")
            extra = (f"{mp['release']} ({mp['machine']})", mp["device_id"] or "-") if mp else (
                Text(p["probe_error"] or "no REPL", style="yellow"), "")
        table.add_row(p["port"], p["vid_pid"], p["serial"] or "", p["location"] or "", p["description"] or "", *extra)
    console.print(table)


# ---------------------------------------------------------------- deploy
@click.command("deploy")
@PORTS
@ALL
@click.option("--board", default="esp32-devkitc", show_default=True, help="Board definition (boards/*.json).")
@click.option("--broker", envvar="MPFLEET_BROKER", default="mqtt://127.0.0.1:1883", show_default=True,
              help="The broker the devices will use (host and port go into their config).")
@click.option("--wifi-ssid", help="Wi-Fi network for the devices.")
@click.option("--wifi-password", help="Its password.")
@click.option("--group", "groups", multiple=True, help="Add the devices to this group. Repeatable.")
@click.option("--credentials", is_flag=True,
              help="Give each device its own broker account (mpfleet broker config writes the broker's files).")
@TRANSPORT
@WAIT
@QUIET
@DB
@KEYS_DIR
@JSON
def deploy(ports, all_ports, board, broker, wifi_ssid, wifi_password, groups, credentials, transport, wait_s, quiet,
           db, keys_dir, as_json):
    """Copy the agent to every board (only what changed), provision it and check it.

    \b
    Per board: compile firmware/lib with mpy-cross for the board's .mpy version, copy the
    files whose SHA-256 on the board differs, write /config.json (device id = the MAC,
    or the one it already has; trusted keys; Wi-Fi; broker; its own broker account with
    --credentials), register it in the database, then run the agent's self-check.
      mpfleet deploy --all --wifi-ssid site --wifi-password ... --broker mqtt://10.0.0.2
    """
    from mpfleet.boards import load_board
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.broker.link import parse_broker_url
    from mpfleet.db.store import Store
    from mpfleet.usb.field import DeploySettings
    from mpfleet.usb.field import deploy as deploy_boards

    chosen = choose_ports(ports, all_ports)
    load_board(board)  # an unknown board is refused before any board is touched
    settings = DeploySettings(board=board, broker=parse_broker_url(broker), wifi_ssid=wifi_ssid,
                              wifi_password=wifi_password, groups=list(groups), with_credentials=credentials,
                              transport=transport, wait_s=wait_s)
    store = Store(db)
    with store:
        ring = KeyRing(store, keys_dir)
        ring.fleet_key()  # no signing key: the devices could trust nothing; say so now
        results = deploy_boards(store, ring, chosen, settings, progress=_Lines(quiet or as_json))
    _report(results, as_json, "deploy", [("copied", lambda r: len(r.detail["written"])),
                                         ("unchanged", lambda r: len(r.detail["skipped"])),
                                         ("agent", lambda r: r.detail["app"])])


# ---------------------------------------------------------------- usb run / collect
@click.group("usb")
def usb() -> None:
    """Signed jobs and sample collection over USB, for sites without a network.

    \b
      mpfleet job create diag --targets site-7 --id diag-site-7
      mpfleet usb run diag-site-7 --all       # statuses land in `mpfleet job status diag-site-7`
      mpfleet usb collect --all               # samples into the database; boards trim what was stored
    """


@usb.command("run")
@click.argument("job_id", metavar="JOB")
@PORTS
@ALL
@TRANSPORT
@WAIT
@QUIET
@DB
@KEYS_DIR
@JSON
def usb_run(job_id, ports, all_ports, transport, wait_s, quiet, db, keys_dir, as_json):
    """Run JOB's signed envelope on every board through its REPL; record each status."""
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine
    from mpfleet.db.store import Store
    from mpfleet.usb.field import run_job

    chosen = choose_ports(ports, all_ports)
    store = Store(db)
    with store:
        engine = RolloutEngine(store, KeyRing(store, keys_dir), Registry(store))
        engine.job_status(job_id)  # an unknown job is refused before any board is touched
        results = run_job(engine, chosen, job_id, transport, progress=_Lines(quiet or as_json), wait_s=wait_s)
    _report(results, as_json, f"job {job_id} over USB", [("status", lambda r: r.detail["status"])])


@usb.command("collect")
@PORTS
@ALL
@TRANSPORT
@WAIT
@QUIET
@DB
@JSON
def usb_collect(ports, all_ports, transport, wait_s, quiet, db, as_json):
    """Pull each board's unacked samples into the database; each board then trims what was stored."""
    from mpfleet.db.store import Store
    from mpfleet.usb.field import collect

    chosen = choose_ports(ports, all_ports)
    store = Store(db)
    with store:
        results = collect(store, chosen, transport, progress=_Lines(quiet or as_json), wait_s=wait_s)
    _report(results, as_json, "samples over USB", [("new samples", lambda r: r.detail["new"]),
                                                   ("duplicates", lambda r: r.detail["duplicates"]),
                                                   ("acked up to", lambda r: r.detail["acked"])])
