"""The virtual board's serial console: its REPL on a pseudo-terminal.

`SerialConsole(vb)` makes a virtual board reachable the way a USB board is:
`console.port` is a tty that mpremote, ampy or pyserial open like
/dev/ttyUSB0. Behind it a relay thread runs the board's boots back to back
(each one a run of the MicroPython unix port in interactive mode) and moves
bytes between the client and the device::

    client (mpremote)            relay thread                 device process
    pty B slave  <-> pty B master <-> [cook, gate] <-> pty A master <-> pty A slave
    console.port                                                  stdin/stdout/stderr

What a client sees is what an ESP32 would send, where tools check it:

- Output is "cooked" as the ESP32 port's stdout is: print() there sends
  "\\r\\n", the unix port sends "\\n" (its REPL messages already carry "\\r\\n").
  The relay turns a "\\n" not preceded by "\\r" into "\\r\\n"; the device tty has
  no OPOST, so nothing is doubled.
- Ctrl-D on an empty REPL ends the unix port's process; a board soft-resets.
  The relay records the boot as ended by `soft_reset`, writes
  "MPY: soft reboot\\r\\n" and starts the interpreter again: after a raw-REPL
  Ctrl-D in mode "soft-raw" (boot.py only, as a board skips main.py), entering
  the raw REPL itself and hiding the unix port's own banner, so the client
  reads "OK\\r\\nMPY: soft reboot\\r\\n<boot.py output>raw REPL; CTRL-B to exit\\r\\n>"
  exactly as mpremote's `enter_raw_repl(soft_reset=True)` expects; after a
  friendly-REPL Ctrl-D in mode "soft" (boot.py and main.py run again).
  `machine.soft_reset()` goes the same way.
- Ctrl-C: on a board the UART driver turns ^C into KeyboardInterrupt while
  code runs and passes it on as a character otherwise (and always when
  `micropython.kbd_intr(-1)` is set). The unix port mirrors that with its
  SIGINT handler, installed only while code runs. The relay reads the
  process's caught-signal mask (/proc/<pid>/status) and either sends SIGINT
  or writes the byte; the device tty has ISIG off, so the kernel never sends
  a SIGINT by itself. That matters because the port resets SIGINT to SIG_DFL
  when code ends: a kernel-generated SIGINT in that window (mpremote's
  "\\r\\x03", pyboard's "\\x03\\x03") would kill the process.
  After an interrupt, input is held until the interrupted code has stopped
  (at most INTERRUPT_HOLD_S), so a second ^C reaches the REPL as a character
  and not as a second KeyboardInterrupt raised inside the exception handler.
- Deep sleep, reset, watchdog: the process ends with an exit record;
  `VirtualBoard.finish_boot` prepares the next boot; deep sleep waits
  sleep_ms / clock_scale real seconds (clock_scale 0: no wait). While the chip
  sleeps or resets, bytes from the client are lost, as a UART's are, except a
  Ctrl-C: it ends the sleep and interrupts the next boot once its code runs,
  so firmware that wakes many times a second (the agent on an unscaled clock)
  still leaves a console at its REPL (`SerialConsole._interrupt_board`). The
  REPL keys typed after it (mpremote's "\\r\\x01") reach that REPL; so does a ^C
  the ending boot was written but never read, with such keys after it and
  nothing else (code meant for the old boot's REPL is not replayed).
- Power cut (scheduled with `schedule_power_cut`): the board stays dark until
  `console.power_on()`. Other stops (no bootable image, ROM bootloader,
  deep sleep without a wake source, a crash of the interpreter) wait for
  `console.reset()` (the EN button) or a power cycle.

Closing the console kills the running boot and records it with the exit
reason "console_closed"; the board keeps its power, so the next boot (from a
new console or `VirtualBoard.run`) is a HARD_RESET with RTC memory kept, as
when a terminal's DTR/RTS toggling resets a devkit.

Linux only (pseudo-terminals with termios, /proc).
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from mpfleet.sim.board import (
    STOPPING_REASONS,
    BootRecord,
    SimError,
    VirtualBoard,
    WatchdogWatch,
    micropython_executable,
)
from mpfleet.sim.mpy import _simfacts as facts

RAW_REPL_BANNER = b"raw REPL; CTRL-B to exit\r\n"
SOFT_REBOOT_LINE = b"MPY: soft reboot\r\n"
# The unix port's own REPL banner ends with this line; it is hidden when the
# relay enters the raw REPL on the client's behalf after a soft reset.
_UNIX_BANNER_START = b"MicroPython "
_UNIX_BANNER_END = b'Type "help()" for more information.'

_CTRL_A = 0x01
_CTRL_B = 0x02
_CTRL_C = 0x03
_SIGINT_MASK = 1 << (signal.SIGINT - 1)
_REPL_KEYS = frozenset(b"\r\n\x01\x02\x03")  # what a tool types to reach a REPL: Enter, Ctrl-A/B/C

# The device tty's lflag outside the port's raw mode: ECHOK does nothing
# without ICANON and ECHO, but it makes "the port switched the tty to raw mode
# (lflag 0), so its REPL or input() is reading" visible from the master side.
_EXECUTING_LFLAG = termios.ECHOK

POLL_S = 0.01
WDT_POLL_S = 0.02  # the wdt file is read at most this often (the loop turns every POLL_S)
INTERRUPT_HOLD_S = 1.0
SENT_KEPT = 4096
# A process younger than this that has printed nothing may still be inside
# CPython's start-up, whose SIGINT handler is not MicroPython's.
STARTUP_GRACE_S = 0.5
CLIENT_BACKLOG_MAX = 64 * 1024
BOOT_OUTPUT_MAX = 1024 * 1024
SESSION_OUTPUT_MAX = 1024 * 1024
_READ_SIZE = 65536


# util-linux (or busybox) setsid: a new session with stdin as controlling tty;
# it execs in place, so the process id stays the interpreter's.
_SETSID = shutil.which("setsid")


def open_raw_pty(lflag: int = 0) -> tuple[int, int, str]:
    """A pseudo-terminal pair that passes bytes untouched: (master, slave, slave path)."""
    master, slave = os.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[0] = 0  # iflag: no ICRNL, IXON, ISTRIP...: "\r" and ^S/^Q are data
    attrs[1] = 0  # oflag: no OPOST, so no "\n" -> "\r\n" and no "\r\r\n"
    attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8 | termios.CREAD | termios.CLOCAL
    attrs[3] = lflag  # no ECHO, ICANON or ISIG
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class _NewlineCooker:
    """"\\n" -> "\\r\\n" unless the "\\n" already follows a "\\r" (across chunks)."""

    def __init__(self):
        self._last = 0

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        out = bytearray()
        start = 0
        while True:
            i = data.find(b"\n", start)
            if i < 0:
                out += data[start:]
                break
            prev = data[i - 1] if i > 0 else self._last
            out += data[start:i]
            out += b"\n" if prev == 0x0D else b"\r\n"
            start = i + 1
        self._last = data[-1]
        return bytes(out)


class _Device:
    """One boot: the interpreter on its own pseudo-terminal."""

    def __init__(self, vb: VirtualBoard, mode: str):
        self.vb = vb
        self.mode = mode
        self.boot = vb.prepare_boot(mode)
        self.master, self.slave, _ = open_raw_pty(_EXECUTING_LFLAG)
        # Its own session, so a Ctrl-C in the terminal running the console does
        # not reach the board; with the device tty as its controlling terminal
        # (setsid -c), so the kernel hangs it up if the supervisor dies and
        # closes the master: no board is left running without a console.
        command = vb.command(interactive=True)
        if _SETSID:
            command = [_SETSID, "-c", *command]
        try:
            self.proc = subprocess.Popen(
                command,
                stdin=self.slave,
                stdout=self.slave,
                stderr=self.slave,
                env=vb.environment(interactive=True),
                start_new_session=not _SETSID,
            )
        except OSError:
            self.close()
            raise
        self.started = time.monotonic()
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None
        self.cooker = _NewlineCooker()
        # The last bytes written to the device tty, so those still unread when
        # the boot ends can be told apart (unread()).
        self.sent = bytearray()
        self.output = bytearray()
        self.output_dropped = 0
        self.printed = False
        # Soft reset into the raw REPL: "await_repl" until the port's REPL
        # reads, then Ctrl-A is sent and "await_banner" until its answer.
        self.handshake = "await_repl" if mode == "soft-raw" else None
        self.handshake_output = bytearray()
        self.watchdog = WatchdogWatch(vb.path, self.started)
        self.wdt_checked_at = self.started

    # --- what the process is doing ---------------------------------------
    def reading_raw(self) -> bool:
        """The port has the tty in raw mode: its REPL (or input()) reads."""
        try:
            return termios.tcgetattr(self.master)[3] == 0
        except termios.error:
            return False

    def interrupt_armed(self) -> bool | None:
        """MicroPython's SIGINT handler is installed (code is running); None if unknown."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("SigCgt:"):
                        return bool(int(line.split()[1], 16) & _SIGINT_MASK)
        except OSError:
            return None
        return None

    def past_startup(self) -> bool:
        return self.printed or time.monotonic() - self.started > STARTUP_GRACE_S

    def read(self) -> bytes:
        try:
            return os.read(self.master, _READ_SIZE)
        except BlockingIOError:
            return b""
        except OSError as e:
            if e.errno == errno.EIO:
                return b""
            raise

    def write(self, data: bytes) -> int:
        try:
            n = os.write(self.master, data)
        except BlockingIOError:
            return 0
        self.sent += data[:n]
        if len(self.sent) > SENT_KEPT:
            del self.sent[:len(self.sent) - SENT_KEPT]
        return n

    def unread(self) -> bytes:
        """What was written to the device tty and the process never read."""
        try:
            buf = fcntl.ioctl(self.slave, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return b""
        n = min(struct.unpack("i", buf)[0], len(self.sent))
        return bytes(self.sent[len(self.sent) - n:]) if n > 0 else b""

    def keep_output(self, data: bytes) -> None:
        self.output += data
        excess = len(self.output) - BOOT_OUTPUT_MAX
        if excess > 0:
            del self.output[:excess]
            self.output_dropped += excess

    def output_text(self) -> str:
        text = self.output.decode("utf-8", errors="replace").replace("\r\n", "\n")
        if self.output_dropped:
            text = f"[... {self.output_dropped} bytes of console output not kept ...]\n" + text
        return text

    def watchdog_expired(self) -> bool:
        """The firmware armed machine.WDT and stopped feeding it (the rule VirtualBoard._watch
        applies too: WatchdogWatch)."""
        now = time.monotonic()
        if now - self.wdt_checked_at < WDT_POLL_S:
            return False
        self.wdt_checked_at = now
        return self.watchdog.expired(now)

    # --- ending ----------------------------------------------------------
    def kill(self) -> None:
        if self.proc.poll() is None:
            # Not reaped yet, so the process group is still ours: kill all of
            # it, the shell _simhw.halt starts to kill the chip included.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # setsid has not made the group yet
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        fds = [self.master, self.slave]
        if getattr(self, "pidfd", None) is not None:
            fds.append(self.pidfd)
            self.pidfd = None
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class SerialConsole:
    """A virtual board's console on a pseudo-terminal (see the module docstring).

    `port` is the tty to open (e.g. /dev/pts/5); with `link`, a symlink to it
    is made at that path and removed on close. The board is powered on if it
    has no power. Use as a context manager, or call `close()`.
    """

    def __init__(self, vb: VirtualBoard, link: str | os.PathLike | None = None):
        self.vb = vb
        micropython_executable()  # fail here, not in the relay thread
        self.records: list[BootRecord] = []
        self.error: BaseException | None = None
        self._master, self._slave, self.port = open_raw_pty()
        self.link = Path(link) if link is not None else None
        try:
            if self.link is not None:
                self._make_link()
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            os.close(self._master)
            os.close(self._slave)
            raise
        os.set_blocking(self._wake_r, False)
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._closed = False
        self._dev: _Device | None = None
        self._sleep_until: float | None = None
        self._stopped_reason: str | None = None
        self._client_raw = False
        self._to_client = bytearray()
        self._to_device = bytearray()
        self._interrupt_next_boot = False
        self._hold_until: float | None = None
        self._carry = b""
        self._session = bytearray()
        self._session_base = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._relay, name=f"sim-console-{vb.device_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def __enter__(self) -> "SerialConsole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopped_reason(self) -> str | None:
        """Why the board is dark ("power_cut", "power_off", "no_bootable_image", ...);
        None while it runs or sleeps with a wake-up timer."""
        return self._stopped_reason

    @property
    def device_pid(self) -> int | None:
        """The running boot's process id (None between boots)."""
        dev = self._dev
        return dev.proc.pid if dev is not None else None

    def power_on(self) -> None:
        """Apply power to a board that has none (after a power cut or power_off)."""
        self._request("power_on")

    def power_off(self) -> None:
        """Remove power: the running boot stops; RTC memory is lost at the next power_on."""
        self._request("power_off")

    def reset(self) -> None:
        """Press EN: the chip restarts through the bootloader (HARD_RESET, RTC memory kept)."""
        self._request("reset")

    def output(self, start: int = 0) -> bytes:
        """What the client was sent since the console opened, from offset `start`
        (offsets count from the opening; only the last SESSION_OUTPUT_MAX bytes are kept)."""
        with self._cond:
            return bytes(self._session[max(0, start - self._session_base):])

    def wait_for_output(self, marker: bytes, timeout_s: float = 10.0, start: int = 0) -> int:
        """Wait until `marker` has been sent to the client (after offset `start`);
        returns the offset just past it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                i = self._session.find(marker, max(0, start - self._session_base))
                if i >= 0:
                    return self._session_base + i + len(marker)
                if self.error is not None or not self._thread.is_alive():
                    raise SimError(f"{self.vb.device_id}: console stopped: {self.error!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = bytes(self._session[-300:])
                    raise SimError(f"{self.vb.device_id}: {marker!r} not seen on the console "
                                   f"within {timeout_s} s; last output: {tail!r}")
                self._cond.wait(min(left, 0.1))

    def close(self) -> None:
        """Stop the relay, kill the running boot (recorded as "console_closed"), close the port."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake()
        self._thread.join(timeout=30)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.link is not None:
            try:
                if self.link.is_symlink() and os.readlink(self.link) == self.port:
                    self.link.unlink()
            except OSError:
                pass
        if self._thread.is_alive():
            raise SimError(f"{self.vb.device_id}: the console relay did not stop")
        if self.error is not None:
            raise SimError(f"{self.vb.device_id}: the console relay failed: {self.error}") from self.error

    # ------------------------------------------------------------------ internals
    def _make_link(self) -> None:
        if self.link.is_symlink():
            self.link.unlink()
        elif self.link.exists():
            raise SimError(f"{self.link}: exists and is not a symlink; choose another --link path")
        self.link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(self.port, self.link)

    def _request(self, what: str) -> None:
        if self._closed:
            raise SimError(f"{self.vb.device_id}: the console is closed")
        self._requests.put(what)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    # --- the relay thread ------------------------------------------------
    def _relay(self) -> None:
        try:
            if not self.vb.powered:
                self.vb.power_on()
            self._start_boot("run")
            while not self._stopping:
                self._step()
        except BaseException as e:  # noqa: BLE001 - reported by close() and wait_for_output()
            self.error = e
        finally:
            try:
                if self._dev is not None:
                    self._stop_boot("console_closed")
            except BaseException as e:  # noqa: BLE001 - kept unless the relay failed first
                self.error = self.error or e
            with self._cond:
                self._cond.notify_all()

    def _step(self) -> None:
        dev = self._dev
        readers = [self._master, self._wake_r]
        if dev is not None:
            readers.append(dev.master)
            if dev.pidfd is not None:
                readers.append(dev.pidfd)
        writers = [self._master] if self._to_client else []
        if dev is not None or self._sleep_until is not None or self._hold_until is not None:
            timeout = POLL_S
        else:
            timeout = None
        readable, writable, _ = select.select(readers, writers, [], timeout)

        if self._wake_r in readable:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._handle_requests()
            dev = self._dev
        if self._master in readable:
            try:
                data = os.read(self._master, _READ_SIZE)
            except (BlockingIOError, OSError):
                data = b""
            # Only a running chip reads its UART; bytes sent to a sleeping,
            # resetting or unpowered board are lost, except a Ctrl-C (below).
            if dev is not None and data:
                self._to_device += data
            elif data and self.vb.powered and self._stopped_reason is None:
                if self._interrupt_next_boot:
                    if all(b in _REPL_KEYS for b in data):
                        self._to_device += data  # typed after a ^C: the REPL it brings reads it
                elif _CTRL_C in data:
                    tail = data[data.find(_CTRL_C):]
                    self._to_device += tail if all(b in _REPL_KEYS for b in tail) else tail[:1]
                    self._interrupt_board()
        if dev is not None and dev.master in readable:
            self._device_output(dev, dev.read())
        if dev is not None:
            self._feed_device(dev)
            if dev.handshake == "await_repl" and dev.reading_raw():
                dev.write(bytes([_CTRL_A]))
                dev.handshake = "await_banner"
            if dev.proc.poll() is not None:
                self._boot_ended(dev)
            elif dev.watchdog_expired():
                self._stop_boot(facts.EXIT_WDT)
                self._start_boot("run")
        if self._sleep_until is not None and time.monotonic() >= self._sleep_until:
            self._sleep_until = None
            self._start_boot("run")
        if self._to_client:
            self._flush_to_client()

    def _handle_requests(self) -> None:
        while True:
            try:
                what = self._requests.get_nowait()
            except queue.Empty:
                return
            if what == "power_on":
                if not self.vb.powered:
                    self.vb.power_on()
                    self._start_boot("run")
            elif what == "power_off":
                if self._dev is not None:
                    self._stop_boot("power_off")
                self._sleep_until = None
                self._stopped_reason = "power_off"
                self.vb.power_off()
            elif what == "reset":
                if self.vb.powered:
                    if self._dev is not None:
                        self._stop_boot("reset_pin")
                    self._sleep_until = None
                    self.vb.press_reset()
                    self._start_boot("run")

    def _interrupt_board(self) -> None:
        """A console's Ctrl-C that found the chip asleep, resetting or still starting:
        it ends the sleep and interrupts the next boot's main.py as soon as it runs,
        so a board whose firmware sleeps and wakes many times a second (the agent
        on an unscaled clock) still gives a console its REPL. (A real ESP32's UART
        does not wake it; on hardware the wake is seconds long and a Ctrl-C lands.)"""
        self._interrupt_next_boot = True
        if self._sleep_until is not None:
            self._sleep_until = time.monotonic()

    # --- boots -----------------------------------------------------------
    def _start_boot(self, mode: str) -> None:
        self._stopped_reason = None
        # A ^C the last boot never took (still queued here, or unread in its
        # tty) interrupts this one, and what the client typed after it (such
        # as mpremote's Ctrl-A for the raw REPL) goes to the REPL it brings.
        at = self._to_device.find(_CTRL_C)
        if at >= 0:
            del self._to_device[:at]
        else:
            self._to_device.clear()
            if self._interrupt_next_boot:
                self._to_device.append(_CTRL_C)
        self._interrupt_next_boot = False
        self._hold_until = None
        if mode != "soft-raw":
            # After a reset or a friendly soft reset the board is in the friendly REPL.
            self._client_raw = False
        self._dev = _Device(self.vb, mode)
        if self._carry:
            self._dev.keep_output(self._carry)
            self._carry = b""

    def _stop_boot(self, reason: str) -> BootRecord:
        """End the running boot from outside (the process is killed)."""
        dev = self._dev
        dev.kill()
        self._last_output(dev)
        return self._finish(dev, reason)

    def _boot_ended(self, dev: _Device) -> None:
        """The process ended by itself: find out why and go on as the chip would."""
        self._last_output(dev)
        forced = None
        if not self._halted(dev) and dev.proc.returncode >= 0:
            # Ctrl-D on an empty REPL line (or SystemExit) ends the unix
            # port's process; an ESP32 soft-resets.
            forced = facts.EXIT_SOFT_RESET
        rec = self._finish(dev, forced)
        reason = rec.exit_reason
        if reason == facts.EXIT_SOFT_RESET:
            self._emit(SOFT_REBOOT_LINE)
            self._carry = SOFT_REBOOT_LINE
            self._start_boot("soft-raw" if self._client_raw else "soft")
        elif reason == facts.EXIT_DEEPSLEEP and rec.sleep_ms:
            scale = self.vb.settings.get("clock_scale", 0)
            self._sleep_until = time.monotonic() + (rec.sleep_ms / 1000 / scale if scale else 0)
        elif (reason == facts.EXIT_DEEPSLEEP or reason in STOPPING_REASONS
              or reason in (facts.EXIT_SIM_ERROR, facts.EXIT_EXEC_DONE)):
            # Dark until power_on() (power cut) or reset(): no wake source,
            # no bootable image, ROM download mode, a crashed interpreter.
            self._stopped_reason = reason
        else:
            self._start_boot("run")

    def _halted(self, dev: _Device) -> bool:
        """The firmware stopped the chip (halt() wrote a reason), as opposed to
        the interpreter ending (its exit record then holds only the slot note)."""
        try:
            return "reason" in self.vb.exit_record()
        except (OSError, ValueError):
            return False

    def _finish(self, dev: _Device, forced: str | None) -> BootRecord:
        self._dev = None
        unread = dev.unread()
        at = unread.find(_CTRL_C)
        if at >= 0:
            # Written as a character in the moment the port had no SIGINT
            # handler (code ending) and never read: the chip stopped first. The
            # ^C goes on to the next boot, and what followed it only if it is the
            # keys of entering a REPL (mpremote's "\r\x01"): code sent after it
            # was for the REPL of this boot, and replayed into another it would
            # put a tool and the board out of step.
            tail = unread[at:]
            self._to_device[:0] = tail if all(b in _REPL_KEYS for b in tail) else tail[:1]
        try:
            rec = self.vb.finish_boot(dev.boot, dev.proc.returncode, dev.output_text(),
                                      time.monotonic() - dev.started, forced_reason=forced)
        finally:
            dev.close()
        self.records.append(rec)
        return rec

    def _last_output(self, dev: _Device) -> None:
        """Pass on what the ended process still had in the tty."""
        while True:
            data = dev.read()
            if not data:
                break
            self._device_output(dev, data)
        if dev.handshake is not None:
            self._release_handshake(dev, b"")

    # --- device -> client ------------------------------------------------
    def _device_output(self, dev: _Device, data: bytes) -> None:
        if not data:
            return
        dev.printed = True
        data = dev.cooker.feed(data)
        if dev.handshake is None:
            self._emit(data, dev)
            return
        dev.handshake_output += data
        if dev.handshake == "await_banner" and RAW_REPL_BANNER in dev.handshake_output:
            self._release_handshake(dev, RAW_REPL_BANNER)

    def _release_handshake(self, dev: _Device, banner: bytes) -> None:
        """Pass on what boot.py printed, without the unix port's own banner."""
        held = bytes(dev.handshake_output)
        dev.handshake = None
        dev.handshake_output.clear()
        if not banner:
            self._emit(held, dev)
            return
        at = held.find(banner)
        head, tail = held[:at], held[at + len(banner):]
        cut = head.rfind(_UNIX_BANNER_START)
        if cut >= 0 and _UNIX_BANNER_END in head[cut:]:
            head = head[:cut]
        self._client_raw = True
        self._emit(head + banner + tail, dev)

    def _emit(self, data: bytes, dev: _Device | None = None) -> None:
        if not data:
            return
        if dev is not None:
            dev.keep_output(data)
        self._to_client += data
        excess = len(self._to_client) - CLIENT_BACKLOG_MAX
        if excess > 0:
            # Nobody is reading: a UART does not wait for its listener either.
            del self._to_client[:excess]
        with self._cond:
            self._session += data
            excess = len(self._session) - SESSION_OUTPUT_MAX
            if excess > 0:
                del self._session[:excess]
                self._session_base += excess
            self._cond.notify_all()

    def _flush_to_client(self) -> None:
        try:
            n = os.write(self._master, self._to_client)
        except BlockingIOError:
            return
        del self._to_client[:n]

    # --- client -> device ------------------------------------------------
    def _feed_device(self, dev: _Device) -> None:
        """Deliver the client's bytes, turning ^C into KeyboardInterrupt when
        code runs (see the module docstring)."""
        if self._hold_until is not None:
            if (time.monotonic() < self._hold_until and dev.interrupt_armed()
                    and not dev.reading_raw()):
                return
            self._hold_until = None
        while self._to_device:
            ctrl_c = self._to_device.find(bytes([_CTRL_C]))
            if dev.handshake is not None:
                # Until the raw REPL is back only an interrupt goes through
                # (a boot.py that never returns can be stopped, as on a board).
                if ctrl_c != 0:
                    return
            elif ctrl_c != 0:
                chunk = self._to_device if ctrl_c < 0 else self._to_device[:ctrl_c]
                n = dev.write(bytes(chunk))
                self._track_repl_mode(chunk[:n])
                del self._to_device[:n]
                if n < len(chunk) or ctrl_c < 0:
                    return
            # A ^C is next.
            armed = dev.interrupt_armed()
            if armed is None:
                armed = not dev.reading_raw()
            if armed:
                if not dev.past_startup():
                    return  # CPython's start-up handler, not MicroPython's: wait
                os.kill(dev.proc.pid, signal.SIGINT)
                del self._to_device[:1]
                self._hold_until = time.monotonic() + INTERRUPT_HOLD_S
                return
            if dev.handshake is not None:
                return
            if dev.write(bytes([_CTRL_C])) != 1:
                return
            del self._to_device[:1]

    def _track_repl_mode(self, sent: bytes) -> None:
        # Which REPL a Ctrl-D soft reset returns to (raw-paste's "\x05A\x01"
        # ends in Ctrl-A too and leaves the raw REPL on).
        a, b = sent.rfind(bytes([_CTRL_A])), sent.rfind(bytes([_CTRL_B]))
        if a > b:
            self._client_raw = True
        elif b > a:
            self._client_raw = False


def serve_console(path: str | os.PathLike, link: str | os.PathLike | None = None, out=None) -> None:
    """`mpfleet sim console DIR [--link PATH]`: serve the board's console until Ctrl-C."""
    out = out if out is not None else sys.stdout
    vb = VirtualBoard(path)
    with SerialConsole(vb, link=link) as console:
        where = console.port if link is None else f"{console.port} (also {link})"
        print(f"{vb.device_id}: console on {where}", file=out, flush=True)
        print(f"connect with: mpremote connect {link or console.port}   (Ctrl-C here stops the board)",
              file=out, flush=True)
        stop = threading.Event()
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGHUP):
            try:
                previous[signum] = signal.signal(signum, lambda *_: stop.set())
            except ValueError:  # not the main thread
                pass
        try:
            while console.alive and not stop.wait(0.2):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
