"""The processors' hot loops: pure numba kernels over numpy arrays, no I/O.

Three steps turn a batch of readings into bucket aggregates:

1. `registers_to_intervals`: cumulative register reads (sorted by series, then time) become intervals
   ``(t0, t1]`` with the quantity consumed in them. Rollover wraps at the register's maximum, a registered
   meter exchange re-anchors the register at its install read, and a read that would book a negative or
   implausible quantity is flagged and not booked. A drop that the next read confirms (both reads
   consistent with each other) is taken as an unregistered reset: the interval across it is booked as
   unknown (bad) and counting resumes from the new level.
2. `prorate`: each interval's quantity is spread over the buckets it overlaps in proportion to time
   (linear interpolation of the register), so bucket sums equal register deltas exactly. An interval
   inside one bucket is measured; one spread over several buckets is estimated, or substituted when it is
   longer than the interpolation limit.
3. `reduce_by_key`: contributions are summed per (series, bucket): total, count, maximum, and counts
   per quality class.

`RegisterBucketer` does all three for every bucket width in one kernel call per batch, over reads in
arrival order, with buffers reused from batch to batch (what it returns are views of them, valid until
its next call): the processor's path for in-order register reads. The separate steps remain for the
late-read replay.

`processing.reference` holds slow, obviously correct versions of the same rules; property tests compare
the two. State that outlives a batch (each series' anchor read) lives in a `RegisterState` the caller
owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
from numba import njit
from numpy.typing import NDArray

I8 = NDArray[np.int8]
I32 = NDArray[np.int32]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

NO_TS: Final = np.int64(-(2**62))

# Quality of a bucket contribution, in order of increasing doubt (OpenADR DATA_QUALITY vocabulary).
MEASURED: Final = 0
ESTIMATED: Final = 1
SUBSTITUTED: Final = 2
NO_QUALITY: Final = -1

# What happened to each register read.
READ_OK: Final = 0
READ_FIRST: Final = 1  # the series' first read: it anchors the register, books nothing
READ_ROLLOVER: Final = 2
READ_NEGATIVE: Final = 3
READ_IMPLAUSIBLE: Final = 4
READ_REBASELINE: Final = 5  # confirmed an unregistered reset at the previous (negative) read
READ_FLAG_NAMES: Final = ("ok", "first", "rollover", "negative", "implausible", "rebaseline")

# A drop from above this share of the register's maximum to a small value is a rollover.
ROLLOVER_ZONE: Final = 0.9

# No meter reads, and no interval holds, more than this in magnitude (a 12-digit register times the
# largest instrument-transformer ratios stays far below it). Beyond it a value is a glitch or an attack:
# flagged, never booked, so that sums of any number of booked quantities stay finite (2^31 rows of
# 1e15 are 2e24, nowhere near float64's 1.8e308) and no aggregate can become inf or NaN.
VALUE_LIMIT: Final = 1e15
# Reads are booked only inside 1970-01-01 to 2200-01-01 (epoch ms), what the database, the API's time
# ranges and the audit chain hold; elsewhere int64 differences could wrap and buckets be absurd.
TS_MIN: Final = 0
TS_MAX: Final = 7_258_118_400_000
# An interval longer than this is booked whole in the bucket it ends in (substituted) instead of
# pro-rated over every bucket it overlaps: a register read after a year's silence would otherwise make
# half a million 1-minute rows, and a read decades apart tens of millions. The total stays exact; only
# where inside so long a gap the energy was used is unknown anyway.
MAX_PRORATE_SPAN_MS: Final = 31 * 86_400_000

# Indexing with unsigned integers spares numba's negative-index wraparound, a measurable share of the
# fused kernel's time; used only where the index is known to be in range.
U = np.uint64

# Beyond this many cells a dense (series x bucket) grid would cost more than sorting the keys.
DENSE_GRID_LIMIT: Final = 1 << 22


@njit(cache=True, nogil=True)
def _prorate_count(t0: I64, t1: I64, bad: I8, width_ms: int) -> int:
    n = 0
    for j in range(t0.size):
        if bad[j] == 0 and t1[j] > t0[j]:
            start = t0[j] if t1[j] - t0[j] <= MAX_PRORATE_SPAN_MS else t1[j] - 1
            first = start - start % width_ms
            last = (t1[j] - 1) - (t1[j] - 1) % width_ms
            n += (last - first) // width_ms + 1
    return n


@njit(cache=True, nogil=True)
def _prorate(
    t0: I64,
    t1: I64,
    qty: F64,
    bad: I8,
    width_ms: int,
    max_interp_gap_ms: int,
    out_interval: I64,
    out_bucket: I64,
    out_qty: F64,
    out_quality: I8,
) -> int:
    k = 0
    for j in range(t0.size):
        if bad[j] != 0 or t1[j] <= t0[j]:
            continue
        span = t1[j] - t0[j]
        last = (t1[j] - 1) - (t1[j] - 1) % width_ms
        if span > MAX_PRORATE_SPAN_MS:
            # Whole in the bucket it ends in (see MAX_PRORATE_SPAN_MS).
            out_interval[k] = j
            out_bucket[k] = last
            out_qty[k] = qty[j]
            out_quality[k] = SUBSTITUTED
            k += 1
            continue
        first = t0[j] - t0[j] % width_ms
        if first == last:
            out_interval[k] = j
            out_bucket[k] = first
            out_qty[k] = qty[j]
            out_quality[k] = MEASURED
            k += 1
            continue
        quality = ESTIMATED if span <= max_interp_gap_ms else SUBSTITUTED
        booked = 0.0
        b = first
        while b <= last:
            out_interval[k] = j
            out_bucket[k] = b
            out_quality[k] = quality
            if b == last:
                # The remainder, not a computed share, so the shares add up to the delta exactly.
                out_qty[k] = qty[j] - booked
            else:
                overlap = min(t1[j], b + width_ms) - max(t0[j], b)
                share = qty[j] * (overlap / span)
                out_qty[k] = share
                booked += share
            k += 1
            b += width_ms
    return k


@njit(cache=True, nogil=True)
def _reduce_dense(
    series: I32,
    bucket_index: I64,
    qty: F64,
    quality: I8,
    flagged: I8,
    first_bucket: int,
    n_buckets: int,
    slot_of_cell: I32,
    out_series: I32,
    out_bucket_index: I64,
    out_total: F64,
    out_n: I32,
    out_max: F64,
    out_quality_n: I32,
    out_flagged: I32,
) -> int:
    groups = 0
    for i in range(series.size):
        cell = series[i] * n_buckets + (bucket_index[i] - first_bucket)
        g = slot_of_cell[cell]
        if g < 0:
            g = groups
            slot_of_cell[cell] = g
            groups += 1
            out_series[g] = series[i]
            out_bucket_index[g] = bucket_index[i]
            out_max[g] = np.nan
        # Written out here, not in a shared helper: numba's inlined helper kept reference counting
        # on the output arrays per row and ran 8x slower.
        if quality[i] >= 0:
            out_total[g] += qty[i]
            out_n[g] += 1
            if math.isnan(out_max[g]) or qty[i] > out_max[g]:
                out_max[g] = qty[i]
            out_quality_n[g * 3 + quality[i]] += 1
        out_flagged[g] += flagged[i]
    return groups


@njit(cache=True, nogil=True)
def _reduce_sorted(
    series: I32,
    bucket_index: I64,
    qty: F64,
    quality: I8,
    flagged: I8,
    order: I64,
    out_series: I32,
    out_bucket_index: I64,
    out_total: F64,
    out_n: I32,
    out_max: F64,
    out_quality_n: I32,
    out_flagged: I32,
) -> int:
    groups = 0
    for r in range(order.size):
        i = order[r]
        if (
            groups == 0
            or out_series[groups - 1] != series[i]
            or out_bucket_index[groups - 1] != bucket_index[i]
        ):
            out_series[groups] = series[i]
            out_bucket_index[groups] = bucket_index[i]
            out_max[groups] = np.nan
            groups += 1
        g = groups - 1
        # Written out here, not in a shared helper: numba's inlined helper kept reference counting
        # on the output arrays per row and ran 8x slower.
        if quality[i] >= 0:
            out_total[g] += qty[i]
            out_n[g] += 1
            if math.isnan(out_max[g]) or qty[i] > out_max[g]:
                out_max[g] = qty[i]
            out_quality_n[g * 3 + quality[i]] += 1
        out_flagged[g] += flagged[i]
    return groups


@njit(cache=True, nogil=True)
def _instantaneous_flags(series: I32, value: F64, abs_limit: F64, out_quality: I8, out_flagged: I8) -> None:
    for i in range(series.size):
        # Not `>`: NaN compares false, and must be a spike too.
        if not abs(value[i]) <= min(abs_limit[series[i]], VALUE_LIMIT):
            out_quality[i] = NO_QUALITY
            out_flagged[i] = 1
        else:
            out_quality[i] = MEASURED
            out_flagged[i] = 0


@njit(cache=True, nogil=True)
def _order_by_series(series: I32, n_series: int, out: I64) -> None:
    # Counting sort: each series' reads land in its own slice, in the order they came.
    next_slot = np.zeros(n_series + 1, np.int64)
    for i in range(series.size):
        next_slot[series[i] + 1] += 1
    for s in range(n_series):
        next_slot[s + 1] += next_slot[s]
    for i in range(series.size):
        s = series[i]
        out[next_slot[s]] = i
        next_slot[s] += 1


# Record layouts of the packed arrays the register kernels take: one argument, and read by read one
# place in memory, instead of several parallel arrays (numba's dispatch costs about 0.1 us per array
# argument, a large share of a micro-batch's time).
STATE: Final = np.dtype(
    [
        ("anchor_ts", np.int64),
        ("anchor_val", np.float64),
        ("pending_ts", np.int64),
        ("pending_val", np.float64),
    ]
)
PARAMS: Final = np.dtype(
    [("register_max", np.float64), ("resolution", np.float64), ("max_rate_per_ms", np.float64)]
)
# Per read, from the register pass to the bucket passes: where the interval it closes starts, the
# quantity in it, and where the unknown interval before a rebaseline starts.
_READ: Final = np.dtype([("start", np.int64), ("qty", np.float64), ("unknown_from", np.int64)])

# The fused kernel's control block (int64): the first group id of the next call (ids grow from call to
# call, so a series' head made by an earlier call is recognised without a per-series batch number);
# whether the register pass is already done (the caller sets it to retry the bucket passes on grown
# buffers, the kernel clears it); the interpolation limit; the widths; then per width the groups that
# hold data (made by the last call, or all of them after a call that ran out of room).
_CTL_NEXT_ID: Final = 0
_CTL_REGISTERS_DONE: Final = 1
_CTL_GAP: Final = 2
_CTL_WIDTHS: Final = 3


@njit(cache=True, nogil=True)
def _group_bound(
    series: I32, ts: I64, read_flag: I8, reads: NDArray[np.void], widths: I64, scratch: I64, mark: int
) -> int:
    """The most (series, bucket) groups any width can get from a batch whose register pass is done: a
    series' groups lie between the earliest start of its intervals and flagged reads, and its last read;
    and each read touches at most its interval's span over the width plus two buckets (the tighter bound
    when reads lie far apart). `scratch[s]` holds `mark` once the batch has seen s, and the earliest and
    latest times so far."""
    k = 0
    n = 0
    read_span_sum = 0
    for i in range(series.size):
        s = series[i]
        f = read_flag[i]
        t = ts[i]
        if not TS_MIN <= t < TS_MAX:
            continue  # never bucketed
        lo = reads[i].start if f in (READ_OK, READ_ROLLOVER, READ_REBASELINE) else t
        if t - lo > MAX_PRORATE_SPAN_MS:
            lo = t - 1
        n += 1
        read_span_sum += t - lo
        if scratch[s, 0] != mark:
            scratch[s, 0] = mark
            scratch[s, 1] = lo
            scratch[s, 2] = t
            k += 1
        else:
            scratch[s, 1] = min(scratch[s, 1], lo)
            scratch[s, 2] = max(scratch[s, 2], t)
    span_sum = 0
    for i in range(series.size):
        s = series[i]
        if scratch[s, 0] == mark:
            span_sum += max(scratch[s, 2] - scratch[s, 1], 0)
            scratch[s, 0] = NO_TS
    need = 0
    for w in range(widths.size):
        need = max(need, min(span_sum // widths[w] + 2 * k, read_span_sum // widths[w] + 2 * n))
    return need


@njit(cache=True, nogil=True)
def _register_pass(
    series: I32,
    ts: I64,
    value: F64,
    extras: F64,
    state: NDArray[np.void],
    params: NDArray[np.void],
    read_flag: I8,
    reads: NDArray[np.void],
) -> None:
    """The register rules (step 1 above), read by read: each read's flag and, when it books, the
    interval it closes: from `reads[i].start` (the anchor, or the drop a rebaseline confirmed) to the
    read, holding `reads[i].qty`. A rebaseline also leaves the unknown interval's start, the anchor
    before the drop, in `reads[i].unknown_from`. `extras` is empty or holds per read the install read
    (NaN: none) and the multiplier."""
    has_extras = extras.shape[1] > 0
    for i in range(series.size):
        s = U(series[i])
        t = ts[i]
        v = value[i]
        anchor_next = v
        if has_extras and not math.isnan(extras[0, i]):
            anchor_next = extras[0, i]
        st = state[s]
        p = params[s]
        # A value no register can hold (NaN and inf included: the comparisons are false) or a time
        # outside what is stored is a glitch: flagged, anchoring nothing, never booked.
        if not (
            abs(v) <= VALUE_LIMIT
            and v <= p.register_max + p.resolution
            and abs(anchor_next) <= VALUE_LIMIT
            and TS_MIN <= t < TS_MAX
        ):
            read_flag[i] = READ_IMPLAUSIBLE
            continue
        if st.anchor_ts == NO_TS:
            st.anchor_ts = t
            st.anchor_val = anchor_next
            read_flag[i] = READ_FIRST
            continue
        r = reads[i]
        d = v - st.anchor_val
        flag = READ_OK
        if (
            d < 0.0
            and st.anchor_val > ROLLOVER_ZONE * p.register_max
            and v < (1.0 - ROLLOVER_ZONE) * p.register_max
        ):
            d = (p.register_max + p.resolution - st.anchor_val) + v
            flag = READ_ROLLOVER
        q = d * extras[1, i] if has_extras else d
        if 0.0 <= d <= p.max_rate_per_ms * (t - st.anchor_ts) + p.resolution and q <= VALUE_LIMIT:
            r.start = st.anchor_ts
            r.qty = q
            st.anchor_ts = t
            st.anchor_val = anchor_next
            if st.pending_ts != NO_TS:
                st.pending_ts = NO_TS
            read_flag[i] = flag
        elif (
            st.pending_ts != NO_TS
            and 0.0 <= v - st.pending_val <= p.max_rate_per_ms * (t - st.pending_ts) + p.resolution
            and (v - st.pending_val) * (extras[1, i] if has_extras else 1.0) <= VALUE_LIMIT
        ):
            r.unknown_from = st.anchor_ts
            r.start = st.pending_ts
            r.qty = (v - st.pending_val) * extras[1, i] if has_extras else v - st.pending_val
            st.anchor_ts = t
            st.anchor_val = anchor_next
            st.pending_ts = NO_TS
            read_flag[i] = READ_REBASELINE
        elif v < st.anchor_val:
            # A drop may be a reset the next read confirms; an up-jump is a glitch and anchors nothing.
            st.pending_ts = t
            st.pending_val = v
            read_flag[i] = READ_NEGATIVE
        else:
            read_flag[i] = READ_IMPLAUSIBLE


@njit(cache=True, nogil=True)
def _registers_to_intervals(
    series: I32,
    ts: I64,
    value: F64,
    extras: F64,
    state: NDArray[np.void],
    params: NDArray[np.void],
    read_flag: I8,
    reads: NDArray[np.void],
    out_series: I32,
    out_t0: I64,
    out_t1: I64,
    out_qty: F64,
    out_bad: I8,
) -> int:
    _register_pass(series, ts, value, extras, state, params, read_flag, reads)
    m = 0
    for i in range(series.size):
        f = read_flag[i]
        if f == READ_REBASELINE:
            out_series[m] = series[i]
            out_t0[m] = reads[i].unknown_from
            out_t1[m] = reads[i].start
            out_qty[m] = 0.0
            out_bad[m] = 1
            m += 1
        if f in (READ_OK, READ_ROLLOVER, READ_REBASELINE):
            out_series[m] = series[i]
            out_t0[m] = reads[i].start
            out_t1[m] = ts[i]
            out_qty[m] = reads[i].qty
            out_bad[m] = 0
            m += 1
    return m


@njit(cache=True, nogil=True)
def _bucket_pass(
    series: I32,
    ts: I64,
    read_flag: I8,
    reads: NDArray[np.void],
    width: int,
    max_interp_gap_ms: int,
    per_series: I64,
    col: int,
    first_id: int,
    g_i32: I32,
    g_i64: I64,
    g_float: F64,
) -> int:
    """Spread each read's interval over the `width` buckets it overlaps and add it, and each flagged
    read, to its (series, bucket) group. Returns the number of groups, or -1 as soon as the group
    buffers are full (the caller grows them and runs this again with a new `first_id`).

    Groups are stored field by field: `g_i32` holds series, n, n per quality and n flagged; `g_i64` the
    bucket and the series' group before (-1: none); `g_float` the total and the maximum. Groups not made
    yet hold zero counts and no link, so making one writes only what differs.

    `per_series[s, col]` holds the id of s's head (its group with the latest bucket) and
    `per_series[s, col + 1]` the head's bucket. Ids count on from call to call, this call's from
    `first_id`, so a head made by an earlier call is older than `first_id` and `per_series` needs no
    clearing. A series' groups form a list by falling bucket from the head. Contributions land at or
    after the head, except those of an interval that reaches back past a flagged read: finding a group
    needs no search and, while reads stay within a bucket or two of the last, no division."""
    capacity = g_i32.shape[1]
    ng = 0
    for i in range(series.size):
        f = read_flag[i]
        t1 = ts[i]
        # A read outside the stored times was flagged by the register pass and has no bucket.
        if f == READ_FIRST or not TS_MIN <= t1 < TS_MAX:
            continue
        flagged = f in (READ_NEGATIVE, READ_IMPLAUSIBLE)
        s = U(series[i])
        t0 = t1 if flagged else reads[i].start
        if t1 <= t0 and not flagged:
            continue
        single = MEASURED  # the quality of an interval inside one bucket
        if t1 - t0 > MAX_PRORATE_SPAN_MS:
            # Whole in the bucket it ends in (see MAX_PRORATE_SPAN_MS).
            t0 = t1 - 1
            single = SUBSTITUTED
        h = per_series[s, U(col)] - first_id
        last = per_series[s, U(col + 1)]
        valid = h >= 0
        # The bucket of the interval's start (or of a flagged read), from the last one if near.
        if last <= t0 < last + width:
            first = last
        elif last + width <= t0 < last + 2 * width:
            first = last + width
        else:
            first = t0 - t0 % width
        q = reads[i].qty
        if flagged:
            steps = 1
            quality = NO_QUALITY
        else:
            if t1 - first <= width:
                steps = 1
            elif t1 - first <= 2 * width:
                steps = 2
            else:
                steps = (t1 - 1 - first) // width + 1
            if steps == 1:
                if valid and first == last:
                    # The head's bucket: the common case, a read soon after the last.
                    g_float[0, U(h)] += q
                    if math.isnan(g_float[1, U(h)]) or q > g_float[1, U(h)]:
                        g_float[1, U(h)] = q
                    g_i32[1, U(h)] += 1
                    g_i32[2 + single, U(h)] += 1
                    continue
                if not valid or first > last:
                    # A new head made with its first contribution: the common case in small batches.
                    if ng == capacity:
                        return -1
                    g_i32[0, U(ng)] = s
                    g_i64[0, U(ng)] = first
                    if valid:
                        g_i64[1, U(ng)] = h
                    g_float[0, U(ng)] = q
                    g_float[1, U(ng)] = q
                    g_i32[1, U(ng)] = 1
                    g_i32[2 + single, U(ng)] = 1
                    per_series[s, U(col)] = first_id + ng
                    per_series[s, U(col + 1)] = first
                    ng += 1
                    continue
                quality = single
            elif t1 - t0 <= max_interp_gap_ms:
                quality = ESTIMATED
            else:
                quality = SUBSTITUTED
        span = t1 - t0
        booked = 0.0
        for step in range(steps):
            b = first + step * width
            # Find (or make) the group of (s, b).
            if not valid or b > last:
                if ng == capacity:
                    return -1
                g = ng
                ng += 1
                g_i32[0, U(g)] = s
                g_i64[0, U(g)] = b
                if valid:
                    g_i64[1, U(g)] = h
                g_float[0, U(g)] = 0.0
                g_float[1, U(g)] = np.nan
                h = g
                last = b
                valid = True
            elif b == last:
                g = h
            else:
                # Behind the head: walk back to it, or link a new group in where it belongs.
                after = h
                g = g_i64[1, U(h)]
                while g >= 0 and g_i64[0, U(g)] > b:
                    after = g
                    g = g_i64[1, U(g)]
                if g < 0 or g_i64[0, U(g)] != b:
                    if ng == capacity:
                        return -1
                    new = ng
                    ng += 1
                    g_i32[0, U(new)] = s
                    g_i64[0, U(new)] = b
                    g_i64[1, U(new)] = g
                    g_i64[1, U(after)] = new
                    g_float[0, U(new)] = 0.0
                    g_float[1, U(new)] = np.nan
                    g = new
            if flagged:
                g_i32[5, U(g)] += 1
                continue
            if step == steps - 1:
                # The remainder, not a computed share, so the shares add up to the delta exactly.
                share = q - booked
            else:
                overlap = min(t1, b + width) - max(t0, b)
                share = q * (overlap / span)
                booked += share
            g_float[0, U(g)] += share
            if math.isnan(g_float[1, U(g)]) or share > g_float[1, U(g)]:
                g_float[1, U(g)] = share
            g_i32[1, U(g)] += 1
            g_i32[2 + quality, U(g)] += 1
        per_series[s, U(col)] = first_id + h
        per_series[s, U(col + 1)] = last
    return ng


@njit(cache=True, nogil=True)
def _register_buckets(
    series: I32,
    ts: I64,
    value: F64,
    extras: F64,
    state: NDArray[np.void],
    params: NDArray[np.void],
    read_flag: I8,
    reads: NDArray[np.void],
    per_series: I64,
    scratch: I64,
    g_i32: I32,
    g_i64: I64,
    g_float: F64,
    ctl: I64,
) -> int:
    """`registers_to_intervals`, `prorate` and `reduce_by_key` for every width (the groups of width `w`
    in `g_i32[w]`, `g_i64[w]` and `g_float[w]`) in one call. Returns 0 when done; -1 (having changed
    nothing) when a series index is out of range; otherwise the groups the buffers need: the caller
    grows them, sets `ctl[_CTL_REGISTERS_DONE]` and calls again, which reruns only the bucket passes."""
    n_widths, _, capacity = g_i32.shape
    first_id = ctl[_CTL_NEXT_ID]
    ctl[_CTL_NEXT_ID] = first_id + capacity
    if ctl[_CTL_REGISTERS_DONE] == 0:
        # A minimum and a maximum rather than a test per read: a loop without exits vectorises.
        lo = hi = series[0] if series.size else 0
        for i in range(series.size):
            lo = min(lo, series[i])
            hi = max(hi, series[i])
        if series.size and (lo < 0 or hi >= min(state.size, params.size)):
            return -1
        _register_pass(series, ts, value, extras, state, params, read_flag, reads)
    ctl[_CTL_REGISTERS_DONE] = 0
    made = _CTL_WIDTHS + n_widths
    for w in range(n_widths):
        # Clear what the last call made (its results are given up now), as `_bucket_pass` expects.
        g_i32[w, 1:, : ctl[made + w]] = 0
        g_i64[w, 1, : ctl[made + w]] = -1
        ng = _bucket_pass(
            series, ts, read_flag, reads, ctl[_CTL_WIDTHS + w], ctl[_CTL_GAP], per_series, 2 * w, first_id,
            g_i32[w], g_i64[w], g_float[w],
        )  # fmt: skip
        if ng < 0:
            ctl[made + w] = capacity
            return _group_bound(series, ts, read_flag, reads, ctl[_CTL_WIDTHS:made], scratch, first_id)
        ctl[made + w] = ng
    return 0


# --- typed wrappers -------------------------------------------------------------------------------


class RegisterState:
    """Each series' anchor read (the last read booked from) and a pending drop awaiting confirmation:
    one STATE record per series in `packed`, which the kernels take; the attributes are views of its
    fields, so writing to them changes the state."""

    __slots__ = ("packed",)

    def __init__(self, anchor_ts: I64, anchor_val: F64, pending_ts: I64, pending_val: F64) -> None:
        self.packed = np.empty(anchor_ts.size, STATE)
        self.packed["anchor_ts"] = anchor_ts
        self.packed["anchor_val"] = anchor_val
        self.packed["pending_ts"] = pending_ts
        self.packed["pending_val"] = pending_val

    @classmethod
    def empty(cls, n_series: int) -> RegisterState:
        none = np.full(n_series, NO_TS, np.int64)
        return cls(none, np.zeros(n_series, np.float64), none, np.zeros(n_series, np.float64))

    def copy(self) -> RegisterState:
        """An independent copy, in one copy of the packed records."""
        out = RegisterState.empty(0)
        out.packed = self.packed.copy()
        return out

    def grow(self, n_series: int) -> None:
        extra = n_series - self.packed.size
        if extra > 0:
            self.packed = np.concatenate([self.packed, RegisterState.empty(extra).packed])

    @property
    def anchor_ts(self) -> I64:
        return self.packed["anchor_ts"]

    @property
    def anchor_val(self) -> F64:
        return self.packed["anchor_val"]

    @property
    def pending_ts(self) -> I64:
        return self.packed["pending_ts"]

    @property
    def pending_val(self) -> F64:
        return self.packed["pending_val"]


class RegisterParams:
    """Per series: register maximum (inf when it never rolls over), resolution, and the largest
    plausible quantity per millisecond (rated rate x margin; inf when the rating is unknown). One PARAMS
    record per series in `packed`, which the kernels take; the attributes are views of its fields."""

    __slots__ = ("packed",)

    def __init__(self, register_max: F64, resolution: F64, max_rate_per_ms: F64) -> None:
        self.packed = np.empty(register_max.size, PARAMS)
        self.packed["register_max"] = register_max
        self.packed["resolution"] = resolution
        self.packed["max_rate_per_ms"] = max_rate_per_ms

    @property
    def register_max(self) -> F64:
        return self.packed["register_max"]

    @property
    def resolution(self) -> F64:
        return self.packed["resolution"]

    @property
    def max_rate_per_ms(self) -> F64:
        return self.packed["max_rate_per_ms"]


@dataclass(frozen=True, slots=True)
class Intervals:
    series: I32
    t0: I64
    t1: I64
    qty: F64
    bad: I8  # 1: the quantity in this interval is unknown (across an unregistered reset)
    read_flag: I8  # per input read, READ_*


def order_by_series(series: I32, n_series: int) -> I64:
    """Positions that sort reads by series, stably (series in ``[0, n_series)``). Reads that arrive in
    time order come out sorted by (series, ts) in linear time, where a lexsort over the two keys would
    pay for a comparison sort."""
    out = np.empty(series.size, np.int64)
    _order_by_series(series, n_series, out)
    return out


_NO_EXTRAS: Final = np.empty((2, 0), np.float64)


def _extras(n: int, install_after: F64 | None, multiplier: F64 | None) -> F64:
    """Install reads (NaN: none) and multipliers per read in one array, as the register pass takes them."""
    if install_after is None and multiplier is None:
        return _NO_EXTRAS
    extras = np.empty((2, n), np.float64)
    extras[0] = np.nan if install_after is None else install_after
    extras[1] = 1.0 if multiplier is None else multiplier
    return extras


def registers_to_intervals(
    series: I32,
    ts: I64,
    value: F64,
    state: RegisterState,
    params: RegisterParams,
    *,
    install_after: F64 | None = None,
    multiplier: F64 | None = None,
) -> Intervals:
    """Reads must be sorted by (series, ts), free of duplicates, and newer than each series' anchor.
    `install_after[i]` (NaN when none) is the install read of a meter exchanged right after read i;
    `multiplier[i]` scales the quantity of the interval ending at read i. Updates `state` in place."""
    n = series.size
    out_series = np.empty(2 * n, np.int32)
    out_t0 = np.empty(2 * n, np.int64)
    out_t1 = np.empty(2 * n, np.int64)
    out_qty = np.empty(2 * n, np.float64)
    out_bad = np.empty(2 * n, np.int8)
    read_flag = np.empty(n, np.int8)
    m = _registers_to_intervals(
        series, ts, value, _extras(n, install_after, multiplier), state.packed, params.packed, read_flag,
        np.empty(n, _READ), out_series, out_t0, out_t1, out_qty, out_bad,
    )  # fmt: skip
    return Intervals(out_series[:m], out_t0[:m], out_t1[:m], out_qty[:m], out_bad[:m], read_flag)


@dataclass(frozen=True, slots=True)
class Contributions:
    interval: I64  # index into the intervals
    bucket_ms: I64
    qty: F64
    quality: I8


def prorate(intervals: Intervals, width_ms: int, max_interp_gap_ms: int) -> Contributions:
    """Spread each booked interval over the `width_ms` buckets it overlaps."""
    n = _prorate_count(intervals.t0, intervals.t1, intervals.bad, width_ms)
    out_interval = np.empty(n, np.int64)
    out_bucket = np.empty(n, np.int64)
    out_qty = np.empty(n, np.float64)
    out_quality = np.empty(n, np.int8)
    k = _prorate(
        intervals.t0, intervals.t1, intervals.qty, intervals.bad, width_ms, max_interp_gap_ms,
        out_interval, out_bucket, out_qty, out_quality,
    )  # fmt: skip
    return Contributions(out_interval[:k], out_bucket[:k], out_qty[:k], out_quality[:k])


class Buckets(NamedTuple):
    """One row per (series, bucket): sums, counts and the maximum of what was added."""

    series: I32
    bucket_ms: I64
    total: F64
    n: I32
    max_value: F64  # NaN when nothing but flags fell in the bucket
    n_measured: I32
    n_estimated: I32
    n_substituted: I32
    n_flagged: I32


def reduce_by_key(series: I32, bucket_ms: I64, qty: F64, quality: I8, flagged: I8, width_ms: int) -> Buckets:
    """Group contributions by (series, bucket). `quality` NO_QUALITY rows add only to `n_flagged`."""
    n = series.size
    out_series = np.empty(n, np.int32)
    out_bucket_index = np.empty(n, np.int64)
    out_total = np.zeros(n, np.float64)
    out_n = np.zeros(n, np.int32)
    out_max = np.empty(n, np.float64)
    out_quality_n = np.zeros(3 * n, np.int32)
    out_flagged = np.zeros(n, np.int32)
    if n == 0:
        groups = 0
    else:
        bucket_index = bucket_ms // width_ms
        first, last = int(bucket_index.min()), int(bucket_index.max())
        n_buckets = last - first + 1
        n_series = int(series.max()) + 1
        if n_series * n_buckets <= DENSE_GRID_LIMIT:
            slot_of_cell = np.full(n_series * n_buckets, -1, np.int32)
            groups = _reduce_dense(
                series, bucket_index, qty, quality, flagged, first, n_buckets, slot_of_cell,
                out_series, out_bucket_index, out_total, out_n, out_max, out_quality_n, out_flagged,
            )  # fmt: skip
        else:
            order = np.lexsort((bucket_index, series)).astype(np.int64)
            groups = _reduce_sorted(
                series, bucket_index, qty, quality, flagged, order,
                out_series, out_bucket_index, out_total, out_n, out_max, out_quality_n, out_flagged,
            )  # fmt: skip
    quality_n = out_quality_n[: 3 * groups].reshape(groups, 3)
    return Buckets(
        out_series[:groups],
        out_bucket_index[:groups] * width_ms,
        out_total[:groups],
        out_n[:groups],
        out_max[:groups],
        np.ascontiguousarray(quality_n[:, MEASURED]),
        np.ascontiguousarray(quality_n[:, ESTIMATED]),
        np.ascontiguousarray(quality_n[:, SUBSTITUTED]),
        out_flagged[:groups],
    )


class RegisterBuckets(NamedTuple):
    read_flag: I8  # per input read, READ_*
    buckets: tuple[Buckets, ...]  # one per width, in the order the widths were given


# A width's group columns in the order of `Buckets`' fields.
_Columns = tuple[I32, I64, F64, I32, F64, I32, I32, I32, I32]


class RegisterBucketer:
    """Register reads -> interval energy per (series, bucket) for several bucket widths, in one kernel
    call per batch: what `registers_to_intervals`, `prorate` and `reduce_by_key` (with each negative or
    implausible read added as a flag in its bucket, as the processor books them) give together, without
    their intermediate arrays. Its buffers are kept and reused from call to call, so a stream of small
    batches pays one dispatch and no copies per batch.

    Unlike `registers_to_intervals`, the reads need not be sorted by series: any order in which each
    series' reads are in time order will do, such as arrival (time) order or (series, ts) order.

    The arrays it returns are views of its buffers, valid until its next call, which overwrites them:
    use (or copy) them before calling again, as the processor's writer does within its poll. One call
    at a time."""

    def __init__(self, widths_ms: tuple[int, ...], max_interp_gap_ms: int) -> None:
        if not widths_ms or min(widths_ms) <= 0:
            raise ValueError(f"bucket widths must be positive, got {widths_ms}")
        self.widths_ms = widths_ms
        self.max_interp_gap_ms = max_interp_gap_ms
        nw = len(widths_ms)
        self._made = _CTL_WIDTHS + nw  # where the control block keeps the groups made per width
        self._ctl = np.zeros(self._made + nw, np.int64)
        self._ctl[_CTL_GAP] = max_interp_gap_ms
        self._ctl[_CTL_WIDTHS : self._made] = widths_ms
        # Per series: for each width its head's id and bucket (none yet); apart, as it is seldom used,
        # room for bounding the groups of a batch (see `_group_bound`).
        self._per_series = np.empty((0, 2 * nw), np.int64)
        self._scratch = np.empty((0, 3), np.int64)
        self._read_flag = np.empty(0, np.int8)
        self._reads = np.empty(0, _READ)
        self._capacity = 0
        self._grow_groups(1024)

    def _grow_groups(self, need: int) -> None:
        self._capacity = max(need, 2 * self._capacity)
        nw = len(self.widths_ms)
        # Clear, as `_bucket_pass` expects of groups not made yet: zero counts, no links.
        self._g_i32 = np.zeros((nw, 6, self._capacity), np.int32)  # series, n, n per quality, n flagged
        self._g_i64 = np.full((nw, 2, self._capacity), -1, np.int64)  # bucket, previous group of the series
        self._g_float = np.empty((nw, 2, self._capacity), np.float64)  # total, max
        self._ctl[self._made :] = 0
        # For slicing each call's groups off (`_first_groups`).
        self._columns: list[_Columns] = []
        for i32, i64, f64 in zip(self._g_i32, self._g_i64, self._g_float, strict=True):
            self._columns.append((i32[0], i64[0], f64[0], i32[1], f64[1], i32[2], i32[3], i32[4], i32[5]))

    def __call__(
        self,
        series: I32,
        ts: I64,
        value: F64,
        state: RegisterState,
        params: RegisterParams,
        *,
        install_after: F64 | None = None,
        multiplier: F64 | None = None,
    ) -> RegisterBuckets:
        """As `registers_to_intervals`, then `prorate` and `reduce_by_key` per width. Updates `state`
        in place. Raises ValueError (and changes nothing) if a series index is outside the state or the
        params."""
        n = series.size
        packed = state.packed
        if n > self._read_flag.size or packed.size > self._per_series.shape[0]:
            self._grow_reads(packed.size, n)
        args = (
            series, ts, value, _extras(n, install_after, multiplier), packed, params.packed, self._read_flag,
            self._reads, self._per_series, self._scratch,
        )  # fmt: skip
        need = _register_buckets(*args, self._g_i32, self._g_i64, self._g_float, self._ctl)
        while need > 0:
            self._grow_groups(need)
            self._ctl[_CTL_REGISTERS_DONE] = 1
            need = _register_buckets(*args, self._g_i32, self._g_i64, self._g_float, self._ctl)
        if need < 0:
            raise ValueError("a series index is out of range")
        made = self._ctl[self._made :].tolist()
        return RegisterBuckets(self._read_flag[:n], tuple(map(_first_groups, self._columns, made)))

    def _grow_reads(self, n_series: int, n_reads: int) -> None:
        extra = n_series - self._per_series.shape[0]
        if extra > 0:
            self._per_series = np.concatenate(
                [self._per_series, np.full((extra, self._per_series.shape[1]), NO_TS, np.int64)]
            )
            self._scratch = np.concatenate([self._scratch, np.full((extra, 3), NO_TS, np.int64)])
        if n_reads > self._read_flag.size:
            self._read_flag = np.empty(n_reads, np.int8)
            self._reads = np.empty(n_reads, _READ)


def _first_groups(columns: _Columns, n: int) -> Buckets:
    """Views of a width's first `n` groups."""
    series, bucket_ms, total, n_all, max_value, measured, estimated, substituted, flagged = columns
    return Buckets(
        series[:n], bucket_ms[:n], total[:n], n_all[:n], max_value[:n], measured[:n], estimated[:n],
        substituted[:n], flagged[:n],
    )  # fmt: skip


@njit(cache=True, nogil=True)
def _count_unstorable(series: I32, ts: I64, value: F64, low: F64, high: F64) -> int:
    n = 0
    for i in range(series.size):
        s = series[i]
        # Written so that NaN counts: every comparison with it is false.
        if not (low[s] <= value[i] <= high[s] and abs(value[i]) <= VALUE_LIMIT and TS_MIN <= ts[i] < TS_MAX):
            n += 1
    return n


def storable(series: I32, ts: I64, value: F64, low: F64, high: F64) -> NDArray[np.bool_] | None:
    """None when every reading's value lies in its series' [low, high] (and within VALUE_LIMIT) at a time
    in [TS_MIN, TS_MAX); otherwise which do. One pass, for the common case of a record with nothing to
    refuse."""
    if _count_unstorable(series, ts, value, low, high) == 0:
        return None
    return (
        (value >= low[series])
        & (value <= high[series])
        & (np.abs(value) <= VALUE_LIMIT)
        & (ts >= TS_MIN)
        & (ts < TS_MAX)
    )


def spikes(value: F64, abs_limit: F64) -> NDArray[np.bool_]:
    """The instantaneous values `instantaneous_buckets` leaves out (`abs_limit` per value)."""
    return ~(np.abs(value) <= np.minimum(abs_limit, VALUE_LIMIT))


def instantaneous_buckets(series: I32, ts: I64, value: F64, abs_limit: F64, width_ms: int) -> Buckets:
    """Average and maximum inputs per bucket for instantaneous metrics (power, SOC): values beyond
    `abs_limit[series]` (rated x margin; inf when unknown) or VALUE_LIMIT, and NaN, are spikes, flagged
    and left out."""
    quality = np.empty(series.size, np.int8)
    flagged = np.empty(series.size, np.int8)
    _instantaneous_flags(series, value, abs_limit, quality, flagged)
    return reduce_by_key(series, ts - ts % width_ms, value, quality, flagged, width_ms)


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel now, so the first batch is not slow."""
    series = np.array([0, 0, 0], np.int32)
    ts = np.array([0, 60_000, 120_000], np.int64)
    state = RegisterState.empty(1)
    params = RegisterParams(np.array([99_999.0]), np.array([0.01]), np.array([np.inf]))
    intervals = registers_to_intervals(series, ts, np.array([1.0, 2.0, 3.0]), state, params)
    contributions = prorate(intervals, 60_000, 3_600_000)
    reduce_by_key(
        intervals.series[contributions.interval], contributions.bucket_ms, contributions.qty,
        contributions.quality, np.zeros(contributions.qty.size, np.int8), 60_000,
    )  # fmt: skip
    wide = np.array([0, 1 << 23], np.int64) * 60_000
    reduce_by_key(
        np.array([0, 0], np.int32), wide, np.ones(2), np.zeros(2, np.int8), np.zeros(2, np.int8), 60_000
    )
    instantaneous_buckets(series, ts, np.array([1.0, 2.0, 3.0]), np.array([np.inf]), 60_000)
    storable(series, ts, np.array([1.0, 2.0, 3.0]), np.zeros(1), np.ones(1))
    order_by_series(series, 1)
    RegisterBucketer((60_000,), 3_600_000)(
        series, ts, np.array([1.0, 2.0, 3.0]), RegisterState.empty(1), params
    )
