"""Kafka records (v1: one device per record; v2: many devices of one gateway per record, see
docs/ingest.md) decoded straight into columns with dense series indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from processing.kernels import F64, I32, I64
from processing.series import SeriesTable


class UndecodableRecord(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Columns:
    series: I32
    ts: I64
    value: F64
    record: I32  # index into the per-record arrays below
    record_partition: I32
    record_received_ms: I64
    record_gateway: list[str]

    @property
    def partition(self) -> I32:
        return self.record_partition[self.record]


@dataclass(slots=True)
class ColumnBuilder:
    """Accumulates decoded records of one poll; `finish` returns the columns."""

    table: SeriesTable
    series: list[int]
    ts: list[int]
    value: list[float]
    record: list[int]
    partitions: list[int]
    received: list[int]
    gateways: list[str]

    @classmethod
    def start(cls, table: SeriesTable) -> ColumnBuilder:
        return cls(table, [], [], [], [], [], [], [])

    def add(self, partition: int, raw: bytes) -> int:
        """Decode one record; returns how many readings it carried. Raises UndecodableRecord."""
        try:
            doc = orjson.loads(raw)
            version = doc["v"]
            tenant = doc["tenant"]
            gateway = doc["gateway"]
            received = int(doc["received_ms"])
            if version == 1:
                devices = [doc["device"]]
                rows = [(0, ts, metric, value) for ts, metric, value in doc["readings"]]
            elif version == 2:
                devices = doc["devices"]
                rows = doc["readings"]
            else:
                raise UndecodableRecord(f"unsupported record version {version!r}")
            if not isinstance(tenant, str) or not isinstance(gateway, str):
                raise UndecodableRecord("tenant and gateway must be strings")
            index = self.table.index
            series: list[int] = []
            ts_list: list[int] = []
            values: list[float] = []
            for dev, ts, metric, value in rows:
                key = (tenant, devices[dev], metric)
                s = index.get(key)
                if s is None:
                    if not (isinstance(key[1], str) and isinstance(metric, str)):
                        raise UndecodableRecord("device and metric must be strings")
                    s = self.table.add(key)
                series.append(s)
                ts_list.append(int(ts))
                values.append(float(value))
        except UndecodableRecord:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise UndecodableRecord(f"undecodable record: {exc!r}") from exc
        r = len(self.partitions)
        self.partitions.append(partition)
        self.received.append(received)
        self.gateways.append(gateway)
        self.series += series
        self.ts += ts_list
        self.value += values
        self.record += [r] * len(series)
        return len(series)

    def finish(self) -> Columns:
        self.table.sync_arrays()
        return Columns(
            np.array(self.series, np.int32),
            np.array(self.ts, np.int64),
            np.array(self.value, np.float64),
            np.array(self.record, np.int32),
            np.array(self.partitions, np.int32),
            np.array(self.received, np.int64),
            self.gateways,
        )
