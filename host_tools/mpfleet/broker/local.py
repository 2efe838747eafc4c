"""Starting a local MQTT broker: mosquitto when installed (the fallback broker,
amqtt, comes with the `broker` extra).

Used by the test suite (a fresh broker per test module on a free loopback
port, with its own configuration) and by `make demo`. Nothing is left running:
`LocalBroker` is a context manager and stops its process on exit.

This module owns the mosquitto lines every mpfleet broker shares, the embedded
one here and the one `mpfleet broker config` writes (brokerconf.py):
`TUNING_LINES` (queue limits, no Nagle) and `persistence_lines()` (sessions and
retained messages saved to disk, on a timer, so a restart keeps them and a
kill -9 loses only the last seconds: docs/security.md, "The broker").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpfleet.errors import MpfleetError

_MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")

# mosquitto's default max_queued_messages (1000 per client) drops QoS 1 messages for
# a dispatcher that falls briefly behind, or is down, while a fleet reports.
TUNING_LINES = (
    "max_queued_messages 100000",
    "max_inflight_messages 1000",
    "max_queued_bytes 0",
    # OTA chunks are many back-to-back 4 KiB messages: with Nagle on, each
    # chunk's tail waits for the device's delayed ACK (~40 ms a chunk).
    "set_tcp_nodelay true",
)
# Seconds between saves of the embedded broker's database. mosquitto saves when more
# than this many whole seconds have passed (src/loop.c), so about every 2 s; its
# database is small, and each save is one write + fsync + rename.
EMBEDDED_AUTOSAVE_S = 1


def persistence_lines(location: str | os.PathLike, autosave_s: int) -> list[str]:
    """Sessions, their queued QoS 1 messages and retained messages kept in
    `location`/mosquitto.db: saved on a clean stop and every `autosave_s` seconds,
    by the clock rather than by a count of changes, which could leave one lone
    change (a status queued for an offline serve) unsaved for good."""
    if autosave_s < 1:
        raise ValueError("autosave_s must be at least 1 (0 saves only on a clean stop)")
    return ["persistence true", f"persistence_location {Path(location).resolve()}/",
            f"autosave_interval {autosave_s}", "autosave_on_changes false"]


class BrokerError(MpfleetError):
    """No broker could be found or started."""


def find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_PATHS:
        if Path(candidate).exists():
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"broker did not accept connections on {host}:{port} within {timeout_s:.0f} s")


class _BrokerProcess:
    """A broker process on 127.0.0.1:`port` run from its own work directory; the
    subclass writes its configuration and starts it (`_launch`)."""

    kind = "?"
    log_name = "broker.log"

    def __init__(self, port: int | None, workdir: str | Path | None, prefix: str):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _launch(self, argv: list[str], timeout_s: float = 10.0) -> None:
        self._log = open(self.workdir / self.log_name, "ab")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=self._log)
        try:
            wait_for_port(self.host, self.port, timeout_s=timeout_s)
        except BrokerError:
            self.stop()
            log = (self.workdir / self.log_name).read_text(errors="replace")[-2000:]
            raise BrokerError(f"{self.kind} did not start on port {self.port}:\n{log}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer ends it: nothing is saved on the way down."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stop()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class LocalBroker(_BrokerProcess):
    """A mosquitto process on 127.0.0.1:`port` with a generated configuration.

    `extra_config` lines are appended; the only listener declared before them is
    this one, so listener options among them (brokerconf.conf_lines()'s
    use_username_as_clientid) apply to it. Without password_file/allow_anonymous
    the listener allows anonymous clients. Queue limits are raised
    (`TUNING_LINES`). With
    `persistence` the broker's database lives in `workdir`, saved every
    `autosave_s` seconds: `restart()` (or `kill()` then `start()`) with the same
    workdir finds sessions and retained messages again. Tests that only need a
    broker leave it off (no disk writes); the embedded broker turns it on.
    """

    kind = "mosquitto"
    log_name = "mosquitto.log"

    def __init__(self, port: int | None = None, extra_config: list[str] | None = None,
                 workdir: str | Path | None = None, persistence: bool = False,
                 autosave_s: int = EMBEDDED_AUTOSAVE_S):
        super().__init__(port, workdir, "mpfleet-broker-")
        self.extra_config = list(extra_config or [])
        self.persistence = persistence
        self.autosave_s = autosave_s

    def config_text(self) -> str:
        lines = [f"listener {self.port} {self.host}", *TUNING_LINES]
        lines += persistence_lines(self.workdir, self.autosave_s) if self.persistence else ["persistence false"]
        lines += [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0 and not any(line.startswith("user ") for line in self.extra_config):
            # Run as root, mosquitto drops to the "mosquitto" user before it
            # reads password/ACL files, which a root-owned 0600 file forbids.
            lines.append("user root")
        if not any(line.startswith(("password_file", "allow_anonymous")) for line in self.extra_config):
            lines.append("allow_anonymous true")
        return "\n".join(lines + self.extra_config) + "\n"

    def start(self) -> "LocalBroker":
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto; "
                              "macOS: brew install mosquitto)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(self.config_text())
        self._launch([binary, "-c", str(conf)])
        return self

    def restart(self) -> None:
        self.stop()
        self.start()


class AmqttBroker(_BrokerProcess):
    """The pure-Python fallback: an amqtt process on 127.0.0.1:`port` (the `broker`
    extra). Anonymous clients only: amqtt has no mosquitto-style password file and
    ACL, so client ids are bound to nothing (any client can take over or wipe any
    session), and sessions and retained messages live in memory only (a restart
    loses them). It is for trying mpfleet out, not for a fleet (docs/dispatch.md,
    docs/security.md)."""

    kind = "amqtt"
    log_name = "amqtt.log"

    def __init__(self, port: int | None = None, workdir: str | Path | None = None):
        super().__init__(port, workdir, "mpfleet-amqtt-")

    def start(self) -> "AmqttBroker":
        script = Path(sys.executable).with_name("amqtt")
        if not script.exists():
            found = shutil.which("amqtt")
            if found is None:
                raise BrokerError("neither mosquitto nor amqtt is installed: apt-get install mosquitto, "
                                  "or pip install 'mpfleet[broker]'")
            script = Path(found)
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "amqtt.yaml"
        conf.write_text("listeners:\n  default:\n    type: tcp\n"
                        f"    bind: {self.host}:{self.port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                        "    allow_anonymous: true\n")
        self._launch([str(script), "-c", str(conf)], timeout_s=20)
        return self


def embedded_broker(extra_config: list[str] | None = None, workdir: str | Path | None = None,
                    prefer: str = "mosquitto"):
    """A broker for the demo: mosquitto when installed (with `extra_config`, e.g.
    brokerconf.conf_lines(): accounts, ACL, client ids bound to them), persistent in
    `workdir`, else amqtt. Not started; use it as a context manager."""
    if prefer == "mosquitto" and find_mosquitto() is not None:
        return LocalBroker(extra_config=extra_config, workdir=workdir, persistence=True)
    return AmqttBroker(workdir=workdir)
