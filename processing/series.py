"""Dense series indices and the per-series arrays the kernels read: one series is one (tenant, device,
metric). Indices are assigned on first sight and never reused while the processor runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from meterflow.contract import (
    CANONICAL_METRICS,
    DEFAULT_MIN_TS_MS,
    METRIC_RANGES,
    OTHER_METRIC_RANGE,
    MetricKind,
)
from processing.kernels import F64, I8, I32, I64, NO_TS, RegisterParams, RegisterState
from processing.registry import RegistryView, SeriesKey

KIND_REGISTER = 0
KIND_INSTANTANEOUS = 1
KIND_UNKNOWN = 2  # a metric outside the canonical set: stored raw, not aggregated

# Absolute ceilings for instantaneous metrics that have one whatever the device's rating.
_FIXED_LIMITS = {"soc_pct": 100.0}
_RATED_LIMITED = {"power_kw", "reactive_power_kvar"}


def metric_kind(metric: str) -> int:
    kind = CANONICAL_METRICS.get(metric)
    if kind is MetricKind.CUMULATIVE:
        return KIND_REGISTER
    if kind is MetricKind.INSTANTANEOUS:
        return KIND_INSTANTANEOUS
    return KIND_UNKNOWN


@dataclass(slots=True)
class SeriesTable:
    keys: list[SeriesKey] = field(default_factory=list)
    index: dict[SeriesKey, int] = field(default_factory=dict)
    kind: I8 = field(default_factory=lambda: np.empty(0, np.int8))
    last_ts: I64 = field(default_factory=lambda: np.empty(0, np.int64))  # newest stored reading
    known: NDArray[np.bool_] = field(
        default_factory=lambda: np.empty(0, np.bool_)
    )  # state loaded from the DB
    # Database ids (migration 0007), -1 until resolved: the series' own and its device-scope aggregate key.
    db_id: I32 = field(default_factory=lambda: np.empty(0, np.int32))
    agg_id: I32 = field(default_factory=lambda: np.empty(0, np.int32))
    by_db_id: dict[int, int] = field(default_factory=dict)
    state: RegisterState = field(default_factory=lambda: RegisterState.empty(0))
    params: RegisterParams = field(
        default_factory=lambda: RegisterParams(np.empty(0), np.empty(0), np.empty(0))
    )
    abs_limit: F64 = field(default_factory=lambda: np.empty(0))
    # The plausible range of each series' metric (meterflow.contract.METRIC_RANGES, replaced per metric
    # by `metric_ranges`): decoding refuses values outside it. Written as series are added, with room to
    # grow, so decoding a poll never replaces the arrays above, which the poll being written uses.
    metric_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    low: F64 = field(default_factory=lambda: np.empty(0))
    high: F64 = field(default_factory=lambda: np.empty(0))
    # Readings stamped before this are refused (past_ts) as the collector refuses them (ingest.min_ts):
    # records produced straight to Kafka meet the same floor.
    min_ts_ms: int = DEFAULT_MIN_TS_MS
    _params_revision: int = -1
    _params_size: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: SeriesKey) -> int:
        i = len(self.keys)
        self.keys.append(key)
        self.index[key] = i
        if i >= self.low.size:
            grown = max(1024, 2 * self.low.size)
            self.low = np.concatenate([self.low, np.full(grown - self.low.size, np.nan)])
            self.high = np.concatenate([self.high, np.full(grown - self.high.size, np.nan)])
        metric = key[2]
        self.low[i], self.high[i] = self.metric_ranges.get(metric) or METRIC_RANGES.get(
            metric, OTHER_METRIC_RANGE
        )
        return i

    def sync_arrays(self) -> None:
        """Grow the per-series arrays to cover series added since the last call."""
        n = len(self.keys)
        extra = n - self.kind.size
        if extra <= 0:
            return
        kinds = np.array([metric_kind(k[2]) for k in self.keys[self.kind.size :]], np.int8)
        self.kind = np.concatenate([self.kind, kinds])
        self.last_ts = np.concatenate([self.last_ts, np.full(extra, NO_TS, np.int64)])
        self.known = np.concatenate([self.known, np.zeros(extra, np.bool_)])
        self.db_id = np.concatenate([self.db_id, np.full(extra, -1, np.int32)])
        self.agg_id = np.concatenate([self.agg_id, np.full(extra, -1, np.int32)])
        self.state.grow(n)

    def forget(self, series: I32) -> None:
        """Drop what is known of these series, so their state is reloaded from the database."""
        self.known[series] = False
        self.last_ts[series] = NO_TS
        self.state.anchor_ts[series] = NO_TS
        self.state.pending_ts[series] = NO_TS

    def forget_all(self) -> None:
        self.forget(np.arange(self.kind.size, dtype=np.int32))

    def refresh_params(self, registry: RegistryView, *, margin: float) -> None:
        """Recompute plausibility limits and register shapes when the registry or the series changed."""
        # Only series whose arrays exist: the next poll may be adding keys while this one is written.
        n = self.kind.size
        if self._params_revision == registry.revision and self._params_size == n:
            return
        register_max = np.full(n, np.inf)
        resolution = np.zeros(n)
        max_rate = np.full(n, np.inf)
        abs_limit = np.full(n, np.inf)
        for i, (tenant, device, metric) in enumerate(self.keys[:n]):
            info = registry.devices.get((tenant, device))
            if info is None:
                continue
            if self.kind[i] == KIND_REGISTER:
                if info.register_max is not None:
                    register_max[i] = info.register_max
                resolution[i] = info.register_resolution
                if info.rated_power_kw is not None:
                    max_rate[i] = info.rated_power_kw * margin / 3_600_000.0
            elif metric in _FIXED_LIMITS:
                abs_limit[i] = _FIXED_LIMITS[metric]
            elif metric in _RATED_LIMITED and info.rated_power_kw is not None:
                abs_limit[i] = info.rated_power_kw * margin
        self.params = RegisterParams(register_max, resolution, max_rate)
        self.abs_limit = abs_limit
        self._params_revision = registry.revision
        self._params_size = n
