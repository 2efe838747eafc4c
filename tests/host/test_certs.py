"""The fleet CA (mpfleet.fleet.certs) and its commands: what it issues, what it keeps,
what it revokes, and how each mistake is refused."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_cli_errors import assert_one_line_error, mpfleet

from mpfleet.broker.link import parse_broker_url, with_client_identity
from mpfleet.db.store import Store
from mpfleet.fleet.certs import CertError, FleetCA
from mpfleet.fleet.provision import tls_files


@pytest.fixture
def ca(tmp_path):
    store = Store(tmp_path / "f.db")
    authority = FleetCA(tmp_path / "keys", store)
    authority.init()
    yield authority
    store.close()


def cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def test_the_ca_key_is_private_and_a_second_init_is_refused(ca):
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    cert = ca.certificate()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(CertError, match="exists already"):
        FleetCA(ca.dir).init()
    assert ca.crl_path.exists() and ca.revoked() == {}


@pytest.mark.sqlite_only("reads the whole file with iterdump; test_cert_scrub scans a PostgreSQL database")
def test_a_device_certificate_names_the_device_and_only_the_key_leaves(ca):
    issued = ca.issue_device("pump-7")
    cert = x509.load_der_x509_certificate(issued.cert_der)
    cert.verify_directly_issued_by(ca.certificate())
    assert cn(cert) == "pump-7"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH])
    key = load_der_private_key(issued.key_der, None)
    assert key.public_key() == cert.public_key()
    assert issued.identity() == issued.cert_der + issued.key_der
    (kept,) = ca.store.certificates("pump-7")
    assert kept["der"] == issued.cert_der and kept["serial"] == cert.serial_number and kept["revoked"] is None
    dump = "\n".join(ca.store.db.iterdump()).lower()
    assert issued.key_der.hex() not in dump  # the host keeps the certificate, never the key


@pytest.mark.parametrize("bad", ["Pump 7", "", "a" * 65, "x/y", "../etc"])
def test_a_certificate_for_what_is_not_a_device_id_is_refused(ca, bad):
    with pytest.raises(CertError, match="not a valid device id"):
        ca.issue_device(bad)
    assert ca.store.certificates() == []


def test_the_broker_certificate_covers_its_names_and_starts_with_the_ca(ca):
    crt, key = ca.issue_broker(["mqtt.example", "127.0.0.1"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert alt.get_values_for_type(x509.DNSName) == ["mqtt.example"]
    assert [str(a) for a in alt.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # a device whose clock was set forward to its own certificate's start accepts it
    assert cert.not_valid_before_utc == ca.certificate().not_valid_before_utc
    with pytest.raises(CertError, match="at least one"):
        ca.issue_broker([])


def test_revoking_a_device_lists_every_certificate_it_has_in_a_crl_the_ca_signed(ca):
    first, second = ca.issue_device("dev-a"), ca.issue_device("dev-a")
    other = ca.issue_device("dev-b")
    assert sorted(ca.revoke("dev-a")) == sorted([first.serial, second.serial])
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.certificate().public_key())
    assert {r.serial_number for r in crl} == {first.serial, second.serial}
    assert crl.next_update_utc >= ca.certificate().not_valid_after_utc - dt.timedelta(seconds=1)
    assert other.serial not in ca.revoked()
    with pytest.raises(CertError, match="no certificate to revoke"):
        ca.revoke("dev-a")
    ca.revoke_serial(other.serial)
    ca.revoke_serial(other.serial)  # twice: one entry
    assert sorted(ca.revoked()) == sorted([first.serial, second.serial, other.serial])


def test_a_ca_key_open_to_others_or_missing_is_refused(tmp_path, ca):
    ca.key_path.chmod(0o644)
    with pytest.raises(CertError, match="readable by others"):
        FleetCA(ca.dir).issue_device("dev-a")
    with pytest.raises(CertError, match="run `mpfleet ca init` first"):
        FleetCA(tmp_path / "nowhere").ca_der()


def test_a_device_gets_the_ca_and_its_identity_as_files(ca):
    files = tls_files(ca, "dev-c")
    assert files["/tls/ca.der"] == ca.certificate().public_bytes(Encoding.DER)
    (kept,) = ca.store.certificates("dev-c")
    assert files["/tls/id.der"].startswith(kept["der"])


def test_serve_finds_the_host_account_certificate_unless_the_url_names_one(ca):
    crt, key = ca.issue_host("mpfleet-host")
    ingest_crt, _ = ca.issue_host("mpfleet-ingest")
    cfg = with_client_identity(parse_broker_url("mqtts://127.0.0.1"), ca.dir)
    assert (cfg.ca_file, cfg.cert_file, cfg.key_file) == (str(ca.cert_path), str(crt), str(key))
    assert with_client_identity(parse_broker_url("mqtts://mpfleet-ingest@h"), ca.dir).cert_file == str(ingest_crt)
    named = with_client_identity(parse_broker_url("mqtts://h?cert=/x.crt&key=/x.key&ca=/c.pem"), ca.dir)
    assert (named.ca_file, named.cert_file, named.key_file) == ("/c.pem", "/x.crt", "/x.key")
    plain = parse_broker_url("mqtt://127.0.0.1")
    assert with_client_identity(plain, ca.dir) is plain


# ---------------------------------------------------------------- the commands
def test_ca_commands_refuse_mistakes_in_one_line(tmp_path):
    keys = tmp_path / "keys"
    assert_one_line_error(mpfleet(tmp_path, "ca", "show", "--keys-dir", keys), "no fleet CA", "ca init")
    assert mpfleet(tmp_path, "ca", "init", "--keys-dir", keys).returncode == 0
    assert_one_line_error(mpfleet(tmp_path, "ca", "init", "--keys-dir", keys), "exists already")
    db = tmp_path / "f.db"
    assert mpfleet(tmp_path, "keys", "init", "--db", db, "--keys-dir", tmp_path / "sign").returncode == 0
    assert_one_line_error(mpfleet(tmp_path, "devices", "cert", "show", "dev-1", "--db", db, "--keys-dir", keys),
                          "no certificate issued")
    assert_one_line_error(mpfleet(tmp_path, "devices", "cert", "revoke", "dev-1", "--db", db, "--keys-dir", keys),
                          "no certificate to revoke")
    assert_one_line_error(mpfleet(tmp_path, "devices", "cert", "renew", "dev-1", "--db", db, "--keys-dir", keys),
                          "no certificate issued yet")
    assert_one_line_error(mpfleet(tmp_path, "broker", "config", "--out", tmp_path / "b", "--db", db,
                                  "--keys-dir", tmp_path / "empty"), "no fleet CA", "ca init")
    assert not (tmp_path / "b" / "mosquitto.conf").exists()


def test_devices_cert_revoke_names_the_broker_it_could_not_tell(tmp_path):
    keys, db = tmp_path / "keys", tmp_path / "f.db"
    with Store(db) as store:
        authority = FleetCA(keys, store)
        authority.init()
        serial = authority.issue_device("dev-1").serial
    proc = mpfleet(tmp_path, "devices", "cert", "revoke", "dev-1", "--reload", "999999", "--db", db,
                   "--keys-dir", keys)
    assert_one_line_error(proc, "revoked, but the broker (pid 999999) was not told")
    assert_one_line_error(mpfleet(tmp_path, "devices", "cert", "revoke", "dev-1", "--reload", tmp_path / "no.pid",
                                  "--db", db, "--keys-dir", keys), "the pid file cannot be read")
    assert serial in FleetCA(keys).revoked()  # the revocation itself stands
    shown = mpfleet(tmp_path, "devices", "cert", "show", "dev-1", "--db", db, "--keys-dir", keys, "--json")
    assert shown.returncode == 0 and '"revoked": null' not in shown.stdout


def test_migrate_and_a_second_plaintext_listener_refuse_mistakes_in_one_line(tmp_path):
    keys, db = tmp_path / "keys", tmp_path / "f.db"
    assert mpfleet(tmp_path, "ca", "init", "--keys-dir", keys).returncode == 0
    assert mpfleet(tmp_path, "keys", "init", "--db", db, "--keys-dir", keys).returncode == 0
    with Store(db) as store:
        store.touch_device("dev-1")

    def migrate(*args):
        return mpfleet(tmp_path, "devices", "cert", "migrate", *args, "--db", db, "--keys-dir", keys)

    assert_one_line_error(migrate("dev-1", "--to", "mqtts://127.0.0.1:8883"), "--key-over-plaintext")
    assert_one_line_error(migrate("dev-1", "--to", "mqtt://127.0.0.1:1883", "--key-over-plaintext"),
                          "use mqtts://")
    assert_one_line_error(migrate("dev-1", "--to", "mqtts://u:p@127.0.0.1:8883", "--key-over-plaintext"),
                          "no user in the URL")
    assert_one_line_error(migrate("dev-9", "--to", "mqtts://127.0.0.1:8883", "--key-over-plaintext"), "dev-9")
    with Store(db) as store:
        assert store.certificates("dev-1") == [] and store.certificates("dev-9") == []
        assert store.db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
    out = tmp_path / "b"
    assert_one_line_error(mpfleet(tmp_path, "broker", "config", "--out", out, "--db", db, "--keys-dir", keys,
                                  "--listen", "127.0.0.1:8883", "--also-plaintext", "127.0.0.1:8883"),
                          "needs a port of its own")
    proc = mpfleet(tmp_path, "broker", "config", "--out", out, "--db", db, "--keys-dir", keys, "--plaintext",
                   "--also-plaintext", "1884")
    assert proc.returncode == 2 and "not with --plaintext" in proc.stderr
    assert not (out / "mosquitto.conf").exists()


def test_migrate_queues_the_install_then_the_switch_for_each_device(tmp_path):
    import json

    keys, db = tmp_path / "keys", tmp_path / "f.db"
    assert mpfleet(tmp_path, "ca", "init", "--keys-dir", keys).returncode == 0
    assert mpfleet(tmp_path, "keys", "init", "--db", db, "--keys-dir", keys).returncode == 0
    with Store(db) as store:
        for d in ("dev-1", "dev-2"):
            store.touch_device(d)
    proc = mpfleet(tmp_path, "devices", "cert", "migrate", "dev-1", "dev-2", "--to", "mqtts://broker.lan",
                   "--tls-hostname", "mqtt.example.org", "--key-over-plaintext", "--json", "--db", db,
                   "--keys-dir", keys)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert [d["device"] for d in made["devices"]] == ["dev-1", "dev-2"] and made["broker"] == "mqtts://broker.lan:8883"
    with Store(db) as store:
        jobs = {r[0]: (r[1], json.loads(r[2])) for r in store.db.execute("SELECT id, type, params_json FROM jobs")}
        for d in made["devices"]:
            kind, params = jobs[d["cert_job"]]
            assert kind == "cert" and params["ca"] and params["identity"]
            assert [f"{c['serial']:x}" for c in store.certificates(d["device"])] == [d["serial"]]
        kind, params = jobs[made["config_job"]]
    assert kind == "config"
    assert params["set"] == {"broker.tls": True, "broker.host": "broker.lan", "broker.port": 8883,
                             "broker.tls_hostname": "mqtt.example.org"}
    assert params["unset"] == ["broker.user", "broker.password"] and params["trial_wakes"] == 3
