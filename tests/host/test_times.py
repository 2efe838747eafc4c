"""The one grammar of durations and points in time (mpfleet.protocol.times): every form
the docs give reads as documented, and every text that is not one fails with a
TimeFormatError (an MpfleetError) that quotes it."""

import pytest

from mpfleet.errors import MpfleetError
from mpfleet.protocol.times import TimeFormatError, parse_duration, parse_time

NOW = 1_800_000_000.0


def _expect_duration_error(text: str, message: str, **kw):
    with pytest.raises(TimeFormatError) as err:
        parse_duration(text, **kw)
    assert message in str(err.value)
    assert isinstance(err.value, MpfleetError)


def _expect_time_error(text: str):
    with pytest.raises(TimeFormatError) as err:
        parse_time(text, now=NOW)
    assert f"cannot read the time {text!r}" in str(err.value)
    assert isinstance(err.value, MpfleetError)


# ---------------------------------------------------------------- durations
def test_a_bare_number_is_seconds():
    assert parse_duration("90") == 90


def test_each_unit_scales_the_number():
    assert [parse_duration(t) for t in ("90s", "10m", "2h", "7d", "1w")] == [90, 600, 7200, 604800, 604800]


def test_a_fractional_number_is_scaled_exactly():
    assert parse_duration("1.5h") == 5400


def test_spaces_around_and_before_the_unit_are_ignored():
    assert parse_duration(" 2 d ") == 172800


def test_a_word_is_not_a_duration():
    _expect_duration_error("soon", "'soon' is not a duration such as 90s, 10m, 2h or 7d")


def test_an_unknown_unit_is_not_a_duration():
    _expect_duration_error("2 hours", "'2 hours' is not a duration")


def test_a_negative_duration_is_refused():
    _expect_duration_error("-5m", "'-5m' is not a duration")


def test_a_bare_number_is_refused_where_a_unit_is_required():
    _expect_duration_error("2", "'2' is not a duration with a unit", unit_required=True)


# ---------------------------------------------------------------- points in time
def test_plus_a_duration_is_that_long_from_now():
    assert parse_time("+10m", now=1000.0) == 1600.0


def test_plus_a_bare_number_is_that_many_seconds_from_now():
    assert parse_time("+90", now=1000.0) == 1090.0


def test_a_duration_with_a_unit_is_that_long_ago():
    assert parse_time("90m", now=NOW) == NOW - 5400
    assert parse_time("7d", now=NOW) == NOW - 7 * 86400


def test_iso_8601_with_z_is_utc():
    assert parse_time("2026-12-01T08:00Z") == 1796112000.0


def test_iso_8601_without_a_zone_is_utc():
    assert parse_time("2026-12-01T08:00") == 1796112000.0


def test_an_iso_date_is_its_midnight_utc():
    assert parse_time("2026-12-01") == parse_time("20261201") == 1796083200.0


def test_unix_seconds_are_taken_as_they_are():
    assert parse_time("1796112000") == 1796112000.0
    assert parse_time("1796112000.5") == 1796112000.5


def test_a_word_is_not_a_time():
    _expect_time_error("tomorrow")


def test_a_short_bare_number_is_not_a_time():
    """Not a moment in 1970: a duration that lost its unit or its '+'."""
    _expect_time_error("90")


def test_plus_a_word_is_not_a_time():
    _expect_time_error("+soon")


def test_an_impossible_date_is_not_a_time():
    _expect_time_error("2026-13-01")


def test_the_message_names_every_form():
    with pytest.raises(TimeFormatError, match=r"ISO 8601 .* from now \(\+10m\), a time ago \(90m, 2h, 7d\) "
                                              r"or Unix seconds"):
        parse_time("yesterday-ish")
