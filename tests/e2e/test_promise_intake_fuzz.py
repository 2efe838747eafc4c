"""The job fuzzer at volume: the same generated queues as tests/e2e/test_promise_fuzz.py,
fed to the real agent's job path many queues per interpreter.

Each batch is one MicroPython process at the 128 KiB heap on a virtual board
(LittleFS on the emulated flash, the real /jobs.json), running the agent's USB
entry point (agent.usb.run_jobs: the same intake, verifier, state and handlers
as a connected wake, statuses printed instead of published) once per queue.
Without Wi-Fi, MQTT and a boot per queue it runs thousands of queues in
minutes, which is how `make stress` reaches 10,000; the wake-level fuzzer
covers what this leaves out (transport, samples, reachability, wear).

Checked after every queue with the oracle of the wake-level fuzzer and the
shared invariants: no exception escaped the agent, nothing unsigned or
untargeted ran, each (kid, seq) at most once, every valid fresh job ended
exactly once in seq order, security settings unchanged.

Reproducible like the wake-level fuzzer: MPFLEET_FUZZ_SEED, MPFLEET_INTAKE_QUEUES;
MPFLEET_INTAKE_BATCH sets the queues per interpreter.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from agent_harness import make_device
from conftest import stress_count
from invariants import check_runs, check_statuses
from test_promise_fuzz import Device, Fuzz

from mpfleet.protocol.signing import SigningKey

SEED = int(os.environ.get("MPFLEET_FUZZ_SEED", "20261201"))
QUEUES = int(os.environ.get("MPFLEET_INTAKE_QUEUES", "0")) or stress_count(quick=60, full=10000)
# Queues per interpreter: one, as a device runs one queue per boot. Several
# in one interpreter fragment the harness's heap until an allocation of 2-3 KB
# fails, which no device sees (at 50 a batch about 1 batch in 8 after 30-45
# queues; at 5 still a few in 6,890 queues, at the fourth queue of a batch).
BATCH = int(os.environ.get("MPFLEET_INTAKE_BATCH", "1"))
QUEUES_PER_DEVICE = 500
# Reproduce a late violation without the queues before it: MPFLEET_FUZZ_FIRST starts at
# the first queue of the device it falls on.
FIRST = int(os.environ.get("MPFLEET_FUZZ_FIRST", "0"))

# The queue arrives in one buffer allocated once, as the device's MQTT client
# hands a message over (its packet limit is 16 KiB): a fresh 12 KiB string per
# queue would fragment the harness's heap, not the agent's.
RUNNER = """
import gc
from agent import usb
buf = bytearray(16384)
for i in range({n}):
    with open('/.host/q%d' % i, 'rb') as f:
        q = memoryview(buf)[:f.readinto(buf)]
    print('MPF-QUEUE', i)
    try:
        usb.run_jobs(q)
    except Exception as e:
        import sys
        print('MPF-CRASH', i, type(e).__name__, e)
        sys.print_exception(e)
    q = None
    gc.collect()
print('MPF-DONE')
"""


def _split(output: str, n: int) -> tuple[list[list[dict]], list[str]]:
    """Statuses per queue, and the crash lines."""
    per: list[list[dict]] = [[] for _ in range(n)]
    crashes = []
    notes: dict[int, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("MPF-QUEUE "):
            current = int(line.split()[1])
        elif line.startswith("MPF-STATUS ") and current is not None:
            per[current].append(json.loads(line[len("MPF-STATUS "):]))
        elif line.startswith("MPF-CRASH") or "Traceback" in line or "MemoryError" in line:
            crashes.append(line)
        elif line.startswith("jobs: ") and current is not None:
            notes.setdefault(current, []).append(line)
    if "MPF-DONE" not in output:
        crashes.append("the interpreter did not reach the end of the batch: " + output[-500:])
    if os.environ.get("MPFLEET_FUZZ_DEBUG"):
        for i, lines in sorted(notes.items()):
            print("queue", i, lines)
    return per, crashes


class Intake(Fuzz):
    """The wake-level fuzzer's model and oracle, without the wakes."""

    def __init__(self, root, seed):
        self.root = root
        self.seed = seed
        self.devices = 0
        self.envelopes = 0

    def device(self, index: int) -> Device:
        keys = [SigningKey.generate() for _ in range(3)]
        trusted = {k.kid: k.public_b64 for k in keys}
        device_id = f"in-{self.seed}-{index}"
        vb = make_device(self.root / device_id, 1, device_id=device_id, trusted_keys=trusted, exec_allowed=True,
                         groups=["pumps"])
        self.devices += 1
        return Device(vb=vb, run=None, device_id=device_id, keys=keys, trusted=trusted)

    def batch(self, dev: Device, first: int, n: int) -> list[str]:
        plans = []
        floor_before = []
        inputs = {}
        for k in range(n):
            i = first + k
            floor = dict(dev.floor)
            _, envs, text, opaque, must = self.plan(i, dev)
            plans.append((i, envs, must, opaque))
            floor_before.append(floor)
            inputs[f"q{k}"] = text.encode()
        output, _ = dev.vb.exec_script(RUNNER.format(n=n), inputs)
        if os.environ.get("MPFLEET_FUZZ_DEBUG") and "MPF-CRASH" in output:
            at = output.index("MPF-CRASH")
            print(output[at:at + 1500])
        per, crashes = _split(output, n)
        out = [f"seed {self.seed}, batch from queue {first}: crash: {c}" for c in crashes]
        trace = dev.vb.fs_get("/trace.txt")
        config_raw = dev.vb.fs_get("/config.json")
        security = dev.vb.fs_get("/security.json")
        cfg = json.loads(config_raw or b"{}")
        cfg.update(json.loads(security or b"{}"))
        config_raw = json.dumps(cfg).encode()
        every = []
        history = list(getattr(dev, "statuses", []))  # what this device reported in earlier batches
        for k, (i, envs, must, opaque) in enumerate(plans):
            every += per[k]
            where = f"seed {self.seed}, queue {i} (MPFLEET_FUZZ_SEED={self.seed}), device {dev.device_id}"
            found = self.oracle(dev, envs, must, per[k], history + every, config_raw, opaque)
            if k < len(plans) - 1:
                # The files are read once, after the batch: what they must hold is
                # judged after its last queue.
                found = [v for v in found if not v.startswith(("config: ", "security: exec_allowed",
                                                              "security: trusted_keys changed"))]
            out += [f"{where}: {v}" for v in found]
            if found and os.environ.get("MPFLEET_FUZZ_DEBUG"):
                print(where, [(e.job_id, e.kid, e.seq, e.expect, e.what) for e in envs], floor_before[k])
                print([(s.get("job"), s.get("status"), str(s.get("detail"))[:90]) for s in per[k]])
            self.learn(dev, envs, every)
        out += [f"seed {self.seed}, batch from queue {first}: {v}" for v in check_runs(trace, dev.runnable)]
        out += [f"seed {self.seed}, batch from queue {first}: {v}" for v in check_statuses(every, dev.signed)]
        dev.statuses = getattr(dev, "statuses", []) + every
        return out


def test_generated_queues_through_the_agents_job_path(tmp_path):
    fuzz = Intake(tmp_path, SEED)
    started = time.monotonic()
    failures: list[str] = []
    dev = None
    done = FIRST - FIRST % QUEUES_PER_DEVICE  # a device's queues depend on its earlier ones: from its first
    while done < QUEUES:
        if done % QUEUES_PER_DEVICE == 0:
            dev = fuzz.device(done // QUEUES_PER_DEVICE)
        n = min(BATCH, QUEUES - done, QUEUES_PER_DEVICE - done % QUEUES_PER_DEVICE)
        failures += fuzz.batch(dev, done, n)
        done += n
        if len(failures) > 40:
            break
    summary = {"seed": SEED, "queues": done, "devices": fuzz.devices, "envelopes": fuzz.envelopes,
               "seconds": round(time.monotonic() - started, 1), "violations": len(failures)}
    print("intake fuzz", json.dumps(summary))
    if os.environ.get("MPFLEET_SWEEP_LOG"):
        with open(os.environ["MPFLEET_SWEEP_LOG"], "a") as f:
            f.write(json.dumps({"intake_fuzz": summary}) + "\n")
    assert not failures, f"{len(failures)} violations (seed {SEED}):\n" + "\n".join(failures[:30])


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
