"""`mpfleet flash`: MicroPython onto every attached board at once (library: mpfleet.usb.flash).

Thin: check the arguments, resolve --port/--all by the rule every many-board command
shares (cli/usb.py chosen_ports, mpfleet.usb.ports.resolve_ports), load the firmware
file once, flash all ports in parallel with one progress bar per board (on a terminal
only), then the per-board table every many-board command prints (cli/render.py, report_boards).
A failed board ends the command in BoardsFailed: exit status 1.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from mpfleet.cli.render import Column, report_boards
from mpfleet.cli.options import JSON
from mpfleet.cli.usb import ALL, BOARDS_HELP, PORTS, chosen_ports
from mpfleet.usb.flash import AFTER_MODES, BEFORE_MODES, DEFAULT_BAUD, FirmwarePlan

# No emoji codes: a MAC such as 24:0a:c4:cd:0f:a2 holds ":cd:", which rich would draw as a disc.
console = Console(emoji=False)

COLUMNS = [Column("chip", lambda r: r.chip or "?"), Column("MAC", lambda r: r.mac or "?"),
           Column("bytes", lambda r: r.bytes_written, right=True),
           Column("secs", lambda r: f"{r.seconds:.1f}", right=True)]


@click.command("flash", epilog=BOARDS_HELP)
@click.option("--board", "board_name", required=True, metavar="NAME",
              help="Board definition: a name from `mpfleet boards list` or a path to a .json file.")
@click.option("--firmware", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Merged firmware.bin (written at the board's firmware_offset) or an app image "
                   "(written at its first app partition).")
@PORTS
@ALL
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

    targets = chosen_ports(ports, all_ports, "flash")
    board = load_board(board_name)
    plan = load_firmware(firmware, board)
    if not as_json:
        console.print(f"{Path(plan.path).name}: {plan.kind} image for {plan.chip}, version {plan.version}, "
                      f"{plan.size} bytes -> {len(targets)} board(s) of type {board.name}",
                      highlight=False, markup=False, soft_wrap=True)
    with _ProgressBars(targets, plan, enabled=not as_json) as bars:
        results = flash_boards(targets, board, plan, baud=baud, no_stub=no_stub, before=before, after=after,
                               compress=compress, on_progress=bars.update)
    report_boards(console, results, title="flash", columns=COLUMNS, done="flashed and verified", as_json=as_json)


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

