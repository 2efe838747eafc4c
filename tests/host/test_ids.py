"""Device ids (mpfleet.protocol.ids): the one rule, [a-z0-9_-]{1,64}, in its text and
bytes forms; a bad id fails with a DeviceIdError (an MpfleetError) that quotes it."""

import pytest

from mpfleet.errors import MpfleetError
from mpfleet.protocol.ids import (DEVICE_ID_BYTES_RE, DEVICE_ID_MAX_LEN, DeviceIdError, check_device_id,
                                  is_device_id)

GOOD = ["a", "dev-1", "pump_07", "0123456789abcdef", "x" * DEVICE_ID_MAX_LEN]
BAD = ["", "Dev1", "d 1", "d/1", "d+", "d#", "dé", "x" * (DEVICE_ID_MAX_LEN + 1), "dev-1\n"]


@pytest.mark.parametrize("good", GOOD)
def test_valid_ids_pass_in_both_forms(good):
    assert is_device_id(good) and check_device_id(good) == good
    assert DEVICE_ID_BYTES_RE.match(good.encode())


@pytest.mark.parametrize("bad", BAD)
def test_topic_unsafe_ids_are_refused_in_both_forms(bad):
    assert not is_device_id(bad)
    assert not DEVICE_ID_BYTES_RE.match(bad.encode())


def test_a_non_string_is_not_a_device_id():
    assert not is_device_id(None) and not is_device_id(b"dev-1")


def test_a_bad_id_fails_quoting_it_and_the_rule():
    with pytest.raises(DeviceIdError) as err:
        check_device_id("Dev/1")
    assert str(err.value) == "'Dev/1' is not a valid device id (1..64 of a-z, 0-9, _ and -)"
    assert isinstance(err.value, MpfleetError)


def test_the_message_names_the_kind_of_name_checked():
    with pytest.raises(DeviceIdError, match="'Pumps' is not a valid group name"):
        check_device_id("Pumps", what="group name")
