"""Slow, obviously correct versions of the rules in `processing.kernels`, for the property tests.

Everything here works one series at a time over plain Python lists and dicts, in whatever order the
reads arrive, and states each rule the way the issue and the kernels' docstring put it:

* A register counts up to its maximum, then wraps to zero one resolution step later, so a drop from
  near the top (above `ROLLOVER_ZONE` of the maximum) to near the bottom (below the rest of the range)
  consumed what was left to the top plus what was counted since zero.
* A quantity is booked only if it is neither negative nor more than the rated rate could have consumed
  in the elapsed time (plus one resolution step of display rounding).
* A read exchanged right after (`install_after`) re-anchors the series at the new meter's install read.
* A rejected drop waits; a later read that is consistent with the drop (but not with the anchor)
  confirms an unregistered reset: the time up to the drop is unknown, counting resumes from the drop.
* A booked interval ``(t0, t1]`` spreads over the buckets it overlaps in proportion to time. Inside one
  bucket it is measured; across several it is estimated, or substituted beyond the interpolation limit.
  One longer than `MAX_PRORATE_SPAN_MS` lies whole, substituted, in the bucket it ends in.
* A value beyond `VALUE_LIMIT` (or NaN, inf, above the register's maximum, at a time outside
  `TS_MIN`..`TS_MAX`) is implausible whatever came before; so is a quantity beyond `VALUE_LIMIT`.

The `*_from_kernel` adapters turn the kernels' arrays into the same plain structures for comparison.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from processing import kernels

ROLLOVER_ZONE = kernels.ROLLOVER_ZONE


@dataclass(frozen=True, slots=True)
class Read:
    series: int
    ts: int
    value: float
    install_after: float | None = None  # install read of a meter exchanged right after this read
    multiplier: float = 1.0  # scales the quantity of the interval ending at this read


@dataclass(frozen=True, slots=True)
class Register:
    maximum: float  # inf: never rolls over
    resolution: float
    max_rate_per_ms: float  # inf: rating unknown


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    series: int
    t0: int
    t1: int
    qty: float
    bad: bool  # the quantity is unknown (across an unregistered reset)


@dataclass(slots=True)
class SeriesState:
    anchor: tuple[int, float] | None = None  # (ts, register value) the next quantity is counted from
    pending_drop: tuple[int, float] | None = None


@dataclass(slots=True)
class Row:
    """One (series, bucket) aggregate."""

    total: float = 0.0
    n: int = 0
    max_value: float = math.nan
    by_quality: list[int] = field(default_factory=lambda: [0, 0, 0])
    n_flagged: int = 0


BucketRows = dict[tuple[int, int], Row]


def _consumed(register: Register, before: float, after: float) -> tuple[float, bool]:
    """What the register counted from `before` to `after`, and whether it wrapped on the way."""
    top = ROLLOVER_ZONE * register.maximum
    bottom = (1.0 - ROLLOVER_ZONE) * register.maximum
    if after < before and before > top and after < bottom:
        wrap_at = register.maximum + register.resolution
        return (wrap_at - before) + after, True
    return after - before, False


def _plausible(register: Register, qty: float, elapsed_ms: int, multiplier: float) -> bool:
    return (
        0.0 <= qty <= register.max_rate_per_ms * elapsed_ms + register.resolution
        and qty * multiplier <= kernels.VALUE_LIMIT
    )


def _possible(register: Register, read: Read) -> bool:
    """A value a register can hold, at a time that is stored."""
    anchor = read.value if read.install_after is None else read.install_after
    return (
        abs(read.value) <= kernels.VALUE_LIMIT
        and read.value <= register.maximum + register.resolution
        and abs(anchor) <= kernels.VALUE_LIMIT
        and kernels.TS_MIN <= read.ts < kernels.TS_MAX
    )


def intervals(
    reads: list[Read], registers: dict[int, Register], states: dict[int, SeriesState]
) -> tuple[list[Interval], dict[tuple[int, int], str]]:
    """Booked intervals (sorted) and what happened to each (series, ts) read (a name from
    READ_FLAG_NAMES). `states` is updated, so a later call continues where this one stopped."""
    by_series: dict[int, list[Read]] = defaultdict(list)
    for read in reads:
        by_series[read.series].append(read)
    booked: list[Interval] = []
    outcome: dict[tuple[int, int], str] = {}
    for s, series_reads in by_series.items():
        register = registers[s]
        state = states.setdefault(s, SeriesState())
        for read in sorted(series_reads, key=lambda r: r.ts):
            new_anchor = (read.ts, read.value if read.install_after is None else read.install_after)
            if not _possible(register, read):
                outcome[read.series, read.ts] = "implausible"
                continue
            if state.anchor is None:
                state.anchor = new_anchor
                outcome[read.series, read.ts] = "first"
                continue
            anchor_ts, anchor_value = state.anchor
            qty, wrapped = _consumed(register, anchor_value, read.value)
            if _plausible(register, qty, read.ts - anchor_ts, read.multiplier):
                booked.append(Interval(s, anchor_ts, read.ts, qty * read.multiplier, False))
                state.anchor, state.pending_drop = new_anchor, None
                outcome[read.series, read.ts] = "rollover" if wrapped else "ok"
            elif state.pending_drop is not None and _plausible(
                register, read.value - state.pending_drop[1], read.ts - state.pending_drop[0], read.multiplier
            ):
                drop_ts, drop_value = state.pending_drop
                booked.append(Interval(s, anchor_ts, drop_ts, 0.0, True))
                booked.append(
                    Interval(s, drop_ts, read.ts, (read.value - drop_value) * read.multiplier, False)
                )
                state.anchor, state.pending_drop = new_anchor, None
                outcome[read.series, read.ts] = "rebaseline"
            elif read.value < anchor_value:
                state.pending_drop = (read.ts, read.value)
                outcome[read.series, read.ts] = "negative"
            else:
                outcome[read.series, read.ts] = "implausible"
    return sorted(booked), outcome


def bucket_start(ts: int, width_ms: int) -> int:
    return (ts // width_ms) * width_ms


def spread(interval: Interval, width_ms: int, max_interp_gap_ms: int) -> list[tuple[int, float, int]]:
    """(bucket start, quantity, quality) for each bucket the interval overlaps by a positive length."""
    if interval.bad or interval.t1 <= interval.t0:
        return []
    span = interval.t1 - interval.t0
    if span > kernels.MAX_PRORATE_SPAN_MS:
        return [(bucket_start(interval.t1 - 1, width_ms), interval.qty, kernels.SUBSTITUTED)]
    parts: list[tuple[int, int]] = []
    bucket = bucket_start(interval.t0, width_ms)
    while bucket < interval.t1:
        parts.append((bucket, min(interval.t1, bucket + width_ms) - max(interval.t0, bucket)))
        bucket += width_ms
    if len(parts) == 1:
        quality = kernels.MEASURED
    elif span <= max_interp_gap_ms:
        quality = kernels.ESTIMATED
    else:
        quality = kernels.SUBSTITUTED
    return [(b, interval.qty * overlap / span, quality) for b, overlap in parts]


def add(rows: BucketRows, key: tuple[int, int], qty: float, quality: int, flagged: bool) -> None:
    row = rows.setdefault(key, Row())
    if quality != kernels.NO_QUALITY:
        row.total += qty
        row.n += 1
        row.max_value = qty if math.isnan(row.max_value) else max(row.max_value, qty)
        row.by_quality[quality] += 1
    row.n_flagged += int(flagged)


def energy_buckets(booked: list[Interval], width_ms: int, max_interp_gap_ms: int) -> BucketRows:
    rows: BucketRows = {}
    for interval in booked:
        for bucket, qty, quality in spread(interval, width_ms, max_interp_gap_ms):
            add(rows, (interval.series, bucket), qty, quality, False)
    return rows


def register_buckets(
    booked: list[Interval], outcome: dict[tuple[int, int], str], width_ms: int, max_interp_gap_ms: int
) -> BucketRows:
    """What the processor books for registers: the energy, and each rejected read as a flag in its
    bucket."""
    rows = energy_buckets(booked, width_ms, max_interp_gap_ms)
    for (s, ts), what in outcome.items():
        if what in ("negative", "implausible") and kernels.TS_MIN <= ts < kernels.TS_MAX:
            add(rows, (s, bucket_start(ts, width_ms)), 0.0, kernels.NO_QUALITY, True)
    return rows


def instantaneous(
    samples: list[tuple[int, int, float]], abs_limit: dict[int, float], width_ms: int
) -> BucketRows:
    """(series, ts, value) samples per bucket; a value beyond the series' limit is a spike, counted
    only as flagged."""
    rows: BucketRows = {}
    for s, ts, value in samples:
        spike = not abs(value) <= min(abs_limit[s], kernels.VALUE_LIMIT)
        add(
            rows,
            (s, bucket_start(ts, width_ms)),
            value,
            kernels.NO_QUALITY if spike else kernels.MEASURED,
            spike,
        )
    return rows


def merge(into: BucketRows, more: BucketRows) -> None:
    """Add the rows of a later batch, as a store adds a batch's buckets to what it already holds."""
    for key, row in more.items():
        have = into.setdefault(key, Row())
        have.total += row.total
        have.n += row.n
        if not math.isnan(row.max_value):
            have.max_value = (
                row.max_value if math.isnan(have.max_value) else max(have.max_value, row.max_value)
            )
        have.by_quality = [a + b for a, b in zip(have.by_quality, row.by_quality, strict=True)]
        have.n_flagged += row.n_flagged


# --- adapters from the kernels' arrays ------------------------------------------------------------


def intervals_from_kernel(result: kernels.Intervals) -> list[Interval]:
    return sorted(
        Interval(int(s), int(t0), int(t1), float(q), bool(b))
        for s, t0, t1, q, b in zip(
            result.series.tolist(), result.t0.tolist(), result.t1.tolist(), result.qty.tolist(),
            result.bad.tolist(), strict=True,
        )
    )  # fmt: skip


def read_flags_from_kernel(result: kernels.Intervals | kernels.RegisterBuckets) -> list[str]:
    return [kernels.READ_FLAG_NAMES[f] for f in result.read_flag.tolist()]


def rows_from_kernel(buckets: kernels.Buckets) -> BucketRows:
    rows: BucketRows = {}
    for i in range(buckets.series.size):
        rows[(int(buckets.series[i]), int(buckets.bucket_ms[i]))] = Row(
            float(buckets.total[i]),
            int(buckets.n[i]),
            float(buckets.max_value[i]),
            [int(buckets.n_measured[i]), int(buckets.n_estimated[i]), int(buckets.n_substituted[i])],
            int(buckets.n_flagged[i]),
        )
    return rows
