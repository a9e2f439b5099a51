"""Demand-response customer baselines and event performance: pure functions over numpy arrays, no I/O.

Load is given per local day as average kW per interval (96 values for 15-minute intervals, NaN where
missing). A day is a candidate for a baseline when it is before the event day, not excluded (past event
days, holidays, days that failed validation: the caller passes them), has every interval, and has the
right day type. Baselines (reference notes 5.3, checklist F.41), by name in `BASELINES`:

* ``CN_JS_5WD`` (Jiangsu, day-ahead): the average of the same intervals on the 5 most recent normal working
  days before the event day.
* ``CN_BJ_5of10`` (Beijing): 10 typical (working, eligible) days counted back from D-2, the 5 with the
  highest daily load averaged.
* ``CAISO_10of10``: the 10 most recent eligible days of the event day's type (working / non-working),
  averaged, times a same-day load-point adjustment: actual / baseline over the ``adjust_hours`` ending
  ``gap_hours`` before the start, clipped to 0.8..1.2.
* ``CN_JS_RT15`` (Jiangsu, real-time): the load of the interval just before the start (15 minutes), held.

Performance (F.42): per interval ``delivered = baseline - actual`` for an up (load-reduction) event and
``actual - baseline`` for a down event; over the event ``delivered_kw = (sum baseline energy - sum actual
energy) / duration`` (the mean, since intervals are equal), ``performance_ratio = delivered / committed``,
and the response is valid when the ratio reaches the program's threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, Literal

import numpy as np

from processing.kernels import F64

INTERVALS_PER_DAY: Final = 96
INTERVAL_H: Final = 0.25
ADJUST_CLIP: Final = (0.8, 1.2)

Direction = Literal["up", "down"]
History = Mapping[date, F64]


class InsufficientHistory(ValueError):
    """Not enough eligible days (or no data before the start) for the baseline."""


@dataclass(frozen=True, slots=True)
class Event:
    day: date  # local day of the event
    first: int  # first interval of the event on that day
    last: int  # one past the last interval
    holidays: frozenset[date] = frozenset()  # non-working weekdays (working weekend days are not modelled)

    @property
    def intervals(self) -> slice:
        return slice(self.first, self.last)


@dataclass(frozen=True, slots=True)
class Baseline:
    method: str
    kw: F64  # the event's intervals
    days: tuple[date, ...]  # the days averaged (empty for CN_JS_RT15)
    adjustment: float = 1.0


@dataclass(frozen=True, slots=True)
class Performance:
    baseline_kw: F64
    actual_kw: F64  # NaN where not measured (yet)
    delivered_kw: F64
    ratio: F64  # per interval, delivered / committed
    total_delivered_kw: float | None  # None until every interval is measured
    performance_ratio: float | None
    valid: bool | None


def is_working_day(day: date, holidays: frozenset[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


def candidates(
    history: History, event: Event, excluded: frozenset[date], *, start: date, working: bool | None
) -> list[date]:
    """Eligible days on or before `start`, newest first. `working`: True for working days only, False for
    non-working days only, None for both."""
    days = sorted((d for d in history if d <= start), reverse=True)
    out = []
    for d in days:
        if d in excluded or d >= event.day:
            continue
        if working is not None and is_working_day(d, event.holidays) != working:
            continue
        kw = history[d]
        if kw.size != INTERVALS_PER_DAY or np.isnan(kw).any():
            continue
        out.append(d)
    return out


def _average(history: History, days: list[date]) -> F64:
    stacked: F64 = np.stack([history[d] for d in days])
    mean: F64 = stacked.mean(axis=0)
    return mean


def _need(days: list[date], n: int, method: str) -> list[date]:
    if len(days) < n:
        raise InsufficientHistory(f"{method} needs {n} eligible days, found {len(days)}")
    return days[:n]


def cn_js_5wd(history: History, event: Event, excluded: frozenset[date]) -> Baseline:
    days = _need(
        candidates(history, event, excluded, start=event.day - timedelta(days=1), working=True),
        5,
        "CN_JS_5WD",
    )
    return Baseline("CN_JS_5WD", _average(history, days)[event.intervals], tuple(days))


def cn_bj_5of10(history: History, event: Event, excluded: frozenset[date]) -> Baseline:
    typical = _need(
        candidates(history, event, excluded, start=event.day - timedelta(days=2), working=True),
        10,
        "CN_BJ_5of10",
    )
    # Highest daily load first; ties go to the more recent day (a stable sort of newest-first days).
    highest = sorted(typical, key=lambda d: -float(history[d].sum()))[:5]
    return Baseline("CN_BJ_5of10", _average(history, highest)[event.intervals], tuple(highest))


def caiso_10of10(
    history: History, event: Event, excluded: frozenset[date], *, adjust_hours: int = 3, gap_hours: int = 1
) -> Baseline:
    same_type = is_working_day(event.day, event.holidays)
    days = _need(
        candidates(history, event, excluded, start=event.day - timedelta(days=1), working=same_type),
        10,
        "CAISO_10of10",
    )
    profile = _average(history, days)
    per_hour = round(1 / INTERVAL_H)
    hi = max(0, event.first - gap_hours * per_hour)
    lo = max(0, hi - adjust_hours * per_hour)
    adjustment = 1.0
    today = history.get(event.day)
    if hi > lo and today is not None:
        actual, base = today[lo:hi], profile[lo:hi]
        if not np.isnan(actual).any() and base.sum() > 0:
            adjustment = float(np.clip(actual.sum() / base.sum(), *ADJUST_CLIP))
    return Baseline("CAISO_10of10", profile[event.intervals] * adjustment, tuple(days), adjustment)


def cn_js_rt15(history: History, event: Event, excluded: frozenset[date]) -> Baseline:
    if event.first > 0:
        before = history.get(event.day)
        value = np.nan if before is None else float(before[event.first - 1])
    else:
        before = history.get(event.day - timedelta(days=1))
        value = np.nan if before is None else float(before[-1])
    if np.isnan(value):
        raise InsufficientHistory("CN_JS_RT15 needs the load of the 15 minutes before the start")
    return Baseline("CN_JS_RT15", np.full(event.last - event.first, value), ())


BaselineMethod = Callable[[History, Event, frozenset[date]], Baseline]
BASELINES: Final[dict[str, BaselineMethod]] = {
    "CN_JS_5WD": cn_js_5wd,
    "CN_BJ_5of10": cn_bj_5of10,
    "CAISO_10of10": caiso_10of10,
    "CN_JS_RT15": cn_js_rt15,
}


def performance(
    baseline_kw: F64, actual_kw: F64, *, direction: Direction, committed_kw: float, valid_ratio: float
) -> Performance:
    delivered = baseline_kw - actual_kw if direction == "up" else actual_kw - baseline_kw
    complete = not np.isnan(actual_kw).any()
    total = float(delivered.mean()) if complete else None
    ratio = None if total is None else total / committed_kw
    return Performance(
        baseline_kw,
        actual_kw,
        delivered,
        delivered / committed_kw,
        total,
        ratio,
        None if ratio is None else ratio >= valid_ratio,
    )
