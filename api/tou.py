"""Time-of-use calendars (peak / flat / valley slots by month and local time) as data, and the split
of interval energy by slot. No I/O except `load_calendars`."""

from __future__ import annotations

import functools
import importlib.resources
from datetime import datetime
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

QUARTERS = 96  # 15-minute slots in a day
Span = Annotated[str, StringConstraints(pattern=r"^\d{2}:\d{2}-\d{2}:\d{2}$")]


def _quarter(hhmm: str) -> int:
    hours, minutes = (int(x) for x in hhmm.split(":"))
    if minutes % 15 or hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ValueError(f"{hhmm}: times are on a 15-minute grid within 00:00-24:00")
    return hours * 4 + minutes // 15


class Season(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    months: list[Annotated[int, Field(ge=1, le=12)]] = Field(min_length=1)
    slots: dict[str, list[Span]] = Field(min_length=1)

    def grid(self) -> list[str]:
        """The slot of each quarter hour of the day."""
        grid: list[str | None] = [None] * QUARTERS
        for slot, spans in self.slots.items():
            for span in spans:
                lo, hi = (_quarter(t) for t in span.split("-"))
                if hi <= lo:
                    raise ValueError(f"{slot} {span}: end must be after start")
                for q in range(lo, hi):
                    if grid[q] is not None:
                        raise ValueError(f"{slot} {span} overlaps {grid[q]}")
                    grid[q] = slot
        gaps = [q for q, s in enumerate(grid) if s is None]
        if gaps:
            raise ValueError(f"no slot from {gaps[0] // 4:02d}:{gaps[0] % 4 * 15:02d}")
        return [s for s in grid if s is not None]


class Calendar(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    provinces: list[str] = []
    source: str
    seasons: list[Season] = Field(min_length=1)

    @model_validator(mode="after")
    def _whole_year(self) -> Calendar:
        months = [m for s in self.seasons for m in s.months]
        if sorted(months) != list(range(1, 13)):
            raise ValueError("every month must be in exactly one season")
        for season in self.seasons:
            season.grid()
        return self

    @functools.cached_property
    def by_month(self) -> dict[int, list[str]]:
        return {m: s.grid() for s in self.seasons for m in s.months}

    def slot_at(self, local: datetime) -> str:
        return self.by_month[local.month][local.hour * 4 + local.minute // 15]

    def slot_names(self) -> list[str]:
        return sorted({slot for s in self.seasons for slot in s.slots})


class Calendars(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    calendars: dict[str, Calendar]

    def for_province(self, province: str | None) -> str | None:
        for name, cal in self.calendars.items():
            if province is not None and province in cal.provinces:
                return name
        return None


def load_calendars(path: Path | None = None) -> Calendars:
    if path is None:
        text = importlib.resources.files("api").joinpath("data/tou.yaml").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return Calendars.model_validate(yaml.safe_load(text))


def split(
    calendar: Calendar, zone: ZoneInfo, buckets: list[tuple[datetime, float]]
) -> dict[str, tuple[float, int]]:
    """15-minute buckets (start, energy) -> slot -> (energy, number of buckets), each bucket by the
    local time at its start."""
    out: dict[str, tuple[float, int]] = dict.fromkeys(calendar.slot_names(), (0.0, 0))
    for start, energy in buckets:
        slot = calendar.slot_at(start.astimezone(zone))
        total, n = out[slot]
        out[slot] = (total + energy, n + 1)
    return out
