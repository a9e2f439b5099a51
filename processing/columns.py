"""Kafka records (v1: one device per record; v2: many devices of one gateway per record, see
docs/ingest.md) decoded straight into columns with dense series indices."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from meterflow.contract import DeadLetterEntry, DeadLetterReason
from processing.kernels import F64, I32, I64, TS_MAX, TS_MIN, VALUE_LIMIT, storable
from processing.series import SeriesTable


class UndecodableRecord(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Refusal:
    """The readings of one record that were left out, each with its reason: what its dead letter lists."""

    partition: int
    offset: int
    raw: bytes
    tenant: str
    gateway: str
    rejected: list[DeadLetterEntry]
    reasons: Counter[DeadLetterReason]


@dataclass(frozen=True, slots=True)
class Columns:
    series: I32
    ts: I64
    value: F64
    record: I32  # index into the per-record arrays below
    record_partition: I32
    record_received_ms: I64
    record_gateway: list[str]
    # Where each record came from, for dead letters about its readings.
    record_offset: I64
    record_raw: list[bytes]

    @property
    def partition(self) -> I32:
        return self.record_partition[self.record]


@dataclass(slots=True)
class ColumnBuilder:
    """Accumulates decoded records of one poll; `finish` returns the columns."""

    table: SeriesTable
    series: list[I32]
    ts: list[I64]
    value: list[F64]
    record: list[I32]
    partitions: list[int]
    received: list[int]
    gateways: list[str]
    offsets: list[int]
    raws: list[bytes]
    refused: list[Refusal]

    @classmethod
    def start(cls, table: SeriesTable) -> ColumnBuilder:
        return cls(table, [], [], [], [], [], [], [], [], [], [])

    def add(self, partition: int, raw: bytes, offset: int = -1) -> int:
        """Decode one record; returns how many readings it adds. Readings no stage may store (below) are
        left out and listed in `refused`, per reason; their siblings stay. Raises UndecodableRecord."""
        try:
            doc = orjson.loads(raw)
            version = doc["v"]
            tenant = doc["tenant"]
            gateway = doc["gateway"]
            received = int(doc["received_ms"])
            readings = doc["readings"]
            if version == 1:
                devices = [doc["device"]]
                ts_col, metric_col, value_col = zip(*readings, strict=True) if readings else ((),) * 3
                dev_col: tuple[int, ...] = (0,) * len(ts_col)
            elif version == 2:
                devices = doc["devices"]
                dev_col, ts_col, metric_col, value_col = (
                    zip(*readings, strict=True) if readings else ((),) * 4
                )
            else:
                raise UndecodableRecord(f"unsupported record version {version!r}")
            if not isinstance(tenant, str) or not isinstance(gateway, str):
                raise UndecodableRecord("tenant and gateway must be strings")
            series = self._series(tenant, devices, dev_col, metric_col)
            ts = np.array(ts_col, np.int64)
            value = np.array(value_col, np.float64)
        except UndecodableRecord:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise UndecodableRecord(f"undecodable record: {exc!r}") from exc
        if ts.ndim != 1 or value.ndim != 1:
            raise UndecodableRecord("timestamps and values must be numbers")
        # The collector checks these first; the processor checks again (defence in depth), because a
        # value no aggregate can hold or a time the database cannot store would poison figures or stop
        # every poll of the partition.
        ok = storable(series, ts, value, self.table.low, self.table.high)
        floor = self.table.min_ts_ms
        if ts.size and int(ts.min()) < floor:
            ok = (ts >= floor) if ok is None else ok & (ts >= floor)
        if ok is not None:
            self._refuse(partition, offset, raw, doc, ok, series, ts, value, metric_col)
            series, ts, value = series[ok], ts[ok], value[ok]
        r = len(self.partitions)
        self.partitions.append(partition)
        self.received.append(received)
        self.gateways.append(gateway)
        self.offsets.append(offset)
        self.raws.append(raw)
        self.series.append(series)
        self.ts.append(ts)
        self.value.append(value)
        self.record.append(np.full(series.size, r, np.int32))
        return int(series.size)

    def _refuse(
        self, partition: int, offset: int, raw: bytes, doc: dict[str, Any], ok: np.ndarray, series: I32,
        ts: I64, value: F64, metric_col: Sequence[str],
    ) -> None:  # fmt: skip
        devices = doc["devices"] if doc["v"] == 2 else [doc["device"]]
        readings = doc["readings"]
        rejected: list[DeadLetterEntry] = []
        reasons: Counter[DeadLetterReason] = Counter()
        floor = max(TS_MIN, self.table.min_ts_ms)
        for i in np.flatnonzero(~ok).tolist():
            t, v = int(ts[i]), float(value[i])
            low, high = float(self.table.low[series[i]]), min(float(self.table.high[series[i]]), VALUE_LIMIT)
            if not math.isfinite(v):
                reason = DeadLetterReason.NON_FINITE  # JSON has no NaN: a NaN here was a null
            elif t < floor:
                reason = DeadLetterReason.PAST_TS
            elif t >= TS_MAX:
                reason = DeadLetterReason.FUTURE_TS
            else:
                reason = DeadLetterReason.OUT_OF_RANGE
            reasons[reason] += 1
            rejected.append(
                DeadLetterEntry(
                    reason=reason.value,
                    detail=f"ts {t}, value {v!r}: outside what the processor stores ({low:g} <= value "
                    f"<= {high:g}, {floor} <= ts < {TS_MAX})",
                    device=devices[readings[i][0]] if doc["v"] == 2 else devices[0],
                    point=i,
                    metric=metric_col[i],
                )
            )
        self.refused.append(
            Refusal(partition, offset, raw, str(doc["tenant"]), str(doc["gateway"]), rejected, reasons)
        )

    def _series(
        self, tenant: str, devices: list[str], dev_col: Sequence[int], metric_col: Sequence[str]
    ) -> I32:
        """Series index per reading: one dict lookup each; new series (rare) are checked and added."""
        dev = np.array(dev_col)
        if dev.size and (dev.dtype.kind not in "iu" or dev.min() < 0 or dev.max() >= len(devices)):
            raise UndecodableRecord(f"device indices must lie in the record's {len(devices)} devices")
        index = self.table.index
        names = [devices[d] for d in dev_col]
        found = [index.get((tenant, name, metric)) for name, metric in zip(names, metric_col, strict=True)]
        if None in found:
            for i, s in enumerate(found):
                if s is None:
                    found[i] = self._new_series(tenant, names[i], metric_col[i])
        return np.array(found, np.int32)

    def _new_series(self, tenant: str, device: object, metric: object) -> int:
        if not (isinstance(device, str) and isinstance(metric, str)):
            raise UndecodableRecord("device and metric must be strings")
        key = (tenant, device, metric)
        s = self.table.index.get(key)
        return self.table.add(key) if s is None else s

    def finish(self) -> Columns:
        self.table.sync_arrays()

        def joined(parts: list[Any], dtype: type) -> Any:
            return np.concatenate(parts) if parts else np.empty(0, dtype)

        return Columns(
            joined(self.series, np.int32),
            joined(self.ts, np.int64),
            joined(self.value, np.float64),
            joined(self.record, np.int32),
            np.array(self.partitions, np.int32),
            np.array(self.received, np.int64),
            self.gateways,
            np.array(self.offsets, np.int64),
            self.raws,
        )
