"""Host-side signing keys and envelopes."""

import json
import os
import stat

import pytest

from mpfleet.protocol.signing import SigningError, SigningKey, b64url_decode, open_envelope


def test_key_file_is_private_and_round_trips(tmp_path):
    key = SigningKey.generate()
    path = key.save(tmp_path / "keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    again = SigningKey.load(path)
    assert again.kid == key.kid and again.public_raw == key.public_raw
    assert path.name == f"{key.kid}.key" and len(key.kid) == 16


def test_a_key_others_can_read_is_refused(tmp_path):
    path = SigningKey.generate().save(tmp_path)
    os.chmod(path, 0o640)
    with pytest.raises(SigningError, match="chmod 600"):
        SigningKey.load(path)


def test_envelope_format_and_verification(tmp_path):
    key = SigningKey.generate()
    payload = {"id": "j1", "seq": 7, "type": "diag", "params": {}, "targets": ["*"], "iat": 1}
    env = key.sign(payload)
    prefix, kid, body, sig = env.split(".")
    assert prefix == "mpf1" and kid == key.kid and "=" not in env
    assert json.loads(b64url_decode(body)) == payload
    assert len(b64url_decode(sig)) == 64
    assert open_envelope(env, {key.kid: key.public_raw}) == payload


def test_tampering_and_unknown_keys_are_caught(tmp_path):
    key, other = SigningKey.generate(), SigningKey.generate()
    env = key.sign({"id": "j1", "seq": 1})
    with pytest.raises(SigningError, match="unknown key"):
        open_envelope(env, {other.kid: other.public_raw})
    with pytest.raises(SigningError, match="bad signature"):
        open_envelope(env, {key.kid: other.public_raw})
    with pytest.raises(SigningError, match="not an mpf1 envelope"):
        open_envelope("jwt.a.b", {})
