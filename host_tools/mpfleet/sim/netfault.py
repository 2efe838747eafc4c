"""A TCP link that breaks: a loopback proxy in front of the broker that cuts connections.

Which room: the virtual board's network faults (tests and benchmarks). A device's
config points at the proxy instead of the broker; each connection is forwarded both
ways until the bytes sent towards the device pass that connection's budget, then
both sides are closed, as a Wi-Fi drop or a NAT timeout would. Budgets come from
`cut_after(connection_number)`: an int, or None for a connection left alone.
"""

from __future__ import annotations

import socket
import threading
from typing import Callable


class LinkCutter:
    def __init__(self, target_host: str, target_port: int, cut_after: Callable[[int], int | None] | None = None):
        self.target = (target_host, target_port)
        self.cut_after = cut_after or (lambda n: None)
        self.lock = threading.Lock()
        self.connections = 0
        self.cuts = 0
        self.down_bytes = 0  # towards the device
        self.up_bytes = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept() wakes up to notice stop()
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, name="link-cutter", daemon=True)

    def start(self) -> "LinkCutter":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self.lock:
            socks = list(self._open)
        for s in socks:
            _close(s)
        self._thread.join(5)

    def __enter__(self) -> "LinkCutter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                device, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            device.settimeout(None)
            try:
                broker = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(device)
                continue
            broker.settimeout(None)
            with self.lock:
                self.connections += 1
                budget = self.cut_after(self.connections)
                self._open.update((device, broker))
            link = {"budget": budget, "down": 0}
            threading.Thread(target=self._pump, args=(device, broker, False, link), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, device, True, link), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, link: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if down and link["budget"] is not None:
                    room = link["budget"] - link["down"]
                    if len(data) >= room:
                        if room > 0:
                            dst.sendall(data[:room])
                        with self.lock:
                            self.cuts += 1
                            self.down_bytes += max(room, 0)
                        break
                    link["down"] += len(data)
                dst.sendall(data)
                with self.lock:
                    if down:
                        self.down_bytes += len(data)
                    else:
                        self.up_bytes += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
                with self.lock:
                    self._open.discard(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
