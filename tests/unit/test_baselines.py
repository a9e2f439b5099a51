"""Each DR baseline against a worked example, and event performance.

History (flat load per day, kW; event on Wednesday 2026-03-18, 14:00-16:00 = intervals 56..64):

    Mar 17 Tue 100   Mar 10 Tue 140 (failed validation)   Mar 3 Tue 105   Feb 26 Thu 85
    Mar 16 Mon 110   Mar  9 Mon 150                        Mar 2 Mon 115   Feb 25 Wed 80
    Mar 15 Sun  50   Mar  8 Sun  50                        Mar 1 Sun  50
    Mar 14 Sat  50   Mar  7 Sat  50                        Feb 28 Sat 50
    Mar 13 Fri 120 (an earlier event day)                  Feb 27 Fri 125
    Mar 12 Thu  40 (holiday)  Mar 6 Fri 160  Mar 5 Thu 90  Mar 4 Wed 95
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest

from processing import dr

pytestmark = pytest.mark.unit

LEVELS = {
    date(2026, 3, 17): 100, date(2026, 3, 16): 110, date(2026, 3, 15): 50, date(2026, 3, 14): 50,
    date(2026, 3, 13): 120, date(2026, 3, 12): 40, date(2026, 3, 11): 130, date(2026, 3, 10): 140,
    date(2026, 3, 9): 150, date(2026, 3, 8): 50, date(2026, 3, 7): 50, date(2026, 3, 6): 160,
    date(2026, 3, 5): 90, date(2026, 3, 4): 95, date(2026, 3, 3): 105, date(2026, 3, 2): 115,
    date(2026, 3, 1): 50, date(2026, 2, 28): 50, date(2026, 2, 27): 125, date(2026, 2, 26): 85,
    date(2026, 2, 25): 80,
}  # fmt: skip
EVENT_DAY = date(2026, 3, 18)
HOLIDAY = date(2026, 3, 12)
PAST_EVENT = date(2026, 3, 13)
FAILED = date(2026, 3, 10)


def history(event_day_kw: float | None = None) -> dict[date, np.ndarray]:
    h = {d: np.full(dr.INTERVALS_PER_DAY, float(kw)) for d, kw in LEVELS.items()}
    h[FAILED][30] = np.nan  # a missing interval
    if event_day_kw is not None:
        h[EVENT_DAY] = np.full(dr.INTERVALS_PER_DAY, event_day_kw)
    return h


EVENT = dr.Event(EVENT_DAY, 56, 64, holidays=frozenset({HOLIDAY}))
EXCLUDED = frozenset({PAST_EVENT})


def test_jiangsu_five_recent_working_days() -> None:
    b = dr.cn_js_5wd(history(), EVENT, EXCLUDED)
    # Mar 17, 16 (weekend, past event day and holiday skipped), 11, (10 failed) 9, 6.
    assert b.days == (
        date(2026, 3, 17),
        date(2026, 3, 16),
        date(2026, 3, 11),
        date(2026, 3, 9),
        date(2026, 3, 6),
    )
    assert b.kw == pytest.approx(np.full(8, (100 + 110 + 130 + 150 + 160) / 5))


def test_beijing_five_highest_of_ten_typical_days() -> None:
    b = dr.cn_bj_5of10(history(), EVENT, EXCLUDED)
    # Ten typical days from D-2 (Mar 16): 110 130 150 160 90 95 105 115 125 85; highest five averaged.
    assert sorted(b.days) == sorted(
        [date(2026, 3, 6), date(2026, 3, 9), date(2026, 3, 11), date(2026, 2, 27), date(2026, 3, 2)]
    )
    assert b.kw == pytest.approx(np.full(8, (160 + 150 + 130 + 125 + 115) / 5))


@pytest.mark.parametrize(
    ("event_day_kw", "adjustment"),
    [(150.0, 1.2), (106.2, 0.9), (80.0, 0.8)],  # 150/118 clipped to 1.2; 0.9 within; 80/118 clipped to 0.8
)
def test_caiso_ten_of_ten_with_clipped_same_day_adjustment(event_day_kw: float, adjustment: float) -> None:
    b = dr.caiso_10of10(history(event_day_kw), EVENT, EXCLUDED)
    # Ten most recent eligible working days: 100 110 130 150 160 90 95 105 115 125 -> 118.
    assert len(b.days) == 10 and b.days[-1] == date(2026, 2, 27)
    assert b.adjustment == pytest.approx(adjustment)
    assert b.kw == pytest.approx(np.full(8, 118 * adjustment))


def test_caiso_on_a_weekend_uses_weekend_days() -> None:
    h = history()
    for d in (date(2026, 2, d) for d in range(1, 25)):
        h[d] = np.full(dr.INTERVALS_PER_DAY, 50.0 if d.weekday() >= 5 else 100.0)
    saturday = dr.Event(date(2026, 3, 21), 56, 64)
    b = dr.caiso_10of10(h, saturday, frozenset())
    assert all(d.weekday() >= 5 for d in b.days)
    assert b.kw == pytest.approx(np.full(8, 50.0))


def test_real_time_load_fifteen_minutes_before_start() -> None:
    h = history(150.0)
    h[EVENT_DAY][55] = 142.0
    b = dr.cn_js_rt15(h, EVENT, EXCLUDED)
    assert b.kw == pytest.approx(np.full(8, 142.0))
    midnight = dr.Event(EVENT_DAY, 0, 4)
    assert dr.cn_js_rt15(h, midnight, EXCLUDED).kw == pytest.approx(np.full(4, 100.0))  # Mar 17's last


def test_too_few_eligible_days_is_an_error() -> None:
    h = {d: v for d, v in history().items() if d >= date(2026, 3, 9)}
    with pytest.raises(dr.InsufficientHistory, match="needs 5 eligible days, found 4"):
        dr.cn_js_5wd(h, EVENT, EXCLUDED)
    with pytest.raises(dr.InsufficientHistory):
        dr.cn_js_rt15(h, EVENT, EXCLUDED)


def test_performance_against_commitment() -> None:
    baseline = np.full(8, 130.0)
    actual = np.array([100.0] * 4 + [90.0] * 4)
    p = dr.performance(baseline, actual, direction="up", committed_kw=40, valid_ratio=0.8)
    assert p.delivered_kw.tolist() == [30.0] * 4 + [40.0] * 4
    # (sum baseline - sum actual) / duration = 35 kW; 35 / 40 = 0.875.
    assert p.total_delivered_kw == pytest.approx(35.0)
    assert p.performance_ratio == pytest.approx(0.875)
    assert p.valid is True
    assert dr.performance(baseline, actual, direction="up", committed_kw=40, valid_ratio=0.9).valid is False
    down = dr.performance(baseline, actual, direction="down", committed_kw=40, valid_ratio=0.8)
    assert down.total_delivered_kw == pytest.approx(-35.0) and down.valid is False
    partial = dr.performance(
        baseline, np.r_[actual[:4], [np.nan] * 4], direction="up", committed_kw=40, valid_ratio=0.8
    )
    assert partial.total_delivered_kw is None and partial.valid is None
