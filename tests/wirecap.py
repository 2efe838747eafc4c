"""A loopback TCP relay that records every byte each way: what a device and its broker
sent each other, for tests and benchmarks that look at the wire (plaintext in a
capture, TLS record types, bytes per sample)."""

from __future__ import annotations

import select
import socket
import threading


class Relay:
    """A TCP relay on loopback to `target_port` that records each connection's
    bytes: sessions[i] = [device->broker bytearray, broker->device bytearray]."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sessions: list[list[bytearray]] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = [bytearray(), bytearray()]
            with self._lock:
                self.sessions.append(record)
            threading.Thread(target=self._pump, args=(conn, record), daemon=True).start()

    def _pump(self, conn: socket.socket, record: list[bytearray]) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
        except OSError:
            conn.close()
            return
        pairs = {conn: (upstream, record[0]), upstream: (conn, record[1])}
        try:
            while not self._stop:
                ready, _, _ = select.select(list(pairs), [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    other, buf = pairs[s]
                    with self._lock:
                        buf.extend(data)
                    other.sendall(data)
        except OSError:
            return
        finally:
            conn.close()
            upstream.close()

    def up(self) -> bytes:
        with self._lock:
            return b"".join(bytes(s[0]) for s in self.sessions)

    def down(self) -> bytes:
        with self._lock:
            return b"".join(bytes(s[1]) for s in self.sessions)

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def tls_record_types(stream: bytes) -> list[int]:
    """The content types of the TLS records in one direction of a session
    (0x14 change cipher spec, 0x15 alert, 0x16 handshake, 0x17 application data)."""
    types, i = [], 0
    while i + 5 <= len(stream):
        types.append(stream[i])
        i += 5 + int.from_bytes(stream[i + 3:i + 5], "big")
    return types
