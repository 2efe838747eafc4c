"""App bundles: deterministic, every file checked by SHA-256, and the .mpy version
recorded is the one the firmware (the real MicroPython) says it loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mpfleet.images.appbundle import BundleError, build_bundle, loadable, read_bundle
from mpfleet.images.firmware import FIRMWARE_DIR


@pytest.fixture(scope="module")
def bundle_bytes():
    return build_bundle("0.4.0")


def test_bundle_holds_every_lib_module_compiled(bundle_bytes):
    b = read_bundle(bundle_bytes)
    expected = {"/" + p.relative_to(FIRMWARE_DIR).as_posix()[:-3] + ".mpy"
                for p in (FIRMWARE_DIR / "lib").rglob("*.py")}
    assert set(b.files) == expected and "/lib/agent/wake.mpy" in b.files
    assert not any(p.endswith(("boot.mpy", "main.mpy")) for p in b.files)
    assert b.manifest["version"] == "0.4.0" and all(d.startswith(b"M") for d in b.files.values())
    assert build_bundle("0.4.0") == bundle_bytes  # deterministic: same sources, same SHA-256


def test_the_recorded_mpy_version_is_what_the_firmware_loads(bundle_bytes, run_firmware):
    record = run_firmware("import sys, machine\nprint('mpy', sys.implementation._mpy)\nmachine.deepsleep(1000)\n")
    device_mpy = int(record.output.split("mpy ")[1].split()[0])
    manifest = read_bundle(bundle_bytes).manifest
    assert loadable(manifest, device_mpy)
    assert manifest["mpy"]["version"] == device_mpy & 0xFF
    older = dict(manifest, mpy=dict(manifest["mpy"], version=manifest["mpy"]["version"] - 1))
    assert not loadable(older, device_mpy)
    native_elsewhere = dict(manifest, mpy=dict(manifest["mpy"], arch=(device_mpy >> 10) + 1))
    assert not loadable(native_elsewhere, device_mpy)


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b"ZIP!" + b[4:], "not an app bundle"),
    (lambda b: b[:5], "shorter than its"),
    (lambda b: b[:-10], "truncated app bundle"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]), "does not match its SHA-256"),
    (lambda b: b + b"extra", "bytes after its last file"),
    (lambda b: b[:4] + b"\x09" + b[5:], "format 9 is not supported"),
])
def test_damaged_bundles_are_refused(bundle_bytes, damage, reason):
    with pytest.raises(BundleError, match=reason):
        read_bundle(damage(bundle_bytes))


def test_a_module_that_does_not_compile_is_named(tmp_path):
    shutil.copytree(FIRMWARE_DIR, tmp_path / "fw")
    (tmp_path / "fw" / "lib" / "agent" / "broken.py").write_text("def f(:\n")
    with pytest.raises(Exception, match="lib/agent/broken.py"):
        build_bundle("0.4.1", tmp_path / "fw")


def test_cli_bundle_and_inspect(tmp_path):
    out = tmp_path / "agent.mpfa"
    made = subprocess.run([sys.executable, "-m", "mpfleet", "app", "bundle", "--version", "0.5.0", "-o", str(out),
                           "--json"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    shown = json.loads(subprocess.run([sys.executable, "-m", "mpfleet", "app", "inspect", str(out), "--json"],
                                      capture_output=True, text=True, timeout=60).stdout)
    assert shown["sha256"] == summary["sha256"] and shown["manifest"]["version"] == "0.5.0"
    out.write_bytes(out.read_bytes()[:-3])
    bad = subprocess.run([sys.executable, "-m", "mpfleet", "app", "inspect", str(out)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.startswith("mpfleet: truncated app bundle")
