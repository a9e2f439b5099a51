"""The numba kernels against `processing.reference`, on generated fleets, plus invariants and worked
examples. Fleets are built from registers that really count (so rollovers, exchanges, resets and gaps
happen where a meter would produce them) and from arbitrary values on a tiny register (so every
branch meets every other)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing import kernels as k
from processing import reference as ref

WIDTH = 60_000
INTERP_LIMIT = 15 * 60_000
T0 = 1_767_225_600_000
KW = 1.0 / 3_600_000  # kWh per ms at 1 kW

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Register shapes: a 5-digit register at 0.01 kWh with a 50 kW rating x 1.2 margin, one whose rating
# is unknown, a tiny 3-digit gas register, and one that never rolls over.
REGISTERS = [
    ref.Register(99_999.99, 0.01, 60 * KW),
    ref.Register(99_999.99, 0.01, math.inf),
    ref.Register(999.9, 0.1, 500 * KW),
    ref.Register(math.inf, 0.001, 200 * KW),
]
# Gaps around the bucket width and the interpolation limit, and long outages.
GAPS = [1, 999, 15_000, 59_999, 60_000, 60_001, 90_000, INTERP_LIMIT - 1, INTERP_LIMIT, INTERP_LIMIT + 1]
GAPS += [3_600_000, 26 * 3_600_000]


@st.composite
def counted_series(draw: st.DrawFn, s: int, register: ref.Register) -> list[ref.Read]:
    """Reads of one meter: mostly honest counting, with glitches, drops, resets and exchanges."""
    steps = round(1 / register.resolution)  # register counts per unit
    modulus = math.inf if math.isinf(register.maximum) else round(register.maximum * steps) + 1
    nominal = register.max_rate_per_ms / 1.2 if math.isfinite(register.max_rate_per_ms) else 80 * KW
    near_top = modulus - draw(st.integers(0, 2_000)) if math.isfinite(modulus) else 0
    count = draw(st.sampled_from([0, near_top, draw(st.integers(0, 10**7))]))
    ts = T0 + draw(st.integers(0, 3 * WIDTH))
    multiplier = draw(st.sampled_from([1.0, 40.0, 0.5]))
    reads: list[ref.Read] = []
    events = ["count"] * 6 + ["glitch", "drop", "reset", "exchange", "multiplier", "stuck"]
    for _ in range(draw(st.integers(1, 14))):
        event = draw(st.sampled_from(events))
        gap = draw(st.sampled_from(GAPS) | st.integers(1, 2 * INTERP_LIMIT))
        ts += gap
        install_after = None
        if event == "glitch":
            value = (count + 10**6) / steps * 3.7
        elif event == "drop":
            value = max(0, count - draw(st.integers(1, 10**4))) / steps
        else:
            if event == "count":
                count += math.floor(draw(st.floats(0, 1)) * nominal * gap * steps)
            elif event == "reset":
                count = draw(st.integers(0, 50))
            elif event == "multiplier":
                multiplier = draw(st.sampled_from([1.0, 40.0, 0.5]))
            if math.isfinite(modulus):
                count %= modulus
            value = count / steps
            if event == "exchange":
                count = draw(st.integers(0, 500))
                install_after = count / steps
        reads.append(ref.Read(s, ts, value, install_after, multiplier))
    return reads


@st.composite
def chaotic_series(draw: st.DrawFn, s: int, register: ref.Register) -> list[ref.Read]:
    """Arbitrary values on a register with few states, so unusual sequences of branches happen."""
    ts = T0 + draw(st.integers(0, WIDTH))
    reads = []
    for _ in range(draw(st.integers(1, 12))):
        ts += draw(st.sampled_from([1_000, 30_000, 60_000, 90_000, 3_600_000]))
        value = draw(st.integers(0, 99)) / 10
        install_after = draw(st.none() | st.integers(0, 99).map(lambda c: c / 10))
        reads.append(ref.Read(s, ts, value, install_after, draw(st.sampled_from([1.0, 2.0]))))
    return reads


CHAOS_REGISTERS = [ref.Register(9.9, 0.1, 0.3 / 60_000), ref.Register(9.9, 0.1, math.inf)]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[ref.Read], dict[int, ref.Register]]:
    """Reads of several series interleaved in arrival (time) order, and each series' register."""
    registers: dict[int, ref.Register] = {}
    reads: list[ref.Read] = []
    for s in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            registers[s] = draw(st.sampled_from(REGISTERS))
            reads += draw(counted_series(s, registers[s]))
        else:
            registers[s] = draw(st.sampled_from(CHAOS_REGISTERS))
            reads += draw(chaotic_series(s, registers[s]))
    reads.sort(key=lambda r: (r.ts, r.series))
    return reads, registers


# --- running the kernels on reads -----------------------------------------------------------------


def params(registers: dict[int, ref.Register]) -> k.RegisterParams:
    n = max(registers) + 1
    return k.RegisterParams(
        np.array([registers[s].maximum for s in range(n)]),
        np.array([registers[s].resolution for s in range(n)]),
        np.array([registers[s].max_rate_per_ms for s in range(n)]),
    )


def kernel_intervals(
    reads: list[ref.Read], registers: dict[int, ref.Register], state: k.RegisterState
) -> tuple[list[ref.Read], k.Intervals]:
    """The reads sorted by (series, ts), as the processor must hand them over, and the kernel's result."""
    ordered = sorted(reads, key=lambda r: (r.series, r.ts))
    result = k.registers_to_intervals(
        np.array([r.series for r in ordered], np.int32),
        np.array([r.ts for r in ordered], np.int64),
        np.array([r.value for r in ordered], np.float64),
        state,
        params(registers),
        install_after=np.array([math.nan if r.install_after is None else r.install_after for r in ordered]),
        multiplier=np.array([r.multiplier for r in ordered]),
    )
    return ordered, result


def kernel_buckets(result: k.Intervals, width_ms: int = WIDTH) -> k.Buckets:
    parts = k.prorate(result, width_ms, INTERP_LIMIT)
    return k.reduce_by_key(
        result.series[parts.interval],
        parts.bucket_ms,
        parts.qty,
        parts.quality,
        np.zeros(parts.qty.size, np.int8),
        width_ms,
    )


def assert_rows_match(got: ref.BucketRows, want: ref.BucketRows, scale: float) -> None:
    assert got.keys() == want.keys()
    tol = 1e-9 * max(scale, 1.0)
    for key, row in want.items():
        other = got[key]
        assert (other.n, other.by_quality, other.n_flagged) == (row.n, row.by_quality, row.n_flagged), key
        assert math.isclose(other.total, row.total, rel_tol=1e-9, abs_tol=tol), key
        if math.isnan(row.max_value):
            assert math.isnan(other.max_value), key
        else:
            assert math.isclose(other.max_value, row.max_value, rel_tol=1e-9, abs_tol=tol), key


def assert_intervals_match(got: list[ref.Interval], want: list[ref.Interval]) -> None:
    assert [(i.series, i.t0, i.t1, i.bad) for i in got] == [(i.series, i.t0, i.t1, i.bad) for i in want]
    for a, b in zip(got, want, strict=True):
        assert math.isclose(a.qty, b.qty, rel_tol=1e-12, abs_tol=1e-12), (a, b)


# --- properties -----------------------------------------------------------------------------------


@PROPERTY
@given(fleets())
def test_intervals_flags_and_buckets_match_the_reference(fleet):
    reads, registers = fleet
    ordered, result = kernel_intervals(reads, registers, k.RegisterState.empty(max(registers) + 1))
    want, outcome = ref.intervals(reads, registers, {})

    assert_intervals_match(ref.intervals_from_kernel(result), want)
    assert ref.read_flags_from_kernel(result) == [outcome[r.series, r.ts] for r in ordered]
    scale = max((i.qty for i in want), default=1.0)
    assert_rows_match(
        ref.rows_from_kernel(kernel_buckets(result)), ref.energy_buckets(want, WIDTH, INTERP_LIMIT), scale
    )


@PROPERTY
@given(fleets(), st.sampled_from([WIDTH, 15 * WIDTH, 60 * WIDTH]))
def test_prorated_quantities_add_up_to_the_booked_ones(fleet, width):
    reads, registers = fleet
    _, result = kernel_intervals(reads, registers, k.RegisterState.empty(max(registers) + 1))
    parts = k.prorate(result, width, INTERP_LIMIT)
    good = result.bad == 0
    # Each interval on its own, then the whole: nothing lost or invented at bucket boundaries.
    per_interval = np.bincount(parts.interval, weights=parts.qty, minlength=result.qty.size)
    np.testing.assert_allclose(per_interval[good], result.qty[good], rtol=1e-9, atol=1e-12)
    assert (per_interval[~good] == 0).all()
    buckets = kernel_buckets(result, width)
    assert math.isclose(buckets.total.sum(), result.qty[good].sum(), rel_tol=1e-9, abs_tol=1e-12)
    assert buckets.n.sum() == parts.qty.size


@PROPERTY
@given(fleets(), st.lists(st.integers(0, 200), max_size=6))
def test_micro_batches_carry_state_to_the_same_buckets(fleet, cuts):
    reads, registers = fleet
    n_series = max(registers) + 1
    _, whole = kernel_intervals(reads, registers, k.RegisterState.empty(n_series))
    want = ref.rows_from_kernel(kernel_buckets(whole))

    state = k.RegisterState.empty(n_series)
    ref_states: dict[int, ref.SeriesState] = {}
    got: ref.BucketRows = {}
    from_reference: ref.BucketRows = {}
    bounds = sorted({0, len(reads), *(c for c in cuts if c < len(reads))})
    for lo, hi in itertools.pairwise(bounds):
        _, result = kernel_intervals(reads[lo:hi], registers, state)
        ref.merge(got, ref.rows_from_kernel(kernel_buckets(result)))
        booked, _ = ref.intervals(reads[lo:hi], registers, ref_states)
        ref.merge(from_reference, ref.energy_buckets(booked, WIDTH, INTERP_LIMIT))

    scale = max(whole.qty.max(initial=1.0), 1.0)
    assert_rows_match(got, want, scale)
    assert_rows_match(from_reference, want, scale)


WIDTHS = (WIDTH, 15 * WIDTH, 60 * WIDTH)


def bucketer_run(
    bucketer: k.RegisterBucketer,
    reads: list[ref.Read],
    registers: dict[int, ref.Register],
    state: k.RegisterState,
) -> k.RegisterBuckets:
    """The fused kernel on reads in the order given (arrival order: each series' reads in time order)."""
    return bucketer(
        np.array([r.series for r in reads], np.int32),
        np.array([r.ts for r in reads], np.int64),
        np.array([r.value for r in reads], np.float64),
        state,
        params(registers),
        install_after=np.array([math.nan if r.install_after is None else r.install_after for r in reads]),
        multiplier=np.array([r.multiplier for r in reads]),
    )


def separate_kernels(result: k.Intervals, series: np.ndarray, ts: np.ndarray, width: int) -> k.Buckets:
    """What the processor did before the fused kernel: prorate, then reduce with the flagged reads."""
    parts = k.prorate(result, width, INTERP_LIMIT)
    flagged = np.isin(result.read_flag, (k.READ_NEGATIVE, k.READ_IMPLAUSIBLE))
    fs, ft = series[flagged], ts[flagged]
    return k.reduce_by_key(
        np.concatenate([result.series[parts.interval], fs]).astype(np.int32),
        np.concatenate([parts.bucket_ms, ft - ft % width]),
        np.concatenate([parts.qty, np.zeros(fs.size)]),
        np.concatenate([parts.quality, np.full(fs.size, k.NO_QUALITY, np.int8)]),
        np.concatenate([np.zeros(parts.qty.size, np.int8), np.ones(fs.size, np.int8)]),
        width,
    )


@PROPERTY
@given(fleets(), st.lists(st.integers(0, 200), max_size=6))
def test_fused_bucketer_matches_the_reference_and_the_separate_kernels(fleet, cuts):
    reads, registers = fleet
    n_series = max(registers) + 1
    bucketer = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)
    state = k.RegisterState.empty(n_series)
    separate_state = k.RegisterState.empty(n_series)
    ref_states: dict[int, ref.SeriesState] = {}
    got: list[ref.BucketRows] = [{} for _ in WIDTHS]
    want: list[ref.BucketRows] = [{} for _ in WIDTHS]
    scale = 1.0
    bounds = sorted({0, len(reads), *(c for c in cuts if c < len(reads))})
    for lo, hi in itertools.pairwise(bounds):
        batch = reads[lo:hi]
        result = bucketer_run(bucketer, batch, registers, state)
        booked, outcome = ref.intervals(batch, registers, ref_states)
        assert ref.read_flags_from_kernel(result) == [outcome[r.series, r.ts] for r in batch]
        ordered, separate = kernel_intervals(batch, registers, separate_state)
        series = np.array([r.series for r in ordered], np.int32)
        ts = np.array([r.ts for r in ordered], np.int64)
        scale = max([scale, *(abs(i.qty) for i in booked)])
        for w, width in enumerate(WIDTHS):
            buckets = result.buckets[w]
            keys = list(zip(buckets.series.tolist(), buckets.bucket_ms.tolist(), strict=True))
            assert len(set(keys)) == len(keys), "one row per (series, bucket) and batch"
            # The same additions in the same order as the separate kernels: equal to the last bit.
            fused = {key: exact(row) for key, row in ref.rows_from_kernel(buckets).items()}
            assert fused == {
                key: exact(row)
                for key, row in ref.rows_from_kernel(separate_kernels(separate, series, ts, width)).items()
            }
            ref.merge(got[w], ref.rows_from_kernel(buckets))
            ref.merge(want[w], ref.register_buckets(booked, outcome, width, INTERP_LIMIT))
    for w in range(len(WIDTHS)):
        assert_rows_match(got[w], want[w], scale)
    for name in ("anchor_ts", "anchor_val", "pending_ts", "pending_val"):
        assert np.array_equal(getattr(state, name), getattr(separate_state, name)), name


def test_an_interval_reaching_back_past_a_flagged_read_meets_its_flag():
    # 0 at T0, a glitch at 2.5 min (flagged in minute 2), then 4.0 at 4 min: the interval (0, 4 min]
    # spreads over minutes 0 to 3, and minute 2 holds both the flag and a quarter of the energy.
    bucketer = k.RegisterBucketer((WIDTH,), INTERP_LIMIT)
    p = k.RegisterParams(np.array([99_999.99]), np.array([0.01]), np.array([60 * KW]))
    ts = T0 + np.array([0, 150_000, 240_000], np.int64)
    result = bucketer(np.zeros(3, np.int32), ts, np.array([0.0, 900.0, 0.4]), k.RegisterState.empty(1), p)
    assert ref.read_flags_from_kernel(result) == ["first", "implausible", "ok"]
    rows = ref.rows_from_kernel(result.buckets[0])
    assert sorted((b - T0) // WIDTH for _, b in rows) == [0, 1, 2, 3]
    assert [rows[0, T0 + m * WIDTH].n_flagged for m in range(4)] == [0, 0, 1, 0]
    assert [rows[0, T0 + m * WIDTH].total for m in range(4)] == pytest.approx([0.1] * 4)
    assert {rows[0, T0 + m * WIDTH].by_quality[k.ESTIMATED] for m in range(4)} == {1}


def test_an_empty_batch_gives_empty_buckets_and_bad_widths_are_refused():
    result = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)(
        np.empty(0, np.int32),
        np.empty(0, np.int64),
        np.empty(0),
        k.RegisterState.empty(2),
        params({0: REGISTERS[0], 1: REGISTERS[1]}),
    )
    assert result.read_flag.size == 0
    assert [b.series.size for b in result.buckets] == [0, 0, 0]
    for widths in [(), (WIDTH, 0)]:
        with pytest.raises(ValueError):
            k.RegisterBucketer(widths, INTERP_LIMIT)


def test_buffers_that_fill_mid_batch_grow_and_the_batch_is_bucketed_once():
    # Three meters silent for 30 hours: 5,400 one-minute groups from one batch, far past the first
    # buffers, then a small batch on the grown ones.
    bucketer = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)
    registers = dict.fromkeys(range(3), REGISTERS[3])
    state = k.RegisterState.empty(3)
    separate_state = k.RegisterState.empty(3)
    batches = [
        [ref.Read(s, T0 + s, 10.0 * s) for s in range(3)],
        [ref.Read(s, T0 + 30 * 3_600_000 + s, 10.0 * s + 50.0) for s in range(3)],
        [ref.Read(s, T0 + 30 * 3_600_000 + 60_000 + s, 10.0 * s + 50.5) for s in range(3)],
    ]
    for batch in batches:
        result = bucketer_run(bucketer, batch, registers, state)
        ordered, separate = kernel_intervals(batch, registers, separate_state)
        series = np.array([r.series for r in ordered], np.int32)
        ts = np.array([r.ts for r in ordered], np.int64)
        for w, width in enumerate(WIDTHS):
            assert {key: exact(row) for key, row in ref.rows_from_kernel(result.buckets[w]).items()} == {
                key: exact(row)
                for key, row in ref.rows_from_kernel(separate_kernels(separate, series, ts, width)).items()
            }
    assert result.buckets[0].total.sum() == pytest.approx(1.5)


def test_bucketer_results_are_views_that_its_next_call_overwrites():
    # Each batch's buckets are exact although the batch before made more groups, with flags and
    # estimated shares, in the same buffers; a result's arrays are valid only until the next call.
    bucketer = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)
    registers = dict.fromkeys(range(3), REGISTERS[0])
    state = k.RegisterState.empty(3)
    separate_state = k.RegisterState.empty(3)
    batches = [
        [ref.Read(s, T0 + s, 100.0 * s) for s in range(3)],
        [
            ref.Read(0, T0 + 90_000, 1.0),
            ref.Read(1, T0 + 90_000, 9_000.0),
            ref.Read(2, T0 + 3 * WIDTH, 200.5),
        ],
        [ref.Read(0, T0 + 120_000, 1.25)],
    ]
    results = []
    for batch in batches:
        result = bucketer_run(bucketer, batch, registers, state)
        ordered, separate = kernel_intervals(batch, registers, separate_state)
        series = np.array([r.series for r in ordered], np.int32)
        ts = np.array([r.ts for r in ordered], np.int64)
        for w, width in enumerate(WIDTHS):
            assert {key: exact(row) for key, row in ref.rows_from_kernel(result.buckets[w]).items()} == {
                key: exact(row)
                for key, row in ref.rows_from_kernel(separate_kernels(separate, series, ts, width)).items()
            }
        results.append(result)
    assert [b.series.size for b in results[1].buckets] == [6, 3, 3]
    before, last = results[1:]
    assert np.shares_memory(before.read_flag, last.read_flag)
    for w in range(len(WIDTHS)):
        for mine, theirs in zip(before.buckets[w], last.buckets[w], strict=True):
            assert np.shares_memory(mine, theirs)


def test_register_state_and_params_are_records_seen_through_their_fields():
    state = k.RegisterState(
        np.array([5, k.NO_TS]), np.array([1.5, 0.0]), np.array([k.NO_TS, 7]), np.array([0.0, 2.5])
    )
    assert state.packed.dtype == k.STATE
    state.anchor_val[1] = 4.0  # the fields are views: what is written reaches the kernels
    assert state.packed["anchor_val"].tolist() == [1.5, 4.0]
    state.grow(4)
    state.grow(3)  # never shrinks
    assert state.anchor_ts.tolist() == [5, k.NO_TS, k.NO_TS, k.NO_TS]
    assert state.anchor_val.tolist() == [1.5, 4.0, 0.0, 0.0]
    assert state.pending_ts.tolist() == [k.NO_TS, 7, k.NO_TS, k.NO_TS]
    assert state.pending_val.tolist() == [0.0, 2.5, 0.0, 0.0]
    p = k.RegisterParams(np.array([9.9, math.inf]), np.array([0.1, 0.001]), np.array([1.0, math.inf]))
    assert p.packed.dtype == k.PARAMS
    assert [p.register_max.tolist(), p.resolution.tolist(), p.max_rate_per_ms.tolist()] == [
        [9.9, math.inf],
        [0.1, 0.001],
        [1.0, math.inf],
    ]


def test_bucketer_follows_a_state_that_grows_between_calls():
    # The processor's series table grows its state when a poll brings new series.
    bucketer = k.RegisterBucketer((WIDTH,), INTERP_LIMIT)
    p = params(dict.fromkeys(range(3), REGISTERS[3]))
    state = k.RegisterState.empty(1)
    bucketer(np.array([0], np.int32), np.array([T0], np.int64), np.array([1.0]), state, p)
    state.grow(3)
    result = bucketer(
        np.array([0, 2, 2], np.int32), T0 + np.array([WIDTH, WIDTH, 2 * WIDTH]), np.array([2.0, 5.0, 5.5]),
        state, p,
    )  # fmt: skip
    assert ref.read_flags_from_kernel(result) == ["ok", "first", "ok"]
    rows = ref.rows_from_kernel(result.buckets[0])
    assert {key: row.total for key, row in rows.items()} == pytest.approx(
        {(0, T0): 1.0, (2, T0 + WIDTH): 0.5}
    )


@pytest.mark.parametrize(
    ("series", "n_series"),
    [([0, 1], 1), ([0, -1], 1), ([0, 1], 2)],
    ids=["unknown", "negative", "without params"],
)
def test_fused_bucketer_refuses_unknown_series_and_changes_nothing(series, n_series):
    bucketer = k.RegisterBucketer(WIDTHS, INTERP_LIMIT)
    state = k.RegisterState.empty(n_series)
    state.anchor_ts[0], state.anchor_val[0] = 0, 5.0
    p = k.RegisterParams(np.array([99_999.99]), np.array([0.01]), np.array([math.inf]))
    with pytest.raises(ValueError):
        bucketer(np.array(series, np.int32), np.array([1, 2], np.int64), np.array([6.0, 7.0]), state, p)
    assert (state.anchor_ts.tolist(), state.anchor_val.tolist()) == (
        [0] + [k.NO_TS] * (n_series - 1),
        [5.0] + [0.0] * (n_series - 1),
    )
    assert state.pending_ts.tolist() == [k.NO_TS] * n_series
    # And it carries on with the next batch.
    result = bucketer(np.array([0], np.int32), np.array([WIDTH], np.int64), np.array([8.0]), state, p)
    assert [b.total.tolist() for b in result.buckets] == [[3.0]] * len(WIDTHS)


@st.composite
def contributions(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    n = draw(st.integers(1, 60))
    series = np.array(draw(st.lists(st.integers(0, 7), min_size=n, max_size=n)), np.int32)
    bucket = np.array(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)), np.int64)
    bucket = T0 + bucket * WIDTH + np.array(draw(st.lists(st.integers(0, WIDTH - 1), min_size=n, max_size=n)))
    qty = np.array(draw(st.lists(st.floats(-1e3, 1e6), min_size=n, max_size=n)))
    quality = np.array(draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n)), np.int8)
    flagged = np.array(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), np.int8)
    return series, bucket, qty, quality, flagged


def exact(row: ref.Row) -> tuple[object, ...]:
    return (
        row.total,
        row.n,
        row.by_quality,
        row.n_flagged,
        "nan" if math.isnan(row.max_value) else row.max_value,
    )


def reference_reduce(series, bucket, qty, quality, flagged) -> ref.BucketRows:
    rows: ref.BucketRows = {}
    for s, b, q, c, f in zip(
        series.tolist(), bucket.tolist(), qty.tolist(), quality.tolist(), flagged.tolist(), strict=True
    ):
        ref.add(rows, (s, ref.bucket_start(b, WIDTH)), q, c, bool(f))
    return rows


@PROPERTY
@given(contributions())
def test_reduce_dense_and_sorted_paths_agree_with_the_reference(arrays):
    series, bucket, qty, quality, flagged = arrays
    dense = ref.rows_from_kernel(k.reduce_by_key(series, bucket, qty, quality, flagged, WIDTH))
    # One row far in the future makes the (series x bucket) grid too large: the sorted path runs.
    far = k.DENSE_GRID_LIMIT * WIDTH
    wide = k.reduce_by_key(
        np.append(series, 0).astype(np.int32), np.append(bucket, T0 + far), np.append(qty, 1.0),
        np.append(quality, 0).astype(np.int8), np.append(flagged, 0).astype(np.int8), WIDTH,
    )  # fmt: skip
    assert np.all(np.diff(wide.series) >= 0), "the sorted path returns groups in key order"
    sorted_rows = ref.rows_from_kernel(wide)
    assert sorted_rows.pop((0, T0 + far)).n == 1
    # Both paths add a group's rows in input order, so they agree to the last bit.
    assert {key: exact(row) for key, row in sorted_rows.items()} == {
        key: exact(row) for key, row in dense.items()
    }
    assert_rows_match(dense, reference_reduce(series, bucket, qty, quality, flagged), 1e6)


@PROPERTY
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5 * WIDTH), st.floats(-500, 500)), max_size=80))
def test_instantaneous_spikes_stay_out_of_average_and_maximum(samples):
    samples = sorted({(s, ts): v for s, ts, v in samples}.items())
    flat = [(s, T0 + ts, v) for (s, ts), v in samples]
    limits = {0: 100.0, 1: 250.0, 2: math.inf, 3: 0.5}
    series = np.array([s for s, _, _ in flat], np.int32)
    ts = np.array([t for _, t, _ in flat], np.int64)
    value = np.array([v for _, _, v in flat])
    buckets = k.instantaneous_buckets(series, ts, value, np.array([limits[s] for s in range(4)]), WIDTH)
    got = ref.rows_from_kernel(buckets)
    assert_rows_match(got, ref.instantaneous(flat, limits, WIDTH), 500.0)
    for (s, _), row in got.items():
        if row.n:
            assert abs(row.total / row.n) <= limits[s]
            assert abs(row.max_value) <= limits[s]


# --- worked examples ------------------------------------------------------------------------------


def run(
    values: list[float],
    *,
    register: ref.Register = REGISTERS[1],
    gaps: list[int] | None = None,
    install_after: list[float] | None = None,
    multiplier: list[float] | None = None,
) -> k.Intervals:
    n = len(values)
    ts = T0 + np.cumsum([0, *(gaps or [WIDTH] * (n - 1))]).astype(np.int64)
    p = k.RegisterParams(
        np.array([register.maximum]), np.array([register.resolution]), np.array([register.max_rate_per_ms])
    )
    return k.registers_to_intervals(
        np.zeros(n, np.int32), ts, np.array(values, np.float64), k.RegisterState.empty(1), p,
        install_after=None if install_after is None else np.array(install_after, np.float64),
        multiplier=None if multiplier is None else np.array(multiplier, np.float64),
    )  # fmt: skip


def flags(result: k.Intervals) -> list[str]:
    return ref.read_flags_from_kernel(result)


def test_rollover_of_a_five_digit_register_books_what_was_left_plus_what_was_counted():
    result = run([99_999.99, 0.5])
    assert flags(result) == ["first", "rollover"]
    assert result.qty.tolist() == pytest.approx([0.51], abs=1e-9)


def test_a_small_step_back_near_the_top_is_not_a_rollover():
    # With no rating to bound it, reading the register as wrapped would book 99,999 kWh.
    result = run([95_000.0, 94_999.0, 95_000.5])
    assert flags(result) == ["first", "negative", "ok"]
    assert result.qty.tolist() == pytest.approx([0.5])


def test_meter_exchange_is_never_differenced_across():
    result = run([1_200.0, 1_250.0, 3.0, 4.5], install_after=[math.nan, 2.0, math.nan, math.nan])
    assert flags(result) == ["first", "ok", "ok", "ok"]
    assert result.qty.tolist() == pytest.approx([50.0, 1.0, 1.5])


def test_confirmed_reset_books_unknown_then_resumes():
    result = run([500.0, 510.0, 3.0, 5.0])
    assert flags(result) == ["first", "ok", "negative", "rebaseline"]
    assert result.bad.tolist() == [0, 1, 0]
    assert result.qty.tolist() == pytest.approx([10.0, 0.0, 2.0])
    assert (result.t0[1:] - T0).tolist() == [WIDTH, 2 * WIDTH]


def test_implausible_jump_anchors_nothing():
    result = run([100.0, 900.0, 100.5], register=REGISTERS[0])
    assert flags(result) == ["first", "implausible", "ok"]
    assert result.qty.tolist() == pytest.approx([0.5])
    assert (result.t1 - result.t0).tolist() == [2 * WIDTH]


def test_multiplier_scales_the_interval_ending_at_its_read():
    result = run([10.0, 10.5, 11.0], multiplier=[40.0, 40.0, 0.5])
    assert result.qty.tolist() == pytest.approx([20.0, 0.25])


def test_prorating_splits_by_time_and_names_the_quality():
    result = run([0.0, 10.0, 13.0, 43.0], gaps=[WIDTH + 30_000, 10_000, 3 * 3_600_000])
    parts = k.prorate(result, WIDTH, INTERP_LIMIT)
    by_interval: list[list[tuple[float, int]]] = [[] for _ in range(result.qty.size)]
    for j, q, c in zip(parts.interval.tolist(), parts.qty.tolist(), parts.quality.tolist(), strict=True):
        by_interval[j].append((q, c))
    # 90 s over two buckets: 60 s + 30 s.
    assert [q for q, _ in by_interval[0]] == pytest.approx([10 * 60 / 90, 10 * 30 / 90])
    assert [c for _, c in by_interval[0]] == [k.ESTIMATED, k.ESTIMATED]
    assert by_interval[1] == [(3.0, k.MEASURED)]
    assert {c for _, c in by_interval[2]} == {k.SUBSTITUTED}
    assert len(by_interval[2]) == 181
    assert sum(q for q, _ in by_interval[2]) == pytest.approx(30.0, rel=1e-12)


def test_a_read_on_the_minute_closes_that_minute():
    result = run([0.0, 1.0], gaps=[WIDTH])
    parts = k.prorate(result, WIDTH, INTERP_LIMIT)
    assert parts.bucket_ms.tolist() == [T0]
    assert parts.quality.tolist() == [k.MEASURED]


@PROPERTY
@given(st.lists(st.integers(0, 30), max_size=300), st.integers(0, 5))
def test_order_by_series_is_the_lexsort_of_time_ordered_reads(series_list, spare):
    series = np.array(series_list, np.int32)
    ts = np.arange(series.size, dtype=np.int64) * 1_000  # arrival order is time order
    order = k.order_by_series(series, int(series.max(initial=-1)) + 1 + spare)
    assert order.tolist() == np.lexsort((ts, series)).tolist()
