"""The fleet's certificate authority: a certificate per device, per host account and
for the broker, and the revocation list the broker checks (docs/security.md).

Files in the key directory (the signing keys' directory, `--keys-dir`):

    ca.key      the CA's private key (EC P-256, PEM, mode 0600)
    ca.crt      the CA's certificate (PEM): the broker's cafile, the device's /tls/ca.der
    crl.pem     the certificate revocation list, signed by the CA: the broker's crlfile
    broker.crt, broker.key      the broker's server certificate and key
    clients/<account>.crt, .key a host account's client certificate (serve, ingest)

One CA, no intermediate. An offline root with an issuing intermediate protects the
root key by keeping it off the machine that issues; here the issuing machine is the
one that holds the fleet's signing keys and database anyway, and an intermediate
costs every device a longer chain to verify and store (the device then needs the
chain in each handshake: about 450 bytes more on the wire, per connection). A fleet
that wants the split can run its own root and give mpfleet an intermediate as
ca.key/ca.crt: devices trust whatever ca.crt holds.

A device certificate's subject CN is the device id; mosquitto's
`use_identity_as_username` makes that the account name the ACL confines to
`<root>/<id>/...`. The host keeps every certificate it issued (table
`certificates`), never a device's private key: the key is returned once, written
to the board (or into the signed `cert` job that renews it) and forgotten.

Validity: devices and host accounts 825 days, the broker 825 days backdated to the
CA's own start, so a device whose clock was set forward to the floor its own
certificate gives (agent.tlsid) never finds the broker's certificate "not yet
valid". The CRL's next update is the CA's expiry: OpenSSL refuses an expired CRL,
and mosquitto re-reads the file only when told (SIGHUP).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpfleet.files import write_atomic
from mpfleet.errors import MpfleetError

CA_DAYS = 3650
LEAF_DAYS = 825
_BACKDATE = dt.timedelta(minutes=5)  # clock skew between the host and the broker


class CertError(MpfleetError):
    """A certificate operation was refused (no CA yet, unknown certificate...)."""


@dataclass(frozen=True)
class Issued:
    """A certificate just issued, with its private key (never stored by the host)."""

    subject: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    cert_der: bytes
    key_der: bytes  # PKCS#8 DER

    def identity(self) -> bytes:
        """What a device keeps in /tls/id.der: the certificate DER, then the key DER."""
        return self.cert_der + self.key_der


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert_info(cert: x509.Certificate) -> dict:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {"subject": cn[0].value if cn else "", "serial": cert.serial_number,
            "not_before": cert.not_valid_before_utc.timestamp(), "not_after": cert.not_valid_after_utc.timestamp(),
            "issuer": cert.issuer.rfc4514_string()}


class FleetCA:
    """The CA in `keys_dir`; `store` (optional) records what it issues."""

    def __init__(self, keys_dir: str | os.PathLike, store=None):
        self.dir = Path(keys_dir)
        self.store = store
        self.key_path = self.dir / "ca.key"
        self.cert_path = self.dir / "ca.crt"
        self.crl_path = self.dir / "crl.pem"
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None

    # ------------------------------------------------------------ the CA itself
    def exists(self) -> bool:
        return self.key_path.exists() and self.cert_path.exists()

    def init(self, name: str = "mpfleet fleet CA") -> x509.Certificate:
        """Create the CA (and an empty CRL); CertError if there is one already."""
        if self.key_path.exists() or self.cert_path.exists():
            raise CertError(f"{self.dir}: a fleet CA exists already (ca.key/ca.crt); it is never replaced "
                            "in place: every device trusts it")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now() - _BACKDATE
        public = key.public_key()
        cert = (x509.CertificateBuilder()
                .subject_name(_name(name)).issuer_name(_name(name))
                .public_key(public).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .sign(key, hashes.SHA256()))
        write_atomic(self.key_path, _key_pem(key), 0o600)
        write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._key, self._cert = key, cert
        self.write_crl()
        return cert

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        if self._key is None:
            if not self.exists():
                raise CertError(f"no fleet CA in {self.dir}: run `mpfleet ca init` first")
            mode = self.key_path.stat().st_mode
            if mode & 0o077:
                raise CertError(f"{self.key_path} is readable by others (mode {mode & 0o777:o}): chmod 600 it")
            try:
                key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
                cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            except (ValueError, TypeError) as e:
                raise CertError(f"{self.dir}: the CA files cannot be read: {e}") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                raise CertError(f"{self.dir}: ca.key does not belong to ca.crt")
            self._key, self._cert = key, cert
        return self._key, self._cert

    def certificate(self) -> x509.Certificate:
        return self._load()[1]

    def ca_der(self) -> bytes:
        return self.certificate().public_bytes(serialization.Encoding.DER)

    def ca_pem(self) -> bytes:
        return self.certificate().public_bytes(serialization.Encoding.PEM)

    # ------------------------------------------------------------ issuing
    def _issue(self, subject: str, usage, days: int, not_before: dt.datetime | None = None,
               not_after: dt.datetime | None = None, names: list[str] | None = None):
        ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - _BACKDATE
        end = not_after or start + dt.timedelta(days=days)
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(subject)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if names:
            alt = []
            for n in names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return key, cert

    def _record(self, kind: str, cert: x509.Certificate) -> None:
        if self.store is not None:
            info = cert_info(cert)
            self.store.put_certificate(info["serial"], info["subject"], kind, info["not_before"], info["not_after"],
                                       cert.public_bytes(serialization.Encoding.DER))

    def issue_device(self, device_id: str, days: int = LEAF_DAYS, not_before: dt.datetime | None = None,
                     not_after: dt.datetime | None = None) -> Issued:
        """A client certificate with CN = `device_id`, and its key (returned, not kept)."""
        from mpfleet.protocol.ids import DEVICE_ID_RULE, is_device_id

        if not is_device_id(device_id):
            raise CertError(f"{device_id!r} is not a valid device id ({DEVICE_ID_RULE})")
        key, cert = self._issue(device_id, ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before, not_after)
        self._record("device", cert)
        return Issued(device_id, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
                      cert.public_bytes(serialization.Encoding.DER),
                      key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))

    def _write_pair(self, stem: Path, key, cert) -> tuple[Path, Path]:
        crt, kp = stem.with_suffix(".crt"), stem.with_suffix(".key")
        write_atomic(kp, _key_pem(key), 0o600)
        write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return crt, kp

    def issue_host(self, account: str, days: int = LEAF_DAYS) -> tuple[Path, Path]:
        """A client certificate for a host account (CN = `account`): clients/<account>.crt/.key."""
        from mpfleet.broker.config import check_username

        check_username(account)
        key, cert = self._issue(account, ExtendedKeyUsageOID.CLIENT_AUTH, days)
        self._record("host", cert)
        return self._write_pair(self.dir / "clients" / account, key, cert)

    def host_files(self, account: str) -> tuple[Path, Path] | None:
        """(crt, key) of a host account's certificate, or None if it has none."""
        crt = self.dir / "clients" / f"{account}.crt"
        key = crt.with_suffix(".key")
        return (crt, key) if crt.exists() and key.exists() else None

    def issue_broker(self, names: list[str], days: int = LEAF_DAYS) -> tuple[Path, Path]:
        """The broker's server certificate for host names/IP addresses `names`:
        broker.crt/.key, valid from the CA's own start (module docstring)."""
        if not names:
            raise CertError("the broker certificate needs at least one host name or IP address")
        start = self.certificate().not_valid_before_utc
        key, cert = self._issue(names[0], ExtendedKeyUsageOID.SERVER_AUTH, days, not_before=start,
                                not_after=_now() + dt.timedelta(days=days), names=names)
        self._record("broker", cert)
        return self._write_pair(self.dir / "broker", key, cert)

    def broker_files(self) -> tuple[Path, Path] | None:
        crt, key = self.dir / "broker.crt", self.dir / "broker.key"
        return (crt, key) if crt.exists() and key.exists() else None

    # ------------------------------------------------------------ revocation
    def revoked(self) -> dict[int, float]:
        """{serial: revocation time} from crl.pem (the list the broker checks)."""
        if not self.crl_path.exists():
            return {}
        crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        return {r.serial_number: r.revocation_date_utc.timestamp() for r in crl}

    def write_crl(self, add: list[int] | None = None) -> Path:
        """crl.pem with every serial revoked so far plus `add`, signed by the CA."""
        ca_key, ca_cert = self._load()
        entries = self.revoked()
        now = _now()
        for serial in add or ():
            entries.setdefault(serial, now.timestamp())
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(now - _BACKDATE)
                   .next_update(ca_cert.not_valid_after_utc))
        for serial, when in sorted(entries.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(when, dt.timezone.utc)).build())
        crl = builder.sign(ca_key, hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
        return self.crl_path

    def revoke_serial(self, serial: int) -> None:
        """Revoke one certificate (the CRL is rewritten; the broker needs a SIGHUP to read it)."""
        self.write_crl([serial])
        if self.store is not None:
            self.store.revoke_certificate(serial)

    def revoke(self, subject: str) -> list[int]:
        """Revoke every certificate issued to `subject` that is not revoked yet; returns the serials."""
        if self.store is None:
            raise CertError("revoking by name needs the fleet database")
        serials = [c["serial"] for c in self.store.certificates(subject) if not c["revoked"]]
        if not serials:
            raise CertError(f"{subject}: no certificate to revoke (`mpfleet devices cert show {subject}`)")
        self.write_crl(serials)
        for serial in serials:
            self.store.revoke_certificate(serial)
        return serials
