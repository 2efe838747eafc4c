"""The byte transport to one board's MicroPython REPL: run code, write a file, nothing more.

Which room: host library, usb/ (docs/usb.md). The lowest layer, as mpremote's
SerialTransport is: it knows the raw REPL and moves bytes; what the code it runs
means is usb/device.py's business, and which ports to talk to is usb/ports.py's.
Prints nothing; every failure is a UsbError (an MpfleetError) naming the port.

Two transports: mpremote's serial transport (raw-paste mode when the board offers it)
and adafruit-ampy's (`transport="ampy"`, plain raw REPL) for boards where raw-paste
mode misbehaves. `LinkPool` keeps one link per port open across the parallel phases of
one command (one thread per port, usb/ports.each_port).
"""

from __future__ import annotations

import threading

from mpfleet.errors import MpfleetError

EXEC_TIMEOUT_S = 60
WRITE_CHUNK = 1024
CATCH_S = 15.0  # how long to keep interrupting a board until its REPL answers


class UsbError(MpfleetError):
    """A board over USB did not do what was asked; the message says which and why."""


def catch_repl(serial, port: str, wait_s: float = CATCH_S) -> None:
    """Interrupt whatever the board runs until its friendly REPL prompt answers.

    The agent sleeps most of the time and a sleeping chip ignores its UART, so one
    Ctrl-C (what mpremote sends) is usually lost, and a board that keeps booting
    keeps printing, which stalls mpremote's input flush. Ctrl-C every 100 ms until
    ">>> " arrives catches the board at its next wake. The board is never reset:
    an EN reset would lose the samples staged in its RTC memory."""
    import time

    deadline = time.monotonic() + wait_s
    seen = b""
    while time.monotonic() < deadline:
        serial.write(b"\r\x03")
        time.sleep(0.1)
        waiting = serial.in_waiting
        if waiting:
            seen = (seen + serial.read(waiting))[-64:]
            if seen.endswith(b">>> "):
                return
    raise UsbError(f"{port}: no MicroPython REPL answered within {wait_s:.0f} s "
                   f"(a sleeping board answers when it next wakes: raise --wait)")


class BoardLink:
    """One board's REPL: run code, read and write files."""

    port: str

    def exec(self, code: str, timeout: float = EXEC_TIMEOUT_S) -> str:
        raise NotImplementedError

    def write_file(self, path: str, data: bytes) -> None:
        raise NotImplementedError

    def soft_reset(self) -> None:
        """Ctrl-D in the raw REPL: the board soft-reboots, runs boot.py (not main.py, as in
        raw mode) and is back in the raw REPL, with nothing of the old session imported."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _answer(self, out: bytes, err: bytes) -> str:
        """What the board printed, or UsbError with the last line of its traceback."""
        if err:
            raise UsbError(f"{self.port}: {_last_line(err.decode(errors='replace'))}")
        return out.decode(errors="replace")

    def __enter__(self) -> "BoardLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MpremoteLink(BoardLink):
    """mpremote's SerialTransport (raw REPL, raw-paste mode when the board offers it)."""

    def __init__(self, port: str, baud: int = 115200, wait_s: float = CATCH_S):
        from mpremote.transport import TransportError
        from mpremote.transport_serial import SerialTransport

        self.port = port
        self._error = TransportError
        try:
            self._t = SerialTransport(port, baudrate=baud)
        except TransportError as e:
            raise UsbError(f"{port}: cannot open: {e}") from None
        try:
            catch_repl(self._t.serial, port, wait_s)
            self._t.enter_raw_repl(soft_reset=False)
        except (TransportError, OSError) as e:
            self._t.close()
            raise UsbError(f"{port}: no MicroPython REPL answered: {e}") from None
        except UsbError:
            self._t.close()
            raise

    def exec(self, code: str, timeout: float = EXEC_TIMEOUT_S) -> str:
        try:
            out, err = self._t.exec_raw(code, timeout=timeout)
        except (self._error, OSError) as e:
            raise UsbError(f"{self.port}: the board stopped answering: {e}") from None
        return self._answer(out, err)

    def write_file(self, path: str, data: bytes) -> None:
        try:
            self._t.fs_writefile(path, data, chunk_size=WRITE_CHUNK)
        except (self._error, OSError) as e:
            raise UsbError(f"{self.port}: writing {path} failed: {e}") from None

    def soft_reset(self) -> None:
        try:
            self._t.enter_raw_repl(soft_reset=True)
        except (self._error, OSError) as e:
            raise UsbError(f"{self.port}: no raw REPL after a soft reset: {e}") from None

    def close(self) -> None:
        try:
            self._t.exit_raw_repl()
        except Exception:  # noqa: BLE001 - the port may be gone; closing is all that is left
            pass
        self._t.close()


class AmpyLink(BoardLink):
    """adafruit-ampy's pyboard module: plain raw REPL, no raw-paste mode."""

    def __init__(self, port: str, baud: int = 115200, wait_s: float = CATCH_S):
        from ampy.pyboard import Pyboard, PyboardError

        self.port = port
        self._error = PyboardError
        try:
            self._pyb = Pyboard(port, baudrate=baud)
        except (PyboardError, OSError) as e:
            raise UsbError(f"{port}: cannot open: {e}") from None
        try:
            catch_repl(self._pyb.serial, port, wait_s)
            self._pyb.enter_raw_repl()
        except (PyboardError, OSError) as e:
            self._pyb.close()
            raise UsbError(f"{port}: no MicroPython REPL answered: {e}") from None
        except UsbError:
            self._pyb.close()
            raise

    def exec(self, code: str, timeout: float = EXEC_TIMEOUT_S) -> str:
        try:
            self._pyb.exec_raw_no_follow(code)
            out, err = self._pyb.follow(timeout)
        except (self._error, OSError) as e:
            raise UsbError(f"{self.port}: the board stopped answering: {e}") from None
        return self._answer(out, err)

    def write_file(self, path: str, data: bytes) -> None:
        # ampy has no file API of its own: the path and each chunk go in as repr()
        # literals (a str and a bytes literal), never as raw text.
        self.exec(f"f = open({path!r}, 'wb')")
        for i in range(0, len(data), WRITE_CHUNK):
            self.exec(f"f.write({data[i:i + WRITE_CHUNK]!r})")
        self.exec("f.close()")

    def soft_reset(self) -> None:
        try:
            self._pyb.enter_raw_repl()  # ampy's always ends in a soft reset
        except (self._error, OSError) as e:
            raise UsbError(f"{self.port}: no raw REPL after a soft reset: {e}") from None

    def close(self) -> None:
        try:
            self._pyb.exit_raw_repl()
        except Exception:  # noqa: BLE001 - the port may be gone; closing is all that is left
            pass
        self._pyb.close()


TRANSPORTS = {"mpremote": MpremoteLink, "ampy": AmpyLink}


def open_link(port: str, transport: str = "mpremote", wait_s: float = CATCH_S) -> BoardLink:
    """The board on `port` in its raw REPL (caught within `wait_s`), through `transport`."""
    if transport not in TRANSPORTS:
        raise UsbError(f"unknown transport {transport!r} (mpremote or ampy)")
    return TRANSPORTS[transport](port, wait_s=wait_s)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text.strip()


class LinkPool:
    """Links kept open across the parallel phases of one command (one per port)."""

    def __init__(self, transport: str = "mpremote", wait_s: float = CATCH_S):
        self.transport = transport
        self.wait_s = wait_s
        self.links: dict[str, BoardLink] = {}
        self._lock = threading.Lock()

    def get(self, port: str) -> BoardLink:
        with self._lock:
            link = self.links.get(port)
        if link is None:
            link = open_link(port, self.transport, self.wait_s)
            with self._lock:
                self.links[port] = link
        return link

    def close(self) -> None:
        for link in self.links.values():
            try:
                link.close()
            except Exception:  # noqa: BLE001 - one link that fails to close must not keep the others open
                pass
        self.links.clear()

    def __enter__(self) -> "LinkPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
