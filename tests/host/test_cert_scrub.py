"""A `cert` job's private key leaves the host's database once the job is done with it
(db/schema.py, migration 4): every text and blob of every table is searched for the
key, as the identity's base64, as raw DER and as the DER's base64, also inside the
base64url parts of a signed envelope.

Library level: a real SQLite store, the fleet CA in a temporary directory, the job made
as `mpfleet devices cert renew` makes it, statuses given to the engine as serve gives
them; no MQTT.
"""

from __future__ import annotations

import base64
import json

import pytest
from test_cli_errors import mpfleet

from mpfleet.db.backend import dialect
from mpfleet.db.store import Store
from mpfleet.fleet import history
from mpfleet.fleet.certs import FleetCA
from mpfleet.fleet.jobs_model import SCRUBBED_ENVELOPE, RolloutError, RolloutOptions, is_scrubbed
from mpfleet.fleet.keys import KeyRing
from mpfleet.fleet.registry import Registry
from mpfleet.fleet.rollout import RolloutEngine, envelope_digest
from mpfleet.protocol.signing import b64url_decode

T0 = 1_800_000_000.0
DEVICE = "pump-7"


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Fleet:
    def __init__(self, tmp_path):
        self.path = tmp_path / "fleet.db"
        self.keys = tmp_path / "keys"
        self.store = Store(self.path)
        self.ring = KeyRing(self.store, self.keys)
        self.ring.init()
        self.registry = Registry(self.store)
        self.registry.add(DEVICE, board="virtual")
        self.registry.add("pump-8", board="virtual")
        self.ca = FleetCA(self.keys, self.store)
        self.ca.init()
        self.clock = Clock()
        self.engine = RolloutEngine(self.store, self.ring, self.registry, clock=self.clock)
        self.issued = None

    def renew(self, options: RolloutOptions | None = None) -> str:
        """A renewal as `mpfleet devices cert renew` makes it (cli/ca.py, cert_renew)."""
        self.issued = self.ca.issue_device(DEVICE)
        identity = base64.b64encode(self.issued.identity()).decode()
        return self.engine.create_job("cert", {"identity": identity, "trial_wakes": 2}, {"ids": [DEVICE]},
                                      options=options)

    def secrets(self) -> dict[str, bytes]:
        key = self.issued.key_der
        return {"identity base64": base64.b64encode(self.issued.identity()),
                "key DER": key, "key base64": base64.b64encode(key),
                "key base64url": base64.urlsafe_b64encode(key).rstrip(b"=")}

    def leaks(self) -> list[str]:
        """Every table.column (of every table SQLite lists) one of whose values holds the key
        in one of its forms."""
        return leaks(self.store.db, self.secrets())

    def execution(self, attempt: int = 1) -> dict:
        e = [r for r in self.engine.job_status(self.job).devices if r.device == DEVICE and r.attempt == attempt]
        assert e, f"no attempt {attempt}"
        return {"seq": e[0].seq, "status": e[0].status}

    def report(self, status: str, attempt: int = 1, detail=None, job: str | None = None) -> bool:
        e = self.execution(attempt)
        return self.engine.on_status(DEVICE, {"job": job or self.job, "seq": e["seq"], "status": status,
                                              "detail": detail, "attempt": 1, "progress": None, "ts": 0})


def _forms(value) -> list[bytes]:
    """The bytes of a cell, and of each base64url part of it (a signed envelope's
    payload is base64url of JSON)."""
    if value is None or isinstance(value, (int, float)):
        return []
    raw = value if isinstance(value, bytes) else value.encode()
    out = [raw]
    text = raw.decode("latin-1")
    for part in text.replace('"', ".").replace(",", ".").replace("[", ".").replace("]", ".").split("."):
        if len(part) >= 16:
            try:
                out.append(b64url_decode(part))
            except (ValueError, TypeError):
                pass
    return out


def _tables_and_columns(db) -> dict[str, list[str]]:
    """Every table of the database and its columns, in either dialect."""
    if dialect(db) == "sqlite":
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1] for r in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}
    out: dict[str, list[str]] = {}
    for table, column in db.execute("SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"):
        out.setdefault(table, []).append(column)
    return out


def leaks(db, secrets: dict[str, bytes]) -> list[str]:
    found = []
    tables = _tables_and_columns(db)
    assert "jobs" in tables and "executions" in tables and "certificates" in tables
    for table, columns in tables.items():
        for column in columns:
            for (value,) in db.execute(f'SELECT "{column}" FROM "{table}"'):
                for form in _forms(value):
                    if any(secret in form for secret in secrets.values()):
                        found.append(f"{table}.{column}")
    return sorted(set(found))


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.store.close()


def assert_scrubbed(fleet: Fleet) -> None:
    assert fleet.leaks() == []
    job = fleet.engine.job_status(fleet.job)
    assert is_scrubbed(job.params) and job.params["identity"] is None and job.params["trial_wakes"] == 2
    envelopes = [r[0] for r in fleet.store.db.execute("SELECT envelope FROM executions WHERE job = ?",
                                                      (fleet.job,))]
    assert envelopes and set(envelopes) == {SCRUBBED_ENVELOPE}
    # what serve publishes retained (a cancel job at most: it names the job, not the key)
    queue = fleet.engine.device_queue(DEVICE)
    assert not [name for envelope in queue for form in _forms(envelope)
                for name, secret in fleet.secrets().items() if secret in form]
    assert all(json.loads(b64url_decode(e.split(".")[2]))["type"] == "cancel" for e in queue)
    # the host keeps the certificate, never the key
    assert fleet.issued.cert_der in [c["der"] for c in fleet.store.certificates(DEVICE)]


def started(fleet: Fleet, options: RolloutOptions | None = None, in_progress: bool = True) -> None:
    fleet.job = fleet.renew(options)
    assert fleet.leaks() == ["jobs.params_json"]
    fleet.engine.tick()
    queued = fleet.leaks()
    assert "executions.envelope" in queued and "jobs.params_json" in queued
    assert fleet.engine.device_queue(DEVICE)  # the envelope the device takes carries the key
    if in_progress:
        assert fleet.report("IN_PROGRESS")
        assert fleet.execution()["status"] == "IN_PROGRESS"
        assert fleet.leaks() == queued  # a pending execution keeps its key: it may be sent again


@pytest.mark.parametrize("final", ["SUCCEEDED", "FAILED", "REJECTED"])
def test_a_device_s_final_status_scrubs_the_key_at_once(fleet, final):
    started(fleet)
    assert fleet.report(final, detail={"reason": "broker refused it"} if final != "SUCCEEDED" else None)
    assert_scrubbed(fleet)  # in the status's own statement, before any tick
    fleet.engine.tick()
    status = fleet.engine.job_status(fleet.job)
    assert status.status == "COMPLETED" and status.devices[0].status == final
    assert_scrubbed(fleet)


def test_a_final_status_straight_from_queued_scrubs_too(fleet):
    started(fleet, in_progress=False)
    assert fleet.report("SUCCEEDED")
    assert_scrubbed(fleet)


def test_a_timeout_scrubs_the_key(fleet):
    started(fleet, RolloutOptions(timeout_s=60))
    fleet.clock.t += 120
    changes = fleet.engine.tick()
    assert (fleet.job, DEVICE) in changes.timed_out
    assert fleet.execution()["status"] == "TIMED_OUT"
    assert_scrubbed(fleet)


@pytest.mark.parametrize("in_progress", [False, True])
def test_a_cancel_scrubs_the_key_and_the_device_s_later_word_still_lands(fleet, in_progress):
    started(fleet, in_progress=in_progress)
    fleet.engine.cancel(fleet.job, "operator changed their mind")
    assert fleet.execution()["status"] == "CANCELED"
    assert_scrubbed(fleet)
    if in_progress:
        assert fleet.engine.cancel_envelopes(fleet.job)  # the cancel job names the job, not the key
        assert fleet.report("SUCCEEDED")  # past its point of no return: recorded without the envelope
        assert fleet.execution()["status"] == "SUCCEEDED"
    assert_scrubbed(fleet)


def test_a_job_canceled_before_it_was_sent_is_scrubbed(fleet):
    fleet.job = fleet.renew()
    fleet.engine.cancel(fleet.job)
    assert fleet.leaks() == []
    assert is_scrubbed(fleet.engine.job_status(fleet.job).params)


def test_a_removed_execution_scrubs_the_key(fleet):
    started(fleet, in_progress=False)
    fleet.engine.remove(fleet.job, [DEVICE])
    assert fleet.execution()["status"] == "REMOVED"
    assert_scrubbed(fleet)
    fleet.engine.tick()
    assert fleet.engine.job_status(fleet.job).status == "COMPLETED"


def test_end_at_passing_scrubs_the_key(fleet):
    started(fleet, RolloutOptions(end_at=T0 + 3600), in_progress=False)
    fleet.clock.t += 7200
    fleet.engine.tick()
    assert fleet.execution()["status"] == "REMOVED"
    assert_scrubbed(fleet)


def test_an_envelope_too_large_for_the_device_is_never_sent_and_scrubbed(fleet):
    fleet.job = fleet.renew()
    fleet.store.touch_device(DEVICE, state={"limits": {"job_max_bytes": 256}})  # reported after create_job
    fleet.engine.tick()
    assert fleet.execution()["status"] == "REJECTED"
    assert_scrubbed(fleet)


def test_the_key_stays_while_a_retry_may_still_be_signed(fleet):
    started(fleet, RolloutOptions(retries=1))
    assert fleet.report("FAILED")
    assert fleet.execution(2)["status"] == "QUEUED"  # the retry: signed from the params, with the key
    assert "jobs.params_json" in fleet.leaks()
    assert fleet.report("IN_PROGRESS", attempt=2)
    assert fleet.report("FAILED", attempt=2)  # the budget is spent: nothing more is signed
    assert_scrubbed(fleet)


def test_an_operator_retry_keeps_the_key_until_its_attempt_ends(fleet):
    started(fleet, RolloutOptions(queued_timeout_s=60), in_progress=False)
    fleet.clock.t += 600  # QUEUED too long: stuck, so the operator may replace it
    assert fleet.engine.stuck(fleet.job)
    fleet.engine.retry(fleet.job, [DEVICE])
    assert fleet.execution(1)["status"] == "REMOVED" and fleet.execution(2)["status"] == "QUEUED"
    assert fleet.leaks() == ["executions.envelope", "jobs.params_json"]  # the new attempt carries it
    assert fleet.report("SUCCEEDED", attempt=2)
    assert_scrubbed(fleet)


def test_hostile_orderings_change_nothing_and_never_need_the_key(fleet):
    started(fleet)
    sent = envelope_digest(fleet.engine.device_queue(DEVICE)[0])
    assert fleet.report("SUCCEEDED")
    assert_scrubbed(fleet)
    seq = fleet.execution()["seq"]
    # the device reports its final status again (it still saw the job in its retained queue)
    assert not fleet.report("SUCCEEDED")
    assert not fleet.report("FAILED")
    assert not fleet.report("IN_PROGRESS")
    # a status for a job the host does not know, and one naming the scrubbed envelope by digest
    assert not fleet.engine.on_status(DEVICE, {"job": "j-unknown", "seq": seq, "status": "SUCCEEDED"})
    # a refusal naming an envelope by its digest: the scrubbed one's is not known any more, so
    # it is kept as unattributed (for the operator) and the execution stays as it ended
    for digest in (sent, envelope_digest(SCRUBBED_ENVELOPE)):
        assert fleet.engine.on_status(DEVICE, {"job": f"envelope:{digest}", "status": "REJECTED",
                                               "detail": "too large"})
    assert fleet.execution()["status"] == "SUCCEEDED"
    # cancel after final: the job is still ACTIVE until the tick, so the cancel is taken
    fleet.engine.cancel(fleet.job)
    assert fleet.engine.job_status(fleet.job).status == "CANCELED"
    with pytest.raises(RolloutError, match="only an ACTIVE job"):
        fleet.engine.cancel(fleet.job)
    assert fleet.execution()["status"] == "SUCCEEDED"
    assert_scrubbed(fleet)


def test_nothing_is_signed_again_from_a_scrubbed_job(fleet):
    started(fleet)
    assert fleet.report("FAILED")
    assert_scrubbed(fleet)
    with pytest.raises(RolloutError, match="renew the certificate"):
        fleet.engine.retry(fleet.job, [DEVICE])
    with pytest.raises(RolloutError, match="renew the certificate"):
        fleet.engine.usb_envelope(fleet.job, DEVICE)
    fleet.engine.tick()
    with pytest.raises(RolloutError, match="renew the certificate"):
        fleet.engine.retry(fleet.job)  # COMPLETED: a retry would reopen it
    assert fleet.engine.job_status(fleet.job).status == "COMPLETED"
    assert [r.attempt for r in fleet.engine.job_status(fleet.job).devices] == [1]
    assert_scrubbed(fleet)


def test_other_jobs_keep_their_params_and_envelopes(fleet):
    other = fleet.engine.create_job("diag", {}, {"ids": [DEVICE]})
    started(fleet)
    fleet.engine.tick()
    diag = [r for r in fleet.engine.job_status(other).devices][0]
    assert fleet.engine.on_status(DEVICE, {"job": other, "seq": diag.seq, "status": "SUCCEEDED"})
    assert fleet.report("SUCCEEDED")
    envelopes = dict(fleet.store.db.execute("SELECT job, envelope FROM executions"))
    assert envelopes[fleet.job] == SCRUBBED_ENVELOPE and envelopes[other].startswith("mpf1.")


def test_a_scrubbed_job_reads_everywhere(fleet, tmp_path):
    started(fleet)
    assert fleet.report("SUCCEEDED")
    fleet.engine.tick()
    assert_scrubbed(fleet)
    # the library's views
    assert json.dumps(fleet.engine.job_status(fleet.job).to_json())
    assert fleet.job in fleet.engine.jobs()
    assert [r.status for r in history.executions(fleet.store, DEVICE)] == ["SUCCEEDED"]
    # and the commands
    common = ("--db", fleet.path)
    keys = ("--keys-dir", fleet.keys)
    shown = mpfleet(tmp_path, "job", "status", fleet.job, "--json", *common, *keys)
    assert shown.returncode == 0, shown.stderr
    params = json.loads(shown.stdout)["params"]
    assert params["identity"] is None and params["scrubbed"]
    db_check = (("db", "check"),) if fleet.store.dialect == "sqlite" else ()  # PostgreSQL checks its own
    for args in (("job", "status", fleet.job), ("job", "list"), ("job", "list", "--json"),
                 ("devices", "show", DEVICE), *db_check):
        proc = mpfleet(tmp_path, *args, *common, *((*keys,) if args[0] == "job" else ()))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stdout, proc.stderr)
    assert fleet.leaks() == []


@pytest.mark.sqlite_only("makes a file of schema version 3 by hand; no PostgreSQL database predates version 4")
def test_a_file_from_before_the_scrub_is_scrubbed_when_it_is_opened(fleet):
    started(fleet)
    fleet.store.db.execute("DROP TRIGGER cert_scrub_on_execution_end")  # as an older mpfleet left it
    fleet.store.db.execute("ALTER TABLE dispatchers DROP COLUMN leads")  # migration 5's
    fleet.store.db.execute("PRAGMA user_version = 3")
    assert fleet.report("SUCCEEDED")
    assert fleet.leaks()
    fleet.store.close()
    fleet.store = Store(fleet.path)  # migration 4
    fleet.engine = RolloutEngine(fleet.store, KeyRing(fleet.store, fleet.keys), Registry(fleet.store),
                                 clock=fleet.clock)
    assert_scrubbed(fleet)
