"""`mpfleet deploy` tells the truth about what a board runs (issue 15, findings 3 and 4).

Each test is one virtual board behind its serial console (sim/serial.py), reached by the
real `mpfleet deploy` command (a subprocess, through mpremote) as a USB board is:

- a redeploy without --broker keeps the board's broker and Wi-Fi (it used to reset the
  broker to 127.0.0.1), and a board with no broker at all is refused, untouched;
- a board that had the agent as source ends with only the compiled agent, the stale
  files removed, its own files and the agent's state files kept;
- a board running an app slot boots the deployed agent afterwards;
- a board whose imports reach another copy of the agent fails its self-check, naming
  the module and the file it runs from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mpfleet.db.store import Store
from mpfleet.fleet.keys import KeyRing
from mpfleet.images.firmware import firmware_tree
from mpfleet.sim import VirtualBoard
from mpfleet.sim.serial import SerialConsole
from mpfleet.usb.transport import open_link

LISTING = ("import os\n"
           "def _walk(d):\n"
           "    for e in os.ilistdir(d):\n"
           "        p = (d.rstrip('/') + '/' + e[0])\n"
           "        if e[1] == 0x4000:\n"
           "            _walk(p)\n"
           "        else:\n"
           "            print(p)\n"
           "_walk('/')\n")


class Laptop:
    """A database, a key and the mpfleet command, without MPFLEET_BROKER in the environment."""

    def __init__(self, root):
        self.root = root
        self.env = {**os.environ, "COLUMNS": "250", "MPFLEET_DB": str(root / "mpfleet.db"),
                    "MPFLEET_KEYS": str(root / "keys")}
        self.env.pop("MPFLEET_BROKER", None)
        with Store(root / "mpfleet.db") as store:
            KeyRing(store, root / "keys").init()

    def mpfleet(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mpfleet", *args], capture_output=True, text=True,
                              timeout=180, env=self.env)

    def deploy(self, port, *args) -> tuple[subprocess.CompletedProcess, dict | None]:
        proc = self.mpfleet("deploy", "--port", port, "--board", "virtual", "--json", *args)
        try:
            (result,) = json.loads(proc.stdout)
        except ValueError:
            result = None
        return proc, result


@pytest.fixture
def laptop(tmp_path):
    return Laptop(tmp_path)


@pytest.fixture
def board(tmp_path):
    vb = VirtualBoard.create(tmp_path / "board")
    vb.power_on()
    return vb


def on_console(vb: VirtualBoard) -> SerialConsole:
    return SerialConsole(vb)


def board_files(port: str) -> list[str]:
    with open_link(port) as link:
        return sorted(link.exec(LISTING).split())


def board_json(port: str, path: str) -> dict:
    with open_link(port) as link:
        return json.loads(link.exec(f"print(open({path!r}).read())"))


def ok(proc, result) -> dict:
    assert proc.returncode == 0 and result and result["ok"], proc.stdout[-3000:] + proc.stderr[-3000:]
    return result


# ---------------------------------------------------------------- finding 3: the broker
def test_redeploy_without_broker_keeps_the_boards_broker_account_and_wifi(laptop, board):
    console = on_console(board)
    try:
        ok(*laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3:1884", "--credentials",
                          "--wifi-ssid", "site-7", "--wifi-password", "secret"))
        before = board_json(console.port, "/config.json")
        assert before["broker"]["user"] == result_device(laptop) and before["broker"]["password"]
        result = ok(*laptop.deploy(console.port))
        after = board_json(console.port, "/config.json")
    finally:
        console.close()
    assert after["broker"]["host"] == "10.1.2.3" and after["broker"]["port"] == 1884
    assert after["broker"] == before["broker"]  # the account too
    assert after["wifi"] == {"ssid": "site-7", "password": "secret"}
    assert not result["detail"]["config_written"]


def result_device(laptop) -> str:
    with Store(laptop.root / "mpfleet.db") as store:
        (device,) = [d for d, in store.db.execute("SELECT id FROM devices")]
    return device


def test_an_mqtts_broker_url_turns_tls_on_and_its_account_goes_into_the_config(laptop, board):
    assert laptop.mpfleet("ca", "init").returncode == 0  # TLS: the board gets the fleet CA and its certificate
    console = on_console(board)
    try:
        result = ok(*laptop.deploy(console.port, "--broker", "mqtts://site:pw@10.1.2.3"))
        broker = board_json(console.port, "/config.json")["broker"]
        tls_files = [f for f in board_files(console.port) if f.startswith("/tls/")]
    finally:
        console.close()
    assert tls_files == ["/tls/ca.der", "/tls/id.der"]
    assert (broker["host"], broker["port"], broker.get("tls")) == ("10.1.2.3", 8883, True)
    assert (broker.get("user"), broker.get("password")) == ("site", "pw")
    assert result["detail"]["broker"] == "10.1.2.3:8883"


def test_an_account_in_the_url_and_credentials_together_are_a_usage_error(laptop):
    proc = laptop.mpfleet("deploy", "--port", "/dev/null", "--broker", "mqtt://u:p@h", "--credentials")
    assert proc.returncode == 2 and "either in --broker's URL (user:pass@) or with --credentials" in proc.stderr


def test_redeploy_with_the_same_ssid_and_no_password_keeps_the_password(laptop, board):
    console = on_console(board)
    try:
        ok(*laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3", "--wifi-ssid", "site-7",
                          "--wifi-password", "secret"))
        ok(*laptop.deploy(console.port, "--wifi-ssid", "site-7"))
        wifi = board_json(console.port, "/config.json")["wifi"]
    finally:
        console.close()
    assert wifi == {"ssid": "site-7", "password": "secret"}


def test_a_board_without_a_broker_and_no_broker_given_fails_and_is_left_untouched(laptop, board):
    console = on_console(board)
    try:
        before = board_files(console.port)
        proc, result = laptop.deploy(console.port)
        after = board_files(console.port)
    finally:
        console.close()
    assert proc.returncode == 1 and not result["ok"], proc.stdout + proc.stderr
    assert "names no broker and no --broker was given: give --broker mqtt://HOST[:PORT]" in result["error"]
    assert "\n" not in result["error"]
    assert proc.stderr.strip().splitlines()[-1] == f"mpfleet: 1 of 1 board(s) failed: {console.port}"
    assert after == before and "/lib/agent/wake.mpy" not in after
    with Store(laptop.root / "mpfleet.db") as store:
        assert store.db.execute("SELECT COUNT(*) FROM devices").fetchone()[0] == 0  # not registered either


def test_deploy_help_says_a_missing_broker_is_kept_not_defaulted(laptop):
    proc = laptop.mpfleet("deploy", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "127.0.0.1" not in text
    assert ("Not given anywhere: each board keeps the broker its /config.json has, and a board without one fails."
            in text)
    assert "Exit status: 0 every board done; 1 a board failed" in text


# ---------------------------------------------------------------- finding 4: stale files, the code that runs
USER_FILES = {"/lib/mylib.py": b"X = 1\n", "/notes.txt": b"mine\n"}
AGENT_STATE = {"/jobs.json": b"{}", "/last_crash.txt": b"OSError: 5", "/config.good.json": b"{}",
               "/log/state": b"\x00" * 8}


def test_deploy_over_an_agent_in_source_leaves_only_the_compiled_agent_and_keeps_other_files(laptop, board):
    proc = laptop.mpfleet("sim", "deploy", str(board.path), "--source")  # the agent as .py, as an old deploy left it
    assert proc.returncode == 0, proc.stderr
    board.fs_put({"/lib/agent/oldmod.py": b"OLD = 1\n", "/lib/agent/old/__init__.py": b"",
                  **USER_FILES, **AGENT_STATE})
    console = on_console(board)
    try:
        result = ok(*laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3"))
        files = board_files(console.port)
    finally:
        console.close()
    deployed = firmware_tree()
    agent_files = [p for p in files if p.startswith("/lib/agent/")]
    assert agent_files == sorted(p for p in deployed if p.startswith("/lib/agent/"))  # only .mpy, nothing stale
    assert "/appslot.py" not in files and "/appslot.mpy" in files
    assert set(USER_FILES) | set(AGENT_STATE) <= set(files)
    removed = result["detail"]["removed"]
    assert "/lib/agent/wake.py" in removed and "/lib/agent/oldmod.py" in removed and "/appslot.py" in removed
    assert "/lib/agent/old/__init__.py" in removed and result["detail"]["removed_dirs"] == ["/lib/agent/old"]
    sources = [p for p in firmware_tree(compiled=False) if p not in ("/boot.py", "/main.py")]
    assert sorted(removed) == sorted(sources + ["/lib/agent/oldmod.py", "/lib/agent/old/__init__.py"])
    running = result["detail"]["running"]
    assert running["agent.wake"] == "/lib/agent/wake.mpy" and running["appslot"] == "/appslot.mpy"
    assert all(path.endswith(".mpy") for path in running.values()), running


def test_deploy_table_counts_copied_removed_and_unchanged(laptop, board):
    board.fs_put({"/lib/agent/oldmod.py": b"OLD = 1\n"})
    console = on_console(board)
    try:
        ok(*laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3"))
        with open_link(console.port) as link:
            link.write_file("/lib/agent/stale.mpy", b"M\x06\x00\x1f")
            link.exec("import os\nos.remove('/lib/agent/ntp.mpy')")
        proc = laptop.mpfleet("deploy", "--port", console.port, "--board", "virtual")
    finally:
        console.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "copied" in line)
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"│ {console.port} "))
    cells = dict(zip([c.strip() for c in header.split("┃")[1:-1]], [c.strip() for c in row.split("│")[1:-1]]))
    assert (cells["copied"], cells["removed"], cells["unchanged"], cells["result"]) == (
        "1", "1", str(len(firmware_tree()) - 1), "ok"), proc.stdout


def test_deploy_retires_the_app_slot_so_the_board_boots_the_agent_deployed(laptop, board):
    old = firmware_tree(only=("lib/agent/__init__.py", "lib/agent/wake.py"))
    board.fs_put({"/app.json": b'{"active": "b"}', "/apps/b/app.json": b'{"version": "0.0.9"}',
                  **{"/apps/b" + p: data for p, data in old.items()}})
    console = on_console(board)
    try:
        result = ok(*laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3"))
        files = board_files(console.port)
    finally:
        console.close()
    assert "/app.json" not in files and not any(p.startswith("/apps/") for p in files)
    assert "/app.json" in result["detail"]["removed"] and "/apps" in result["detail"]["removed_dirs"]
    # the self-check ran after a soft reset, so boot.py and appslot chose the path a boot has
    assert result["detail"]["running"]["agent.wake"] == "/lib/agent/wake.mpy"


def test_self_check_fails_naming_the_module_when_another_copy_of_the_agent_runs(laptop, board):
    # `mpremote cp -r lib/agent :` lands in /agent: sys.path is ['', '.frozen', '/lib'] on an
    # ESP32, so that copy (a user's, deploy never removes it) shadows the deployed /lib/agent.
    shadow = {"/agent" + p[len("/lib/agent"):]: data for p, data in firmware_tree().items()
              if p.startswith("/lib/agent/")}
    board.fs_put(shadow)
    console = on_console(board)
    try:
        proc, result = laptop.deploy(console.port, "--broker", "mqtt://10.1.2.3")
        files = board_files(console.port)
    finally:
        console.close()
    assert proc.returncode == 1 and not result["ok"], proc.stdout + proc.stderr
    assert result["error"].startswith(f"{console.port}: self-check failed: agent runs from /agent/__init__.mpy, "
                                      "not the deployed /lib/agent/__init__.mpy"), result["error"]
    agent_modules = [p for p in shadow if p.endswith(".mpy")]
    assert f"; and {len(agent_modules) - 3} more" in result["error"] and "\n" not in result["error"]
    assert "/agent/wake.mpy" in files  # the user's copy is theirs: reported, not removed
    assert proc.stderr.strip().splitlines()[-1] == f"mpfleet: 1 of 1 board(s) failed: {console.port}"
