"""Grid intensity: the step function against a slow reference, mix estimates by hand, provider
formats, the forecast rule and dead-letter reasons."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from aiokafka import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.intensity import Defaults, estimate_from_mix, parse_csv, parse_jsonl, read_points
from meterflow.carbon.intensity import MODE_FACTORS_G_PER_KWH, Steps, best_window, mix_intensity
from meterflow.contract import DeadLetterReason, EmissionBasis, GridIntensityPoint, SignalType
from processing.intensity import Located, Rejection, classify, latest_per_slot

H = 3_600_000


def reference_mean(points: list[tuple[int, int, float]], lo: int, hi: int) -> float:
    """Walk the interval millisecond-block by block: the value in force at each instant, obviously."""
    points = sorted(points)
    covered = area = 0.0
    for i, (start, duration, value) in enumerate(points):
        end = start + duration
        if i + 1 < len(points):
            end = min(end, points[i + 1][0])
        overlap = max(0, min(end, hi) - max(start, lo))
        covered += overlap
        area += overlap * value
    if hi <= lo or covered < hi - lo:
        return math.nan
    return area / covered


def _steps(points: list[tuple[int, int, float]]) -> Steps:
    points = sorted(points)
    return Steps.of(
        np.array([p[0] for p in points], np.int64),
        np.array([p[1] for p in points], np.int64),
        np.array([p[2] for p in points], np.float64),
    )


point_lists = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 30), st.floats(0, 1000)),
    max_size=30,
    unique_by=lambda p: p[0],
).map(lambda ps: [(s * 60_000, d * 60_000, v) for s, d, v in ps])


@settings(max_examples=300, deadline=None)
@given(point_lists, st.lists(st.tuples(st.integers(-10, 240), st.integers(0, 120)), min_size=1, max_size=20))
def test_mean_over_matches_reference(
    points: list[tuple[int, int, float]], spans: list[tuple[int, int]]
) -> None:
    lo = np.array([s * 60_000 for s, _ in spans], np.int64)
    hi = lo + np.array([w * 60_000 for _, w in spans], np.int64)
    got = _steps(points).mean_over(lo, hi)
    for j in range(lo.size):
        want = reference_mean(points, int(lo[j]), int(hi[j]))
        if math.isnan(want):
            assert math.isnan(got[j])
        else:
            assert got[j] == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(point_lists, st.integers(1, 8))
def test_best_window_is_the_lowest_covered_mean(points: list[tuple[int, int, float]], quarters: int) -> None:
    width, step, lo, hi = quarters * 900_000, 900_000, 0, 240 * 60_000
    found = best_window(_steps(points), lo, hi, width, step)
    candidates = [(reference_mean(points, s, s + width), s) for s in range(lo, hi - width + 1, step)]
    covered = [(m, s) for m, s in candidates if not math.isnan(m)]
    if not covered:
        assert found is None
        return
    assert found is not None
    best = min(m for m, _ in covered)
    assert found[1] == pytest.approx(best, rel=1e-9, abs=1e-9)
    assert reference_mean(points, found[0], found[0] + width) == pytest.approx(best, rel=1e-9, abs=1e-9)


def test_a_point_ends_at_the_next_start() -> None:
    steps = _steps([(0, 2 * H, 100.0), (H, H, 300.0)])
    assert steps.mean_over(np.array([0]), np.array([2 * H]))[0] == pytest.approx(200.0)


def test_mix_intensity_by_hand() -> None:
    mix = {"coal": 600.0, "solar": 300.0, "wind": 100.0}
    assert mix_intensity(mix, EmissionBasis.LIFECYCLE) == pytest.approx(
        (600 * 820 + 300 * 45 + 100 * 11) / 1000
    )
    assert mix_intensity(mix, EmissionBasis.DIRECT) == pytest.approx(600 * 760 / 1000)
    with pytest.raises(ValueError, match="unknown generation modes"):
        mix_intensity({"fusion": 1.0}, EmissionBasis.DIRECT)
    with pytest.raises(ValueError, match="no generation"):
        mix_intensity({"coal": 0.0}, EmissionBasis.DIRECT)
    assert set(MODE_FACTORS_G_PER_KWH[EmissionBasis.DIRECT]) == set(
        MODE_FACTORS_G_PER_KWH[EmissionBasis.LIFECYCLE]
    )


def test_estimate_from_mix_ignores_storage_and_reports_bad_rows() -> None:
    text = "ts,duration_s,coal,gas,storage\n0,3600,50,50,999\n3600,3600,0,0,0\n7200,3600,x,1,0\n"
    parsed = estimate_from_mix(text, "jiangsu", [EmissionBasis.DIRECT, EmissionBasis.LIFECYCLE])
    assert [(p.ts, p.basis, round(p.g_co2e_per_kwh, 6)) for p in parsed.points] == [
        (0, EmissionBasis.DIRECT, (760 + 370) / 2),
        (0, EmissionBasis.LIFECYCLE, (820 + 490) / 2),
    ]
    assert all(p.is_estimated and p.signal_type is SignalType.AVERAGE for p in parsed.points)
    assert [where for where, _ in parsed.rejected] == ["line 3", "line 4"]
    with pytest.raises(ValueError, match="unknown columns"):
        estimate_from_mix("ts,fusion\n0,1\n", "jiangsu", [EmissionBasis.DIRECT])
    # A blank or missing cell is a missing figure, never zero generation; a bad row names its line.
    text = "ts,duration_s,coal,solar\n0,3600,,100\n3600,3600,100\n7200,x,1,1\n10800,3600,1,1,9\n14400,3600,50,50\n"
    parsed = estimate_from_mix(text, "jiangsu", [EmissionBasis.DIRECT])
    assert [p.ts for p in parsed.points] == [14400]
    assert [where for where, _ in parsed.rejected] == ["line 2", "line 3", "line 4", "line 5"]
    assert "no generation given for ['coal']" in parsed.rejected[0][1]


def test_electricitymaps_history(tmp_path: Path) -> None:
    saved = tmp_path / "em.json"
    saved.write_text(
        '{"zone": "DE", "history": ['
        '{"zone": "DE", "carbonIntensity": 302, "datetime": "2025-03-10T00:00:00.000Z", "isEstimated": false,'
        ' "emissionFactorType": "lifecycle", "temporalGranularity": "hourly"},'
        '{"zone": "DE", "carbonIntensity": null, "datetime": "2025-03-10T01:00:00.000Z"}]}'
    )
    parsed = read_points(saved, "auto", Defaults())
    assert len(parsed.points) == 1 and len(parsed.rejected) == 1
    p = parsed.points[0]
    assert (p.zone, p.g_co2e_per_kwh, p.duration_s, p.basis, p.is_estimated) == (
        "DE",
        302,
        3600,
        "lifecycle",
        False,
    )
    assert (p.source, p.is_forecast, p.ts) == ("electricitymaps", False, 1_741_564_800_000)


def test_watttime_moer_is_marginal_in_grams(tmp_path: Path) -> None:
    saved = tmp_path / "wt.json"
    saved.write_text(
        '{"meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer", "units": "lbs_co2_per_mwh",'
        ' "data_point_period_seconds": 300, "model": {"date": "2024-10-01"}},'
        ' "data": [{"point_time": "2025-03-10T00:00:00+00:00", "value": 1000}]}'
    )
    [p] = read_points(saved, "auto", Defaults()).points
    assert p.g_co2e_per_kwh == pytest.approx(453.592)
    assert (p.signal_type, p.basis, p.duration_s, p.is_forecast) == ("marginal", "direct", 300, False)
    assert p.model_version == "2024-10-01"
    # A forecast response says when it was generated: its points are forecasts without being told.
    forecast = tmp_path / "wt-forecast.json"
    forecast.write_text(
        saved.read_text().replace('"model":', '"generated_at": "2025-03-09T23:55:00+00:00", "model":')
    )
    [f] = read_points(forecast, "watttime", Defaults()).points
    assert f.is_forecast
    nested = tmp_path / "wt-forecast-historical.json"
    nested.write_text(
        '{"meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer", "units": "lbs_co2_per_mwh"},'
        ' "data": [{"generated_at": "2025-03-10T00:00:00+00:00", "forecast": []}]}'
    )
    with pytest.raises(ValueError, match="forecasts of the past"):
        read_points(nested, "watttime", Defaults())


def test_jsonl_and_csv_rows_that_fail_are_reported_with_their_line() -> None:
    jsonl = '{"zone": "CN-JS", "ts": 0, "g_co2e_per_kwh": 500}\n[1]\n{\n{"zone": "CN-JS", "ts": 0}\n'
    parsed = parse_jsonl(jsonl, Defaults(source="manual"))
    assert len(parsed.points) == 1 and parsed.points[0].source == "manual"
    assert [w for w, _ in parsed.rejected] == ["line 2", "line 3", "line 4"]
    csv_text = "zone,ts,g_co2e_per_kwh,is_forecast\nCN-JS,0,500,true\nCN-JS,3600000,-1,false\n"
    parsed = parse_csv(csv_text, Defaults(source="manual"))
    assert [p.is_forecast for p in parsed.points] == [True]
    assert parsed.rejected[0][0] == "line 3" and "greater than or equal to 0" in parsed.rejected[0][1]


def _located(ts: int, value: float, forecast: bool, offset: int) -> Located:
    point = GridIntensityPoint(zone="Z", ts=ts, g_co2e_per_kwh=value, is_forecast=forecast, source="t")
    return Located(point, 0, offset)


def test_a_forecast_never_replaces_a_value_that_is_not_one() -> None:
    kept = latest_per_slot(
        [
            _located(0, 500, False, 1),
            _located(0, 400, True, 2),  # ignored
            _located(H, 300, True, 3),
            _located(H, 310, False, 4),  # replaces the forecast
            _located(2 * H, 200, True, 5),
            _located(2 * H, 210, True, 6),  # a newer forecast replaces an older one
        ]
    )
    assert sorted((k.point.ts, k.point.g_co2e_per_kwh) for k in kept) == [(0, 500), (H, 310), (2 * H, 210)]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", DeadLetterReason.INVALID_JSON),
        (b'{"zone": "Z", "ts": 0, "g_co2e_per_kwh": NaN, "source": "s"}', DeadLetterReason.NON_FINITE),
        (
            b'{"zone": "Z", "ts": 0, "g_co2e_per_kwh": 1, "source": "s", "signal_type": "index"}',
            DeadLetterReason.SCHEMA,
        ),
        (b'{"zone": "no spaces", "ts": 0, "g_co2e_per_kwh": 1, "source": "s"}', DeadLetterReason.SCHEMA),
        # What PostgreSQL would refuse must not reach it: the service would fail on the whole poll.
        (
            b'{"zone": "Z", "ts": 100000000000000000, "g_co2e_per_kwh": 1, "source": "s"}',
            DeadLetterReason.SCHEMA,
        ),
        (b'{"zone": "Z", "ts": 0, "g_co2e_per_kwh": 1, "source": "a\\u0000b"}', DeadLetterReason.SCHEMA),
    ],
)
def test_records_that_are_not_points_get_a_reason(raw: bytes, reason: DeadLetterReason) -> None:
    record = ConsumerRecord("t", 0, 7, 0, 0, b"Z", raw, None, 1, len(raw), [])
    outcome = classify(record)
    assert isinstance(outcome, Rejection) and outcome.reason is reason and outcome.detail


def test_point_round_trip() -> None:
    point = GridIntensityPoint(zone="CN-JS", ts="2025-03-10T00:00:00+08:00", g_co2e_per_kwh=581.2, source="x")
    record = ConsumerRecord("t", 0, 0, 0, 0, point.kafka_key(), point.encode(), None, 5, 10, [])
    outcome = classify(record)
    assert isinstance(outcome, Located) and outcome.point == point


def reference_steps(points: list[tuple[int, int, float, bool]]) -> list[tuple[int, int, float]]:
    """What prevails where, plainly: a forecast starting inside an actual value's span (up to the next
    actual start) is dropped; then every point ends at its duration or the next start."""
    actual = sorted((s, d) for s, d, _, f in points if not f)
    spans = [
        (s, min(s + d, actual[i + 1][0]) if i + 1 < len(actual) else s + d) for i, (s, d) in enumerate(actual)
    ]
    kept = sorted(p for p in points if not p[3] or not any(a <= p[0] < e for a, e in spans))
    return [
        (s, min(s + d, kept[i + 1][0]) if i + 1 < len(kept) else s + d, v)
        for i, (s, d, v, _) in enumerate(kept)
    ]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 100), st.integers(1, 30), st.floats(0, 1000), st.booleans()),
        max_size=25,
        unique_by=lambda p: p[0],
    )
)
def test_actual_values_prevail_over_forecasts(points: list[tuple[int, int, float, bool]]) -> None:
    points = sorted(points)
    steps = Steps.of(
        np.array([p[0] for p in points], np.int64),
        np.array([p[1] for p in points], np.int64),
        np.array([p[2] for p in points], np.float64),
        np.array([p[3] for p in points], np.bool_),
    )
    assert list(
        zip(steps.start.tolist(), steps.end.tolist(), steps.value.tolist(), strict=True)
    ) == reference_steps(points)


def test_local_hours_and_days_follow_daylight_saving() -> None:
    from zoneinfo import ZoneInfo

    from api.routes.intensity import _period_ms

    zone = ZoneInfo("America/New_York")
    day_start = 1_730_433_600_000  # 2024-11-01 00:00 EDT; 2024-11-03 has 25 hours
    quarters = np.arange(day_start, day_start + 4 * 86_400_000, 900_000, dtype=np.int64)
    days = np.unique(_period_ms(quarters, "1d", zone), return_counts=True)
    assert days[1][:3].tolist() == [96, 96, 100]
    hours = np.unique(_period_ms(quarters, "1h", zone), return_counts=True)
    assert set(hours[1].tolist()) == {4}
