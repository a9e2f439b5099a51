"""Accepted readings -> Kafka records of version 2 (meterflow/contract.py), fewest records possible.

Pure: no I/O. The collector hands over every accepted device's readings of a batch of MQTT messages;
readings of one tenant and gateway whose devices fall into the same partition share a record. The
partition is the one aiokafka's (and Java's) default partitioner gives the device's v1 key, so a
device lives in the same partition as with v1 records, and its readings stay in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from aiokafka.partitioner import murmur2

from meterflow.contract import DeviceReadings, GatewayRecord, ReadingRow, device_key

# A record stays well under Kafka's default 1 MB message limit and within one producer batch; a larger
# one is split in two, as often as needed.
MAX_RECORD_BYTES: Final = 256 * 1024
# Readings after which a record is closed, so that it seldom needs splitting: a reading encodes to
# about 45 bytes with a canonical metric name.
MAX_RECORD_READINGS: Final = 4096
# Devices whose key hash is remembered; beyond it the cache starts over (a fleet is far smaller).
MAX_CACHED_DEVICES: Final = 1_000_000


class Partitioner:
    """The default partitioner's choice for a tenant/device key. Pure-Python murmur2 costs more than
    the rest of a reading's way through the collector, so each device's hash is computed once."""

    def __init__(self, max_cached: int = MAX_CACHED_DEVICES) -> None:
        self._hashes: dict[tuple[str, str], int] = {}
        self._max_cached = max_cached

    def partition(self, tenant: str, device: str, partitions: Sequence[int]) -> int:
        """`partitions`: the topic's partition ids, sorted, as the default partitioner sees them."""
        hashed = self._hashes.get((tenant, device))
        if hashed is None:
            if len(self._hashes) >= self._max_cached:
                self._hashes.clear()
            hashed = murmur2(device_key(tenant, device)) & 0x7FFFFFFF
            self._hashes[(tenant, device)] = hashed
        return partitions[hashed % len(partitions)]


@dataclass(slots=True)
class _Open:
    record: GatewayRecord
    indexes: dict[str, int] = field(default_factory=dict)


class RecordBatch:
    """Collects device readings into v2 records, one per tenant, gateway and partition (more when one
    reaches MAX_RECORD_READINGS or would encode to more than MAX_RECORD_BYTES). Every record carries
    `received_ms`."""

    def __init__(self, received_ms: int, partitions: Sequence[int], partitioner: Partitioner) -> None:
        self._received_ms = received_ms
        self._partitions = partitions
        self._partitioner = partitioner
        self._open: dict[tuple[str, str, int], _Open] = {}
        self._closed: list[tuple[int, GatewayRecord]] = []
        self.readings = 0

    def add(self, device: DeviceReadings) -> None:
        partition = self._partitioner.partition(device.tenant, device.device, self._partitions)
        group = (device.tenant, device.gateway, partition)
        current = self._open.get(group)
        if current is None:
            current = self._open[group] = _Open(
                GatewayRecord(device.tenant, device.gateway, self._received_ms, [], [])
            )
        index = current.indexes.get(device.device)
        if index is None:
            index = current.indexes[device.device] = len(current.record.devices)
            current.record.devices.append(device.device)
        rows: list[ReadingRow] = current.record.readings
        rows += [(index, r.ts_ms, r.metric, r.value) for r in device.readings]
        self.readings += len(device.readings)
        if len(rows) >= MAX_RECORD_READINGS:
            del self._open[group]
            self._closed.append((partition, current.record))

    def records(self) -> list[tuple[int, GatewayRecord]]:
        """(partition, record) pairs, each partition's records in the order their readings came."""
        return [(partition, record) for partition, record, _ in self._split()]

    def encoded(self) -> list[tuple[int, bytes, bytes]]:
        """(partition, key, value) of every record, in the order of `records`."""
        return [(partition, record.kafka_key(), value) for partition, record, value in self._split()]

    def _split(self) -> list[tuple[int, GatewayRecord, bytes]]:
        out: list[tuple[int, GatewayRecord, bytes]] = []
        # A group's closed records hold its earlier readings.
        for partition, record in self._closed:
            _encode(partition, record, out)
        for (_, _, partition), current in self._open.items():
            _encode(partition, current.record, out)
        return out


def _encode(partition: int, record: GatewayRecord, out: list[tuple[int, GatewayRecord, bytes]]) -> None:
    value = record.encode()
    if len(value) <= MAX_RECORD_BYTES or len(record.readings) == 1:
        out.append((partition, record, value))
        return
    half = len(record.readings) // 2
    for rows in (record.readings[:half], record.readings[half:]):
        _encode(partition, _subset(record, rows), out)


def _subset(record: GatewayRecord, rows: list[ReadingRow]) -> GatewayRecord:
    """A record of some of `record`'s readings, naming only their devices."""
    indexes: dict[int, int] = {}
    devices: list[str] = []
    remapped: list[ReadingRow] = []
    for index, ts, metric, value in rows:
        new = indexes.get(index)
        if new is None:
            new = indexes[index] = len(devices)
            devices.append(record.devices[index])
        remapped.append((new, ts, metric, value))
    return GatewayRecord(record.tenant, record.gateway, record.received_ms, devices, remapped)
