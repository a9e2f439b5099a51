"""The kernels under hostile input: values like +-1e308, 1.8e19, 1.2e29, subnormals, NaN and inf, register
jumps of any size, multipliers up to 1e300 and timestamps at and beyond the edges of what is stored. Every
bucket they give must be finite (and bounded), and every value that could not be booked must be flagged:
a poisoned read may cost a flag, never a figure (issue 13, finding 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing import kernels as k
from processing import reference as ref

WIDTHS = (60_000, 900_000, 3_600_000)
INTERP_LIMIT = 3_600_000
T0 = 1_767_225_600_000
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

EXTREME_VALUES = [
    1e308, -1e308, 1.8e19, 1.2e29, -1.2e29, 5e-324, -5e-324, 2.2250738585072014e-308, math.inf, -math.inf,
    math.nan, k.VALUE_LIMIT, -k.VALUE_LIMIT, k.VALUE_LIMIT * (1 + 2**-52), 0.0, -0.0,
]  # fmt: skip
# Around the edges of what is stored and of int64 (NO_TS is -2**62: a read there must not look stateless).
EXTREME_TS = [
    -(2**62), -(10**15), -62_135_596_800_000, -1, k.TS_MIN, 1, T0, k.TS_MAX - 1, k.TS_MAX, 2**61, 2**62,
]  # fmt: skip
values = st.sampled_from(EXTREME_VALUES) | st.floats(-1e6, 1e6) | st.floats(allow_nan=True)
registers = st.sampled_from([math.inf, 99_999.99, 1e300, 5e-324])
rates = st.sampled_from([math.inf, 1e300, 60.0 / 3_600_000, 0.0])
multipliers = st.sampled_from([1.0, 40.0, 1e300, 5e-324])


@st.composite
def hostile_fleets(draw: st.DrawFn) -> tuple[list[ref.Read], dict[int, ref.Register]]:
    """Series of strictly increasing timestamps (edges included, gaps of decades among them) with extreme
    values, in arrival (time) order."""
    regs: dict[int, ref.Register] = {}
    reads: list[ref.Read] = []
    for s in range(draw(st.integers(1, 4))):
        regs[s] = ref.Register(draw(registers), draw(st.sampled_from([0.01, 5e-324])), draw(rates))
        stamps = draw(
            st.sets(
                st.sampled_from(EXTREME_TS) | st.integers(T0, T0 + 40 * 86_400_000), min_size=1, max_size=10
            )
        )
        for ts in sorted(stamps):
            install = draw(st.none() | values)
            if install is not None and math.isnan(install):
                install = None  # the kernels' encoding of "no exchange"
            reads.append(ref.Read(s, ts, draw(values), install, draw(multipliers)))
    reads.sort(key=lambda r: (r.ts, r.series))
    return reads, regs


def _params(regs: dict[int, ref.Register]) -> k.RegisterParams:
    return k.RegisterParams(
        np.array([regs[s].maximum for s in range(len(regs))]),
        np.array([regs[s].resolution for s in range(len(regs))]),
        np.array([regs[s].max_rate_per_ms for s in range(len(regs))]),
    )


def _columns(reads: list[ref.Read]) -> tuple[k.I32, k.I64, k.F64, k.F64, k.F64]:
    return (
        np.array([r.series for r in reads], np.int32),
        np.array([r.ts for r in reads], np.int64),
        np.array([r.value for r in reads], np.float64),
        np.array([math.nan if r.install_after is None else r.install_after for r in reads]),
        np.array([r.multiplier for r in reads]),
    )


def _assert_finite(buckets: k.Buckets) -> None:
    assert np.isfinite(buckets.total).all(), buckets.total
    # Each booked contribution is at most VALUE_LIMIT, so no sum of them comes near float64's range.
    assert (np.abs(buckets.total) <= np.maximum(buckets.n, 1) * k.VALUE_LIMIT).all()
    booked = buckets.n > 0
    assert np.isfinite(buckets.max_value[booked]).all()
    assert np.isnan(buckets.max_value[~booked]).all()  # nothing but flags in those buckets


def _assert_refused(reads: list[ref.Read], flags: list[str]) -> None:
    """A value no register can hold, or a time outside what is stored, is flagged, never booked."""
    for read, flag in zip(reads, flags, strict=True):
        if not (abs(read.value) <= k.VALUE_LIMIT and k.TS_MIN <= read.ts < k.TS_MAX):
            assert flag == "implausible", (read, flag)


@PROPERTY
@given(hostile_fleets(), st.integers(1, 5))
def test_bucketer_books_only_finite_bounded_quantities(fleet, cuts):
    reads, regs = fleet
    series, ts, value, install, multiplier = _columns(reads)
    state = k.RegisterState.empty(len(regs))
    bucketer = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)
    flags: list[str] = []
    for part in np.array_split(np.arange(len(reads)), cuts):
        result = bucketer(
            series[part], ts[part], value[part], state, _params(regs),
            install_after=install[part], multiplier=multiplier[part],
        )  # fmt: skip
        flags += ref.read_flags_from_kernel(result)
        for buckets in result.buckets:
            _assert_finite(buckets)
            # A read decades after the last is booked in one bucket, not in millions of them.
            assert buckets.series.size <= 2 * len(reads) + 2 * (40 * 1440 + 2) * len(regs)
    _assert_refused(reads, flags)
    assert np.isfinite(state.anchor_val[state.anchor_ts != k.NO_TS]).all()
    # The reference states the same rules.
    _, outcome = ref.intervals(reads, regs, {})
    assert flags == [outcome[r.series, r.ts] for r in reads]


@PROPERTY
@given(hostile_fleets(), st.sampled_from(WIDTHS))
def test_separate_kernels_book_only_finite_quantities(fleet, width):
    reads, regs = fleet
    ordered = sorted(reads, key=lambda r: (r.series, r.ts))
    series, ts, value, install, multiplier = _columns(ordered)
    result = k.registers_to_intervals(
        series, ts, value, k.RegisterState.empty(len(regs)), _params(regs),
        install_after=install, multiplier=multiplier,
    )  # fmt: skip
    assert np.isfinite(result.qty).all() and (np.abs(result.qty) <= k.VALUE_LIMIT).all()
    _assert_refused(ordered, ref.read_flags_from_kernel(result))
    parts = k.prorate(result, width, INTERP_LIMIT)
    assert parts.qty.size <= 2 * result.qty.size + result.qty.size * (k.MAX_PRORATE_SPAN_MS // width + 2)
    buckets = k.reduce_by_key(
        result.series[parts.interval], parts.bucket_ms, parts.qty, parts.quality,
        np.zeros(parts.qty.size, np.int8), width,
    )  # fmt: skip
    _assert_finite(buckets)
    want, _ = ref.intervals(reads, regs, {})
    assert [(i.series, i.t0, i.t1, i.bad) for i in ref.intervals_from_kernel(result)] == [
        (i.series, i.t0, i.t1, i.bad) for i in want
    ]


@PROPERTY
@given(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from(EXTREME_TS), values), min_size=1, max_size=40),
    st.sampled_from([math.inf, 100.0, 1e300]),
)
def test_instantaneous_buckets_leave_extreme_values_out(samples, limit):
    series = np.array([s for s, _, _ in samples], np.int32)
    ts = np.array([t for _, t, _ in samples], np.int64)
    value = np.array([v for _, _, v in samples], np.float64)
    abs_limit = np.full(3, limit)
    spikes = k.spikes(value, abs_limit[series])
    assert spikes[~(np.abs(value) <= k.VALUE_LIMIT)].all()
    for width in WIDTHS[1:]:
        buckets = k.instantaneous_buckets(series, ts, value, abs_limit, width)
        _assert_finite(buckets)
        assert buckets.n_flagged.sum() == spikes.sum()


def test_a_year_long_gap_is_booked_whole_in_its_last_bucket():
    year = 365 * 86_400_000
    series = np.zeros(2, np.int32)
    ts = np.array([T0, T0 + year], np.int64)
    params = k.RegisterParams(np.array([math.inf]), np.array([0.01]), np.array([math.inf]))
    result = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)(
        series, ts, np.array([10.0, 8_770.0]), k.RegisterState.empty(1), params
    )
    for buckets, width in zip(result.buckets, WIDTHS, strict=True):
        assert buckets.bucket_ms.tolist() == [(T0 + year - 1) // width * width]
        assert buckets.total.tolist() == [8_760.0]
        assert buckets.n_substituted.tolist() == [1]


def test_worked_example_of_poison_between_honest_reads():
    """1.8e19 between two honest reads of an unrated meter is flagged; the honest delta is booked."""
    series = np.zeros(4, np.int32)
    ts = T0 + np.array([0, 60_000, 120_000, 180_000], np.int64)
    params = k.RegisterParams(np.array([math.inf]), np.array([0.01]), np.array([math.inf]))
    result = k.RegisterBucketer((60_000,), INTERP_LIMIT)(
        series, ts, np.array([100.0, 1.8e19, -1e308, 101.5]), k.RegisterState.empty(1), params
    )
    assert ref.read_flags_from_kernel(result) == ["first", "implausible", "implausible", "ok"]
    (minute,) = result.buckets
    booked = minute.n > 0
    assert minute.total[booked].sum() == pytest.approx(1.5)
    assert minute.n_flagged.sum() == 2
