"""The access line's own time stamp: the text structlog's TimeStamper writes."""

from __future__ import annotations

import datetime
import re

import structlog

from proxyd import log

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


def test_the_stamp_reads_as_structlogs_does() -> None:
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    for _ in range(1000):
        ours = log._utc_now()
        theirs = stamper(None, "info", {})["ts"]
        assert ISO_UTC.fullmatch(ours), ours
        assert ISO_UTC.fullmatch(theirs), theirs
        gap = datetime.datetime.fromisoformat(theirs) - datetime.datetime.fromisoformat(ours)
        assert datetime.timedelta(0) <= gap < datetime.timedelta(milliseconds=50)
