"""`mpfleet ports`, `mpfleet deploy`, `mpfleet usb run|collect` (libraries: mpfleet.usb.field, mpfleet.usb.ports).

Thin: parse, resolve --port/--all (mpfleet.usb.ports.resolve_ports, the rule every
many-board command shares, `flash` too), call the library on every port at once,
show one line per board and step as it goes, then the per-board table
(cli/render.py, report_boards); a failed board ends the command in BoardsFailed, exit 1.
"""

from __future__ import annotations

import threading

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import DB, GROUP, JSON, KEYS_DIR, BrokerUrl, TopicRoot, open_store
from mpfleet.cli.settings import configured
from mpfleet.cli.render import Column, print_json, report_boards

# No emoji codes: a MAC such as 24:0a:c4:cd:0f:a2 holds ":cd:", which rich would draw as a disc.
console = Console(emoji=False)

BOARDS_HELP = """
\b
Boards: --port PORT names one (repeatable; a board named twice is a usage error).
--all adds every attached USB serial port (`mpfleet ports`), in USB-location order.
With both, the named ports come first, then the rest of --all.

\b
Exit status: 0 every board done; 1 a board failed (the table, or --json, says
which and why: the other boards are done all the same) or the command could not
start; 2 a usage error (no boards given, a board named twice, a bad option).
"""

PORTS = click.option("--port", "ports", multiple=True, metavar="PORT",
                     help="A board's serial port; repeat for more (with --all: these first).")
ALL = click.option("--all", "all_ports", is_flag=True,
                   help="Every attached USB serial port (what `mpfleet ports` lists), in USB-location order.")
WAIT = click.option("--wait", "wait_s", type=click.FloatRange(min=1), default=15, show_default=True,
                    help="Seconds to keep interrupting a board until its REPL answers (a board in deep "
                         "sleep answers when it next wakes).")
QUIET = click.option("--quiet", is_flag=True, help="No progress lines.")
TRANSPORT = click.option("--transport", type=click.Choice(["mpremote", "ampy"]), default="mpremote",
                         show_default=True,
                         help="REPL transport: mpremote (raw-paste mode, faster) or ampy (plain raw REPL).")


def link_options(command):
    """--transport, --wait and --quiet: how a field command talks to each board."""
    return TRANSPORT(WAIT(QUIET(command)))


def chosen_ports(ports: tuple[str, ...], all_ports: bool, action: str) -> list[str]:
    """--port/--all by the one rule (mpfleet.usb.ports.resolve_ports); a bad choice is a usage error."""
    from mpfleet.usb.ports import BadPortChoice, resolve_ports

    try:
        return resolve_ports(ports, all_ports, action=action)
    except BadPortChoice as e:
        raise click.UsageError(str(e)) from None


class _Lines:
    """One line per board and step, printed as the parallel workers report (port, done, total)."""

    def __init__(self, steps: tuple[str, ...], quiet: bool):
        self.steps = steps
        self.quiet = quiet
        self.lock = threading.Lock()

    def __call__(self, port: str, done: int, total: int) -> None:
        if not self.quiet:
            with self.lock:
                console.print(f"  {port}: {self.steps[done] if done < total else 'done'}", highlight=False,
                              markup=False)


DEVICE = Column("device", lambda r: r.device)


# ---------------------------------------------------------------- ports
@click.command("ports")
@click.option("--probe", is_flag=True, help="Ask each board's MicroPython for its version and device id "
                                            "(interrupts what it runs).")
@click.option("--port", "ports", multiple=True, metavar="PORT",
              help="List (and probe) this port too, attached over USB or not. Repeatable.")
@JSON
def ports(probe, ports, as_json):
    """Attached boards: port, VID:PID, serial number, USB location (the stable key).

    The order is the one `--all` takes everywhere: USB location in hub order (1-1.2
    before 1-1.10), then ports without a location by name; --port ones first.
    """
    from mpfleet.usb.device import identify
    from mpfleet.usb.ports import PortResult, each_port, list_usb_ports
    from mpfleet.usb.transport import open_link

    attached = list_usb_ports()
    if not attached and not ports:
        if as_json:
            print_json([])
        else:
            console.print("no USB serial ports found")
        return
    by_name = {p.port: p for p in attached}
    found = []
    for name in chosen_ports(ports, True, "list"):
        p = by_name.get(name)
        found.append({"port": name, "vid_pid": p.vid_pid, "serial": p.serial, "location": p.location,
                      "description": p.description, "key": p.key} if p else
                     {"port": name, "vid_pid": "", "serial": None, "location": None, "description": "given",
                      "key": name})
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
# Deploy's own --broker, without the default of options.broker_option: a redeploy without
# --broker keeps each board's broker, it never resets it to 127.0.0.1.
# A broker or topic root written in the config file (or the environment) is one the user
# chose, so deploy takes it as if given; only with none anywhere does a board keep its own.
DEPLOY_BROKER = click.option(
    "--broker", type=BrokerUrl(), envvar="MPFLEET_BROKER", default=configured("broker", None),
    help="The broker the boards will use: mqtt://[user:pass@]host[:port] or mqtts://... (host, port, TLS and "
         "the URL's user and password go into their config; env MPFLEET_BROKER, config key broker). Not given "
         "anywhere: each board keeps the broker its /config.json has, and a board without one fails.")


DEPLOY_TOPIC_ROOT = click.option(
    "--topic-root", type=TopicRoot(), envvar="MPFLEET_TOPIC_ROOT", default=configured("topic_root", None),
    help="Where the fleet's topics live on the broker (the board's broker.topic_root; env MPFLEET_TOPIC_ROOT, "
         "config key topic_root). Not given anywhere: each board keeps its own (mpf/v1 unless set).")


@click.command("deploy", epilog=BOARDS_HELP)
@PORTS
@ALL
@click.option("--board", default="esp32-devkitc", show_default=True, help="Board definition (boards/*.json).")
@DEPLOY_BROKER
@DEPLOY_TOPIC_ROOT
@click.option("--wifi-ssid", help="Wi-Fi network for the devices (not given: each keeps its own).")
@click.option("--wifi-password", help="Its password (not given: a board already on that network keeps its own; "
                                      "a new network without one is open).")
@click.option("--group", "groups", type=GROUP, multiple=True, help="Add the devices to this group. Repeatable.")
@click.option("--credentials", is_flag=True,
              help="Give each device its own broker account (mpfleet broker config writes the broker's files).")
@link_options
@DB
@KEYS_DIR
@JSON
def deploy(ports, all_ports, board, broker, topic_root, wifi_ssid, wifi_password, groups, credentials, transport,
           wait_s, quiet, db, keys_dir, as_json):
    """Make every board run the agent as deployed, provision it and check it.

    \b
    Per board: compile firmware/lib with mpy-cross for the board's .mpy version; copy the
    files whose SHA-256 on the board differs; remove what the tree no longer has (in
    /lib/agent, the other form of a root file such as /appslot.py, and the A/B app slots
    /app.json and /apps, so the board boots the agent just deployed); write /config.json
    (device id = the MAC, or the one it already has; trusted keys; what was given of
    Wi-Fi, broker and groups; its own broker account with --credentials) keeping every
    other setting the board has, its broker and Wi-Fi included; register it in the
    database; soft-reset it and check that each agent module it imports is the file
    deployed (path and SHA-256).
      mpfleet deploy --all --wifi-ssid site --wifi-password ... --broker mqtt://10.0.0.2
      mpfleet deploy --all          # a redeploy: each board keeps its broker and Wi-Fi
    """
    from mpfleet.boards import load_board
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.usb.field import DEPLOY_STEPS, DeploySettings
    from mpfleet.usb.field import deploy as deploy_boards

    chosen = chosen_ports(ports, all_ports, "deploy to")
    if credentials and broker is not None and broker.user:
        raise click.UsageError("give the broker account either in --broker's URL (user:pass@) or with "
                               "--credentials (one account per device), not both")
    load_board(board)  # an unknown board is refused before any board is touched
    settings = DeploySettings(board=board, broker=broker, topic_root=topic_root, wifi_ssid=wifi_ssid,
                              wifi_password=wifi_password, groups=list(groups), with_credentials=credentials,
                              transport=transport, wait_s=wait_s)
    store = open_store(db, create=True)  # deploy registers the boards
    with store:
        ring = KeyRing(store, keys_dir)
        ring.fleet_key()  # no signing key: the devices could trust nothing; say so now
        from mpfleet.cli.ca import fleet_ca

        settings.ca = fleet_ca(keys_dir, store)
        if broker is not None and broker.tls:
            settings.ca.certificate()  # no fleet CA: say so before any board is touched
        results = deploy_boards(store, ring, chosen, settings, on_progress=_Lines(DEPLOY_STEPS, quiet or as_json))
    report_boards(console, results, title="deploy", done="deployed and checked", as_json=as_json, columns=[
        DEVICE,
        Column("copied", lambda r: len(r.detail["written"]) if "written" in r.detail else None, right=True),
        Column("removed", lambda r: len(r.detail["removed"]) if "removed" in r.detail else None, right=True),
        Column("unchanged", lambda r: len(r.detail["skipped"]) if "skipped" in r.detail else None, right=True),
        Column("broker", lambda r: r.detail.get("broker")),
        Column("agent", lambda r: r.detail.get("app"))])


# ---------------------------------------------------------------- usb run / collect
@click.group("usb")
def usb() -> None:
    """Signed jobs and sample collection over USB, for sites without a network.

    \b
      mpfleet job create diag --targets site-7 --id diag-site-7
      mpfleet usb run diag-site-7 --all       # statuses land in `mpfleet job status diag-site-7`
      mpfleet usb collect --all               # samples into the database; boards trim what was stored
    """


@usb.command("run", epilog=BOARDS_HELP)
@click.argument("job_id", metavar="JOB")
@PORTS
@ALL
@link_options
@DB
@KEYS_DIR
@JSON
def usb_run(job_id, ports, all_ports, transport, wait_s, quiet, db, keys_dir, as_json):
    """Run JOB's signed envelope on every board through its REPL; record each status.

    A board whose job ends other than SUCCEEDED counts as failed (exit 1).
    """
    from mpfleet.fleet.keys import KeyRing
    from mpfleet.fleet.registry import Registry
    from mpfleet.fleet.rollout import RolloutEngine
    from mpfleet.usb.field import RUN_STEPS, run_job

    chosen = chosen_ports(ports, all_ports, f"run {job_id} on")
    store = open_store(db)  # the job must be in it
    with store:
        engine = RolloutEngine(store, KeyRing(store, keys_dir), Registry(store))
        engine.job_status(job_id)  # an unknown job is refused before any board is touched
        results = run_job(engine, chosen, job_id, transport, on_progress=_Lines(RUN_STEPS, quiet or as_json),
                          wait_s=wait_s)
    report_boards(console, results, title=f"job {job_id} over USB", done="succeeded", as_json=as_json,
                  columns=[DEVICE, Column("status", lambda r: r.detail.get("status"))])


@usb.command("collect", epilog=BOARDS_HELP)
@PORTS
@ALL
@link_options
@DB
@JSON
def usb_collect(ports, all_ports, transport, wait_s, quiet, db, as_json):
    """Pull each board's unacked samples into the database; each board then trims what was stored."""
    from mpfleet.usb.field import COLLECT_STEPS, collect

    chosen = chosen_ports(ports, all_ports, "collect from")
    store = open_store(db, create=True)  # a field laptop may start a database with what it collects
    with store:
        results = collect(store, chosen, transport, on_progress=_Lines(COLLECT_STEPS, quiet or as_json),
                          wait_s=wait_s)
    report_boards(console, results, title="samples over USB", done="collected and acknowledged", as_json=as_json,
                  columns=[DEVICE, Column("new samples", lambda r: r.detail.get("new"), right=True),
                           Column("duplicates", lambda r: r.detail.get("duplicates"), right=True),
                           Column("acked up to", lambda r: r.detail.get("acked"), right=True)])
