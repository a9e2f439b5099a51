"""Bucket deltas of one poll -> aggregate rows: merged per (series, bucket), then rolled up to sites,
enterprises and VPPs by the membership valid at each bucket. Vectorised with numpy group-bys: every
poll yields one row per key, as an upsert may touch a row only once per statement.

Roll-up scopes follow the device's role: boundary (grid) meters make a site's and an enterprise's
energy, VPP resources their VPP's; sub-meters stay at device level, so nothing is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from processing import pgcopy
from processing.kernels import F64, I32, I64, Buckets
from processing.registry import RegistryView
from processing.series import SeriesTable

_COUNT_FIELDS = ("n", "n_measured", "n_estimated", "n_substituted", "n_flagged")


@dataclass(slots=True)
class Part:
    buckets: Buckets
    sign: int
    late: bool
    rollup: bool


@dataclass(slots=True)
class Merged:
    """One row per key: `key` indexes the series (device level) or the entity list (roll-ups)."""

    key: I64
    bucket_ms: I64
    total: F64
    counts: dict[str, I64]
    max_value: F64
    n_uncalibrated: I64
    late: I64
    rollup: np.ndarray


def _group(key: I64, bucket_ms: I64) -> tuple[I64, I64]:
    """Sort order and the start of each run of equal (key, bucket)."""
    order = np.lexsort((bucket_ms, key))
    k, b = key[order], bucket_ms[order]
    starts = np.flatnonzero(np.concatenate([[True], (k[1:] != k[:-1]) | (b[1:] != b[:-1])])) if k.size else k
    return order, starts.astype(np.int64)


def merge_parts(parts: list[Part]) -> Merged | None:
    if not parts:
        return None
    key = np.concatenate([p.buckets.series.astype(np.int64) for p in parts])
    bucket = np.concatenate([p.buckets.bucket_ms for p in parts])
    sign = np.concatenate([np.full(p.buckets.series.size, p.sign, np.int64) for p in parts])
    late = np.concatenate([np.full(p.buckets.series.size, int(p.late), np.int64) for p in parts])
    rollup = np.concatenate([np.full(p.buckets.series.size, p.rollup, np.bool_) for p in parts])
    total = np.concatenate([p.buckets.total for p in parts]) * sign
    # A subtraction never lowers a maximum: only additions carry theirs.
    maxima = np.concatenate([np.where(p.sign > 0, p.buckets.max_value, np.nan) for p in parts])
    counts = {
        name: np.concatenate([getattr(p.buckets, name).astype(np.int64) for p in parts]) * sign
        for name in _COUNT_FIELDS
    }
    if key.size == 0:
        return None
    order, starts = _group(key, bucket)
    return Merged(
        key[order][starts],
        bucket[order][starts],
        np.add.reduceat(total[order], starts),
        {name: np.add.reduceat(c[order], starts) for name, c in counts.items()},
        np.fmax.reduceat(maxima[order], starts),
        np.zeros(starts.size, np.int64),
        np.maximum.reduceat(late[order], starts),
        np.maximum.reduceat(rollup[order], starts),
    )


@dataclass(slots=True)
class EntityIndex:
    """Dense ids for (scope, tenant, entity, metric) roll-up targets, and each series' targets."""

    keys: list[tuple[str, str, str, str]] = field(default_factory=list)
    index: dict[tuple[str, str, str, str], int] = field(default_factory=dict)

    def id_of(self, key: tuple[str, str, str, str]) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.keys)
            self.keys.append(key)
        return i


_SCOPES_BY_ROLE = {"grid": ("site", "enterprise"), "resource": ("vpp",)}


def rollup_targets(
    series: SeriesTable, registry: RegistryView, entities: EntityIndex, rows_series: I64, rows_bucket: I64
) -> list[tuple[I64, I64]]:
    """For each roll-up scope: (row index, entity id) pairs of the device rows that roll up into it.
    Targets are resolved once per series and membership period, not per row."""
    pairs: dict[str, tuple[list[I64], list[I64]]] = {
        scope: ([], []) for scope in ("site", "enterprise", "vpp")
    }
    unique, inverse = np.unique(rows_series, return_inverse=True)
    for u, si in enumerate(unique.tolist()):
        tenant, device, metric = series.keys[si]
        info = registry.devices.get((tenant, device))
        if info is None or info.role not in _SCOPES_BY_ROLE:
            continue
        of_series = np.flatnonzero(inverse == u)
        for period in registry.membership.get((tenant, device), ()):
            bucket = rows_bucket[of_series]
            rows = of_series[(bucket >= period.valid_from_ms) & (bucket < period.valid_to_ms)]
            if rows.size == 0:
                continue
            for scope in _SCOPES_BY_ROLE[info.role]:
                if scope == "site" and period.site:
                    target = ("site", tenant, period.site, metric)
                elif scope == "enterprise":
                    target = ("enterprise", tenant, tenant, metric)
                elif scope == "vpp" and period.vpp:
                    target = ("vpp", "", period.vpp, metric)
                else:
                    continue
                row_list, id_list = pairs[scope]
                row_list.append(rows)
                id_list.append(np.full(rows.size, entities.id_of(target), np.int64))
    return [(np.concatenate(r), np.concatenate(e)) for r, e in pairs.values() if r]


def roll_up(device: Merged, targets: list[tuple[I64, I64]]) -> Merged | None:
    if not targets:
        return None
    rows = np.concatenate([r for r, _ in targets])
    key = np.concatenate([e for _, e in targets])
    bucket = device.bucket_ms[rows]
    order, starts = _group(key, bucket)
    src = rows[order]
    return Merged(
        key[order][starts],
        bucket[order][starts],
        np.add.reduceat(device.total[src], starts),
        {name: np.add.reduceat(c[src], starts) for name, c in device.counts.items()},
        np.fmax.reduceat(device.max_value[src], starts),
        np.add.reduceat(device.n_uncalibrated[src], starts),
        np.maximum.reduceat(device.late[src], starts),
        np.ones(starts.size, np.bool_),
    )


def mark_uncalibrated(device: Merged, series: SeriesTable, registry: RegistryView) -> None:
    """Readings of a meter whose calibration was due before their bucket count as uncalibrated."""
    due = np.full(series.kind.size, np.iinfo(np.int64).max, np.int64)
    for si in np.unique(device.key).tolist():
        tenant, dev, _ = series.keys[si]
        info = registry.devices.get((tenant, dev))
        if info is not None and info.calibration_due_ms is not None:
            due[si] = info.calibration_due_ms
    device.n_uncalibrated = np.where(device.bucket_ms >= due[device.key], device.counts["n"], 0)


def encode(merged: Merged, key_ids: I32, rows: np.ndarray) -> bytes:
    """The selected rows as a binary COPY stream; `key_ids` are the rows' agg_key_id values."""
    c = merged.counts
    counts = np.stack(
        [c["n"], c["n_measured"], c["n_estimated"], c["n_substituted"], c["n_flagged"], merged.n_uncalibrated,
         merged.late]
    )  # fmt: skip
    return pgcopy.encode_aggregates(
        key_ids[rows], merged.bucket_ms[rows], merged.total[rows], merged.max_value[rows], counts[:, rows]
    )
