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
arrival order, with buffers reused from batch to batch: the processor's path for in-order register
reads. The separate steps remain for the late-read replay.

`processing.reference` holds slow, obviously correct versions of the same rules; property tests compare
the two. State that outlives a batch (each series' anchor read) lives in arrays the caller owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

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
            first = t0[j] - t0[j] % width_ms
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
        first = t0[j] - t0[j] % width_ms
        last = (t1[j] - 1) - (t1[j] - 1) % width_ms
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
        if abs(value[i]) > abs_limit[series[i]]:
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


@njit(cache=True, nogil=True)
def _group_bound(
    series: I32, ts: I64, read_flag: I8, start: I64, widths: I64, scratch: I64, batch_no: int
) -> int:
    """The most (series, bucket) groups any width can get from a batch whose register pass is done: a
    series' groups lie between the earliest start of its intervals and flagged reads, and its last read.
    `scratch[s]` holds the batch that last saw s and the earliest and latest times so far."""
    k = 0
    for i in range(series.size):
        s = series[i]
        f = read_flag[i]
        t = ts[i]
        lo = start[i] if f in (READ_OK, READ_ROLLOVER, READ_REBASELINE) else t
        if scratch[s, 0] != batch_no:
            scratch[s, 0] = batch_no
            scratch[s, 1] = lo
            scratch[s, 2] = t
            k += 1
        else:
            scratch[s, 1] = min(scratch[s, 1], lo)
            scratch[s, 2] = max(scratch[s, 2], t)
    span_sum = 0
    for i in range(series.size):
        s = series[i]
        if scratch[s, 0] == batch_no:
            span_sum += max(scratch[s, 2] - scratch[s, 1], 0)
            scratch[s, 0] = -1
    need = 0
    for w in range(widths.size):
        need = max(need, span_sum // widths[w] + 2 * k)
    return need


@njit(cache=True, nogil=True)
def _register_pass(
    series: I32,
    ts: I64,
    value: F64,
    install_after: F64,
    multiplier: F64,
    anchor_ts: I64,
    anchor_val: F64,
    pending_ts: I64,
    pending_val: F64,
    register_max: F64,
    resolution: F64,
    max_rate_per_ms: F64,
    read_flag: I8,
    start: I64,
    qty: F64,
    unknown_from: I64,
) -> None:
    """The register rules (step 1 above), read by read: each read's flag and, when it books, the
    interval it closes: from `start[i]` (the anchor, or the drop a rebaseline confirmed) to the read,
    holding `qty[i]`. A rebaseline also leaves the unknown interval's start, the anchor before the
    drop, in `unknown_from[i]`."""
    has_install = install_after.size > 0
    has_multiplier = multiplier.size > 0
    for i in range(series.size):
        s = U(series[i])
        t = ts[i]
        v = value[i]
        anchor_next = v
        if has_install and not math.isnan(install_after[i]):
            anchor_next = install_after[i]
        if anchor_ts[s] == NO_TS:
            anchor_ts[s] = t
            anchor_val[s] = anchor_next
            read_flag[i] = READ_FIRST
            continue
        d = v - anchor_val[s]
        flag = READ_OK
        if (
            d < 0.0
            and anchor_val[s] > ROLLOVER_ZONE * register_max[s]
            and v < (1.0 - ROLLOVER_ZONE) * register_max[s]
        ):
            d = (register_max[s] + resolution[s] - anchor_val[s]) + v
            flag = READ_ROLLOVER
        if 0.0 <= d <= max_rate_per_ms[s] * (t - anchor_ts[s]) + resolution[s]:
            start[i] = anchor_ts[s]
            qty[i] = d * multiplier[i] if has_multiplier else d
            anchor_ts[s] = t
            anchor_val[s] = anchor_next
            if pending_ts[s] != NO_TS:
                pending_ts[s] = NO_TS
            read_flag[i] = flag
        elif pending_ts[s] != NO_TS and (
            0.0 <= v - pending_val[s] <= max_rate_per_ms[s] * (t - pending_ts[s]) + resolution[s]
        ):
            unknown_from[i] = anchor_ts[s]
            start[i] = pending_ts[s]
            qty[i] = (v - pending_val[s]) * multiplier[i] if has_multiplier else v - pending_val[s]
            anchor_ts[s] = t
            anchor_val[s] = anchor_next
            pending_ts[s] = NO_TS
            read_flag[i] = READ_REBASELINE
        elif v < anchor_val[s]:
            # A drop may be a reset the next read confirms; an up-jump is a glitch and anchors nothing.
            pending_ts[s] = t
            pending_val[s] = v
            read_flag[i] = READ_NEGATIVE
        else:
            read_flag[i] = READ_IMPLAUSIBLE


@njit(cache=True, nogil=True)
def _registers_to_intervals(
    series: I32,
    ts: I64,
    value: F64,
    install_after: F64,
    multiplier: F64,
    anchor_ts: I64,
    anchor_val: F64,
    pending_ts: I64,
    pending_val: F64,
    register_max: F64,
    resolution: F64,
    max_rate_per_ms: F64,
    read_flag: I8,
    start: I64,
    qty: F64,
    unknown_from: I64,
    out_series: I32,
    out_t0: I64,
    out_t1: I64,
    out_qty: F64,
    out_bad: I8,
) -> int:
    _register_pass(
        series, ts, value, install_after, multiplier, anchor_ts, anchor_val, pending_ts, pending_val,
        register_max, resolution, max_rate_per_ms, read_flag, start, qty, unknown_from,
    )  # fmt: skip
    m = 0
    for i in range(series.size):
        f = read_flag[i]
        if f == READ_REBASELINE:
            out_series[m] = series[i]
            out_t0[m] = unknown_from[i]
            out_t1[m] = start[i]
            out_qty[m] = 0.0
            out_bad[m] = 1
            m += 1
        if f in (READ_OK, READ_ROLLOVER, READ_REBASELINE):
            out_series[m] = series[i]
            out_t0[m] = start[i]
            out_t1[m] = ts[i]
            out_qty[m] = qty[i]
            out_bad[m] = 0
            m += 1
    return m


@njit(cache=True, nogil=True)
def _bucket_pass(
    series: I32,
    ts: I64,
    read_flag: I8,
    start: I64,
    qty: F64,
    width: int,
    max_interp_gap_ms: int,
    per_series: I64,
    col: int,
    batch_no: int,
    capacity: int,
    g_i32: I32,
    g_i64: I64,
    g_float: F64,
) -> int:
    """Spread each read's interval over the `width` buckets it overlaps and add it, and each flagged
    read, to its (series, bucket) group. Returns the number of groups, or -1 as soon as the group
    buffers are full (the caller grows them and runs this again with a new `batch_no`).

    `per_series[s, col:col + 3]` holds s's head (its group with the latest bucket), that bucket, and
    the batch that set the head. A series' groups form a list by falling bucket from the head
    (`g_i64[1]` links each to the one before), so nothing needs clearing between batches. Contributions
    land at or after the head, except those of an interval that reaches back past a flagged read: finding
    a group needs no search and, while reads stay within a bucket or two of the last, no division."""
    ng = 0
    for i in range(series.size):
        f = read_flag[i]
        if f == READ_FIRST:
            continue
        flagged = f in (READ_NEGATIVE, READ_IMPLAUSIBLE)
        s = U(series[i])
        t1 = ts[i]
        t0 = t1 if flagged else start[i]
        if t1 <= t0 and not flagged:
            continue
        h = per_series[s, U(col)]
        last = per_series[s, U(col + 1)]
        valid = per_series[s, U(col + 2)] == batch_no
        # The bucket of the interval's start (or of a flagged read), from the last one if near.
        if last <= t0 < last + width:
            first = last
        elif last + width <= t0 < last + 2 * width:
            first = last + width
        else:
            first = t0 - t0 % width
        q = qty[i]
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
                    g_i32[2 + MEASURED, U(h)] += 1
                    continue
                if not valid or first > last:
                    # A new head made with its first contribution: the common case in small batches.
                    if ng == capacity:
                        return -1
                    g_i32[0, U(ng)] = s
                    g_i64[0, U(ng)] = first
                    g_i64[1, U(ng)] = h if valid else -1
                    g_float[0, U(ng)] = q
                    g_float[1, U(ng)] = q
                    g_i32[1, U(ng)] = 1
                    g_i32[2 + MEASURED, U(ng)] = 1
                    g_i32[2 + ESTIMATED, U(ng)] = 0
                    g_i32[2 + SUBSTITUTED, U(ng)] = 0
                    g_i32[5, U(ng)] = 0
                    per_series[s, U(col)] = ng
                    per_series[s, U(col + 1)] = first
                    per_series[s, U(col + 2)] = batch_no
                    ng += 1
                    continue
                quality = MEASURED
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
                g_i64[1, U(g)] = h if valid else -1
                g_float[0, U(g)] = 0.0
                g_float[1, U(g)] = np.nan
                for c in range(1, 6):
                    g_i32[c, U(g)] = 0
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
                    for c in range(1, 6):
                        g_i32[c, U(new)] = 0
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
        per_series[s, U(col)] = h
        per_series[s, U(col + 1)] = last
        per_series[s, U(col + 2)] = batch_no
    return ng


@njit(cache=True, nogil=True)
def _register_buckets(
    series: I32,
    ts: I64,
    value: F64,
    install_after: F64,
    multiplier: F64,
    anchor_ts: I64,
    anchor_val: F64,
    pending_ts: I64,
    pending_val: F64,
    register_max: F64,
    resolution: F64,
    max_rate_per_ms: F64,
    read_flag: I8,
    batch_no: int,
    registers_done: bool,
    widths: I64,
    max_interp_gap_ms: int,
    start: I64,
    qty: F64,
    unknown_from: I64,
    per_series: I64,
    scratch: I64,
    capacity: int,
    g_i32: I32,
    g_i64: I64,
    g_float: F64,
    n_groups: I64,
) -> int:
    """`registers_to_intervals`, `prorate` and `reduce_by_key` for every width in one call. Returns 0
    when done; -1 (having changed nothing) when a series index is out of range; otherwise the groups
    the buffers need: the caller grows them and calls again with `registers_done`, which reruns only
    the bucket passes."""
    if not registers_done:
        for i in range(series.size):
            if series[i] < 0 or series[i] >= anchor_ts.size:
                return -1
        _register_pass(
            series, ts, value, install_after, multiplier, anchor_ts, anchor_val, pending_ts, pending_val,
            register_max, resolution, max_rate_per_ms, read_flag, start, qty, unknown_from,
        )  # fmt: skip
    for w in range(widths.size):
        n_groups[w] = _bucket_pass(
            series, ts, read_flag, start, qty, widths[w], max_interp_gap_ms, per_series, 3 * w, batch_no,
            capacity, g_i32[w], g_i64[w], g_float[w],
        )  # fmt: skip
        if n_groups[w] < 0:
            return _group_bound(series, ts, read_flag, start, widths, scratch, batch_no)
    return 0


# --- typed wrappers -------------------------------------------------------------------------------


@dataclass(slots=True)
class RegisterState:
    """Each series' anchor read (the last read booked from) and a pending drop awaiting confirmation."""

    anchor_ts: I64
    anchor_val: F64
    pending_ts: I64
    pending_val: F64

    @classmethod
    def empty(cls, n_series: int) -> RegisterState:
        return cls(
            np.full(n_series, NO_TS, np.int64),
            np.zeros(n_series, np.float64),
            np.full(n_series, NO_TS, np.int64),
            np.zeros(n_series, np.float64),
        )

    def grow(self, n_series: int) -> None:
        extra = n_series - self.anchor_ts.size
        if extra <= 0:
            return
        self.anchor_ts = np.concatenate([self.anchor_ts, np.full(extra, NO_TS, np.int64)])
        self.anchor_val = np.concatenate([self.anchor_val, np.zeros(extra, np.float64)])
        self.pending_ts = np.concatenate([self.pending_ts, np.full(extra, NO_TS, np.int64)])
        self.pending_val = np.concatenate([self.pending_val, np.zeros(extra, np.float64)])


@dataclass(frozen=True, slots=True)
class RegisterParams:
    """Per series: register maximum (inf when it never rolls over), resolution, and the largest
    plausible quantity per millisecond (rated rate x margin; inf when the rating is unknown)."""

    register_max: F64
    resolution: F64
    max_rate_per_ms: F64


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
    no_values = np.empty(0, np.float64)
    out_series = np.empty(2 * n, np.int32)
    out_t0 = np.empty(2 * n, np.int64)
    out_t1 = np.empty(2 * n, np.int64)
    out_qty = np.empty(2 * n, np.float64)
    out_bad = np.empty(2 * n, np.int8)
    read_flag = np.empty(n, np.int8)
    m = _registers_to_intervals(
        series, ts, value,
        no_values if install_after is None else install_after,
        no_values if multiplier is None else multiplier,
        state.anchor_ts, state.anchor_val, state.pending_ts, state.pending_val,
        params.register_max, params.resolution, params.max_rate_per_ms,
        read_flag, np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.int64),
        out_series, out_t0, out_t1, out_qty, out_bad,
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


@dataclass(frozen=True, slots=True)
class Buckets:
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


@dataclass(frozen=True, slots=True)
class RegisterBuckets:
    read_flag: I8  # per input read, READ_*
    buckets: tuple[Buckets, ...]  # one per width, in the order the widths were given


class RegisterBucketer:
    """Register reads -> interval energy per (series, bucket) for several bucket widths, in one kernel
    call per batch: what `registers_to_intervals`, `prorate` and `reduce_by_key` (with each negative or
    implausible read added as a flag in its bucket, as the processor books them) give together, without
    their intermediate arrays. Its buffers are kept and reused from call to call, so a stream of small
    batches pays one dispatch and a few small copies per batch.

    Unlike `registers_to_intervals`, the reads need not be sorted by series: any order in which each
    series' reads are in time order will do, such as arrival (time) order or (series, ts) order. The
    arrays it returns are its own copies; one call at a time (its buffers are shared between calls)."""

    def __init__(self, widths_ms: tuple[int, ...], max_interp_gap_ms: int) -> None:
        if not widths_ms or min(widths_ms) <= 0:
            raise ValueError(f"bucket widths must be positive, got {widths_ms}")
        self.widths_ms = widths_ms
        self.max_interp_gap_ms = max_interp_gap_ms
        self._widths = np.array(widths_ms, np.int64)
        self._no_values = np.empty(0, np.float64)
        self._batch_no = 0
        self._n_groups = np.zeros(len(widths_ms), np.int64)
        # Per series and width: the head group, its bucket and the batch that set it (none yet).
        self._per_series = np.empty((0, 3 * len(widths_ms)), np.int64)
        self._scratch = np.empty((0, 3), np.int64)  # per series, for bounding the groups
        self._start = np.empty(0, np.int64)  # per read: where the interval it closes starts
        self._qty = np.empty(0, np.float64)  # and the quantity in it
        self._unknown_from = np.empty(0, np.int64)
        self._capacity = 0
        self._grow_groups(1024)

    def _grow_groups(self, need: int) -> None:
        self._capacity = max(need, 2 * self._capacity)
        nw = len(self.widths_ms)
        self._g_i32 = np.empty((nw, 6, self._capacity), np.int32)  # series, n, n per quality, n flagged
        self._g_i64 = np.empty((nw, 2, self._capacity), np.int64)  # bucket, previous group of the series
        self._g_float = np.empty((nw, 2, self._capacity), np.float64)  # total, max
        self._buffers()

    def _buffers(self) -> None:
        self._tail = (
            self._widths, self.max_interp_gap_ms, self._start, self._qty, self._unknown_from,
            self._per_series, self._scratch,
            self._capacity, self._g_i32, self._g_i64, self._g_float, self._n_groups,
        )  # fmt: skip

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
        in place. Raises ValueError (and changes nothing) if a series index is outside the state."""
        n = series.size
        if state.anchor_ts.size > self._per_series.shape[0] or n > self._start.size:
            self._grow_reads(state.anchor_ts.size, n)
        read_flag = np.empty(n, np.int8)
        head = (
            series, ts, value,
            self._no_values if install_after is None else install_after,
            self._no_values if multiplier is None else multiplier,
            state.anchor_ts, state.anchor_val, state.pending_ts, state.pending_val,
            params.register_max, params.resolution, params.max_rate_per_ms, read_flag,
        )  # fmt: skip
        self._batch_no += 1
        need = _register_buckets(*head, self._batch_no, False, *self._tail)
        while need > 0:
            self._grow_groups(need)
            self._batch_no += 1
            need = _register_buckets(*head, self._batch_no, True, *self._tail)
        if need < 0:
            raise ValueError("a series index is out of range")
        out = []
        for w, groups in enumerate(self._n_groups.tolist()):
            series_of, n_all, measured, estimated, substituted, flagged = self._g_i32[w, :, :groups].copy()
            total, max_value = self._g_float[w, :, :groups].copy()
            bucket_ms = self._g_i64[w, 0, :groups].copy()
            out.append(
                Buckets(
                    series_of, bucket_ms, total, n_all, max_value, measured, estimated, substituted, flagged
                )
            )
        return RegisterBuckets(read_flag, tuple(out))

    def _grow_reads(self, n_series: int, n_reads: int) -> None:
        extra = n_series - self._per_series.shape[0]
        if extra > 0:
            self._per_series = np.concatenate(
                [self._per_series, np.full((extra, self._per_series.shape[1]), NO_TS, np.int64)]
            )
            self._scratch = np.concatenate([self._scratch, np.full((extra, 3), NO_TS, np.int64)])
        if n_reads > self._start.size:
            self._start = np.empty(n_reads, np.int64)
            self._qty = np.empty(n_reads, np.float64)
            self._unknown_from = np.empty(n_reads, np.int64)
        self._buffers()


def instantaneous_buckets(series: I32, ts: I64, value: F64, abs_limit: F64, width_ms: int) -> Buckets:
    """Average and maximum inputs per bucket for instantaneous metrics (power, SOC): values beyond
    `abs_limit[series]` (rated x margin; inf when unknown) are spikes, flagged and left out."""
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
    order_by_series(series, 1)
    RegisterBucketer((60_000,), 3_600_000)(
        series, ts, np.array([1.0, 2.0, 3.0]), RegisterState.empty(1), params
    )
