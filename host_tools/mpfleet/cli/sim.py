"""`mpfleet sim ...`: create, power, run and inspect virtual boards."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from mpfleet.cli.options import DEVICE_ID
from mpfleet.cli.render import print_json
from mpfleet.sim.board import VirtualBoard

console = Console()

_DIR = click.argument("directory", type=click.Path(file_okay=False, path_type=Path))


class _Heap(click.ParamType):
    """A firmware heap size: 128k, 1m or a byte count, positive."""

    name = "SIZE"

    def convert(self, value, param, ctx):
        from mpfleet.sim.board import SimError, parse_heap

        try:
            parse_heap(value)
        except SimError as e:
            self.fail(str(e), param, ctx)
        return str(value).strip().lower()


@click.group()
def sim() -> None:
    """Virtual ESP32 boards: the real MicroPython unix port on an emulated flash.

    \b
    A board lives in a directory. Typical session:
      mpfleet sim create /tmp/dev1
      mpfleet sim put /tmp/dev1 firmware/main.py /main.py
      mpfleet sim run /tmp/dev1 --boots 5
      mpfleet sim console /tmp/dev1      # then: mpremote connect <port> repl
      mpfleet sim flash /tmp/dev1        # erase/program counters per partition
    """


@sim.command("create")
@_DIR
@click.option("--board", default="virtual", show_default=True, help="Board definition name or .json path.")
@click.option("--device-id", type=DEVICE_ID, help="Device id (default: the MAC in hex).")
@click.option("--firmware-version", default="v1.24.0", show_default=True,
              help="Version in the synthetic firmware image written to ota_0.")
@click.option("--heap", type=_Heap(), default="128k", show_default=True,
              help="Firmware heap budget, e.g. 128k.")
@click.option("--force", is_flag=True, help="Replace a board that already exists there.")
def sim_create(directory: Path, board: str, device_id: str | None, firmware_version: str, heap: str,
               force: bool) -> None:
    """Create a virtual board in DIRECTORY (erased flash, firmware in ota_0)."""
    vb = VirtualBoard.create(directory, board=board, device_id=device_id, firmware_version=firmware_version,
                             heap=heap, overwrite=force)
    console.print(f"created virtual board [bold]{vb.device_id}[/] ({vb.board['name']}) in {directory}")


@sim.command("put")
@_DIR
@click.argument("local", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("remote")
def sim_put(directory: Path, local: Path, remote: str) -> None:
    """Copy LOCAL onto the board's LittleFS as REMOTE (an absolute device path)."""
    VirtualBoard(directory).fs_put({remote: local.read_bytes()})
    console.print(f"{local} -> :{remote}")


@sim.command("deploy")
@_DIR
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A config.json to install as /config.json (see docs/agent.md).")
@click.option("--source", is_flag=True, help="Copy lib/ as .py source instead of compiled .mpy.")
def sim_deploy(directory: Path, config_file: Path | None, source: bool) -> None:
    """Install the firmware tree (lib/ compiled to .mpy) onto a virtual board."""
    import json as _json

    from mpfleet.images.firmware import firmware_tree

    files = firmware_tree(compiled=not source)
    if config_file:
        try:
            _json.loads(config_file.read_text())
        except ValueError as e:
            raise click.BadParameter(f"{config_file} is not valid JSON: {e}", param_hint="--config") from None
        files["/config.json"] = config_file.read_bytes()
    VirtualBoard(directory).fs_put(files)
    console.print(f"deployed {len(files)} files to {directory}")


@sim.command("ls")
@_DIR
@click.argument("remote", default="/")
def sim_ls(directory: Path, remote: str) -> None:
    """List a directory on the board's LittleFS."""
    for name in VirtualBoard(directory).fs_listdir(remote):
        click.echo(name)


@sim.command("power-on")
@_DIR
def sim_power_on(directory: Path) -> None:
    """Apply power (RTC memory and clock start afresh); `run` then boots it."""
    VirtualBoard(directory).power_on()


@sim.command("power-cut")
@_DIR
@click.option("--after-ops", type=click.IntRange(min=1), help="Cut at the Nth flash erase/program from now.")
def sim_power_cut(directory: Path, after_ops: int | None) -> None:
    """Cut the power now, or schedule a cut during a flash operation."""
    vb = VirtualBoard(directory)
    if after_ops:
        vb.schedule_power_cut(after_ops)
        console.print(f"power will be cut at flash operation {after_ops} from now")
    else:
        vb.power_off()


@sim.command("run")
@_DIR
@click.option("--boots", type=click.IntRange(min=1), help="Stop after this many boots.")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True),
              help="Stop when this much device time (awake and asleep) has passed.")
@click.option("--scale", type=click.FloatRange(min=0), default=None,
              help="Device seconds per real second of a sleep (default 0: sleeps take no real time).")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per boot.")
@click.option("--output/--no-output", default=True, help="Show what the device printed.")
@click.option("--progress/--no-progress", default=None,
              help="One line per boot on stderr while it runs: device time reached, real time taken "
                   "(default: with --json; otherwise each boot's line is shown as it ends).")
def sim_run(directory: Path, boots: int | None, hours: float | None, scale: float | None, as_json: bool,
            output: bool, progress: bool | None) -> None:
    """Run the board through boots and deep sleeps (powering it on if needed).

    Device time is virtual: a deep sleep or a sleep inside a wake takes no real
    time unless --scale asks for real-time pacing. Waits on the network (a broker,
    the host's ack) are real.
    """
    vb = VirtualBoard(directory)
    if not vb.powered:
        vb.power_on()
    if boots is None and hours is None:
        boots = 1
    if progress is None:
        progress = as_json
    started = time.monotonic()

    def report(rec, device_s: float) -> None:
        click.echo(f"boot {rec.index}: {rec.exit_reason}, awake {(rec.awake_ms or 0) / 1000:.1f} s, "
                   f"device time {_duration(device_s)}"
                   + (f" of {_duration(hours * 3600)}" if hours else "")
                   + f", {time.monotonic() - started:.1f} s real", err=True)

    def show(rec, device_s: float) -> None:
        if progress:
            report(rec, device_s)
        if as_json:
            return
        if output and rec.output.strip():
            console.print(rec.output.rstrip(), markup=False, highlight=False)
        console.print(f"[dim]boot {rec.index}: {rec.reset_cause_name} slot={rec.running_slot} "
                      f"version={rec.firmware_version} -> {rec.exit_reason}"
                      + (f" {rec.sleep_ms} ms" if rec.sleep_ms else "")
                      + (f" ({rec.detail})" if rec.detail else "") + "[/]")

    records = vb.run(boots=boots, hours=hours, real_time_scale=scale, progress=show)
    if as_json:
        print_json([r.to_json() for r in records])


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


@sim.command("status")
@_DIR
@click.option("--json", "as_json", is_flag=True)
def sim_status(directory: Path, as_json: bool) -> None:
    """Power, clock, otadata (the slot that boots, each slot's state) and the last boots."""
    vb = VirtualBoard(directory)
    otadata = vb.otadata()
    status = {"device_id": vb.device_id, "board": vb.board["name"], "powered": vb.powered,
              "clock_s": vb.clock_s, "boot_count": vb.state["boot_count"], "otadata": otadata,
              "last_boots": vb.boot_records()[-5:]}
    if as_json:
        print_json(status)
        return
    from mpfleet.sim.board import RESET_NAMES

    console.print(f"[bold]{vb.device_id}[/] ({vb.board['name']}) powered={vb.powered} "
                  f"boots={vb.state['boot_count']} clock={vb.clock_s:.0f}", highlight=False)
    console.print(f"otadata: boots {otadata['boots']}", highlight=False)
    slots = Table(title="otadata")
    for col in ("slot", "state", "entry (sector, seq)"):
        slots.add_column(col)
    for slot in otadata["slots"]:
        held = [f"{e['sector']}, {e['seq']}" for e in otadata["entries"] if e["slot"] == slot["slot"]]
        slots.add_row(slot["slot"] + (" (boots)" if slot["slot"] == otadata["boots"] else ""), slot["state"],
                      "; ".join(held) or "-")
    console.print(slots)
    table = Table(title="last boots")
    for col in ("boot", "reset cause", "slot", "version", "exit", "detail"):
        table.add_column(col)
    for r in status["last_boots"]:
        table.add_row(str(r["index"]), RESET_NAMES.get(r["reset_cause"], "?"), str(r["running_slot"]),
                      str(r["firmware_version"]), r["exit_reason"], r.get("detail") or "")
    console.print(table)


@sim.command("flash")
@_DIR
@click.option("--json", "as_json", is_flag=True)
def sim_flash(directory: Path, as_json: bool) -> None:
    """Flash wear counters: erases, program operations and bytes programmed per partition."""
    counters = VirtualBoard(directory).counters()
    if as_json:
        print_json(counters)
        return
    table = Table(title=f"flash counters ({counters['ops']} operations)")
    for col in ("partition", "erases", "programs", "bytes programmed"):
        table.add_column(col, justify="right" if col != "partition" else "left")
    for name, c in counters.items():
        if name == "ops":
            continue
        table.add_row(name, str(c["erases"]), str(c["programs"]), str(c["bytes_programmed"]))
    console.print(table)


@sim.command("console")
@_DIR
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="Also make this path a symlink to the console's pty.")
def sim_console(directory: Path, link: Path | None) -> None:
    """Expose the board's serial console on a pseudo-terminal until Ctrl-C.

    Use it like a USB board: `mpremote connect <port> fs ls`, `mpremote connect <port> repl`.
    """
    from mpfleet.sim.serial import serve_console

    serve_console(directory, link=link)


@sim.command("download-mode")
@_DIR
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path),
              help="Also make this path a symlink to the ROM loader's pty.")
def sim_download_mode(directory: Path, link: Path | None) -> None:
    """Hold the board in its ROM bootloader (GPIO0 low) on a pseudo-terminal until Ctrl-C,
    so `mpfleet flash` or esptool write its flash like a USB board's.

    \b
      mpfleet sim download-mode /tmp/dev1 --link /tmp/d.rom   # then, in another terminal:
      mpfleet flash --board virtual --firmware t.bin --port /tmp/d.rom --no-stub --before no-reset --after no-reset
    """
    import signal
    import threading

    from mpfleet.sim.rom import RomBootloader

    vb = VirtualBoard(directory)
    with RomBootloader(vb) as rom:
        if link is not None:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(rom.port)
        where = rom.port if link is None else f"{rom.port} (also {link})"
        click.echo(f"{vb.device_id}: ROM bootloader on {where} (Ctrl-C here ends download mode)")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda *_: stop.set())
        try:
            while not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if link is not None and link.is_symlink():
                link.unlink()
    click.echo(f"{vb.device_id}: download mode ended; `mpfleet sim run` boots what was written")


from mpfleet.cli.sim_fleet import sim_fleet  # noqa: E402 - registered last, kept in its own module

sim.add_command(sim_fleet)
from mpfleet.cli.sim_load import sim_load  # noqa: E402 - beside sim fleet, in its own module
sim.add_command(sim_load)
