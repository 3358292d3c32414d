"""proxyd.periods: parsing periods and anchors, known bounds, and the properties every
period's bounds keep across DST changes (contiguous, stable, start <= now < end)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.periods import Period, parse_period

HOUR = 3600
DAY = 86400


def ts(text: str) -> float:
    """POSIX seconds for an ISO 8601 text with an offset."""
    return datetime.fromisoformat(text).timestamp()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bounds_iso(period: str, anchor: str, now: str) -> tuple[str, str]:
    start, end = parse_period(period, anchor).bounds(ts(now))
    return iso(start), iso(end)


# -- parsing and normalised text -----------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "spec"),
    [
        ("day", "day"),
        ("  DAY ", "day"),
        ("Week", "week"),
        ("month", "month"),
        ("1 day", "day"),
        ("1 days", "day"),
        ("7 days", "7 days"),
        (" 30  DAYS ", "30 days"),
        ("366 days", "366 days"),
        ("2 day", "2 days"),
    ],
)
def test_period_text_is_normalised(period: str, spec: str) -> None:
    assert parse_period(period).spec == spec


@pytest.mark.parametrize(
    ("anchor", "normalised"),
    [
        ("00:00 UTC", "00:00 UTC"),
        ("4:00", "04:00 UTC"),
        ("04:00 utc", "04:00 UTC"),
        ("04:00 Z", "04:00 UTC"),
        ("04:00:30 Europe/Berlin", "04:00:30 Europe/Berlin"),
        ("04:00:00 Europe/Berlin", "04:00 Europe/Berlin"),
        ("2026-01-15 04:00 Europe/Berlin", "2026-01-15 04:00 Europe/Berlin"),
        ("2026-01-15T04:00 Europe/Berlin", "2026-01-15 04:00 Europe/Berlin"),
        ("  2026-01-15   04:00  ", "2026-01-15 04:00 UTC"),
        ("00:00 +02:00", "00:00 +02:00"),
        ("00:00 -0530", "00:00 -05:30"),
        ("00:00+05:30", "00:00 +05:30"),
        ("00:00 +00:00", "00:00 UTC"),
        ("12:00 America/New_York", "12:00 America/New_York"),
    ],
)
def test_anchor_text_is_normalised(anchor: str, normalised: str) -> None:
    assert parse_period("day", anchor).anchor == normalised


def test_str_names_period_and_anchor() -> None:
    assert str(parse_period("month")) == "month from 00:00 UTC"
    period = parse_period("7 Days", "2026-01-01T00:00 UTC")
    assert str(period) == "7 days from 2026-01-01 00:00 UTC"


def test_equal_texts_are_equal_periods() -> None:
    assert parse_period("DAY", "0:00") == parse_period("1 day", "00:00 UTC")
    assert parse_period("day") != parse_period("week")
    assert hash(parse_period("week")) == hash(parse_period(" week "))


@pytest.mark.parametrize(
    ("period", "words"),
    [
        ("fortnight", ["'day', 'week', 'month' or 'N days'"]),
        ("", ["'day', 'week', 'month' or 'N days'"]),
        ("-3 days", ["'N days'"]),
        ("0 days", ["1 to 366", "not 0"]),
        ("400 days", ["1 to 366", "not 400"]),
    ],
)
def test_bad_period_is_named(period: str, words: list[str]) -> None:
    with pytest.raises(ValueError, match="period") as caught:
        parse_period(period)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("anchor", "words"),
    [
        ("25:00", ["time 25:00", "not a time of day"]),
        ("24:00", ["time 24:00"]),
        ("12:60", ["time 12:60"]),
        ("12:00:60", ["time 12:00:60"]),
        ("noon", ["time is not HH:MM"]),
        ("2026-02-30 00:00", ["date '2026-02-30' does not exist"]),
        ("2026-13-01 00:00", ["date '2026-13-01' does not exist"]),
        ("2026-1-1 00:00", ["date '2026-1-1'", "YYYY-MM-DD"]),
        ("2026-01-01", ["no time of day"]),
        ("00:00 Mars/Olympus", ["zone 'Mars/Olympus'", "IANA"]),
        ("00:00 europe/berlin", ["zone 'europe/berlin'"]),
        ("00:00 ../etc/passwd", ["zone '../etc/passwd'"]),
        ("00:00 +25:00", ["zone '+25:00'", "offset"]),
        ("00:00 +2", ["zone '+2'", "offset"]),
        ("00:00 UTC Europe/Berlin", ["more than one zone"]),
        ("", ["anchor is empty"]),
    ],
)
def test_bad_anchor_names_the_part(anchor: str, words: list[str]) -> None:
    with pytest.raises(ValueError, match="anchor") as caught:
        parse_period("day", anchor)
    for word in words:
        assert word in str(caught.value)


def test_bounds_refuses_a_non_finite_now() -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_period("day").bounds(float("nan"))


# -- known bounds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "anchor", "now", "start", "end"),
    [
        # day in UTC
        ("day", "00:00 UTC", "2026-12-06T05:30Z", "2026-12-06T00:00:00Z", "2026-12-07T00:00:00Z"),
        ("day", "00:00 UTC", "2026-12-06T00:00Z", "2026-12-06T00:00:00Z", "2026-12-07T00:00:00Z"),
        ("day", "06:00", "2026-12-06T05:30Z", "2026-12-05T06:00:00Z", "2026-12-06T06:00:00Z"),
        (
            "day",
            "00:00 +05:30",
            "2026-12-06T20:00Z",
            "2026-12-06T18:30:00Z",
            "2026-12-07T18:30:00Z",
        ),
        # DST start in Berlin (2026-03-29 02:00 CET -> 03:00 CEST): the local day is 23 h
        (
            "day",
            "00:00 Europe/Berlin",
            "2026-03-29T12:00Z",
            "2026-03-28T23:00:00Z",
            "2026-03-29T22:00:00Z",
        ),
        # a 04:00 anchor: the period that holds the change, from the 28th, is the short one
        (
            "day",
            "04:00 Europe/Berlin",
            "2026-03-29T01:00Z",
            "2026-03-28T03:00:00Z",
            "2026-03-29T02:00:00Z",
        ),
        (
            "day",
            "04:00 Europe/Berlin",
            "2026-03-29T02:00Z",
            "2026-03-29T02:00:00Z",
            "2026-03-30T02:00:00Z",
        ),
        # DST end in Berlin (2026-10-25 03:00 CEST -> 02:00 CET): 25 h
        (
            "day",
            "00:00 Europe/Berlin",
            "2026-10-25T12:00Z",
            "2026-10-24T22:00:00Z",
            "2026-10-25T23:00:00Z",
        ),
        # an anchor in the spring gap reads as fold=0: 02:30 at +01:00, i.e. 03:30 CEST
        (
            "day",
            "02:30 Europe/Berlin",
            "2026-03-29T12:00Z",
            "2026-03-29T01:30:00Z",
            "2026-03-30T00:30:00Z",
        ),
        (
            "day",
            "02:30 Europe/Berlin",
            "2026-03-29T01:00Z",
            "2026-03-28T01:30:00Z",
            "2026-03-29T01:30:00Z",
        ),
        # an anchor in the autumn fold reads as fold=0: the first 02:30, still CEST
        (
            "day",
            "02:30 Europe/Berlin",
            "2026-10-25T01:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-26T01:30:00Z",
        ),
        # New York: DST starts 2026-03-08
        (
            "day",
            "00:00 America/New_York",
            "2026-03-08T12:00Z",
            "2026-03-08T05:00:00Z",
            "2026-03-09T04:00:00Z",
        ),
        # week: without a date, from Monday (2026-12-06 is a Sunday)
        ("week", "00:00 UTC", "2026-12-06T05:30Z", "2026-11-30T00:00:00Z", "2026-12-07T00:00:00Z"),
        ("week", "00:00 UTC", "2026-12-07T00:00Z", "2026-12-07T00:00:00Z", "2026-12-14T00:00:00Z"),
        # week: with a date, on its weekday (2026-01-15 is a Thursday)
        (
            "week",
            "2026-01-15 04:00 Europe/Berlin",
            "2026-12-06T05:30Z",
            "2026-12-03T03:00:00Z",
            "2026-12-10T03:00:00Z",
        ),
        (
            "week",
            "2026-01-15 04:00 Europe/Berlin",
            "2026-03-27T12:00Z",
            "2026-03-26T03:00:00Z",
            "2026-04-02T02:00:00Z",
        ),
        # month without a date: from the 1st
        ("month", "00:00 UTC", "2026-12-06T05:30Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        (
            "month",
            "00:00 Europe/Berlin",
            "2026-03-15T00:00Z",
            "2026-02-28T23:00:00Z",
            "2026-03-31T22:00:00Z",
        ),
        # month from the 31st: a shorter month starts on its last day
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2026-02-10T00:00Z",
            "2026-01-31T00:00:00Z",
            "2026-02-28T00:00:00Z",
        ),
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2026-03-05T00:00Z",
            "2026-02-28T00:00:00Z",
            "2026-03-31T00:00:00Z",
        ),
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2026-04-15T00:00Z",
            "2026-03-31T00:00:00Z",
            "2026-04-30T00:00:00Z",
        ),
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2026-05-01T00:00Z",
            "2026-04-30T00:00:00Z",
            "2026-05-31T00:00:00Z",
        ),
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2028-03-01T00:00Z",
            "2028-02-29T00:00:00Z",
            "2028-03-31T00:00:00Z",
        ),
        (
            "month",
            "2026-01-31 00:00 UTC",
            "2026-12-31T12:00Z",
            "2026-12-31T00:00:00Z",
            "2027-01-31T00:00:00Z",
        ),
        (
            "month",
            "2025-03-15 12:00 UTC",
            "2026-01-10T00:00Z",
            "2025-12-15T12:00:00Z",
            "2026-01-15T12:00:00Z",
        ),
        # N days, counted from the anchor's date (and before it, too)
        (
            "7 days",
            "2026-01-01 00:00 UTC",
            "2026-01-20T00:00Z",
            "2026-01-15T00:00:00Z",
            "2026-01-22T00:00:00Z",
        ),
        (
            "7 days",
            "2026-01-01 00:00 UTC",
            "2026-01-01T00:00Z",
            "2026-01-01T00:00:00Z",
            "2026-01-08T00:00:00Z",
        ),
        (
            "7 days",
            "2026-01-01 00:00 UTC",
            "2025-12-31T23:59Z",
            "2025-12-25T00:00:00Z",
            "2026-01-01T00:00:00Z",
        ),
        # N days without a date: from 1970-01-01 (a Thursday), not from Monday as a week
        (
            "7 days",
            "00:00 UTC",
            "2026-12-06T05:30Z",
            "2026-12-03T00:00:00Z",
            "2026-12-10T00:00:00Z",
        ),
        (
            "3 days",
            "00:00 UTC",
            "1970-01-04T00:00Z",
            "1970-01-04T00:00:00Z",
            "1970-01-07T00:00:00Z",
        ),
        # N days in local calendar days: the time of day stays 04:00 across DST
        (
            "30 days",
            "2026-03-01 04:00 Europe/Berlin",
            "2026-03-15T12:00Z",
            "2026-03-01T03:00:00Z",
            "2026-03-31T02:00:00Z",
        ),
    ],
)
def test_known_bounds(period: str, anchor: str, now: str, start: str, end: str) -> None:
    assert bounds_iso(period, anchor, now) == (start, end)


def test_berlin_day_lengths_around_dst() -> None:
    period = parse_period("day", "04:00 Europe/Berlin")
    lengths = {}
    for day in ("2026-03-28", "2026-03-29", "2026-03-30", "2026-10-24", "2026-10-25"):
        start, end = period.bounds(ts(f"{day}T12:00Z"))
        lengths[day] = (end - start) / HOUR
    assert lengths == {
        "2026-03-28": 23,
        "2026-03-29": 24,
        "2026-03-30": 24,
        "2026-10-24": 25,
        "2026-10-25": 24,
    }


def test_month_starts_on_the_anchor_day_or_the_month_end() -> None:
    period = parse_period("month", "2026-01-31 00:00 UTC")
    starts = []
    now = ts("2026-01-31T00:00Z")
    for _ in range(13):
        start, now = period.bounds(now)
        starts.append(iso(start)[:10])
    assert starts == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
        "2026-05-31",
        "2026-06-30",
        "2026-07-31",
        "2026-08-31",
        "2026-09-30",
        "2026-10-31",
        "2026-11-30",
        "2026-12-31",
        "2027-01-31",
    ]


def test_far_from_the_anchor_is_computed_directly() -> None:
    # Decades away from the anchor still lands on the anchor's weekday and time.
    period = parse_period("week", "1970-01-08 06:00 America/New_York")
    start, end = period.bounds(ts("2099-07-04T12:00Z"))
    local = datetime.fromtimestamp(start, ZoneInfo("America/New_York"))
    assert (local.weekday(), local.hour, local.minute) == (3, 6, 0)
    assert end - start == 7 * DAY


# -- properties over many instants ---------------------------------------------------------

ANCHORS = [
    "00:00 UTC",
    "04:00 Europe/Berlin",
    "02:30 Europe/Berlin",  # in the spring gap and the autumn fold
    "2026-01-15 04:00 Europe/Berlin",
    "2026-01-31 23:59:59 Europe/Berlin",
    "01:30 America/New_York",  # in the autumn fold
    "2024-02-29 02:15 America/New_York",  # in the spring gap
    "12:00 +05:30",
    "2026-01-31 00:00 UTC",
    "1999-12-31T18:45 -0530",
]
PERIODS = ["day", "week", "month", "1 day", "2 days", "7 days", "30 days", "366 days"]
DST_ZONES = ("Europe/Berlin", "America/New_York")

periods = st.builds(parse_period, st.sampled_from(PERIODS), st.sampled_from(ANCHORS))
# 1971 to 2100, with fractions of a second
instants = st.floats(min_value=365 * DAY, max_value=4102444800.0, allow_nan=False)


def in_dst_zone(period: Period) -> bool:
    return period.anchor.endswith(DST_ZONES)


@settings(max_examples=600, deadline=None)
@given(periods, instants)
def test_bounds_hold_now_and_are_stable_and_contiguous(period: Period, now: float) -> None:
    start, end = period.bounds(now)
    assert start <= now < end
    assert period.bounds(start) == (start, end)
    assert period.bounds(end)[0] == end
    assert period.bounds(start - 0.5)[1] == start
    assert period.bounds(end - 0.001) == (start, end)


@settings(max_examples=300, deadline=None)
@given(periods, instants, st.floats(min_value=0.0, max_value=1.0))
def test_every_instant_of_a_period_has_that_period(
    period: Period, now: float, fraction: float
) -> None:
    start, end = period.bounds(now)
    other = min(start + fraction * (end - start), end - 0.001)
    assert period.bounds(other) == (start, end)


@settings(max_examples=400, deadline=None)
@given(periods, instants)
def test_period_lengths(period: Period, now: float) -> None:
    start, end = period.bounds(now)
    length = end - start
    # DST moves a boundary by an hour at most in these zones; fixed zones never move one.
    slack = HOUR if in_dst_zone(period) else 0
    if period.spec == "month":
        assert 28 * DAY - slack <= length <= 31 * DAY + slack
    else:
        days = {"day": 1, "week": 7}.get(period.spec) or int(period.spec.split()[0])
        assert days * DAY - slack <= length <= days * DAY + slack


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["00:00", "04:00 UTC", "2026-01-31 00:00 UTC", "00:00 +05:30"]), instants)
def test_fixed_zones_have_exact_lengths(anchor: str, now: float) -> None:
    start, end = parse_period("day", anchor).bounds(now)
    assert end - start == DAY
    start, end = parse_period("week", anchor).bounds(now)
    assert end - start == 7 * DAY
    start, end = parse_period("month", anchor).bounds(now)
    assert (end - start) / DAY in (28, 29, 30, 31)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PERIODS), st.sampled_from(DST_ZONES), instants)
def test_boundaries_keep_the_local_time_across_dst(spec: str, zone: str, now: float) -> None:
    # 04:00 exists every day in both zones, so every boundary is 04:00 local.
    period = parse_period(spec, f"2026-01-31 04:00 {zone}")
    start, end = period.bounds(now)
    for edge in (start, end):
        local = datetime.fromtimestamp(edge, ZoneInfo(zone))
        assert (local.hour, local.minute, local.second) == (4, 0, 0)


def test_a_skipped_local_day_gives_no_empty_period() -> None:
    # Samoa skipped 2011-12-30 (UTC-10 to UTC+14): the 30th's and 31st's noon are one instant.
    period = parse_period("day", "12:00 Pacific/Apia")
    assert bounds_iso("day", "12:00 Pacific/Apia", "2011-12-30T10:00Z") == (
        "2011-12-29T22:00:00Z",
        "2011-12-30T22:00:00Z",
    )
    start, end = period.bounds(ts("2011-12-30T22:00Z"))
    assert (iso(start), iso(end)) == ("2011-12-30T22:00:00Z", "2011-12-31T22:00:00Z")
    now = ts("2011-12-27T00:00Z")
    for _ in range(8):
        start, end = period.bounds(now)
        assert start <= now < end and period.bounds(start) == (start, end)
        now = end
