"""Topic names (mpfleet.protocol.topics): mpf/v1/<device id>/<leaf>, read back only
for a valid device id under the root."""

import pytest

from mpfleet.protocol.topics import (DEVICE_READS, DEVICE_WRITES, TopicRootError, check_topic_root,
                                     device_from_topic, topic)


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


# ---------------------------------------------------------------- the topic root
@pytest.mark.parametrize("root", ["mpf/v1", "acme", "acme/site-7/mpf_v1", "a/b/c/d/e/f/g/h"])
def test_a_topic_root_of_plain_levels_is_valid(root):
    assert check_topic_root(root) == root


@pytest.mark.parametrize("root", ["", "/mpf", "mpf/", "mpf//v1", "mpf/+", "mpf/#", "$SYS", "mpf v1",
                                  "a/b/c/d/e/f/g/h/i", "x" * 65, "mpf/v1\n", "ü"])
def test_a_topic_root_with_wildcards_empty_levels_or_odd_characters_is_refused(root):
    with pytest.raises(TopicRootError, match="topic root .* is not valid"):
        check_topic_root(root)


def test_the_device_and_the_host_agree_on_every_topic_root():
    """firmware/lib/agent/config.py's check of broker.topic_root and the host's
    check_topic_root accept exactly the same roots (generated, and the edges)."""
    import random

    from mpfleet.fleet.configschema import firmware_config
    from mpfleet.protocol.topics import TopicRootError, check_topic_root

    device_check = dict(((s, k), c) for s, k, c, _ in firmware_config().SCHEMA)[("broker", "topic_root")]
    rng = random.Random(7)
    alphabet = "aZ09_-/ +#.é"
    cases = ["mpf/v1", "a", "a" * 64, "a" * 65, "/a", "a/", "a//b", "/".join("a" * 8), "/".join("a" * 9),
             "site-A/mpf_2", "", "a/+/b", "a/#", 7, None, ["mpf"]]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(3000)]
    for root in cases:
        try:
            host = check_topic_root(root) == root
        except TopicRootError:
            host = False
        assert device_check(root) is host, root
