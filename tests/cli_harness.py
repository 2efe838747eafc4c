"""`mpfleet` run as a user runs it, a process of its own, for the tests of the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The settings a shell may hold (tests/conftest.py drops them for the session; a test
# that gives a process an environment of its own drops them again).
SETTING_VARS = ("MPFLEET_DB", "MPFLEET_KEYS", "MPFLEET_IMAGES", "MPFLEET_BROKER", "MPFLEET_TOPIC_ROOT",
                "MPFLEET_PROFILE", "MPFLEET_HOME")


def mpfleet(*args, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mpfleet ARGS` in the session's environment; AssertionError with its output if it
    fails, unless `check` is false."""
    proc = subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpfleet {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def mpfleet_at(root: Path, *args, timeout: float = 60, keep_cache: bool = False) -> subprocess.CompletedProcess:
    """`mpfleet ARGS` with a HOME and config directory of its own under `root` (root/home),
    none of the settings variables, no stdin. `keep_cache`: the cache directory stays
    the user's (where the compiled firmware is kept). Its exit status is the caller's to
    check."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS}
    env.update(HOME=str(root / "home"), XDG_CONFIG_HOME=str(root / "home" / ".config"))
    if keep_cache:
        env["XDG_CACHE_HOME"] = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A refusal as every command gives one: non-zero, no traceback, one `mpfleet: ` line
    on stderr holding each of `words`."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("mpfleet: ") and proc.stderr.count("\n") == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
