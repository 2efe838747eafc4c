"""`mpfleet flash`: MicroPython onto every attached board at once (library: mpfleet.usb.flash).

Thin: check the arguments, load the firmware file once, flash all ports in parallel
with one progress bar per board (on a terminal only), then a summary table. Exit
status 1 when any board failed, after one `mpfleet: PORT: reason` line per failure.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mpfleet.cli.options import JSON, print_json
from mpfleet.errors import MpfleetError
from mpfleet.usb.flash import AFTER_MODES, BEFORE_MODES, DEFAULT_BAUD, FirmwarePlan
from mpfleet.usb.ports import PortResult

# No emoji codes: a MAC such as 24:0a:c4:cd:0f:a2 holds ":cd:", which rich would draw as a disc.
console = Console(emoji=False)


class BoardsFailed(MpfleetError):
    """At least one board was not flashed (each reason has been printed)."""


@click.command("flash")
@click.option("--board", "board_name", required=True, metavar="NAME",
              help="Board definition: a name from `mpfleet boards list` or a path to a .json file.")
@click.option("--firmware", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Merged firmware.bin (written at the board's firmware_offset) or an app image "
                   "(written at its first app partition).")
@click.option("--port", "ports", multiple=True, metavar="PORT", help="A board's serial port; repeat for more.")
@click.option("--all", "all_ports", is_flag=True, help="Every serial port with a USB vendor/product id.")
@click.option("--baud", type=click.IntRange(min=9600), default=DEFAULT_BAUD, show_default=True,
              help="Baud rate for the write (a failed write is retried once at 115200).")
@click.option("--no-stub", is_flag=True, help="Talk to the ROM loader only, without esptool's flasher stub.")
@click.option("--before", type=click.Choice(BEFORE_MODES), default="default-reset", show_default=True,
              help="How to get the chip into its bootloader.")
@click.option("--after", type=click.Choice(AFTER_MODES), default="hard-reset", show_default=True,
              help="What the chip does when written.")
@click.option("--compress/--no-compress", default=None,
              help="Deflate data on the wire (default: only with the flasher stub).")
@JSON
def flash(board_name: str, firmware: str, ports: tuple[str, ...], all_ports: bool, baud: int, no_stub: bool,
          before: str, after: str, compress: bool | None, as_json: bool) -> None:
    """Flash FILE onto the boards on every PORT in parallel, checking each chip first.

    \b
      mpfleet flash --board esp32-devkitc --firmware firmware.bin --all
      mpfleet flash --board esp32-s3-devkitc --firmware micropython.bin --port /dev/ttyACM0 --port /dev/ttyACM1

    A chip other than the board definition's or the image's is refused before
    anything is erased. otadata is left erased, so the board boots what was written.
    """
    from mpfleet.boards import load_board
    from mpfleet.usb.flash import flash_boards, load_firmware

    board = load_board(board_name)
    plan = load_firmware(firmware, board)
    targets = _target_ports(ports, all_ports)
    if not as_json:
        console.print(f"{Path(plan.path).name}: {plan.kind} image for {plan.chip}, version {plan.version}, "
                      f"{plan.size} bytes -> {len(targets)} board(s) of type {board.name}",
                      highlight=False, markup=False, soft_wrap=True)
    with _ProgressBars(targets, plan, enabled=not as_json) as bars:
        results = flash_boards(targets, board, plan, baud=baud, no_stub=no_stub, before=before, after=after,
                               compress=compress, on_progress=bars.update)
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
    else:
        _print_summary(results)
    failed = [r for r in results if not r.ok]
    for r in failed:
        click.echo(f"mpfleet: {r.port}: {r.error}", err=True)
    if failed:
        raise BoardsFailed(f"{len(failed)} of {len(results)} board(s) failed")


def _target_ports(ports: tuple[str, ...], all_ports: bool) -> list[str]:
    from mpfleet.usb.ports import list_usb_ports

    if not ports and not all_ports:
        raise click.UsageError("no boards to flash: give --port PORT (repeatable) or --all")
    targets = list(dict.fromkeys(ports))
    if all_ports:
        found = [p.port for p in list_usb_ports()]
        if not found and not targets:
            raise BoardsFailed("--all found no serial port with a USB vendor/product id: "
                               "is a board plugged in (and its USB-serial driver loaded)?")
        targets += [p for p in found if p not in targets]
    return targets


class _ProgressBars:
    """One rich bar per port, drawn only when stdout is a terminal."""

    def __init__(self, ports: list[str], plan: FirmwarePlan, enabled: bool):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TimeElapsedColumn(), console=console,
                                  disable=not (enabled and console.is_terminal))
        self._tasks = {port: self._progress.add_task(port, total=plan.size) for port in ports}

    def __enter__(self) -> _ProgressBars:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, port: str, done: int, total: int) -> None:
        self._progress.update(self._tasks[port], completed=done, total=total)


def _print_summary(results: list[PortResult]) -> None:
    table = Table(title="flash")
    for column in ("port", "chip", "MAC", "result", "bytes", "secs"):
        table.add_column(column, justify="right" if column in ("bytes", "secs") else "left",
                         no_wrap=column in ("port", "MAC"))
    for r in results:
        outcome = Text("ok", style="green") if r.ok else Text("FAILED", style="red")
        if r.retried:
            outcome.append(" (retried)")
        table.add_row(Text(r.port), Text(r.chip or "?"), Text(r.mac or "?"), outcome,
                      str(r.bytes_written), f"{r.seconds:.1f}")
    console.print(table)
    ok = sum(r.ok for r in results)
    console.print(f"{ok} of {len(results)} board(s) flashed and verified", highlight=False)
    sys.stdout.flush()
