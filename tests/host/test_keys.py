"""Signing keys: key files, the persistent per-key seq, rotation and retirement, the CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from mpfleet.fleet.keys import KeyRing, KeyringError
from mpfleet.protocol.signing import SigningError, b64url, b64url_decode, open_envelope
from mpfleet.db.store import Store


@pytest.fixture
def ring(tmp_path):
    with Store(tmp_path / "db.sqlite") as store:
        yield KeyRing(store, tmp_path / "keys")


def _job(n: int = 0) -> dict:
    return {"id": f"job-{n}", "type": "reboot", "targets": ["*"], "params": {}}


def test_key_file_and_dir_modes(ring):
    info = ring.init()
    assert stat.S_IMODE(ring.keys_dir.stat().st_mode) == 0o700
    path = ring.keys_dir / f"{info.kid}.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ring.load(info.kid).public_b64 == info.public_b64
    assert ring.trusted_keys() == {info.kid: info.public_b64}


def test_group_readable_key_refused(ring):
    info = ring.init()
    path = ring.keys_dir / f"{info.kid}.key"
    os.chmod(path, 0o640)
    with pytest.raises(SigningError, match=f"chmod 600 {path}"):
        ring.sign(_job())
    os.chmod(path, 0o600)
    os.chmod(ring.keys_dir, 0o750)
    with pytest.raises(KeyringError, match="chmod 700"):
        ring.sign(_job())
    os.chmod(ring.keys_dir, 0o700)
    payload, _ = ring.sign(_job())
    assert payload["seq"] == 1  # the refused attempts took no seq


def test_init_refuses_second_key_unless_forced(ring):
    first = ring.init()
    with pytest.raises(KeyringError, match="active signing key exists"):
        ring.init()
    second = ring.init(force=True)
    assert ring.active().kid == second.kid != first.kid


def test_sign_assigns_seq_and_iat(ring):
    info = ring.init()
    payload, envelope = ring.sign(_job())
    assert payload["seq"] == 1 and isinstance(payload["iat"], int)
    assert open_envelope(envelope, {info.kid: b64url_decode(info.public_b64)}) == payload
    with pytest.raises(KeyringError, match="seq"):
        ring.sign({**_job(), "seq": 5})
    with pytest.raises(KeyringError, match="job type"):
        ring.sign({**_job(), "type": "format-disk"})


def test_seq_survives_reopen(tmp_path):
    db, keys_dir = tmp_path / "db.sqlite", tmp_path / "keys"
    with Store(db) as store:
        ring = KeyRing(store, keys_dir)
        ring.init()
        seqs = [ring.sign(_job(i))[0]["seq"] for i in range(5)]
    with Store(db) as a, Store(db) as b:  # two rings on the same database, interleaved
        ra, rb = KeyRing(a, keys_dir), KeyRing(b, keys_dir)
        for i in range(5):
            seqs.append(ra.sign(_job(i))[0]["seq"])
            seqs.append(rb.sign(_job(i))[0]["seq"])
    assert seqs == list(range(1, 16))


SIGN_MANY = """
import json, sys
from mpfleet.fleet.keys import KeyRing
from mpfleet.db.store import Store
db, keys_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Store(db) as store:
    ring = KeyRing(store, keys_dir)
    seqs = [ring.sign({"id": "j", "type": "diag", "params": {}, "targets": ["*"]})[0]["seq"] for _ in range(count)]
print(json.dumps(seqs))
"""


def test_seq_unique_across_processes(tmp_path):
    db, keys_dir = str(tmp_path / "db.sqlite"), str(tmp_path / "keys")
    with Store(db) as store:
        KeyRing(store, keys_dir).init()
    procs = [subprocess.Popen([sys.executable, "-c", SIGN_MANY, db, keys_dir, "200"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results.append(json.loads(out))
    for seqs in results:
        assert seqs == sorted(seqs) and len(set(seqs)) == 200  # strictly increasing per process
    assert sorted(results[0] + results[1]) == list(range(1, 401))  # all distinct, none skipped
    with Store(db) as store:
        assert KeyRing(store, keys_dir).active().last_seq == 400


def test_rotate_signed_by_old_key(ring):
    old = ring.init()
    ring.sign(_job())
    job = ring.rotate()
    assert job.signed_by == old.kid and job.kid != old.kid
    payload = open_envelope(job.envelope, {old.kid: b64url_decode(old.public_b64)})
    assert payload == job.payload
    assert payload["type"] == "keys" and payload["targets"] == ["*"]
    assert payload["params"] == {"add": {job.kid: job.public_b64}}
    assert payload["seq"] == 2  # the old key's seq carries on
    assert ring.active().kid == job.kid  # the new key signs from now on
    assert ring.load(job.kid).public_b64 == job.public_b64
    with pytest.raises(SigningError, match="unknown key"):
        open_envelope(job.envelope, {job.kid: b64url_decode(job.public_b64)})


def test_retire(ring):
    old = ring.init()
    with pytest.raises(KeyringError, match="only active key"):
        ring.retire(old.kid)
    new = ring.rotate()
    job = ring.retire(old.kid)
    assert job.signed_by == new.kid
    payload = open_envelope(job.envelope, {new.kid: b64url_decode(new.public_b64)})
    assert payload["type"] == "keys" and payload["params"] == {"remove": [old.kid]} and payload["seq"] == 1
    state = {k.kid: k for k in ring.list()}
    assert not state[old.kid].active and state[old.kid].retired is not None
    assert state[new.kid].active
    with pytest.raises(KeyringError, match="already retired"):
        ring.retire(old.kid)
    with pytest.raises(KeyringError, match="only active key"):
        ring.retire(new.kid)
    with pytest.raises(KeyringError, match="retired"):
        ring.sign(_job(), kid=old.kid)


# ------------------------------------------------------------ CLI
def _mpfleet(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "mpfleet", "keys", *args, "--keys-dir", str(tmp_path / "keys"),
                           "--db", str(tmp_path / "db.sqlite")], capture_output=True, text=True, timeout=60)


def test_cli_keys(tmp_path):
    done = _mpfleet(tmp_path, "init", "--json")
    assert done.returncode == 0, done.stderr
    first = json.loads(done.stdout)
    assert first["trusted_keys"] == {first["kid"]: first["public_b64"]}

    again = _mpfleet(tmp_path, "init")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert again.stderr.startswith("mpfleet: an active signing key exists")

    rot = _mpfleet(tmp_path, "rotate", "--envelope-only", "--json")
    assert rot.returncode == 0, rot.stderr
    out = json.loads(rot.stdout)
    assert {"new_kid", "envelope", "payload"} <= set(out)
    payload = open_envelope(out["envelope"], {first["kid"]: b64url_decode(first["public_b64"])})
    assert payload["type"] == "keys" and payload["params"] == {"add": {out["new_kid"]: out["public_b64"]}}

    listed = json.loads(_mpfleet(tmp_path, "list", "--json").stdout)
    assert [k["kid"] for k in listed] == [first["kid"], out["new_kid"]]
    assert [k["last_seq"] for k in listed] == [1, 0]
    table = _mpfleet(tmp_path, "list")
    assert table.returncode == 0 and first["kid"] in table.stdout and "signing" in table.stdout

    ret = _mpfleet(tmp_path, "retire", first["kid"])
    assert ret.returncode == 0, ret.stderr
    assert ret.stdout.strip().startswith(f"mpf1.{out['new_kid']}.")
    last = _mpfleet(tmp_path, "retire", out["new_kid"])
    assert last.returncode == 1 and last.stderr.startswith("mpfleet: ") and "only active key" in last.stderr

    os.chmod(tmp_path / "keys" / f"{out['new_kid']}.key", 0o644)
    bad = _mpfleet(tmp_path, "rotate")
    assert bad.returncode == 1 and "chmod 600" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------ what a keys / config job may say
def test_keys_params_checked_as_the_device_checks_them():
    from mpfleet.fleet.keys import MAX_TRUSTED_KEYS, check_keys_params
    from mpfleet.protocol.signing import SigningKey

    a, b = SigningKey.generate(), SigningKey.generate()
    check_keys_params({"add": {a.kid: a.public_b64}}, [b.kid])
    check_keys_params({"remove": [b.kid]}, [a.kid, b.kid])
    check_keys_params({"add": {a.kid: a.public_b64}, "remove": [b.kid]}, [b.kid])
    short = b64url_decode(a.public_b64)[:31]
    for params, word in [
        ({}, "add or remove at least one"),
        ({"add": {}, "remove": []}, "add or remove at least one"),
        ({"add": {b.kid: a.public_b64}}, f"{b.kid} is not the id of its key"),
        ({"add": {a.kid: b64url(short)}}, "32-byte"),
        ({"add": {a.kid: "!!not base64!!"}}, "32-byte"),
        ({"add": {a.kid: 5}}, "32-byte"),
        ({"add": {"A" * 16: a.public_b64}}, "not a key id"),
        ({"add": [a.kid]}, "add must be"),
        ({"remove": b.kid}, "remove a list"),
        ({"remove": ["nope"]}, "not a key id"),
        ({"remove": [b.kid]}, "remove every trusted key"),
        ({"add": {a.kid: a.public_b64}, "remove": [a.kid]}, "both added and removed"),
        ({"add": {a.kid: a.public_b64}, "pad": 1}, "add and remove only"),
    ]:
        with pytest.raises(KeyringError, match=word):
            check_keys_params(params, [b.kid])
    many = [SigningKey.generate().kid for _ in range(MAX_TRUSTED_KEYS)]
    with pytest.raises(KeyringError, match=f"at most {MAX_TRUSTED_KEYS}"):
        check_keys_params({"add": {a.kid: a.public_b64}}, many)


def test_config_params_cannot_touch_trusted_keys_or_exec_allowed():
    from mpfleet.fleet.keys import check_config_params

    check_config_params({"set": {"wifi.ssid": "x", "limits.job_max_bytes": 2048}, "unset": ["sensors"]})
    for params, word in [
        ({"set": {"trusted_keys.0123456789abcdef": "AAAA"}}, "keys rotate"),
        ({"set": {"trusted_keys": {}}}, "keys rotate"),
        ({"unset": ["trusted_keys"]}, "keys rotate"),
        ({"unset": ["trusted_keys.0123456789abcdef"]}, "keys rotate"),
        ({"set": {"exec_allowed": True}}, "USB"),
        ({"unset": ["exec_allowed"]}, "USB"),
        ({"unset": [5]}, "not a dotted config key"),
        ({"set": {"a..b": 1}}, "not a dotted config key"),
        ({"set": [1]}, "config params need"),
    ]:
        with pytest.raises(KeyringError, match=word):
            check_config_params(params)


def test_rotate_refuses_an_envelope_the_device_would_not_take_before_making_a_key(ring):
    ring.init()
    with pytest.raises(KeyringError, match=r"would be \d+ bytes, over the device limit of 4096"):
        ring.rotate(targets=[f"device-{i:05d}" for i in range(400)])
    assert len(ring.list()) == 1  # no key made for nothing


def test_a_new_keys_seqs_start_above_every_other_keys(tmp_path):
    """A device sorts its queue by seq across keys: after a rotation, a job signed by the
    new key must not sort before an older job still queued under the old one."""
    from mpfleet.db.store import Store

    with Store(tmp_path / "seq.db") as store:
        store.add_key("old", "AAAA")
        seqs = [store.next_seq("old") for _ in range(5)]
        store.add_key("new", "BBBB")
        assert store.next_seq("new") > max(seqs)
        assert store.next_seq("old") == 6
