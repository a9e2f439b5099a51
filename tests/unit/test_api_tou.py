"""Time-of-use calendars: every packaged calendar covers every quarter hour of every month once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from api.tou import Calendar, load_calendars, split

pytestmark = pytest.mark.unit

SHANGHAI = ZoneInfo("Asia/Shanghai")


def test_packaged_calendars_cover_the_year() -> None:
    calendars = load_calendars().calendars
    assert {"zhejiang", "shanghai", "sichuan"} <= set(calendars)
    for cal in calendars.values():
        assert sorted(cal.by_month) == list(range(1, 13))
        assert all(len(grid) == 96 for grid in cal.by_month.values())


def test_zhejiang_slots_from_the_reference_notes() -> None:
    cal = load_calendars().calendars["zhejiang"]

    def at(month: int, hour: int) -> str:
        return cal.slot_at(datetime(2025, month, 10, hour, 0, tzinfo=SHANGHAI))

    assert (at(3, 7), at(3, 8), at(3, 11), at(3, 13), at(3, 17)) == (
        "valley",
        "peak",
        "valley",
        "peak",
        "flat",
    )
    assert (at(7, 9), at(7, 8), at(7, 15)) == ("critical_peak", "peak", "critical_peak")


def test_overlaps_gaps_and_missing_months_are_refused() -> None:
    whole = {"months": list(range(1, 13)), "slots": {"flat": ["00:00-24:00"]}}
    Calendar(name="x", source="s", seasons=[whole])
    overlap = {"months": list(range(1, 13)), "slots": {"flat": ["00:00-24:00"], "peak": ["08:00-09:00"]}}
    gap = {"months": list(range(1, 13)), "slots": {"flat": ["00:00-23:00"]}}
    off_grid = {"months": list(range(1, 13)), "slots": {"flat": ["00:00-12:10", "12:10-24:00"]}}
    for season in (overlap, gap, off_grid):
        with pytest.raises(ValidationError):
            Calendar(name="x", source="s", seasons=[season])
    with pytest.raises(ValidationError):
        Calendar(name="x", source="s", seasons=[{**whole, "months": [1, 2]}])


def test_split_uses_local_time_of_each_quarter() -> None:
    cal = load_calendars().calendars["sichuan"]
    # 02:00 UTC is 10:00 in Shanghai: a peak quarter; 16:00 UTC is midnight: valley.
    start = datetime(2025, 5, 1, 2, 0, tzinfo=UTC)
    buckets = [
        (start, 4.0),
        (start + timedelta(minutes=15), 6.0),
        (datetime(2025, 5, 1, 16, 0, tzinfo=UTC), 1.0),
    ]
    out = split(cal, SHANGHAI, buckets)
    assert out["peak"] == (10.0, 2) and out["valley"] == (1.0, 1) and out["flat"] == (0.0, 0)
