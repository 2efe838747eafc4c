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
