"""The first gate of a job queue (agent/intake.py: read_queue, list_spans,
screen), as units on the MicroPython unix port with a fake runner: the queue
message is split into entries in one pass without parsing them, and each entry
is screened in place (size, form, already finished or rejected) before any
envelope check. A message that is not a JSON list, and each entry that fails,
is rejected once by its digest with the reason."""

import hashlib

import pytest

MODULES = ("lib/agent/intake.py", "lib/agent/envelope.py", "lib/agent/jobs.py", "lib/agent/jsonfile.py",
           "lib/agent/rtcstage.py", "lib/agent/varint.py", "lib/agent/topics.py")


def digest(raw: bytes) -> str:
    """An envelope's digest as agent.jobs gives it (and the host's envelope_digest):
    the first 8 bytes of the SHA-256 of the queue entry, quotes included, in hex."""
    return hashlib.sha256(raw).hexdigest()[:16]


# (case, the message, the entries list_spans finds in it)
SPLITS = [
    ("an empty list", b"[]", []),
    ("an empty list in spaces", b" \n[ \t]\r\n", []),
    ("one string", b'["mpf1.a.b.c"]', [b'"mpf1.a.b.c"']),
    ("entries in spaces", b'[ "a" ,\n\t"b"  ]', [b'"a"', b'"b"']),
    ("nested entries", b'[[1, [2, 3]], {"k": [4, {"j": 5}]}, 6]', [b"[1, [2, 3]]", b'{"k": [4, {"j": 5}]}', b"6"]),
    ("brackets and commas in strings", b'["a,]", "[{", "}"]', [b'"a,]"', b'"[{"', b'"}"']),
    ("an escaped quote", b'["a\\",b", 2]', [b'"a\\",b"', b"2"]),
    ("an escaped backslash before the quote", b'["a\\\\", 2]', [b'"a\\\\"', b"2"]),
]
# (case, the message, list_spans' ValueError)
MALFORMED = [
    ("nothing", b"", "not a list"),
    ("spaces only", b"   ", "not a list"),
    ("an object", b'{"a": 1}', "not a list"),
    ("a string", b'"[1]"', "not a list"),
    ("an unclosed list", b"[1, 2", "truncated"),
    ("an unclosed string", b'["abc]', "truncated"),
    ("an unclosed inner list", b"[[1, 2]", "truncated"),
    ("a brace closing the list", b"[1}", "truncated"),
    ("two commas", b"[1,,2]", "an empty entry"),
    ("a comma alone", b"[,]", "an empty entry"),
    ("a trailing comma", b"[1,]", "an empty entry"),
    ("text after the list", b"[1] x", "text after the list"),
    ("a second closer", b"[1]]", "text after the list"),
    ("two lists", b"[1][2]", "text after the list"),
]

DEVICE = f"SPLITS = {SPLITS!r}\nMALFORMED = {MALFORMED!r}\n" + r"""
from agent import intake


def spans(raw, most=32):
    return [bytes(raw[a:b]).decode() for a, b in intake.list_spans(raw, most)]


class FakeRunner:
    # What read_queue and screen use of agent.jobs.Runner: the queue message,
    # the limits, the job state and the two ways of reporting.
    def __init__(self, raw=None, limit=64, done=(), rej=(), cur=None):
        self.ctx = self
        self.raw = raw
        self.cfg = {"limits": {"job_max_bytes": limit}}
        self.state = {"cur": cur, "done": [list(d) for d in done], "rej": list(rej)}
        self.rejected = []
        self.again = []

    def take_queue(self):
        raw, self.raw = self.raw, None
        return raw

    def reject_unattributed(self, digest, reason):
        self.rejected.append([digest, reason])

    def report_again(self, done):
        self.again.append(done)


def read(raw):
    r = FakeRunner(raw)
    got, found = intake.read_queue(r)
    return {"raw": None if got is None else bytes(got).decode(), "spans": len(found), "rejected": r.rejected}


def screen(entries, **kw):
    raw = b"[" + b", ".join(entries) + b"]"
    r = FakeRunner(**kw)
    texts, digests = intake.screen(r, raw, intake.list_spans(raw, 32))
    return {"texts": texts, "digests": digests, "rejected": r.rejected, "again": r.again}


for name, raw, _ in SPLITS:
    case("split " + name, lambda: spans(raw))
for name, raw, _ in MALFORMED:
    case("split " + name, lambda: spans(raw))
case("split the first of many", lambda: spans(b"[1, 2, 3, 4, 5]", 2))
case("split the first of many, cut off", lambda: spans(b"[1, 2, 3, 4, 5", 2))
case("split a memoryview", lambda: spans(memoryview(b'xx["a", [1]]')[2:]))
case("read an empty message", lambda: read(b""))
case("read an empty list", lambda: read(b" [ ] "))
case("read a queue", lambda: read(b'["a", "b"]'))
case("read a queue given as text", lambda: read('["a"]'))
case("read a queue of 40", lambda: read(("[" + ", ".join('"e%d"' % i for i in range(40)) + "]").encode()))
case("read a queue over 12 KiB", lambda: read(b'["' + b"a" * 12285 + b'"]'))
case("read a queue at 12 KiB", lambda: read(b'["' + b"a" * 12284 + b'"]'))
case("read an object", lambda: read(b'{"jobs": []}'))
case("read a cut-off queue", lambda: read(b'["a", "b'))
case("screen good entries", lambda: screen([b'"mpf1.k.p.s"', b'"x"']))
case("screen an entry at the limit", lambda: screen([b'"' + b"a" * 64 + b'"']))
case("screen an entry over the limit", lambda: screen([b'"' + b"a" * 65 + b'"']))
case("screen a number", lambda: screen([b"12"]))
case("screen an object", lambda: screen([b'{"a": "b"}']))
case("screen an escape", lambda: screen([b'"mpf1\\u002ek.p.s"']))
case("screen invalid UTF-8", lambda: screen([b'"\xff"']))
FINISHED = intake.digest_of(b'"done"')
case("screen a finished entry", lambda: screen([b'"done"', b'"new"'], done=[[FINISHED, "j1", 4, "ok", 1]]))
case("screen a rejected entry", lambda: screen([b'"bad"'], rej=[intake.digest_of(b'"bad"')]))
case("screen the current entry", lambda: screen([b'"cur"'], cur={"digest": intake.digest_of(b'"cur"')}))
"""


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


@pytest.mark.parametrize("name, raw, entries", SPLITS, ids=[s[0] for s in SPLITS])
def test_list_spans_finds_each_entry_without_parsing_it(device, name, raw, entries):
    assert device.value("split " + name) == [e.decode() for e in entries]


@pytest.mark.parametrize("name, raw, reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_message_that_is_not_one_json_list_is_a_value_error(device, name, raw, reason):
    assert device.error("split " + name) == ("ValueError", reason)


def test_list_spans_keeps_the_first_most_entries(device):
    assert device.value("split the first of many") == ["1", "2"]


def test_list_spans_checks_the_whole_list_even_past_most(device):
    assert device.error("split the first of many, cut off") == ("ValueError", "truncated")


def test_list_spans_reads_a_memoryview(device):
    assert device.value("split a memoryview") == ['"a"', "[1]"]


@pytest.mark.parametrize("name", ["read an empty message", "read an empty list"])
def test_an_empty_queue_has_no_entries_and_no_rejection(device, name):
    got = device.value(name)
    assert (got["spans"], got["rejected"]) == (0, [])


def test_a_queue_is_read_with_the_spans_of_its_entries(device):
    assert device.value("read a queue") == {"raw": '["a", "b"]', "spans": 2, "rejected": []}


def test_a_queue_given_as_text_is_read_as_bytes(device):
    assert device.value("read a queue given as text") == {"raw": '["a"]', "spans": 1, "rejected": []}


def test_at_most_32_entries_of_a_queue_are_looked_at(device):
    assert device.value("read a queue of 40")["spans"] == 32


def test_a_queue_over_12_kib_is_rejected_by_digest_before_it_is_split(device):
    raw = b'["' + b"a" * 12285 + b'"]'
    got = device.value("read a queue over 12 KiB")
    assert got["raw"] is None
    reason = "job queue is not a JSON list of envelopes: 12289 bytes, over the limit of 12288"
    assert got["rejected"] == [[digest(raw), reason]]


def test_a_queue_of_12_kib_is_read(device):
    assert device.value("read a queue at 12 KiB")["spans"] == 1


@pytest.mark.parametrize("name, raw, reason", [
    ("read an object", b'{"jobs": []}', "not a list"),
    ("read a cut-off queue", b'["a", "b', "truncated"),
])
def test_a_queue_that_is_not_a_list_is_rejected_by_digest_with_the_reason(device, name, raw, reason):
    got = device.value(name)
    assert (got["raw"], got["spans"]) == (None, 0)
    assert got["rejected"] == [[digest(raw), "job queue is not a JSON list of envelopes: " + reason]]


def test_screen_gives_each_string_entry_its_text_and_its_digest_over_the_quoted_entry(device):
    got = device.value("screen good entries")
    assert got["texts"] == ["mpf1.k.p.s", "x"]
    assert got["digests"] == [digest(b'"mpf1.k.p.s"'), digest(b'"x"')]
    assert got["rejected"] == [] and got["again"] == []


def test_an_entry_at_job_max_bytes_passes_the_screen(device):
    assert device.value("screen an entry at the limit")["texts"] == ["a" * 64]


def test_an_entry_over_job_max_bytes_is_rejected_in_place(device):
    got = device.value("screen an entry over the limit")
    assert got["texts"] == [None]
    assert got["rejected"] == [[digest(b'"' + b"a" * 65 + b'"'), "envelope of 65 bytes is over the limit of 64"]]


@pytest.mark.parametrize("name, entry", [
    ("screen a number", b"12"),
    ("screen an object", b'{"a": "b"}'),
    ("screen an escape", b'"mpf1\\u002ek.p.s"'),
])
def test_an_entry_that_is_not_a_plain_string_is_rejected(device, name, entry):
    got = device.value(name)
    assert got["texts"] == [None]
    assert got["rejected"] == [[digest(entry), "envelope is not a string of base64url and dots"]]


def test_an_entry_that_is_not_utf8_is_rejected(device):
    got = device.value("screen invalid UTF-8")
    assert got["texts"] == [None]
    assert got["rejected"] == [[digest(b'"\xff"'), "envelope is not ASCII"]]


def test_a_finished_entry_has_its_final_status_reported_again_and_is_not_checked(device):
    got = device.value("screen a finished entry")
    assert got["texts"] == [None, "new"]
    assert got["again"] == [[digest(b'"done"'), "j1", 4, "ok", 1]]
    assert got["rejected"] == []


@pytest.mark.parametrize("name", ["screen a rejected entry", "screen the current entry"])
def test_an_entry_already_rejected_or_in_progress_is_passed_over_silently(device, name):
    got = device.value(name)
    assert (got["texts"], got["rejected"], got["again"]) == ([None], [], [])

