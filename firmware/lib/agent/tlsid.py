# The device's TLS identity on flash, and the few DER facts the agent needs.
#
# Files (docs/agent.md, "TLS"):
#
#   /tls/ca.der   the fleet CA's certificate (DER): the broker's certificate
#                 must chain to it. Without it the agent never connects over
#                 TLS (no unverified fallback).
#   /tls/id.der   the device's certificate (DER) immediately followed by its
#                 private key (PKCS#8 or SEC1 DER): two DER SEQUENCEs back to
#                 back, nothing before, between or after
#   /tls/id.try   a renewal on trial (a `cert` job), same format; used only
#                 while the job state says the trial is on
#   /tls/id.bad   a renewal being reverted: id.try renamed aside before the job
#                 ends FAILED, removed right after
#
# Every write is a temporary file renamed into place (LittleFS commits a
# rename atomically), as agent.jsonfile does for JSON.
#
# The DER walker reads definite-length TLV elements with single-byte tags and
# at most 3 length bytes (16 MiB; an identity is under 4 KiB), and refuses
# anything else with ValueError: it runs on bytes that came over the air.
# Each field is read within its parent (the TBSCertificate, the subject), so a
# length that lies cannot send it into the next structure. It reads what the
# agent needs, no more: the two parts of an identity, a notBefore (the clock
# floor) and the subject CN (a renewal must be for this device).
#
# On the ESP32 mbedTLS checks certificate validity against the RTC, which a
# power loss resets to 2000-01-01: clock_floor() gives the earliest time the
# device can be sure of (this build's date, and the notBefore of the CA and of
# the identity it presents), and the wake moves the clock forward to it
# before a handshake (agent.wake.Wake.tls_params; forward only).

import os
import time

from micropython import const

CA_PATH = "/tls/ca.der"
ID_PATH = "/tls/id.der"
TRY_PATH = "/tls/id.try"
BAD_PATH = "/tls/id.bad"
_DIR = "/tls"

_SEQUENCE = const(0x30)
_INTEGER = const(0x02)
_VERSION_TAG = const(0xA0)  # [0] EXPLICIT Version in a TBSCertificate
_UTC_TIME = const(0x17)
_GENERALIZED_TIME = const(0x18)
_HIGH_TAG = const(0x1F)
_SET = const(0x31)
_OID = const(0x06)
_CN_OID = b"\x55\x04\x03"  # 2.5.4.3, id-at-commonName
_STRING_TAGS = (0x0C, 0x13, 0x16)  # UTF8String, PrintableString, IA5String
_TBS_FIELDS = ("the serial number", "the signature algorithm", "the issuer", "the validity", "the subject")
_MAX_LENGTH_BYTES = const(3)
_MAX_IDENTITY = const(8192)
# No certificate this agent uses was valid before this build was made: the
# floor of the clock after a power loss (year, month, day, h, m, s, wd, yd).
_BUILT = (2026, 12, 1, 0, 0, 0, 0, 0)
# A notBefore at or past 2100 is not believed as a floor: the clock only moves
# forward, so a floor there could never be corrected (agent.upload's limit).
_FLOOR_YEAR_MAX = const(2100)


def der_length(buf, at):
    """(header length, body length) of the DER element starting at buf[at];
    ValueError unless the whole element lies within buf."""
    n = len(buf)
    if at < 0 or at + 2 > n:
        raise ValueError("DER: no element header at offset %d of %d bytes" % (at, n))
    if buf[at] & _HIGH_TAG == _HIGH_TAG:
        raise ValueError("DER: multi-byte tag at offset %d" % at)
    first = buf[at + 1]
    if first < 0x80:
        head, body = 2, first
    else:
        k = first & 0x7F
        if k == 0:
            raise ValueError("DER: indefinite length at offset %d" % at)
        if k > _MAX_LENGTH_BYTES:
            raise ValueError("DER: %d length bytes at offset %d" % (k, at))
        if at + 2 + k > n:
            raise ValueError("DER: length cut off at offset %d" % at)
        body = 0
        for i in range(k):
            body = (body << 8) | buf[at + 2 + i]
        head = 2 + k
    if at + head + body > n:
        raise ValueError("DER: element at offset %d needs %d bytes, %d left" % (at, head + body, n - at))
    return head, body


def _element(buf, at, tag, what):
    if at >= len(buf) or buf[at] != tag:
        raise ValueError("DER: expected %s (tag 0x%02x) at offset %d" % (what, tag, at))
    return der_length(buf, at)


def _skip(buf, at, tag, what):
    head, body = _element(buf, at, tag, what)
    return at + head + body


def split_identity(buf):
    """(certificate, key) of an identity file's bytes: slices of `buf`."""
    if len(buf) > _MAX_IDENTITY:
        raise ValueError("identity: %d bytes, at most %d" % (len(buf), _MAX_IDENTITY))
    head, body = _element(buf, 0, _SEQUENCE, "a certificate")
    end = head + body
    # The certificate holds a TBSCertificate: a bare key or other SEQUENCE is no certificate.
    _element(buf, head, _SEQUENCE, "the certificate's TBSCertificate")
    khead, kbody = _element(buf, end, _SEQUENCE, "a private key after the certificate")
    if end + khead + kbody != len(buf):
        raise ValueError("identity: %d bytes after the key" % (len(buf) - end - khead - kbody))
    return buf[:end], buf[end:]


def check_certificate(buf):
    """ValueError unless `buf` is one certificate (a SEQUENCE holding a
    TBSCertificate) and nothing after it: the fleet CA a `cert` job installs."""
    if len(buf) > _MAX_IDENTITY:
        raise ValueError("CA: %d bytes, at most %d" % (len(buf), _MAX_IDENTITY))
    head, body = _element(buf, 0, _SEQUENCE, "a certificate")
    _element(buf, head, _SEQUENCE, "the certificate's TBSCertificate")
    if head + body != len(buf):
        raise ValueError("CA: %d bytes after the certificate" % (len(buf) - head - body))


def _digits(buf, at, n):
    v = 0
    for i in range(at, at + n):
        c = buf[i]
        if c < 0x30 or c > 0x39:
            raise ValueError("DER: time has a non-digit at offset %d" % i)
        v = v * 10 + c - 0x30
    return v


def _time_at(buf, at):
    """(year, month, day, hour, minute, second) of a UTCTime or GeneralizedTime."""
    tag = buf[at] if at < len(buf) else 0
    head, body = der_length(buf, at)
    at += head
    if tag == _UTC_TIME and body == 13:
        year = _digits(buf, at, 2)
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
        at += 2
    elif tag == _GENERALIZED_TIME and body == 15:
        year = _digits(buf, at, 4)
        at += 4
    else:
        raise ValueError("DER: expected a UTCTime or GeneralizedTime of the Z form (tag 0x%02x, %d bytes)"
                         % (tag, body))
    if buf[at + 10] != 0x5A:  # "Z": RFC 5280 requires UTC
        raise ValueError("DER: time is not in UTC (Z)")
    month, day = _digits(buf, at, 2), _digits(buf, at + 2, 2)
    hour, minute, second = _digits(buf, at + 4, 2), _digits(buf, at + 6, 2), _digits(buf, at + 8, 2)
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 61):
        raise ValueError("DER: time out of range")
    return year, month, day, hour, minute, second


def _tbs_field(cert, index):
    """Offset of field `index` of the TBSCertificate (after the optional version:
    0 serial, 1 signature algorithm, 2 issuer, 3 validity, 4 subject), and the
    TBSCertificate's end: no field is read from beyond it."""
    head, _ = _element(cert, 0, _SEQUENCE, "a certificate")
    at = head
    head, body = _element(cert, at, _SEQUENCE, "the TBSCertificate")
    end = at + head + body
    at += head
    if at < end and cert[at] == _VERSION_TAG:
        at = _skip(cert, at, _VERSION_TAG, "the version")
    for i in range(index):
        at = _skip(cert, at, _INTEGER if i == 0 else _SEQUENCE, _TBS_FIELDS[i])
    if at >= end:
        raise ValueError("DER: the TBSCertificate ends before %s" % _TBS_FIELDS[index])
    return at, end


def not_before_date(cert):
    """The certificate's notBefore as (year, month, day, hour, minute, second), UTC."""
    at, _ = _tbs_field(cert, 3)
    head, _ = _element(cert, at, _SEQUENCE, "the validity")
    return _time_at(cert, at + head)


def subject_cn(cert):
    """The certificate's subject common name (str), or None when it has none."""
    at, _ = _tbs_field(cert, 4)
    head, body = _element(cert, at, _SEQUENCE, "the subject")
    at, end = at + head, at + head + body
    cn = None
    while at < end:  # RDNSequence: SET { SEQUENCE { OID, value } ... } ...
        shead, sbody = _element(cert, at, _SET, "a relative distinguished name")
        inner, send = at + shead, at + shead + sbody
        if send > end:
            raise ValueError("DER: a name part runs past the subject at offset %d" % at)
        while inner < send:
            ahead, abody = _element(cert, inner, _SEQUENCE, "an attribute")
            if inner + ahead + abody > send:
                raise ValueError("DER: an attribute runs past its name part at offset %d" % inner)
            oid = inner + ahead
            ohead, obody = _element(cert, oid, _OID, "an attribute type")
            if bytes(cert[oid + ohead:oid + ohead + obody]) == _CN_OID:
                vat = oid + ohead + obody
                vhead, vbody = der_length(cert, vat)
                if cert[vat] not in _STRING_TAGS:
                    raise ValueError("DER: the common name is not a string (tag 0x%02x)" % cert[vat])
                cn = bytes(cert[vat + vhead:vat + vhead + vbody]).decode()
            inner += ahead + abody
        at = send
    return cn


def _seconds(date):
    # time.mktime counts from the port's epoch (1970 on the unix port, 2000 on
    # some ESP32 builds), as time.time() does: the two always compare. A date
    # before 2000 is clamped to it (no floor needs earlier; the 2000 epoch has
    # no earlier second).
    if date[0] < 2000:
        date = (2000, 1, 1, 0, 0, 0)
    return time.mktime((date[0], date[1], date[2], date[3], date[4], date[5], 0, 0))


def not_before(cert):
    """The certificate's notBefore in seconds of time.time()'s epoch."""
    return _seconds(not_before_date(cert))


def clock_floor(*certs):
    """The earliest time the clock can be: this build's date, or the latest
    notBefore of `certs` (None entries and unreadable ones are passed over)."""
    floor = _seconds(_BUILT)
    for cert in certs:
        if cert is None:
            continue
        try:
            date = not_before_date(cert)
        except (ValueError, IndexError):
            continue
        if date[0] < _FLOOR_YEAR_MAX:
            floor = max(floor, _seconds(date))
    return floor


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def tls_params(host, hostname=None, trial=False):
    """MQTTClient's tls_params: the fleet CA, this device's identity (id.try
    while a renewal is on trial and the file is there, else id.der; none when
    there is neither: a broker that takes passwords over TLS), and the name
    the broker's certificate must carry (`hostname`, else `host`). OSError
    without a CA or with an unreadable identity: the wake backs off as for
    any broker failure, and never connects unverified."""
    ca = _read(CA_PATH)
    if not ca:
        raise OSError("no %s: provision the device for TLS" % CA_PATH)
    params = {"cadata": ca, "server_hostname": hostname or host}
    path = TRY_PATH if trial and exists(TRY_PATH) else ID_PATH
    ident = _read(path)
    if ident is not None:
        try:
            params["cert"], params["key"] = split_identity(ident)
        except ValueError as e:
            raise OSError("%s: %s" % (path, e))
    return params


def _write(path, data):
    try:
        os.mkdir(_DIR)
    except OSError:
        pass  # there already
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def write_trial(identity):
    """Store a renewal as /tls/id.try, atomically."""
    _write(TRY_PATH, identity)


def install(identity, ca):
    """A first TLS identity for a device that does not use TLS yet (a `cert`
    job while broker.tls is off): the fleet CA (when given) then the identity,
    each written atomically. Nothing connects with them until a config job turns
    broker.tls on, so there is nothing to try; running it again after a power
    cut writes the same files."""
    if ca is not None:
        _write(CA_PATH, ca)
    _write(ID_PATH, identity)


def promote():
    """The renewal connected: id.try over id.der. "promoted", or "reverted"
    when id.try is gone and id.bad is there (a revert got that far); with
    neither, an earlier promote already happened: "promoted"."""
    try:
        os.rename(TRY_PATH, ID_PATH)
        return "promoted"
    except OSError:
        pass
    return "reverted" if exists(BAD_PATH) else "promoted"


def set_aside():
    """A renewal that failed its trial: id.try to id.bad (if not done already)."""
    try:
        os.rename(TRY_PATH, BAD_PATH)
    except OSError:
        pass


def forget_bad():
    try:
        os.remove(BAD_PATH)
    except OSError:
        pass
