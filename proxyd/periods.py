"""Accounting periods for per-user traffic quotas: when a user's counted bytes start afresh.

An operator names a period ("day", "week", "month" or "N days") and an anchor, the
wall-clock time (and optionally the date) in a zone at which periods begin, such as
"04:00 Europe/Berlin". `parse_period` checks both and gives a `Period`, whose
`bounds(now)` is the period holding a POSIX time as POSIX seconds. Boundaries are
computed directly from calendar dates, never by stepping through time, and a boundary
that falls in a DST gap or fold takes datetime's fold=0 reading, so periods are
contiguous and never overlap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MAX_DAYS = 366

_PERIOD_FORMS = "'day', 'week', 'month' or 'N days' with N from 1 to 366"
_ANCHOR_FORM = "'[YYYY-MM-DD ]HH:MM[:SS] [ZONE]', e.g. '04:00 Europe/Berlin'"
_ZONE_FORMS = "an IANA time zone name such as 'Europe/Berlin', 'UTC' or an offset such as '+02:00'"

_N_DAYS = re.compile(r"(\d+)\s*days?")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
# A zone may follow the time without a space when it is an offset ("04:00+02:00").
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?([+-].*|[Zz])?")
_OFFSET = re.compile(r"([+-])(\d{2}):?(\d{2})")

# Without a date, "N days" counts from the POSIX epoch's date and weeks start on Monday.
_EPOCH_DATE = date(1970, 1, 1)
_A_MONDAY = date(1970, 1, 5)


@dataclass(frozen=True, slots=True)
class Period:
    """A repeating accounting period, made by `parse_period`.

    `spec` and `anchor` are the normalised texts; two periods with equal texts are equal.
    """

    spec: str
    anchor: str
    _kind: str = field(repr=False, compare=False)  # "days", "week" or "month"
    _n: int = field(repr=False, compare=False)  # days per period; unused for "month"
    _date: date | None = field(repr=False, compare=False)
    _time: time = field(repr=False, compare=False)
    _tz: tzinfo = field(repr=False, compare=False)

    def bounds(self, now: float) -> tuple[float, float]:
        """The period holding `now` (POSIX seconds): (start, end), start <= now < end,
        as POSIX seconds."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite POSIX time, not {now!r}")
        index = self._index_on(datetime.fromtimestamp(now, self._tz).date())
        # The local date is only a first guess: near a boundary a zone's offset change can
        # put it one period off, and equal boundaries (a skipped local day) must be passed.
        while self._start(index) > now:
            index -= 1
        while self._start(index + 1) <= now:
            index += 1
        return self._start(index), self._start(index + 1)

    def __str__(self) -> str:
        return f"{self.spec} from {self.anchor}"

    def _start(self, index: int) -> float:
        """The POSIX time at which period number `index` starts."""
        wall = datetime.combine(self._start_date(index), self._time, tzinfo=self._tz)
        return wall.timestamp()

    def _start_date(self, index: int) -> date:
        """The local date on which period number `index` starts."""
        if self._kind == "month":
            year, month0 = divmod(index, 12)
            day = self._date.day if self._date is not None else 1
            return date(year, month0 + 1, min(day, _month_length(year, month0 + 1)))
        return date.fromordinal(self._origin().toordinal() + index * self._n)

    def _index_on(self, day: date) -> int:
        """The number of the last period whose start date is on or before `day`."""
        if self._kind == "month":
            index = day.year * 12 + day.month - 1
            return index if self._start_date(index) <= day else index - 1
        return (day.toordinal() - self._origin().toordinal()) // self._n

    def _origin(self) -> date:
        if self._date is not None:
            return self._date
        return _A_MONDAY if self._kind == "week" else _EPOCH_DATE


def parse_period(period: str, anchor: str = "00:00 UTC") -> Period:
    """Raise ValueError with a clear, operator-facing message naming what is wrong."""
    kind, n, spec = _parse_spec(period)
    anchor_date, anchor_time, zone, zone_text = _parse_anchor(anchor)
    time_text = anchor_time.strftime("%H:%M:%S" if anchor_time.second else "%H:%M")
    date_text = f"{anchor_date.isoformat()} " if anchor_date is not None else ""
    return Period(
        spec=spec,
        anchor=f"{date_text}{time_text} {zone_text}",
        _kind=kind,
        _n=n,
        _date=anchor_date,
        _time=anchor_time,
        _tz=zone,
    )


def _parse_spec(period: str) -> tuple[str, int, str]:
    """(kind, days per period, normalised text) for a period's text."""
    text = " ".join(period.split()).lower()
    if text == "day":
        return "days", 1, "day"
    if text == "week":
        return "week", 7, "week"
    if text == "month":
        return "month", 0, "month"
    match = _N_DAYS.fullmatch(text)
    if match is None:
        raise ValueError(f"period {period!r} is not {_PERIOD_FORMS}")
    n = int(match.group(1))
    if not 1 <= n <= MAX_DAYS:
        raise ValueError(f"period {period!r}: N days takes N from 1 to {MAX_DAYS}, not {n}")
    # "1 day" behaves exactly as "day", so it gets the same text and compares equal.
    return "days", n, "day" if n == 1 else f"{n} days"


def _parse_anchor(anchor: str) -> tuple[date | None, time, tzinfo, str]:
    """(date or None, time, zone, the zone's normalised text) for an anchor's text."""
    tokens = anchor.split()
    if tokens and (split := re.fullmatch(r"(\d{4}-\d{2}-\d{2})[Tt](.+)", tokens[0])):
        tokens[:1] = [split.group(1), split.group(2)]
    if not tokens:
        raise ValueError(f"anchor is empty: give {_ANCHOR_FORM}")
    anchor_date = None
    # A leading "digits-" is meant as a date, so a malformed one is reported as the date.
    if re.match(r"\d+-", tokens[0]):
        anchor_date = _parse_date(tokens.pop(0))
    if not tokens:
        raise ValueError(f"anchor {anchor!r} has no time of day: give {_ANCHOR_FORM}")
    match = _TIME.fullmatch(tokens.pop(0))
    if match is None:
        raise ValueError(f"anchor {anchor!r}: the time is not HH:MM or HH:MM:SS")
    hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
    if hour > 23 or minute > 59 or second > 59:
        clock = match.group(0).removesuffix(match.group(4) or "")
        raise ValueError(
            f"anchor {anchor!r}: the time {clock} is not a time of day (00:00 to 23:59:59)"
        )
    if match.group(4):
        tokens.insert(0, match.group(4))
    if len(tokens) > 1:
        raise ValueError(f"anchor {anchor!r} has more than one zone: give {_ANCHOR_FORM}")
    zone, zone_text = _parse_zone(tokens[0]) if tokens else (UTC, "UTC")
    return anchor_date, time(hour, minute, second), zone, zone_text


def _parse_date(text: str) -> date:
    match = _DATE.fullmatch(text)
    if match is None:
        raise ValueError(f"anchor date {text!r} is not a date YYYY-MM-DD")
    try:
        return date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError as exc:
        raise ValueError(f"anchor date {text!r} does not exist ({exc})") from exc


def _parse_zone(text: str) -> tuple[tzinfo, str]:
    """(zone, normalised text) for a zone name, "UTC" or a fixed offset."""
    if text.upper() in ("UTC", "Z"):
        return UTC, "UTC"
    if text[0] in "+-":
        match = _OFFSET.fullmatch(text)
        if match is None or int(match.group(2)) > 23 or int(match.group(3)) > 59:
            raise ValueError(f"anchor zone {text!r} is not an offset from -23:59 to +23:59")
        sign = -1 if match.group(1) == "-" else 1
        offset = sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        if not offset:
            return UTC, "UTC"
        return timezone(offset), f"{match.group(1)}{match.group(2)}:{match.group(3)}"
    try:
        return ZoneInfo(text), text
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"anchor zone {text!r} is not {_ZONE_FORMS}") from exc


def _month_length(year: int, month: int) -> int:
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - timedelta(days=1)).day
