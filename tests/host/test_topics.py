"""Topic names (mpfleet.protocol.topics): mpf/v1/<device id>/<leaf>, read back only
for a valid device id under the root."""

from mpfleet.protocol.topics import DEVICE_READS, DEVICE_WRITES, device_from_topic, topic


def test_a_topic_is_the_root_the_device_and_the_leaf():
    assert topic("dev-1", "jobs/status") == "mpf/v1/dev-1/jobs/status"


def test_the_wildcard_device_makes_a_subscription():
    assert topic("+", "samples") == "mpf/v1/+/samples"


def test_a_topic_reads_back_as_device_and_leaf():
    assert device_from_topic("mpf/v1/dev-1/samples/ack") == ("dev-1", "samples/ack")


def test_a_topic_under_another_root_is_not_ours():
    assert device_from_topic("mpf/v2/dev-1/state") is None


def test_a_topic_naming_an_invalid_device_is_not_ours():
    assert device_from_topic("mpf/v1/Dev-1/state") is None


def test_a_topic_without_a_leaf_is_not_ours():
    assert device_from_topic("mpf/v1/dev-1") is None


def test_every_leaf_has_one_direction():
    assert not set(DEVICE_READS) & set(DEVICE_WRITES)
