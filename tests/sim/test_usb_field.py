"""USB field work on several boards at once: `mpfleet deploy`, `mpfleet usb run`,
`mpfleet usb collect`, through the real mpremote (and ampy) serial code over
pseudo-terminals to virtual boards running the real agent.

The module shares one set of four boards: deployed first, then jobs, then samples, then
which boards a command works on (--port, --all: one rule for every command) and how a
command ends when one board fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from serial.tools import list_ports

from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.sim import VirtualBoard
from mpfleet.sim.serial import SerialConsole
from mpfleet.db.store import Store
from mpfleet.cli import main
from mpfleet.errors import MpfleetError
from mpfleet.usb.field import collect
from mpfleet.usb.ports import BadPortChoice, NoUsbPorts, UsbPort, list_usb_ports, resolve_ports
from mpfleet.usb.transport import open_link

BOARDS = 4


class Bench:
    """Four boards on consoles, a database and a key: a field engineer's laptop."""

    def __init__(self, root):
        self.root = root
        self.db = root / "mpfleet.db"
        self.keys = root / "keys"
        with Store(self.db) as store:
            KeyRing(store, self.keys).init()
        self.boards = []
        self.consoles = []
        for i in range(BOARDS):
            vb = VirtualBoard.create(root / f"board{i}")
            vb.power_on()
            self.boards.append(vb)
            self.consoles.append(SerialConsole(vb))
        self.ports = [c.port for c in self.consoles]

    def mpfleet(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mpfleet", *args], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "COLUMNS": "200", "MPFLEET_DB": str(self.db),
                                   "MPFLEET_KEYS": str(self.keys)})
        if check:
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    def port_args(self, ports=None) -> list[str]:
        return [a for p in (ports or self.ports) for a in ("--port", p)]

    def close(self):
        for c in self.consoles:
            c.close()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    b = Bench(tmp_path_factory.mktemp("usb"))
    try:
        yield b
    finally:
        b.close()


def _deploy(bench, *extra, ports=None):
    out = bench.mpfleet("deploy", *bench.port_args(ports), "--board", "virtual", "--wifi-ssid", "site-7",
                        "--wifi-password", "secret", "--broker", "mqtt://10.1.2.3:1883", "--group", "site-7",
                        "--json", *extra)
    return json.loads(out.stdout)


def test_deploy_copies_provisions_and_checks_every_board_in_parallel(bench):
    results = _deploy(bench)
    assert [r["ok"] for r in results] == [True] * BOARDS, results
    devices = [r["device"] for r in results]
    assert len(set(devices)) == BOARDS
    for r in results:
        assert len(r["detail"]["written"]) > 15 and r["detail"]["skipped"] == []
        assert "/lib/agent/wake.mpy" in r["detail"]["written"] and "/boot.py" in r["detail"]["written"]
    with Store(bench.db) as store:
        registered = {d["id"]: d for d in Registry(store).list()}
        trusted = KeyRing(store, bench.keys).trusted_keys()
    assert set(devices) <= set(registered)
    assert all(registered[d]["board"] == "virtual" and "site-7" in registered[d]["groups"] for d in devices)
    with open_link(bench.ports[0]) as link:
        cfg = json.loads(link.exec("print(open('/config.json').read())"))
    assert cfg["device_id"] == devices[0] and cfg["trusted_keys"] == trusted
    assert cfg["wifi"] == {"ssid": "site-7", "password": "secret"}
    assert cfg["broker"]["host"] == "10.1.2.3" and cfg["broker"]["port"] == 1883


def test_deploying_again_copies_nothing_that_is_unchanged(bench):
    results = _deploy(bench)
    assert all(r["ok"] and r["detail"]["written"] == [] and not r["detail"]["config_written"] for r in results)
    assert all(len(r["detail"]["skipped"]) > 15 for r in results)


def test_ampy_transport_deploys_a_changed_file(bench):
    with open_link(bench.ports[1]) as link:
        link.exec("import os\nos.remove('/lib/agent/ntp.mpy')")
    (result,) = _deploy(bench, "--transport", "ampy", ports=[bench.ports[1]])
    assert result["ok"] and result["detail"]["written"] == ["/lib/agent/ntp.mpy"], result


def test_usb_run_executes_the_signed_job_on_every_board_into_the_job_records(bench):
    with Store(bench.db) as store:
        engine = RolloutEngine(store, KeyRing(store, bench.keys), Registry(store))
        job = engine.create_job("config", {"set": {"upload_watermark": 222}}, ["site-7"], job_id="usb-config")
    out = bench.mpfleet("usb", "run", job, *bench.port_args(), "--json")
    results = json.loads(out.stdout)
    assert [r["detail"]["status"] for r in results] == ["SUCCEEDED"] * BOARDS, results
    status = json.loads(bench.mpfleet("job", "status", job, "--json").stdout)
    assert status["counts"]["SUCCEEDED"] == BOARDS and status["status"] == "COMPLETED"
    with open_link(bench.ports[2]) as link:
        assert json.loads(link.exec("print(open('/config.json').read())"))["upload_watermark"] == 222
    # the same envelope again changes nothing: the job has ended on every board
    again = bench.mpfleet("usb", "run", job, *bench.port_args(bench.ports[:1]), check=False)
    assert again.returncode == 1 and "COMPLETED" in again.stdout + again.stderr


def test_usb_run_refuses_jobs_that_need_the_network(bench):
    with Store(bench.db) as store:
        engine = RolloutEngine(store, KeyRing(store, bench.keys), Registry(store))
        job = engine.create_job("reboot", {}, ["site-7"], job_id="usb-reboot")
    out = bench.mpfleet("usb", "run", job, *bench.port_args(bench.ports[:2]), check=False)
    assert out.returncode == 1 and "needs the network" in out.stdout, out.stdout


def test_usb_collect_stores_the_backlog_and_the_boards_trim_only_what_was_stored(bench):
    # let the agent run offline for a while on each board: samples pile up
    for console in bench.consoles:
        console.reset()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and min(len(c.records) for c in bench.consoles) < 8:
        time.sleep(0.2)
    out = bench.mpfleet("usb", "collect", *bench.port_args(), "--json")
    first = json.loads(out.stdout)
    assert all(r["ok"] and r["detail"]["new"] > 0 for r in first), first
    with Store(bench.db) as store:
        for r in first:
            assert store.ack_point(r["device"]) == r["detail"]["acked"] > 0
            seqs = [s for s, in store.db.execute("SELECT seq FROM samples WHERE device = ? ORDER BY seq",
                                                  (r["device"],))]
            assert seqs == list(range(1, r["detail"]["acked"] + 1)), "every sample, once, in order"
    # the boards trimmed what was stored: nothing comes twice
    with Store(bench.db) as store:
        second = collect(store, bench.ports)
    assert all(r.ok and r.detail["new"] == 0 and r.detail["duplicates"] == 0 for r in second), second


def test_ports_probe_names_the_micropython_and_the_device(bench):
    found = json.loads(bench.mpfleet("ports", *bench.port_args(bench.ports[:2]), "--probe", "--json").stdout)
    given = [p for p in found if p["port"] in bench.ports[:2]]
    assert len(given) == 2
    for p in given:
        assert p["micropython"]["mpy"] & 0xFF == 6 and p["micropython"]["device_id"], p


def test_deploy_refuses_a_board_that_cannot_load_the_compiled_agent(bench):
    from mpfleet.broker.link import parse_broker_url
    from mpfleet.usb.field import DeploySettings, deploy

    old_mpy = {"/lib/agent/__init__.mpy": b"M\x05\x00\x1f" + bytes(12)}  # .mpy version 5 (MicroPython < 1.22)
    with Store(bench.db) as store:
        (result,) = deploy(store, KeyRing(store, bench.keys), bench.ports[3:], DeploySettings(
            board="virtual", broker=parse_broker_url("mqtt://127.0.0.1")), files=old_mpy)
    assert not result.ok and "loads .mpy version 6, this mpfleet compiles version 5" in result.error


def test_usb_commands_explain_what_is_missing(bench):
    out = bench.mpfleet("deploy", check=False)
    assert out.returncode == 2 and "give --port" in out.stderr
    out = bench.mpfleet("deploy", "--port", bench.ports[0], "--board", "no-such-board", check=False)
    assert out.returncode == 1 and "no-such-board" in out.stderr
    out = bench.mpfleet("usb", "run", "no-such-job", "--port", bench.ports[0], check=False)
    assert out.returncode == 1 and "no-such-job" in out.stderr


# ---------------------------------------------------------------- which boards: one rule for every command
def attached(*ports):
    """What pyserial's comports() reports: (device, USB location or None) per port."""
    return [SimpleNamespace(device=device, vid=0x10C4, pid=0xEA60, serial_number=None, location=location,
                            description="CP2102N") for device, location in ports]


def test_attached_ports_are_listed_in_hub_order_then_by_name_and_only_with_a_usb_id(monkeypatch):
    found = attached(("/dev/ttyUSB10", None), ("/dev/ttyUSB2", None), ("/dev/ttyUSB0", "1-1.10"),
                     ("/dev/ttyUSB1", "1-1.2"))
    found.append(SimpleNamespace(device="/dev/ttyS0", vid=None, pid=None, serial_number=None, location=None,
                                 description="n/a"))
    monkeypatch.setattr(list_ports, "comports", lambda: found)
    assert [p.port for p in list_usb_ports()] == ["/dev/ttyUSB1", "/dev/ttyUSB0", "/dev/ttyUSB2", "/dev/ttyUSB10"]


def usb_ports(*names):
    return lambda: [UsbPort(name, 0x10C4, 0xEA60) for name in names]


def test_named_ports_come_first_in_the_order_given_then_the_rest_of_all():
    chosen = resolve_ports(["/dev/ttyUSB3", "/dev/ttyUSB1"], True,
                           attached=usb_ports("/dev/ttyUSB0", "/dev/ttyUSB1", "/dev/ttyUSB2"))
    assert chosen == ["/dev/ttyUSB3", "/dev/ttyUSB1", "/dev/ttyUSB0", "/dev/ttyUSB2"]


def test_without_all_only_the_named_ports_are_used():
    assert resolve_ports(["/dev/ttyUSB2"], False, attached=usb_ports("/dev/ttyUSB0")) == ["/dev/ttyUSB2"]


def test_a_port_named_twice_is_a_usage_error():
    with pytest.raises(BadPortChoice, match="^/dev/ttyUSB0 is given twice$"):
        resolve_ports(["/dev/ttyUSB0", "/dev/ttyUSB0"], False)


def test_two_names_of_one_device_are_a_usage_error(tmp_path):
    link = tmp_path / "by-path-port0"
    link.symlink_to("/dev/null")
    with pytest.raises(BadPortChoice, match=f"^/dev/null and {link} are the same board"):
        resolve_ports(["/dev/null", str(link)], False)


def test_neither_port_nor_all_is_a_usage_error_naming_the_action():
    with pytest.raises(BadPortChoice, match=r"^no boards to flash: give --port PORT \(repeatable\) or --all$"):
        resolve_ports([], False, action="flash")


def test_all_finding_nothing_is_an_error_unless_a_port_is_named():
    with pytest.raises(NoUsbPorts, match="--all found no USB serial port") as caught:
        resolve_ports([], True, attached=usb_ports())
    assert isinstance(caught.value, MpfleetError) and not isinstance(caught.value, BadPortChoice)
    assert resolve_ports(["/dev/ttyUSB5"], True, attached=usb_ports()) == ["/dev/ttyUSB5"]


MANY_BOARD_COMMANDS = [["flash", "--board", "virtual", "--firmware", "firmware.bin"], ["deploy"],
                       ["usb", "run", "some-job"], ["usb", "collect"]]


@pytest.mark.parametrize("command", MANY_BOARD_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_many_board_command_refuses_no_boards_and_a_board_named_twice_alike(tmp_path, command):
    env = {**os.environ, "MPFLEET_DB": str(tmp_path / "db"), "MPFLEET_KEYS": str(tmp_path / "keys")}
    for ports, message in (([], "no boards to "), (["--port", "/dev/ttyUSB7"] * 2, "/dev/ttyUSB7 is given twice")):
        proc = subprocess.run([sys.executable, "-m", "mpfleet", *command, *ports], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The real CLI in this process (so pyserial's enumeration can be faked): exit status, stdout, stderr."""
    try:
        main(list(args))
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_usb_collect_with_port_and_all_takes_the_named_board_first_then_the_attached_in_hub_order(
        bench, monkeypatch, capsys):
    p0, p1, p2, p3 = bench.ports
    monkeypatch.setattr(list_ports, "comports", lambda: attached((p1, "1-1.10"), (p0, "1-1.3"), (p3, None),
                                                                 (p2, "1-1.2")))
    monkeypatch.setenv("MPFLEET_DB", str(bench.db))
    status, out, err = run_cli(capsys, "usb", "collect", "--port", p0, "--all", "--json", "--wait", "20")
    assert status == 0, out + err
    results = json.loads(out)
    assert [r["port"] for r in results] == [p0, p2, p1, p3]  # each board once, p0 where it was named
    assert all(r["ok"] for r in results), results


def table_row(stdout: str, port: str) -> str:
    """The per-board table's row for `port` (its first line)."""
    return next(line for line in stdout.splitlines() if line.startswith(f"│ {port} "))


def test_one_board_failing_exits_1_with_the_table_and_the_others_are_done(bench):
    p0, p1, p2, _ = bench.ports
    gone = "/dev/mpfleet-unplugged"
    proc = bench.mpfleet("usb", "collect", "--port", p0, "--port", gone, "--port", p1, "--port", p2, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {port: table_row(proc.stdout, port) for port in (p0, p1, p2, gone)}
    assert all(rows[p].rstrip(" │").endswith("ok") for p in (p0, p1, p2)), proc.stdout
    assert "cannot open" in rows[gone], proc.stdout
    assert "3 of 4 board(s) collected and acknowledged" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == f"mpfleet: 1 of 4 board(s) failed: {gone}"
    assert "Traceback" not in proc.stderr


def test_one_board_failing_in_json_still_exits_1_and_reports_every_board(bench):
    gone = "/dev/mpfleet-unplugged"
    proc = bench.mpfleet("usb", "collect", "--port", gone, "--port", bench.ports[3], "--json", check=False)
    assert proc.returncode == 1
    lost, done = json.loads(proc.stdout)
    assert (lost["port"], lost["ok"], done["ok"]) == (gone, False, True) and "cannot open" in lost["error"]
    assert proc.stderr.strip() == f"mpfleet: 1 of 2 board(s) failed: {gone}"


def test_deploy_to_a_tls_broker_gives_the_board_its_own_certificate_and_a_redeploy_keeps_it(bench):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    port = bench.ports[3]
    args = ("deploy", "--port", port, "--board", "virtual", "--broker", "mqtts://10.1.2.3", "--json")
    refused = bench.mpfleet(*args, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith("mpfleet: no fleet CA in ")
    assert "Traceback" not in refused.stderr
    bench.mpfleet("ca", "init")
    (result,) = json.loads(bench.mpfleet(*args).stdout)
    device = result["device"]
    assert result["ok"] and result["detail"]["broker"] == "10.1.2.3:8883"
    with open_link(port) as link:
        cfg = json.loads(link.exec("print(open('/config.json').read())"))
        ca_der = bytes.fromhex(link.exec("import binascii\nprint(binascii.hexlify(open('/tls/ca.der','rb').read())"
                                         ".decode())").strip())
        ident = bytes.fromhex(link.exec("import binascii\nprint(binascii.hexlify(open('/tls/id.der','rb').read())"
                                        ".decode())").strip())
    assert cfg["broker"]["tls"] is True and cfg["broker"]["port"] == 8883
    ca_cert = x509.load_pem_x509_certificate((bench.keys / "ca.crt").read_bytes())
    assert ca_der == ca_cert.public_bytes(Encoding.DER)
    with Store(bench.db) as store:
        issued = store.certificates(device)
    assert len(issued) == 1
    cert = x509.load_der_x509_certificate(issued[0]["der"])
    assert ident.startswith(issued[0]["der"]) and len(ident) > len(issued[0]["der"])  # then the key
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device
    cert.verify_directly_issued_by(ca_cert)
    # the host keeps the certificate, never the key
    with Store(bench.db) as store:
        dumped = b"".join(bytes(line, "utf-8") for line in store.db.iterdump())
    assert ident[len(issued[0]["der"]):].hex().encode() not in dumped.lower()
    (again,) = json.loads(bench.mpfleet(*args).stdout)
    assert again["ok"] and not again["detail"]["config_written"]
    with Store(bench.db) as store:
        assert len(store.certificates(device)) == 1  # kept: valid, not revoked, the board holds it
