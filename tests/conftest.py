"""Shared fixtures: virtual boards at the RAM budget, firmware runs, a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from mpfleet.broker.local import LocalBroker, find_mosquitto
from mpfleet.sim import VirtualBoard

# Stress tests run a reduced count in `make test`; MPFLEET_STRESS=1 (make stress) runs them in full.
STRESS = os.environ.get("MPFLEET_STRESS") == "1"


# The settings a user's shell or config file may hold: no test reads or writes the
# user's own database, keys or profiles. Every test runs with an mpfleet home and a
# config directory of the session's own (a test that wants others passes them).
_USER_SETTINGS = ("MPFLEET_DB", "MPFLEET_KEYS", "MPFLEET_IMAGES", "MPFLEET_BROKER", "MPFLEET_TOPIC_ROOT",
                  "MPFLEET_PROFILE")


def pytest_configure(config):
    import tempfile

    for name in _USER_SETTINGS:
        os.environ.pop(name, None)
    home = Path(tempfile.mkdtemp(prefix="mpfleet-test-home-"))
    config.mpfleet_test_home = home
    os.environ["MPFLEET_HOME"] = str(home / ".mpfleet")
    os.environ["XDG_CONFIG_HOME"] = str(home / ".config")


def pytest_unconfigure(config):
    import shutil

    home = getattr(config, "mpfleet_test_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def stress_count(quick: int, full: int) -> int:
    return full if STRESS else quick


# MPFLEET_TEST_BACKEND=postgresql (make test runs it over the store's and the engine's
# tests, PG_SUITE in the Makefile): every Store a test opens on a file path opens a
# schema of its own on the test PostgreSQL instead (tests/pgharness.py), the same
# schema for the same path within one test, so the same assertions hold on both.
ON_POSTGRES = os.environ.get("MPFLEET_TEST_BACKEND") == "postgresql"


@pytest.fixture(scope="session")
def pg_database():
    """A PostgreSQL database of this test session's own (skips where there is none)."""
    from pgharness import TestDatabase, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    database = TestDatabase().create()
    yield database
    database.drop()


@pytest.fixture(autouse=True)
def _store_on_postgres(request, monkeypatch):
    if not ON_POSTGRES:
        yield
        return
    only = request.node.get_closest_marker("sqlite_only")
    if only is not None:
        pytest.skip(f"SQLite only: {only.args[0] if only.args else 'checks the SQLite file'}")
    database = request.getfixturevalue("pg_database")
    from mpfleet.db import backend
    from mpfleet.db.store import Store

    import subprocess

    urls: dict[str, str] = {}
    original_store, original_popen = Store.__init__, subprocess.Popen.__init__

    def url_of(path) -> str:
        key = str(Path(path).resolve())
        if key not in urls:
            urls[key] = database.url()
        return urls[key]

    def names_a_store(arg) -> bool:
        if not isinstance(arg, (str, os.PathLike)) or "\n" in str(arg) or backend.is_url(arg):
            return False
        return str(arg).endswith(".db") or str(Path(arg).resolve()) in urls

    def store_on_postgres(self, path=None):
        original_store(self, url_of(path) if path is not None and not backend.is_url(path) else path)

    def cli_on_postgres(self, args, *rest, **kwargs):
        # an mpfleet command a test runs as a process names its database by path: the same schema
        if isinstance(args, (list, tuple)):
            args = [url_of(a) if names_a_store(a) else a for a in args]
        env = kwargs.get("env")
        if env and env.get("MPFLEET_DB") and not backend.is_url(env["MPFLEET_DB"]):
            kwargs["env"] = {**env, "MPFLEET_DB": url_of(env["MPFLEET_DB"])}
        original_popen(self, args, *rest, **kwargs)

    from mpfleet.cli import options

    original_path = options.database_path

    def path_on_postgres(db):  # an in-process command line (cli.main) names its database by path too
        target = original_path(db)
        return target if backend.is_url(target) or not names_a_store(target) else url_of(target)

    monkeypatch.setattr(options, "database_path", path_on_postgres)
    from mpfleet.fleet.otaserve import ArtifactServer

    original_artifacts = ArtifactServer.__init__

    def artifacts_on_postgres(self, db_path, *rest, **kwargs):
        original_artifacts(self, url_of(db_path) if names_a_store(db_path) else db_path, *rest, **kwargs)

    monkeypatch.setattr(ArtifactServer, "__init__", artifacts_on_postgres)
    monkeypatch.setattr(Store, "__init__", store_on_postgres)
    monkeypatch.setattr(subprocess.Popen, "__init__", cli_on_postgres)
    yield


@pytest.fixture
def new_board(tmp_path):
    """Factory: a freshly created, powered virtual board (128 KiB firmware heap)."""
    made = []

    def make(name: str = "dev", **kwargs) -> VirtualBoard:
        vb = VirtualBoard.create(tmp_path / name, **kwargs)
        vb.power_on()
        made.append(vb)
        return vb

    return make


@pytest.fixture
def run_firmware(new_board):
    """Run MicroPython source as the board's main.py for one boot; returns the BootRecord.

    The record carries `output`, `exit_reason` and `heap_live`; use
    mpfleet.sim.heap.heap_needed() for the smallest heap a program fits in.
    """

    def run(source: str, board: VirtualBoard | None = None, files: dict | None = None):
        vb = board or new_board()
        payload = {"/main.py": textwrap.dedent(source).encode()}
        payload.update(files or {})
        vb.fs_put(payload)
        return vb.boot()

    return run


@pytest.fixture(scope="module")
def mosquitto():
    """A real mosquitto on a free loopback port for the module's tests, stopped afterwards."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make test` (it installs it) or apt-get install mosquitto")
    with LocalBroker() as broker:
        yield broker


# The agent's job tests (tests/e2e/test_agent_jobs.py, test_agent_promises.py).
# agent_harness imports this module, so it is imported where it is used.
@pytest.fixture
def host(mosquitto, tmp_path):
    """A host ingesting from `mosquitto` into a fresh database."""
    from agent_harness import Host

    h = Host(mosquitto, tmp_path / "host.db").start()
    yield h
    h.close()


@pytest.fixture
def desk_factory(mosquitto):
    """Factory: a JobDesk (signs and publishes jobs) for a device id, closed afterwards."""
    from agent_harness import JobDesk

    desks = []

    def make(device_id, key=None):
        d = JobDesk(mosquitto, device_id, key)
        desks.append(d)
        return d

    yield make
    for d in desks:
        d.close()


def firmware_files(only: tuple[str, ...] | None = None, compiled: bool = True) -> dict[str, bytes]:
    """The firmware tree as {device path: bytes}, for VirtualBoard.fs_put: lib/ as
    .mpy, as a deploy puts it (see mpfleet.images.firmware).

    `only` limits it to paths relative to firmware/ (e.g. ("lib/agent/mqtt.py",)).
    """
    from mpfleet.images.firmware import firmware_tree

    return firmware_tree(compiled=compiled, only=only)


@pytest.fixture(scope="module")
def mpy_path(tmp_path_factory) -> Path:
    """A directory holding agent/{__init__,sha512,ed25519}.mpy as a deploy compiles them
    (tests/firmware/test_ed25519.py, test_signature_agreement.py)."""
    root = tmp_path_factory.mktemp("ed25519-mpy")
    files = firmware_files(only=("lib/agent/__init__.py", "lib/agent/sha512.py", "lib/agent/ed25519.py"))
    for device_path, data in files.items():
        target = root / device_path.removeprefix("/lib/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


# What every unit script starts with: case(name, fn) runs one case and prints
# its result, or the exception it raised, as one JSON line.
UNIT_PRELUDE = """
import json


def case(name, fn):
    try:
        line = json.dumps([name, {"value": fn()}])
    except Exception as e:
        line = json.dumps([name, {"error": type(e).__name__, "message": str(e)}])
    print("CASE " + line)
"""


class UnitResults(dict):
    """{case name: {"value": v} or {"error": exception type name, "message": text}}."""

    def __repr__(self):  # a failing test's traceback names the case, not every result
        return f"<{len(self)} unit cases>"

    def value(self, name):
        """The case's returned value; fails the test if it raised."""
        out = self[name]
        assert "value" in out, f"{name}: raised {out['error']}: {out['message']}"
        return out["value"]

    def error(self, name):
        """(exception type name, message) of the case; fails the test if it returned."""
        out = self[name]
        assert "error" in out, f"{name}: returned {out['value']!r} where an error was expected"
        return out["error"], out["message"]


@pytest.fixture(scope="session")
def unit_cases(tmp_path_factory):
    """Factory: run a script of case(name, fn) calls once on the MicroPython unix
    port at the firmware's 128 KiB heap, no virtual board, with the given firmware
    files (paths relative to firmware/) importable as deployed (.mpy). The script
    is compiled on the host too, so the heap is spent as on a device. Returns the
    UnitResults; a script that dies fails every test that asked for it."""
    from mpfleet.images.firmware import compile_mpy
    from mpfleet.sim.board import micropython_executable

    def run(source: str, only: tuple[str, ...]) -> UnitResults:
        root = tmp_path_factory.mktemp("unit")
        for device_path, data in firmware_files(("lib/agent/__init__.py",) + tuple(only)).items():
            target = root / device_path.removeprefix("/lib/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (root / "_cases.mpy").write_bytes(compile_mpy((UNIT_PRELUDE + textwrap.dedent(source)).encode(), "cases.py"))
        env = dict(os.environ, MICROPYPATH=str(root))
        proc = subprocess.run([micropython_executable(), "-X", "heapsize=128k", "-m", "_cases"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results = UnitResults()
        for line in proc.stdout.splitlines():
            if line.startswith("CASE "):
                name, out = json.loads(line[5:])
                assert name not in results, f"case {name!r} ran twice"
                results[name] = out
        assert results, proc.stdout[-3000:]
        return results

    return run


def child_processes() -> dict[int, str]:
    """{pid: command line} of this process's children (zombies included)."""
    me = str(os.getpid())
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
            ppid = next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            if ppid != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip() or "<zombie>"
        except (OSError, StopIteration):
            continue
    return found


@pytest.fixture(autouse=True, scope="module")
def leaves_nothing_running(request):
    """Every test module must stop what it started (brokers, devices, helpers)."""
    before = set(child_processes())
    yield
    import time

    deadline = time.monotonic() + 5
    left = {}
    while time.monotonic() < deadline:
        left = {pid: cmd for pid, cmd in child_processes().items() if pid not in before}
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"{request.module.__name__} left processes running: {left}")
