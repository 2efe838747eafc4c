"""Host-side MQTT: broker URLs and paho clients set up the same way everywhere
(topic names are mpfleet.protocol.topics).

Broker URL: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (TLS,
default port 8883; ``?ca=/path/ca.pem`` names a CA file, ``?cert=/path/c.crt&key=/path/c.key``
a client certificate, ``?insecure=1`` skips certificate checks for lab brokers).
On a broker from `mpfleet broker config` (mutual TLS), `with_client_identity` fills
in the fleet CA and the host account's certificate from the keys dir: the account
is the URL's user, else ``mpfleet-host``.

Client ids (`default_client_id`): two host processes with one client id on one broker
throw each other off, in turn, for as long as both run (MQTT 3.1.1 section 3.1.4: the
broker disconnects the existing client). So no process uses a fixed default: serve's is
stable per fleet and host (its persistent session must survive a restart, and one
database has one serve), every other one unique per process with a clean session (a
random id with a persistent session would leave a session queueing on the broker at
each run).

Connection outcomes are logged (`connect`): a lost connection with its reason code at
WARNING, each failed retry at WARNING, the reconnect at INFO; paho retries on its own,
every RECONNECT_MIN_S doubling to RECONNECT_MAX_S.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import paho.mqtt.client as mqtt

from mpfleet.errors import MpfleetError

log = logging.getLogger("mpfleet.mqtt")

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30


class BrokerUrlError(MpfleetError):
    """A --broker value that is not a usable MQTT URL."""


class MqttLinkError(MpfleetError):
    """The broker could not be reached or refused us."""


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    insecure: bool = False
    cert_file: str | None = None
    key_file: str | None = None

    def url(self, with_password: bool = False) -> str:
        auth = ""
        if self.user:
            auth = self.user + (f":{self.password}" if with_password and self.password else "") + "@"
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerConfig:
    parsed = urlparse(url if "://" in url else "mqtt://" + url)
    if parsed.scheme not in ("mqtt", "mqtts"):
        raise BrokerUrlError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise BrokerUrlError(f"broker URL {url!r}: no host")
    tls = parsed.scheme == "mqtts"
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerUrlError(f"broker URL {url!r}: bad port") from None
    query = parse_qs(parsed.query)
    return BrokerConfig(
        host=parsed.hostname,
        port=port,
        user=unquote(parsed.username) if parsed.username else None,
        password=unquote(parsed.password) if parsed.password else None,
        tls=tls,
        ca_file=query.get("ca", [None])[0],
        insecure=query.get("insecure", ["0"])[0] in ("1", "true", "yes"),
        cert_file=query.get("cert", [None])[0],
        key_file=query.get("key", query.get("cert", [None]))[0],
    )


DEFAULT_TLS_ACCOUNT = "mpfleet-host"


def with_client_identity(cfg: BrokerConfig, keys_dir: str | os.PathLike | None,
                         account: str | None = None) -> BrokerConfig:
    """`cfg` with the fleet CA (keys_dir/ca.crt) as its CA file and the host account's
    client certificate (keys_dir/clients/<account>.crt and .key; account: `account`,
    the URL's user, else DEFAULT_TLS_ACCOUNT) where the URL names none. Unchanged
    for a plaintext broker, or when the files do not exist."""
    if not cfg.tls or keys_dir is None:
        return cfg
    keys = Path(keys_dir)
    changes = {}
    if cfg.ca_file is None and (keys / "ca.crt").exists():
        changes["ca_file"] = str(keys / "ca.crt")
    if cfg.cert_file is None:
        name = account or cfg.user or DEFAULT_TLS_ACCOUNT
        crt, key = keys / "clients" / f"{name}.crt", keys / "clients" / f"{name}.key"
        if crt.exists() and key.exists():
            changes.update(cert_file=str(crt), key_file=str(key))
    return replace(cfg, **changes) if changes else cfg


def _host_part() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"


def default_client_id(kind: str, stable_for: str | None = None) -> str:
    """`mpfleet-<kind>-<host>-<8 hex of stable_for>`, the same at every run for the same
    `stable_for` (serve: its database and topic root), or, without it,
    `mpfleet-<kind>-<host>-<pid>-<6 random hex>`, unique per process."""
    if stable_for is not None:
        return f"mpfleet-{kind}-{_host_part()}-{hashlib.sha256(stable_for.encode()).hexdigest()[:8]}"
    return f"mpfleet-{kind}-{_host_part()}-{os.getpid()}-{secrets.token_hex(3)}"


def make_client(cfg: BrokerConfig, client_id: str, clean_session: bool = True) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
                         protocol=mqtt.MQTTv311)
    if cfg.user:
        client.username_pw_set(cfg.user, cfg.password)
    if cfg.tls:
        try:
            context = ssl.create_default_context(cafile=cfg.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise BrokerUrlError(f"CA file {cfg.ca_file}: {e}") from None
        if cfg.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            try:
                context.load_cert_chain(cfg.cert_file, cfg.key_file or cfg.cert_file)
            except (OSError, ssl.SSLError) as e:
                raise BrokerUrlError(f"client certificate {cfg.cert_file}: {e}") from None
        client.tls_set_context(context)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    client.on_socket_open = _no_delay
    return client


def _no_delay(client, userdata, sock) -> None:
    """Send each packet at once (no Nagle): OTA chunks go out back to back, and with
    Nagle on a chunk's tail waits for the broker's delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. websockets): nothing to tune


def connect(client: mqtt.Client, cfg: BrokerConfig, timeout_s: float = 10.0, keepalive_s: int = 30,
            on_connected=None, name: str = "mpfleet", stopping=lambda: False) -> None:
    """Connect and start the network loop; raise MqttLinkError with the cause on failure.

    `on_connected(client)` runs after every successful (re)connect: subscribe there.
    A client with a persistent session whose broker has no session for it is
    warned about: what was published to it while it was away is not waiting.
    After the first connect, every disconnect, failed retry and reconnect is logged
    (as `name`, with the client id); `stopping()` true means a disconnect was asked for.
    """
    done = threading.Event()
    result: dict = {}
    persistent = not getattr(client, "_clean_session", True)
    who = f"{name} (client id {client._client_id.decode(errors='replace')})"

    def on_connect(c, userdata, flags, reason_code, properties=None):
        first = not done.is_set()
        result["rc"] = reason_code
        if reason_code.is_failure:
            if not first:
                log.warning("%s: the broker at %s refused the reconnect: %s; retrying (every %d to %d s)",
                            who, cfg.url(), reason_code, RECONNECT_MIN_S, RECONNECT_MAX_S)
            done.set()
            return
        if not first:
            log.info("%s: reconnected to the broker at %s (session %s)", who, cfg.url(),
                     "resumed" if flags.session_present else "new")
        if persistent and not flags.session_present:
            log.warning("the broker at %s has no session for this client: messages sent to it while it was "
                        "away are not waiting (devices report finished jobs again at their next wake)", cfg.url())
        if on_connected is not None:
            on_connected(c)
        done.set()

    def on_disconnect(c, userdata, flags, reason_code, properties=None):
        if done.is_set() and not stopping():
            log.warning("%s: lost the connection to the broker at %s (reason: %s); reconnecting (every %d to %d s)",
                        who, cfg.url(), reason_code, RECONNECT_MIN_S, RECONNECT_MAX_S)

    def on_connect_fail(c, userdata):
        if done.is_set() and not stopping():
            log.warning("%s: reconnecting to the broker at %s failed (unreachable); retrying (every %d to %d s)",
                        who, cfg.url(), RECONNECT_MIN_S, RECONNECT_MAX_S)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_connect_fail = on_connect_fail
    try:
        client.connect(cfg.host, cfg.port, keepalive=keepalive_s)
    except OSError as e:
        raise MqttLinkError(f"cannot reach the broker at {cfg.url()}: {e}") from None
    client.loop_start()
    if not done.wait(timeout_s):
        client.loop_stop()
        raise MqttLinkError(f"the broker at {cfg.url()} did not answer within {timeout_s:.0f} s")
    rc = result["rc"]
    if rc.is_failure:
        client.loop_stop()
        raise MqttLinkError(f"the broker at {cfg.url()} refused the connection: {rc}")
