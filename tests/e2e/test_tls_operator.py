"""The operator's path over mutual TLS, command by command: `ca init`, a TLS fleet
provisioned by `sim fleet`, `broker config`'s listener on a real mosquitto, `mpfleet
serve` (its own process, presenting the host certificate it finds), then
`devices cert renew` carried to the device by serve as a signed `cert` job, and
`devices cert revoke --reload` refusing one device while the other carries on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from mpfleet.broker.local import LocalBroker, find_mosquitto, free_port
from mpfleet.db.store import Store
from mpfleet.fleet.certs import FleetCA
from mpfleet.fleet.provision import tls_files
from mpfleet.sim.board import VirtualBoard

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed (make test installs it)")


class Operator:
    """One laptop: a database, a keys dir, and `mpfleet` with them."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "MPFLEET_DB": str(root / "mpfleet.db"), "MPFLEET_KEYS": str(root / "keys"),
                    "COLUMNS": "200"}

    def __call__(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                              timeout=120, env=self.env)
        if check:
            assert proc.returncode == 0, f"mpfleet {args}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        return proc

    def serve(self, url: str, log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "mpfleet", "serve", "--broker", url, "--tick", "0.1"],
                                stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while b"serving" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and b"serving" in log.read_bytes(), log.read_text()
        return proc


def run_until(boards: list[VirtualBoard], done, what: str, boots: int = 40) -> None:
    for _ in range(boots):
        for b in boards:
            b.boot()
        if done():
            return
    raise AssertionError(f"not {what} after {boots} boots of each board")


def _first_der(board: VirtualBoard) -> x509.Certificate:
    """The certificate at the start of the board's /tls/id.der (its key follows)."""
    data = board.fs_get("/tls/id.der")
    length = int.from_bytes(data[2:4], "big") + 4 if data[1] == 0x82 else data[1] + 2
    return x509.load_der_x509_certificate(data[:length])


def test_renewal_and_revocation_through_the_cli_and_serve(tmp_path):
    op = Operator(tmp_path)
    port = free_port()
    url = f"mqtts://127.0.0.1:{port}"
    op("keys", "init")
    op("ca", "init")
    op("sim", "fleet", "--devices", "2", "--prefix", "op", "--root", tmp_path / "fleet", "--broker", url,
       "--awake", "--provision-only")
    conf = json.loads(op("broker", "config", "--out", tmp_path / "broker", "--listen", f"127.0.0.1:{port}",
                         "--json").stdout)
    assert conf["tls"] and conf["devices"] == ["op-0001", "op-0002"] and conf["passwd"] is None
    boards = [VirtualBoard(tmp_path / "fleet" / d) for d in conf["devices"]]
    first_serial = {b.device_id: _first_der(b).serial_number for b in boards}
    with LocalBroker(port=port, extra_config=conf["conf_lines"], workdir=tmp_path / "run") as broker:
        serve = op.serve(url, tmp_path / "serve.log")
        try:
            def reported():
                with Store(tmp_path / "mpfleet.db") as store:
                    return all((store.device(b.device_id) or {}).get("state") for b in boards)

            run_until(boards, reported, "reporting over TLS")
            renewed = json.loads(op("devices", "cert", "renew", "op-0001", "--json").stdout)

            def finished():
                status = json.loads(op("job", "status", renewed["job"], "--json", check=False).stdout)
                return status["status"] == "COMPLETED"

            run_until(boards, finished, "renewed")
            assert _first_der(boards[0]).serial_number == int(renewed["serial"], 16) != first_serial["op-0001"]
            assert _first_der(boards[1]).serial_number == first_serial["op-0002"]
            # the device now connects with the new certificate: revoking the old one changes nothing for it
            with Store(tmp_path / "mpfleet.db") as store:
                assert len(store.certificates("op-0001")) == 2
            revoked = json.loads(op("devices", "cert", "revoke", "op-0002", "--reload", broker.process.pid,
                                    "--json").stdout)
            assert revoked["revoked"] == [f"{first_serial['op-0002']:x}"]
            time.sleep(1.0)  # the broker re-reads the CRL on SIGHUP
            with Store(tmp_path / "mpfleet.db") as store:
                seen = {b.device_id: store.device(b.device_id)["last_seen"] for b in boards}
            time.sleep(0.1)
            outputs = {b.device_id: [b.boot().output for _ in range(3)] for b in boards}
            with Store(tmp_path / "mpfleet.db") as store:
                after = {b.device_id: store.device(b.device_id)["last_seen"] for b in boards}
            assert after["op-0001"] > seen["op-0001"], outputs["op-0001"]
            assert after["op-0002"] == seen["op-0002"], outputs["op-0002"]
            assert any("refused this device's certificate" in o or "upload failed" in o
                       for o in outputs["op-0002"]), outputs["op-0002"]
            # A field engineer gives op-0002 a new certificate: at its next connection it
            # tells the host why it could not connect before, and the host keeps that
            # after the device stops reporting it.
            with Store(tmp_path / "mpfleet.db") as store:
                boards[1].fs_put(tls_files(FleetCA(tmp_path / "keys", store), "op-0002"))

            def failure_shown():
                shown = json.loads(op("devices", "show", "op-0002", "--json").stdout)
                return ((shown["state"] or {}).get("last_failure") or {}).get("error")

            run_until([boards[1]], failure_shown, "reporting its failure", boots=5)
            assert "refused this device's certificate" in failure_shown(), failure_shown()
            assert boards[1].fs_get("/failure.json") is None

            def reported_at():
                with Store(tmp_path / "mpfleet.db") as store:
                    return store.device("op-0002")["reported_at"]

            before = reported_at()
            run_until([boards[1]], lambda: reported_at() > before, "reporting again", boots=3)
            assert "refused this device's certificate" in failure_shown()
        finally:
            serve.terminate()
            serve.wait(timeout=30)


def _run_mosquitto(conf: Path, ports: tuple[int, ...], log: Path) -> subprocess.Popen:
    """mosquitto on the configuration `broker config` wrote, as is (as root: with
    `user root` first, else it drops to a user that cannot read the 0600 files)."""
    if os.geteuid() == 0:
        rooted = conf.with_name("mosquitto.root.conf")
        rooted.write_text("user root\n" + conf.read_text())
        conf = rooted
    proc = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        if all(_listening(p) for p in ports):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"mosquitto did not listen on {ports}: {log.read_text()[-2000:]}")


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_plaintext_devices_move_to_mutual_tls_over_the_air_or_stay_on_plaintext(tmp_path):
    """`devices cert migrate` on a broker with both listeners (`broker config
    --also-plaintext`): one device moves to TLS and goes on reporting there; one told a
    broker name the certificate does not carry fails its trial, goes back to plaintext
    and reports why; nothing happens without --key-over-plaintext."""
    op = Operator(tmp_path)
    tls_port, plain_port = free_port(), free_port()
    op("keys", "init")
    op("ca", "init")
    op("sim", "fleet", "--devices", "2", "--prefix", "mig", "--root", tmp_path / "fleet", "--broker",
       f"mqtt://127.0.0.1:{plain_port}", "--credentials", "--awake", "--provision-only")
    conf = json.loads(op("broker", "config", "--out", tmp_path / "broker", "--listen", f"127.0.0.1:{tls_port}",
                         "--also-plaintext", f"127.0.0.1:{plain_port}", "--json").stdout)
    assert conf["tls"] and conf["passwd"] and conf["also_plaintext"] == f"127.0.0.1:{plain_port}"
    boards = {d: VirtualBoard(tmp_path / "fleet" / d) for d in conf["devices"]}
    assert sorted(boards) == ["mig-0001", "mig-0002"]
    assert all(b.fs_get("/tls/id.der") is None for b in boards.values())
    broker = _run_mosquitto(Path(conf["conf"]), (tls_port, plain_port), tmp_path / "mosquitto.log")
    serve = op.serve(f"mqtts://127.0.0.1:{tls_port}", tmp_path / "serve.log")
    try:
        def reported_at(device_id: str) -> float:
            with Store(tmp_path / "mpfleet.db") as store:
                return (store.device(device_id) or {}).get("reported_at") or 0

        run_until(list(boards.values()), lambda: all(reported_at(d) for d in boards), "reporting over plaintext")
        refused = op("devices", "cert", "migrate", "mig-0001", "--to", f"mqtts://127.0.0.1:{tls_port}",
                     check=False)
        assert refused.returncode != 0 and "--key-over-plaintext" in refused.stderr, refused
        assert json.loads(op("job", "list", "--json").stdout) == []

        moved = json.loads(op("devices", "cert", "migrate", "mig-0001", "--to", f"mqtts://127.0.0.1:{tls_port}",
                              "--key-over-plaintext", "--json").stdout)
        stays = json.loads(op("devices", "cert", "migrate", "mig-0002", "--to", f"mqtts://127.0.0.1:{tls_port}",
                              "--tls-hostname", "broker.example.org", "--trial-wakes", "2", "--key-over-plaintext",
                              "--json").stdout)

        def status(job_id: str) -> dict:
            return json.loads(op("job", "status", job_id, "--json", check=False).stdout)

        run_until(list(boards.values()), lambda: all(status(j["config_job"])["status"] != "ACTIVE"
                                                     for j in (moved, stays)), "through the migration")
        assert status(moved["devices"][0]["cert_job"])["status"] == "COMPLETED"
        assert status(moved["config_job"])["status"] == "COMPLETED", status(moved["config_job"])
        assert status(stays["devices"][0]["cert_job"])["status"] == "COMPLETED"
        assert status(stays["config_job"])["counts"]["FAILED"] == 1, status(stays["config_job"])

        cfg = {d: json.loads(b.fs_get("/config.json")) for d, b in boards.items()}
        assert cfg["mig-0001"]["broker"]["tls"] is True and cfg["mig-0001"]["broker"]["port"] == tls_port
        assert "user" not in cfg["mig-0001"]["broker"] and "password" not in cfg["mig-0001"]["broker"]
        assert _first_der(boards["mig-0001"]).serial_number == int(moved["devices"][0]["serial"], 16)
        assert not cfg["mig-0002"]["broker"].get("tls") and cfg["mig-0002"]["broker"]["port"] == plain_port
        # Both go on reporting: mig-0001 over TLS (its only listener now), mig-0002 over plaintext,
        # telling the host why its trial could not connect.
        before = {d: reported_at(d) for d in boards}
        run_until(list(boards.values()), lambda: all(reported_at(d) > before[d] for d in boards), "reporting after")
        shown = json.loads(op("devices", "show", "mig-0002", "--json").stdout)
        assert "TLS handshake" in shown["state"]["last_failure"]["error"], shown["state"]["last_failure"]
        assert shown["state"]["last_error"] is None
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        broker.terminate()
        broker.wait(timeout=10)
