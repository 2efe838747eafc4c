"""USB field work on several boards at once: `mpfleet deploy`, `mpfleet usb run`,
`mpfleet usb collect`, through the real mpremote (and ampy) serial code over
pseudo-terminals to virtual boards running the real agent.

The module shares one set of four boards: deployed first, then jobs, then samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine
from mpfleet.sim import VirtualBoard
from mpfleet.sim.serial import SerialConsole
from mpfleet.db.store import Store
from mpfleet.usb.transport import open_link
from mpfleet.usb.field import collect

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
