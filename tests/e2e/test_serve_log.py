"""What `mpfleet serve` tells its operator on stderr (finding 9 of issue 15): a job
canceled while it runs, the broker lost (with the reason) and regained. Through the
`serve` process itself, on a mosquitto of its own that the test restarts."""

from __future__ import annotations

import subprocess
import sys
import time

from mpfleet.broker.local import LocalBroker
from mpfleet.db.store import Store
from mpfleet.fleet.registry import Registry


def mpfleet(*args):
    proc = subprocess.run([sys.executable, "-m", "mpfleet", *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def wait_for(log, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = log.read_text()
        if text in out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"serve never logged {text!r}:\n{log.read_text()}")


def test_serve_logs_cancels_and_what_became_of_its_connection(tmp_path):
    db, keys, log = tmp_path / "m.db", tmp_path / "keys", tmp_path / "serve.log"
    with Store(db) as store:
        Registry(store).add("pump-1")
    mpfleet("keys", "init", "--keys-dir", keys, "--db", db)
    with LocalBroker() as broker:
        proc = subprocess.Popen([sys.executable, "-m", "mpfleet", "serve", "--broker", broker.url, "--db", str(db),
                                 "--keys-dir", str(keys), "--tick", "0.1"], stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT)
        try:
            wait_for(log, "serving")
            mpfleet("job", "create", "reboot", "--targets", "pump-1", "--id", "never-mind", "--db", db,
                    "--keys-dir", keys)
            wait_for(log, "queued job=never-mind")
            mpfleet("job", "cancel", "never-mind", "--db", db, "--keys-dir", keys)
            out = wait_for(log, "job never-mind canceled")
            assert "taking it off the queues of 1 device(s) that had not started it" in out
            broker.restart()  # the broker goes away and comes back on the same port
            out = wait_for(log, "lost the connection to the broker")
            out = wait_for(log, "reconnected to the broker", timeout_s=60)
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(30)
    lost = next(line for line in out.splitlines() if "lost the connection" in line)
    assert "serve (client id mpfleet-serve-" in lost and "reason:" in lost
