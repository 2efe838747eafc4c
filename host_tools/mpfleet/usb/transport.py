"""USB field work on many attached boards: deploy the agent, run signed jobs, collect samples.

Which room: host library; the CLI is cli_usb.py (`mpfleet ports`, `deploy`, `usb run`,
`usb collect`), flashing is usbflash.py. docs/usb.md explains the commands.

Each board is reached through its REPL with mpremote's serial transport (or ampy's,
`transport="ampy"`, for boards where raw-paste mode misbehaves). Work on several
boards runs one thread per port (`each_port`); the database is touched only by the
calling thread, between those parallel phases, so SQLite objects never cross threads.

What the board runs is the agent's own code (firmware/lib/agent/usb.py): the same
signature checks and handlers for jobs, the same frames and end-to-end ack for samples
as over MQTT; only the transport differs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
    import time  # noqa: PLC0415

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
        from mpremote.transport import TransportError  # noqa: PLC0415
        from mpremote.transport_serial import SerialTransport  # noqa: PLC0415

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

    def close(self) -> None:
        try:
            self._t.exit_raw_repl()
        except Exception:  # noqa: BLE001 - the port may be gone; closing is all that is left
            pass
        self._t.close()


class AmpyLink(BoardLink):
    """adafruit-ampy's pyboard module: plain raw REPL, no raw-paste mode."""

    def __init__(self, port: str, baud: int = 115200, wait_s: float = CATCH_S):
        from ampy.pyboard import Pyboard, PyboardError  # noqa: PLC0415

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
        self.exec(f"f = open({path!r}, 'wb')")
        for i in range(0, len(data), WRITE_CHUNK):
            self.exec(f"f.write({data[i:i + WRITE_CHUNK]!r})")
        self.exec("f.close()")

    def close(self) -> None:
        try:
            self._pyb.exit_raw_repl()
        except Exception:  # noqa: BLE001
            pass
        self._pyb.close()


TRANSPORTS = {"mpremote": MpremoteLink, "ampy": AmpyLink}


def open_link(port: str, transport: str = "mpremote", wait_s: float = CATCH_S) -> BoardLink:
    if transport not in TRANSPORTS:
        raise UsbError(f"unknown transport {transport!r} (mpremote or ampy)")
    return TRANSPORTS[transport](port, wait_s=wait_s)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text.strip()


# ---------------------------------------------------------------- many ports at once
@dataclass
class PortResult:
    port: str
    ok: bool = False
    device: str | None = None
    error: str | None = None
    detail: dict = field(default_factory=dict)


def each_port(ports: Iterable[str], work: Callable[[str], PortResult]) -> list[PortResult]:
    """work(port) on every port at once, one thread each; a failure is that port's result."""
    ports = list(ports)

    def guarded(port: str) -> PortResult:
        try:
            return work(port)
        except MpfleetError as e:
            return PortResult(port, error=str(e))
        except Exception as e:  # noqa: BLE001 - one board must never stop the others
            return PortResult(port, error=f"{type(e).__name__}: {e}")

    if not ports:
        return []
    with ThreadPoolExecutor(max_workers=len(ports), thread_name_prefix="usb") as pool:
        return list(pool.map(guarded, ports))


# ---------------------------------------------------------------- what a board says about itself
IDENTIFY = """
import sys, json, machine
try:
    with open('/config.json') as f:
        _id = json.load(f).get('device_id')
except (OSError, ValueError):
    _id = None
_v = sys.implementation.version
print(json.dumps({'mpy': getattr(sys.implementation, '_mpy', 0), 'release': '%d.%d.%d' % _v[:3],
                  'machine': getattr(sys.implementation, '_machine', sys.platform),
                  'mac': ''.join('%02x' % b for b in machine.unique_id()), 'device_id': _id}))
"""


def identify(link: BoardLink) -> dict:
    """mpy version, MicroPython release, board, MAC and the provisioned device id (or None)."""
    return _json_line(link, link.exec(IDENTIFY), "identify")


def _json_line(link: BoardLink, out: str, what: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise UsbError(f"{link.port}: {what}: unexpected answer {out.strip()[-200:]!r}")


# ---------------------------------------------------------------- deploy
HASHES = """
import json, hashlib, binascii
def _h(p):
    try:
        f = open(p, 'rb')
    except OSError:
        return None
    h = hashlib.sha256()
    b = bytearray(512)
    while True:
        n = f.readinto(b)
        if not n:
            break
        h.update(memoryview(b)[:n])
    f.close()
    return binascii.hexlify(h.digest()).decode()
print(json.dumps({p: _h(p) for p in %r}))
"""


def device_hashes(link: BoardLink, paths: list[str]) -> dict[str, str | None]:
    return _json_line(link, link.exec(HASHES % (paths,)), "hashes")


def make_dirs(link: BoardLink, paths: Iterable[str]) -> None:
    dirs = sorted({p.rsplit("/", 1)[0] for p in paths if p.count("/") > 1})
    if dirs:
        link.exec("import os\nfor d in %r:\n    p = ''\n    for part in d.split('/')[1:]:\n        p += '/' + part\n"
                  "        try:\n            os.mkdir(p)\n        except OSError:\n            pass\n" % (dirs,))


def sync_files(link: BoardLink, files: dict[str, bytes]) -> tuple[list[str], list[str]]:
    """Write the files whose SHA-256 on the board differs; returns (written, skipped)."""
    have = device_hashes(link, sorted(files))
    todo = [p for p in sorted(files) if have.get(p) != hashlib.sha256(files[p]).hexdigest()]
    make_dirs(link, todo)
    for path in todo:
        link.write_file(path, files[path])
    return todo, [p for p in sorted(files) if p not in todo]


SELF_CHECK = """
import json, machine
from agent import config, wake
_mac = ''.join('%02x' % b for b in machine.unique_id())
_cfg, _problems = config.load(_mac)
print(json.dumps({'device_id': _cfg['device_id'], 'problems': _problems, 'app': wake.AGENT_VERSION,
                  'keys': sorted(_cfg['trusted_keys']), 'broker': _cfg['broker']['host']}))
"""


def self_check(link: BoardLink) -> dict:
    """The agent imports, and loads the config it was given without problems."""
    return _json_line(link, link.exec(SELF_CHECK), "self-check")


# ---------------------------------------------------------------- jobs and samples
def run_envelopes(link: BoardLink, envelopes: list[str]) -> list[dict]:
    """Run signed envelopes on the board (agent.usb.run_jobs); returns the statuses it reported."""
    out = link.exec("from agent import usb\nusb.run_jobs(%r)\n" % json.dumps(envelopes), timeout=EXEC_TIMEOUT_S * 5)
    return [json.loads(line[len("MPF-STATUS "):]) for line in out.splitlines() if line.startswith("MPF-STATUS ")]


def read_backlog(link: BoardLink, host_ack: int) -> tuple[list[bytes], int]:
    """The board's unacked samples as frames (it first trims what the host already holds)."""
    out = link.exec("from agent import usb\nusb.collect(%d)\n" % host_ack, timeout=EXEC_TIMEOUT_S * 5)
    frames = [base64.b64decode(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("MPF-FRAME ")]
    sent = [int(line.split()[1]) for line in out.splitlines() if line.startswith("MPF-SENT ")]
    if not sent:
        raise UsbError(f"{link.port}: collect: no end marker in the board's answer {out.strip()[-200:]!r}")
    return frames, sent[0]


def send_ack(link: BoardLink, upto: int) -> None:
    out = link.exec("from agent import usb\nusb.ack(%d)\n" % upto)
    if f"MPF-ACKED {upto}" not in out:
        raise UsbError(f"{link.port}: the board did not confirm the ack: {out.strip()[-200:]!r}")


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
            except Exception:  # noqa: BLE001
                pass
        self.links.clear()

    def __enter__(self) -> "LinkPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
