"""The OTA chunk stream's device side (agent/otastream.py), as units on the
MicroPython unix port against a fake host: a fake MQTT client that answers each
`ota/get` with the chunks asked for (or with the fault a case needs) and a fake
clock, so that silences cost no time. Chunks reach the sink whole, in order,
once; a late, short or over-long chunk is ignored and asked for again; a
wrong artifact size or a refusal ends the pull with the reason; silence ends it
with OSError after the retries."""

import pytest

MODULES = ("lib/agent/otastream.py", "lib/agent/topics.py")
CHUNK = 512
SIZE = 10 * CHUNK


def chunks(start, end, size=SIZE):
    """[offset, length] of every chunk of [start, end), as the sink must get them."""
    return [[o, min(CHUNK, size - o)] for o in range(start, end, CHUNK)]


DEVICE = f"CHUNK = {CHUNK}\nSIZE = {SIZE}\n" + r"""
import json
from agent import otastream

DATA = b"mpf/v1/dev1/ota/data"


class FakeClock:
    # time for otastream: ticks in ms that move only when the fake host waits
    now = 0

    @staticmethod
    def ticks_ms():
        return FakeClock.now

    @staticmethod
    def ticks_diff(a, b):
        return a - b


otastream.time = FakeClock


def artifact(size):
    return bytes((i * 7 + 3) & 0xFF for i in range(size))


def message(offset, total, body):
    return offset.to_bytes(4, "little") + total.to_bytes(4, "little") + body


class FakeHost:
    # The MQTT client as otastream uses it, with the host behind it: a request
    # queues its chunks; fault(offset, msg, nth) turns the nth sending of a
    # chunk into the messages that go out instead; wait_msg delivers one, into
    # the receive buffer as the real client does, or lets timeout_ms pass.
    def __init__(self, data, total=None, fault=None, silent=False):
        self.data = data
        self.total = len(data) if total is None else total
        self.fault = fault
        self.silent = silent
        self.queue = []
        self.requests = []
        self.topics = []
        self.subscribed = []
        self.rx = None
        self.rx_calls = []
        self.sent = {}
        self.cb = None

    def set_callback(self, cb):
        self.cb = cb

    def set_rx_buffer(self, buf):
        self.rx = buf
        self.rx_calls.append(None if buf is None else len(buf))

    def subscribe(self, topic, qos):
        self.subscribed.append([topic.decode(), qos])

    def publish(self, topic, msg):
        req = json.loads(msg)
        self.requests.append([req["offset"], req["count"]])
        self.topics.append([topic, req["job"], req["len"]])
        if self.silent:
            return
        for k in range(req["count"]):
            off = req["offset"] + k * req["len"]
            if off >= len(self.data):
                break
            msg = message(off, self.total, self.data[off:off + req["len"]])
            nth = self.sent.get(off, 0)
            self.sent[off] = nth + 1
            for m in (self.fault(off, msg, nth) if self.fault else [msg]):
                self.queue.append(m if isinstance(m, tuple) else (DATA, m))

    def wait_msg(self, timeout_ms):
        if not self.queue:
            FakeClock.now += timeout_ms
            return False
        FakeClock.now += 1
        topic, msg = self.queue.pop(0)
        if self.rx is not None and len(msg) <= len(self.rx):
            self.rx[:len(msg)] = msg
            msg = memoryview(self.rx)[:len(msg)]
        else:
            msg = bytearray(msg)
        self.cb(topic, msg, False)
        return True


def pull(size=SIZE, offset=0, until=None, total=None, fault=None, silent=False, window=4, rx=None, other=None):
    data = artifact(size)
    host = FakeHost(data, total, fault, silent)
    got = bytearray(size)
    taken = []
    feeds = []
    p = otastream.Puller("dev1", "job7", size, chunk=CHUNK, window=window, timeout_ms=100, retries=2, rx=rx)

    def sink(off, mv):
        got[off:off + len(mv)] = mv
        taken.append([off, len(mv)])

    out = {}
    try:
        out["reached"] = p.pull(host, offset, sink, feed=lambda: feeds.append(1), other=other, until=until)
    except Exception as e:
        out["error"] = [type(e).__name__, str(e)]
    end = size if until is None else until
    out.update({"taken": taken, "whole": bytes(got[offset:end]) == data[offset:end], "requests": host.requests,
                "ignored": p.ignored, "reasked": p.reasked, "received": p.received, "feeds": len(feeds),
                "rx_calls": host.rx_calls, "subscribed": host.subscribed, "topics": host.topics[:1],
                "rx_len": len(p.rx)})
    return out


def nth_only(at, n, change):
    # a fault on the nth sending of the chunk at `at`
    return lambda off, msg, nth: [change(msg)] if off == at and nth == n else [msg]


def late_duplicate(off, msg, nth):
    # before the first chunk at 1024, a late second answer for the one at 0
    if off == 1024 and nth == 0:
        return [message(0, SIZE, artifact(SIZE)[:CHUNK]), msg]
    return [msg]


def lost(off, msg, nth):
    return [] if off == 2048 and nth == 0 else [msg]


def interleaved(off, msg, nth):
    # a header-less message and one on another topic, before the first chunk at 512
    if off == 512 and nth == 0:
        return [b"\x00\x02\x00\x00\x00\x14\x00", (b"mpf/v1/dev1/jobs", b"[]"), msg]
    return [msg]


def refused(off, msg, nth):
    return [message(0xFFFFFFFF, 0, b"no image for job job7")]


def two_pulls():
    host = FakeHost(artifact(SIZE))
    p = otastream.Puller("dev1", "job7", SIZE, chunk=CHUNK, window=4, timeout_ms=100, retries=2)
    sink = lambda off, mv: None
    first = p.pull(host, 0, sink, until=1024)
    return [first, p.pull(host, first, sink), host.subscribed]


others = []
case("in order", lambda: pull())
case("a short last chunk", lambda: pull(size=SIZE - 120))
case("resumed", lambda: pull(offset=1536))
case("until", lambda: pull(offset=1024, until=2560))
case("a late duplicate", lambda: pull(fault=late_duplicate))
case("a short chunk", lambda: pull(fault=nth_only(1536, 0, lambda m: m[:-1])))
case("an over-long chunk", lambda: pull(fault=nth_only(1536, 0, lambda m: m + b"x")))
case("a short last chunk cut shorter", lambda: pull(size=SIZE - 120, fault=nth_only(4608, 0, lambda m: m[:-1])))
case("an over-long last chunk", lambda: pull(size=SIZE - 120, fault=nth_only(4608, 0, lambda m: m + b"x")))
case("a lost chunk", lambda: pull(fault=lost))
case("a wrong artifact size", lambda: pull(total=SIZE + 1))
case("a refusal", lambda: pull(fault=refused))
case("silence", lambda: pull(silent=True))
case("interleaved", lambda: pull(fault=interleaved,
                                 other=lambda t, m, r: others.append([t.decode(), bytes(m).decode()])))
case("the other callback", lambda: others)
case("two pulls", two_pulls)
case("a window of one", lambda: pull(window=1))
given = bytearray(8 + CHUNK)
case("a given rx buffer", lambda: otastream.Puller("dev1", "j", SIZE, chunk=CHUNK, rx=given).rx is given)
case("a given rx buffer too small", lambda: len(otastream.Puller("dev1", "j", SIZE, chunk=CHUNK,
                                                                 rx=bytearray(CHUNK)).rx))
for chunk in (512, 1024, 2048, 4096, 8192, 12288, 16384, 0, 511, 513, 1536, 3072, 6144, 16896, True, 4096.0, "4096"):
    case("chunk %r" % (chunk,), lambda: otastream.check_chunk_size(chunk))
"""

FIRST_REQUESTS = [[0, 4], [2048, 2], [3072, 2], [4096, 2]]


@pytest.fixture(scope="module")
def device(unit_cases):
    return unit_cases(DEVICE, MODULES)


def test_an_artifact_reaches_the_sink_in_order_whole_and_once(device):
    got = device.value("in order")
    assert got["reached"] == SIZE
    assert got["taken"] == chunks(0, SIZE)
    assert got["whole"] and got["received"] == SIZE
    assert (got["ignored"], got["reasked"]) == (0, 0)


def test_requests_ask_a_window_then_half_a_window_each_time_half_has_arrived(device):
    assert device.value("in order")["requests"] == FIRST_REQUESTS


def test_a_request_names_the_job_and_the_chunk_length_on_the_get_topic(device):
    assert device.value("in order")["topics"] == [["mpf/v1/dev1/ota/get", "job7", CHUNK]]


def test_the_data_topic_is_subscribed_at_qos_0(device):
    assert device.value("in order")["subscribed"] == [["mpf/v1/dev1/ota/data", 0]]


def test_feed_is_called_for_every_chunk_taken(device):
    assert device.value("in order")["feeds"] == SIZE // CHUNK


def test_the_receive_buffer_is_lent_for_the_pull_and_taken_back(device):
    assert device.value("in order")["rx_calls"] == [8 + CHUNK, None]


def test_the_last_chunk_may_be_short(device):
    got = device.value("a short last chunk")
    assert got["reached"] == SIZE - 120
    assert got["taken"] == chunks(0, SIZE - 120, SIZE - 120) and got["taken"][-1] == [4608, CHUNK - 120]
    assert got["whole"]


def test_a_pull_resumes_from_its_offset(device):
    got = device.value("resumed")
    assert got["reached"] == SIZE
    assert got["taken"] == chunks(1536, SIZE) and got["whole"]
    assert got["requests"] == [[1536, 4], [3584, 2], [4608, 1]], "never past the artifact's end"


def test_a_pull_stops_at_until(device):
    got = device.value("until")
    assert got["reached"] == 2560
    assert got["taken"] == chunks(1024, 2560) and got["whole"]
    assert got["requests"] == [[1024, 3]]


def test_a_late_answer_for_an_earlier_chunk_is_ignored(device):
    got = device.value("a late duplicate")
    assert got["taken"] == chunks(0, SIZE) and got["whole"]
    assert got["ignored"] == 1


# After a bad chunk at 1536 the two behind it arrive and are ignored too; the
# silence that follows asks again from 1536, what had been asked up to 3072.
# A bad last chunk (at 4608, 392 bytes) is asked for again alone.
WRONG_LENGTHS = [
    ("a short chunk", SIZE, [[0, 4], [2048, 2], [1536, 4], [3584, 2], [4608, 1]], 3, 3072 - 1536),
    ("an over-long chunk", SIZE, [[0, 4], [2048, 2], [1536, 4], [3584, 2], [4608, 1]], 3, 3072 - 1536),
    ("a short last chunk cut shorter", SIZE - 120, FIRST_REQUESTS + [[4608, 1]], 1, CHUNK - 120),
    ("an over-long last chunk", SIZE - 120, FIRST_REQUESTS + [[4608, 1]], 1, CHUNK - 120),
]


@pytest.mark.parametrize("name, size, requests, ignored, reasked", WRONG_LENGTHS, ids=[w[0] for w in WRONG_LENGTHS])
def test_a_chunk_of_the_wrong_length_is_ignored_and_asked_for_again(device, name, size, requests, ignored, reasked):
    got = device.value(name)
    assert got["reached"] == size
    assert got["taken"] == chunks(0, size, size) and got["whole"], "the sink never sees the bad chunk"
    assert (got["requests"], got["ignored"], got["reasked"]) == (requests, ignored, reasked)


def test_a_lost_chunk_is_asked_for_again_after_a_silence(device):
    got = device.value("a lost chunk")
    assert got["taken"] == chunks(0, SIZE) and got["whole"]
    assert got["requests"] == [[0, 4], [2048, 2], [3072, 2], [2048, 4], [4096, 2]]
    # what had been asked for from the lost chunk on (up to 4096) is asked for again
    assert got["reasked"] == 4096 - 2048


def test_an_artifact_of_another_size_is_refused_with_both_sizes(device):
    got = device.value("a wrong artifact size")
    assert got["error"] == ["Refused", f"the host's artifact is {SIZE + 1} bytes, the signed job says {SIZE}"]
    assert got["taken"] == []
    assert got["rx_calls"][-1] is None, "the receive buffer is taken back on the way out"


def test_the_hosts_refusal_ends_the_pull_with_its_reason(device):
    got = device.value("a refusal")
    assert got["error"] == ["Refused", "no image for job job7"]
    assert got["taken"] == [] and got["rx_calls"][-1] is None


def test_silence_raises_oserror_after_the_retries(device):
    got = device.value("silence")
    assert got["error"] == ["OSError", "no OTA data for 100 ms, 3 times"]
    assert got["requests"] == [[0, 4]] * 3, "the first ask and one per silence within the retries"
    assert got["rx_calls"][-1] is None


def test_a_header_less_message_and_other_topics_do_not_disturb_the_stream(device):
    got = device.value("interleaved")
    assert got["taken"] == chunks(0, SIZE) and got["whole"]
    assert got["ignored"] == 0


def test_other_topics_go_to_the_other_callback(device):
    assert device.value("the other callback") == [["mpf/v1/dev1/jobs", "[]"]]


def test_two_pulls_on_one_client_subscribe_once(device):
    assert device.value("two pulls") == [1024, SIZE, [["mpf/v1/dev1/ota/data", 0]]]


def test_a_window_below_two_is_two(device):
    got = device.value("a window of one")
    assert got["requests"][0] == [0, 2]
    assert got["taken"] == chunks(0, SIZE) and got["whole"]


def test_a_given_receive_buffer_that_fits_a_chunk_is_used(device):
    assert device.value("a given rx buffer") is True


def test_a_given_receive_buffer_too_small_for_a_chunk_is_replaced(device):
    assert device.value("a given rx buffer too small") == 8 + CHUNK


@pytest.mark.parametrize("chunk", [512, 1024, 2048, 4096, 8192, 12288, 16384])
def test_chunks_that_tile_flash_blocks_are_accepted(device, chunk):
    assert device.value(f"chunk {chunk!r}") is None


@pytest.mark.parametrize("chunk", [0, 511, 513, 1536, 3072, 6144, 16896, True, 4096.0, "'4096'"])
def test_chunks_that_do_not_tile_flash_blocks_are_refused(device, chunk):
    assert device.error(f"chunk {chunk}") == (
        "ValueError", "chunk must be 512..16384 bytes and divide or be a multiple of 4096")
