"""`mpfleet serve` end to end: real mosquitto, a fleet of virtual devices running the
real firmware, the dispatcher (in-process, or `mpfleet serve` as a process that gets
killed), and an independent MQTT observer that records what the devices were sent
(`jobs`, retained) and what they reported (`jobs/status`).

The module runs one fleet of 50 awake devices ("awake" group) for its whole life,
plus a few devices that are booted only by hand ("offline").
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_harness import FleetEnv

from mpfleet.broker.link import parse_broker_url
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.jobs_model import JobStatus, RolloutOptions
from mpfleet.fleet.serve import Dispatcher, ServeError
from mpfleet.sim.fleet import AWAKE_CONFIG, FleetRunner, provision_sim_fleet

AWAKE = 50
OFFLINE = 4


def _job_id_of(envelope: str) -> tuple[str, int]:
    payload = envelope.split(".")[2]
    job = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return job["id"], job["seq"]


class Observer:
    """Records every device's queue contents and job statuses, independent of serve."""

    def __init__(self, broker):
        self.lock = threading.Lock()
        self.received: dict[str, set[str]] = defaultdict(set)   # job id -> devices whose queue held it
        self.queue: dict[str, list[str]] = {}                    # device -> job ids in its current queue
        self.statuses: list[tuple[str, dict]] = []               # (device, status message)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="observer")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([("mpf/v1/+/jobs", 1), ("mpf/v1/+/jobs/status", 1)])
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client, userdata, msg):
        device, leaf = msg.topic.split("/", 3)[2:]
        with self.lock:
            if leaf == "jobs":
                ids = [_job_id_of(e)[0] for e in json.loads(msg.payload or b"[]")]
                self.queue[device] = ids
                for job in ids:
                    self.received[job].add(device)
            else:
                self.statuses.append((device, json.loads(msg.payload)))

    def of(self, job: str) -> list[tuple[str, dict]]:
        with self.lock:
            return [(d, s) for d, s in self.statuses if s.get("job") == job]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Env(FleetEnv):
    def status(self, job: str) -> JobStatus:
        return self.engine.job_status(job)

    def wait_job_done(self, job: str, timeout: float = 90) -> JobStatus:
        self.wait(lambda: self.status(job).status != "ACTIVE", timeout, f"job {job} to finish")
        return self.status(job)


@pytest.fixture(scope="module")
def env(tmp_path_factory, mosquitto):
    root = tmp_path_factory.mktemp("dispatch")
    e = Env(root, mosquitto)
    e.awake = provision_sim_fleet(e.store, e.ring, root / "awake", AWAKE, e.cfg, prefix="awake",
                                  groups_fn=lambda i, d: ["awake"], with_credentials=False,
                                  config_overrides=AWAKE_CONFIG)
    e.offline = {b.device_id: b for b in provision_sim_fleet(
        e.store, e.ring, root / "offline", OFFLINE, e.cfg, prefix="off", groups_fn=lambda i, d: ["offline"],
        with_credentials=False, config_overrides=AWAKE_CONFIG)}
    e.observer = Observer(mosquitto)
    e.runner = FleetRunner(e.awake).start()
    try:
        e.runner.wait_until(lambda s: s["boots_per_device_min"] >= 1, timeout=120)
        yield e
    finally:
        e.runner.stop()
        e.observer.close()
        e.store.close()


@pytest.fixture
def dispatcher(env):
    d = Dispatcher(env.cfg, env.db, keys_dir=env.keys, tick_s=0.1).start()
    yield d
    d.stop()
    assert d.stats.errors == 0, d.stats.last_error


def _boot_until(board, env, predicate, boots: int = 6) -> None:
    for _ in range(boots):
        time.sleep(0.3)  # let serve publish what the last boot caused
        board.boot()
        time.sleep(0.3)
        if predicate():
            return
    raise AssertionError(f"{board.device_id}: condition not met after {boots} boots")


# ---------------------------------------------------------------- staged rollouts
def test_failing_canary_aborts_and_later_stages_never_receive_the_job(env, dispatcher):
    job = env.engine.create_job("config", {"set": {"sample_interval_s": 0}}, ["awake"], job_id="bad-canary",
                                options=RolloutOptions(stages=[0.1, 0.5, 1.0]))
    s = env.wait_job_done(job, timeout=60)
    assert s.status == "ABORTED" and "stage 0" in s.reason, s.reason
    canary = {row.device for row in s.devices}
    assert len(canary) == s.stage_size == 5
    assert all(row.status == "FAILED" and "sample_interval_s" in json.dumps(row.detail) for row in s.devices)
    time.sleep(3)  # more than one wake of every awake device
    assert env.observer.received[job] == canary  # nobody past the canary ever had it in its queue
    assert {d for d, _ in env.observer.of(job)} == canary
    assert env.status(job).counts["SUCCEEDED"] == 0


def test_good_job_reaches_every_device_stage_by_stage_within_the_rate(env):
    # The dispatcher's clock runs 20x fast so that 60 s rate windows pass in 3 s.
    t0 = time.time()

    def fast():
        return t0 + (time.time() - t0) * 20

    job = env.engine.create_job("config", {"set": {"upload_watermark": 450}}, ["awake"], job_id="good-staged",
                                options=RolloutOptions(stages=[0.1, 0.5, 1.0], rate_per_min=12,
                                                       success_threshold=0.9))
    with Dispatcher(env.cfg, env.db, keys_dir=env.keys, tick_s=0.1, clock=fast):
        s = env.wait_job_done(job, timeout=120)
    assert s.status == "COMPLETED", s.reason
    assert s.counts["SUCCEEDED"] == AWAKE and len(s.devices) == AWAKE
    rows = sorted(s.devices, key=lambda r: r.queued)
    queued = [r.queued for r in rows]
    # the rate: no 60 s window (dispatcher clock) starts more than 12 devices
    assert all(queued[i + 12] - queued[i] >= 60 for i in range(len(queued) - 12))
    # the stages: nobody of a later stage was queued before the earlier stage had finished
    for stage in (1, 2):
        earlier_done = max(r.finished for r in rows if r.stage < stage)
        assert min(r.queued for r in rows if r.stage == stage) >= earlier_done
    assert [len([r for r in rows if r.stage == k]) for k in (0, 1, 2)] == [5, 20, 25]
    # each device ran it once: one seq, attempt 1, per device
    seqs = defaultdict(set)
    for device, status in env.observer.of(job):
        seqs[device].add((status["seq"], status["attempt"]))
    assert len(seqs) == AWAKE and all(len(v) == 1 and next(iter(v))[1] == 1 for v in seqs.values())


# ---------------------------------------------------------------- offline, continuous, cancel, timeout
def test_offline_device_gets_its_job_when_it_wakes(env, dispatcher):
    board = env.offline["off-0001"]
    job = env.engine.create_job("config", {"set": {"upload_watermark": 300}}, ["off-0001"], job_id="offline-1")
    env.wait(lambda: env.observer.queue.get("off-0001") == [job], 10, "the queue to be published")
    assert env.status(job).counts["QUEUED"] == 1
    _boot_until(board, env, lambda: env.status(job).status == "COMPLETED")
    assert env.status(job).counts["SUCCEEDED"] == 1
    env.wait(lambda: env.observer.queue.get("off-0001") == [], 10, "the finished job to leave the queue")


def test_continuous_job_reaches_a_device_tagged_later(env, dispatcher):
    job = env.engine.create_job("config", {"set": {"upload_watermark": 310}}, ["late"], job_id="continuous-late",
                                options=RolloutOptions(continuous=True))
    time.sleep(1)
    s = env.status(job)
    assert s.status == "ACTIVE" and s.target_count == 0
    Registry(env.store).tag("off-0002", add=["late"])
    env.wait(lambda: env.observer.queue.get("off-0002") == [job], 10, "the newly tagged device's queue")
    _boot_until(env.offline["off-0002"], env, lambda: env.status(job).counts["SUCCEEDED"] == 1)
    assert env.status(job).status == "ACTIVE"  # continuous: waits for more devices
    env.engine.cancel(job)


def test_cancel_from_the_cli_empties_the_queues_of_devices_that_did_not_start(env, dispatcher):
    board = env.offline["off-0003"]
    job = env.engine.create_job("config", {"set": {"upload_watermark": 320}}, ["off-0003"], job_id="to-cancel")
    env.wait(lambda: env.observer.queue.get("off-0003") == [job], 10, "the queue to be published")
    out = subprocess.run([sys.executable, "-m", "mpfleet", "job", "cancel", job, "--db", str(env.db),
                          "--keys-dir", str(env.keys)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    env.wait(lambda: env.observer.queue.get("off-0003") == [], 10, "serve to notice the cancel and empty the queue")
    for _ in range(2):
        board.boot()
    time.sleep(0.5)
    assert env.observer.of(job) == []  # never started
    assert env.status(job).counts["CANCELED"] == 1 and env.status(job).status == "CANCELED"


def test_in_progress_past_its_timeout_is_timed_out_and_retried(env, dispatcher):
    board = env.offline["off-0004"]
    job = env.engine.create_job("reboot", {}, ["off-0004"], job_id="slow-reboot",
                                options=RolloutOptions(timeout_s=4, retries=1))
    env.wait(lambda: env.observer.queue.get("off-0004") == [job], 10, "the queue to be published")
    board.boot()  # takes the job, reports IN_PROGRESS, resets; then the device stays off
    env.wait(lambda: any(r.status == "TIMED_OUT" for r in env.status(job).devices), 15, "the timeout")
    env.wait(lambda: len(env.status(job).devices) == 2, 10, "the retry to be queued")
    _boot_until(board, env, lambda: env.status(job).status != "ACTIVE")
    s = env.status(job)
    first, second = sorted(s.devices, key=lambda r: r.attempt)
    assert first.status == "TIMED_OUT" and "later reported SUCCEEDED" in first.note
    assert second.status == "SUCCEEDED" and second.seq > first.seq
    assert s.status == "COMPLETED"


# ---------------------------------------------------------------- restart safety
def _serve_process(env, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mpfleet", "serve", "--broker", env.broker.url,
                             "--db", str(env.db), "--keys-dir", str(env.keys), "--tick", "0.1"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    env.wait(lambda: b"serving" in log.read_bytes() or proc.poll() is not None, 30, "serve to start")
    assert proc.poll() is None, log.read_text()
    return proc


def test_killing_serve_mid_rollout_loses_nothing_and_runs_nothing_twice(env, tmp_path):
    log = tmp_path / "serve.log"
    job = env.engine.create_job("config", {"set": {"upload_watermark": 460}}, ["awake"], job_id="survives-kill",
                                options=RolloutOptions(stages=[0.2, 0.6, 1.0]))
    proc = _serve_process(env, log)
    try:
        env.wait(lambda: env.status(job).stage >= 1, 60, "the first stage to pass")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = env.status(job)
        time.sleep(2)  # devices go on waking and reporting while serve is down
        # the killed serve's database lock went with its process: a new one starts
        proc = _serve_process(env, log)
        s = env.wait_job_done(job, timeout=90)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert killed_at.status == "ACTIVE"
    assert s.status == "COMPLETED", s.reason
    assert s.counts["SUCCEEDED"] == AWAKE and len(s.devices) == AWAKE  # one execution per device
    reported = defaultdict(set)
    for device, status in env.observer.of(job):
        reported[device].add((status["seq"], status["attempt"]))
        assert status["attempt"] == 1
    # every device ran exactly one envelope, and the records name that envelope
    assert {d: {seq for seq, _ in v} for d, v in reported.items()} == {r.device: {r.seq} for r in s.devices}
    final = {(d, st["seq"]) for d, st in env.observer.of(job) if st["status"] == "SUCCEEDED"}
    assert final == {(r.device, r.seq) for r in s.devices}


def test_one_dispatcher_per_database(env, dispatcher):
    with pytest.raises(ServeError, match="another `mpfleet serve`"):
        Dispatcher(env.cfg, env.db, keys_dir=env.keys, client_id="second").start()


# ---------------------------------------------------------------- key rotation (last: it changes the fleet's keys)
def test_key_rotation_rolls_out_the_new_key_then_retires_the_old(env, dispatcher):
    old = env.ring.fleet_key().kid
    out = subprocess.run([sys.executable, "-m", "mpfleet", "keys", "rotate", "--targets", "awake", "--json",
                          "--db", str(env.db), "--keys-dir", str(env.keys)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert made["signed_by"] == old and made["new_kid"] != old
    add = env.wait_job_done(made["job"], timeout=60)
    assert add.type == "keys" and add.params == {"add": {made["new_kid"]: made["public_b64"]}}
    assert add.status == "COMPLETED" and add.counts["SUCCEEDED"] == AWAKE
    assert all(r.seq and r.device.startswith("awake") for r in add.devices)
    assert f"key {old} retired" in add.reason
    assert env.ring.fleet_key().kid == made["new_kid"] and not env.ring.get(old).active
    retire = [j for j in env.engine.jobs() if j.startswith(f"key-retire-{old[:8]}")]
    assert len(retire) == 1
    done = env.wait_job_done(retire[0], timeout=60)
    assert done.type == "keys" and done.params == {"remove": [old]}
    assert done.status == "COMPLETED" and done.counts["SUCCEEDED"] == AWAKE
    # what the devices now run is signed by the new key alone
    after = env.engine.create_job("config", {"set": {"upload_watermark": 470}}, ["awake"], job_id="after-rotation")
    s = env.wait_job_done(after, timeout=60)
    assert s.counts["SUCCEEDED"] == AWAKE
    signers = env.store.db.execute("SELECT DISTINCT kid FROM executions WHERE job = ?", (after,)).fetchall()
    assert signers == [(made["new_kid"],)] and len({row.device for row in s.devices}) == AWAKE


def test_broker_restart_loses_the_retained_queues_and_serve_publishes_them_again(tmp_path):
    from mpfleet.broker.local import LocalBroker

    with LocalBroker() as broker:
        e = Env(tmp_path, broker)
        (board,) = provision_sim_fleet(e.store, e.ring, tmp_path / "fleet", 1, e.cfg, prefix="rb",
                                       with_credentials=False, config_overrides=AWAKE_CONFIG)
        job = e.engine.create_job("config", {"set": {"upload_watermark": 330}}, ["rb-0001"], job_id="across-restart")
        with Dispatcher(e.cfg, e.db, keys_dir=e.keys, tick_s=0.1) as d:
            e.wait(lambda: d.stats.queue_confirmed >= 1, 10, "the queue to be confirmed")
            broker.restart()  # no persistence: the retained queue is gone
            e.wait(lambda: d.stats.reconnects >= 2, 30, "serve to reconnect")
            e.wait(lambda: d.stats.queue_confirmed >= 2, 10, "the queue to be published again")
            _boot_until(board, e, lambda: e.status(job).status == "COMPLETED")
        assert e.status(job).counts["SUCCEEDED"] == 1
        e.store.close()


class RetainedQueue:
    """A plain MQTT client on one device's retained `jobs` topic: the last payload serve left there."""

    def __init__(self, broker, device: str):
        self.lock = threading.Lock()
        self.payloads: list[bytes] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{device}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"mpf/v1/{device}/jobs", 1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client, userdata, msg):
        with self.lock:
            self.payloads.append(msg.payload)

    def last(self) -> bytes | None:
        with self.lock:
            return self.payloads[-1] if self.payloads else None

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def test_serve_publishes_capped_queues_and_the_rest_follow(tmp_path):
    """More than QUEUE_MAX_BYTES of jobs for one device: the retained queue serve publishes
    holds the oldest that fit, in seq order, and the others follow as those finish."""
    from mpfleet.broker.local import LocalBroker
    from mpfleet.fleet.rollout import QUEUE_MAX_BYTES

    with LocalBroker() as broker:
        e = Env(tmp_path, broker)
        Registry(e.store).add("cap-0001")
        jobs = [e.engine.create_job("config", {"set": {"name": f"{i:02d}" + "x" * 1000}}, ["cap-0001"],
                                    job_id=f"fat-{i:02d}") for i in range(10)]  # ~13 KiB of envelopes
        watch = RetainedQueue(broker, "cap-0001")
        status = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cap-0001")
        status.connect(broker.host, broker.port)
        status.loop_start()
        done: list[str] = []
        try:
            with Dispatcher(e.cfg, e.db, keys_dir=e.keys, tick_s=0.1, client_id="serve-cap"):
                while len(done) < len(jobs):
                    e.wait(lambda: watch.last() not in (None, b"[]") and
                           _job_id_of(json.loads(watch.last())[0])[0] not in done, 10, "the next queue")
                    payload = watch.last()
                    assert len(payload) <= QUEUE_MAX_BYTES
                    queue = [_job_id_of(env_) for env_ in json.loads(payload)]
                    assert [seq for _, seq in queue] == sorted(seq for _, seq in queue)
                    assert [job for job, _ in queue] == [j for j in jobs if j not in done][:len(queue)]
                    assert 1 < len(queue) < len(jobs) - len(done) or len(queue) == len(jobs) - len(done)
                    job, seq = queue[0]  # the device finishes the first: the rest move up
                    status.publish("mpf/v1/cap-0001/jobs/status",
                                   json.dumps({"job": job, "seq": seq, "status": "SUCCEEDED", "attempt": 1}), qos=1)
                    done.append(job)
                e.wait(lambda: watch.last() == b"[]", 10, "the queue to empty")
        finally:
            status.loop_stop()
            status.disconnect()
            watch.close()
        assert all(e.status(j).counts["SUCCEEDED"] == 1 for j in jobs)
        e.store.close()


def _self_signed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (cryptography), as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mpfleet test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(2)
           .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .sign(ca_key, hashes.SHA256()))
    paths = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_serve_over_tls_with_the_ca_from_the_broker_url(tmp_path):
    from mpfleet.broker.local import LocalBroker, free_port
    from mpfleet.broker.link import MqttLinkError

    ca, cert, key = _self_signed(tmp_path)
    tls_port = free_port()
    tls = [f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    with LocalBroker(extra_config=tls) as broker:
        e = Env(tmp_path, broker)  # the device uses the plain listener, serve the TLS one
        (board,) = provision_sim_fleet(e.store, e.ring, tmp_path / "fleet", 1, e.cfg, prefix="tls",
                                       with_credentials=False, config_overrides=AWAKE_CONFIG)
        job = e.engine.create_job("config", {"set": {"upload_watermark": 340}}, ["tls-0001"], job_id="over-tls")
        secure = parse_broker_url(f"mqtts://127.0.0.1:{tls_port}?ca={ca}")
        with pytest.raises(MqttLinkError):  # without the CA the certificate is not trusted
            Dispatcher(secure.__class__(secure.host, secure.port, tls=True), e.db, keys_dir=e.keys).start()
        with Dispatcher(secure, e.db, keys_dir=e.keys, tick_s=0.1):
            _boot_until(board, e, lambda: e.status(job).status == "COMPLETED")
        assert e.status(job).counts["SUCCEEDED"] == 1
        e.store.close()
