from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from ingest import records
from ingest.records import Partitioner, RecordBatch
from meterflow.contract import DeviceReadings, Reading, decode_records, device_key

PARTITIONS = [0, 1, 2, 3, 4, 5]


def _device(device: str, *readings: tuple[int, str, float], tenant: str = "acme") -> DeviceReadings:
    return DeviceReadings(tenant, "gw-1", device, 7, tuple(Reading(*r) for r in readings))


@pytest.mark.parametrize("n_partitions", [1, 3, 6, 12])
def test_partition_is_the_default_partitioners(n_partitions: int) -> None:
    partitions = list(range(n_partitions))
    ours = Partitioner(max_cached=10)  # also crosses the cache limit
    for i in range(200):
        device = f"m-{i:03d}"
        expected = DefaultPartitioner()(device_key("acme", device), partitions, partitions)
        assert ours.partition("acme", device, partitions) == expected
        assert ours.partition("acme", device, partitions) == expected  # cached


def test_one_record_per_tenant_gateway_and_partition_and_nothing_lost() -> None:
    partitioner = Partitioner()
    batch = RecordBatch(7, PARTITIONS, partitioner)
    devices = [_device(f"m-{i:02d}", (i, "power_kw", float(i)), (i + 1, "power_kw", 1.0)) for i in range(40)]
    devices += [
        _device("m-00", (99, "energy_import_kwh", 5.0)),
        _device("m-00", (1, "power_kw", 2.0), tenant="other"),
    ]
    for d in devices:
        batch.add(d)
    out = batch.records()
    assert batch.readings == sum(len(d.readings) for d in devices)
    keys = [(r.tenant, r.gateway, p) for p, r in out]
    assert len(keys) == len(set(keys))
    back: dict[tuple[str, str], list[Reading]] = {}
    for partition, record in out:
        assert record.received_ms == 7
        assert record.kafka_key() == device_key(record.tenant, record.devices[0])
        for name in record.devices:
            assert partitioner.partition(record.tenant, name, PARTITIONS) == partition
        for decoded in decode_records(record.encode()):
            back.setdefault((decoded.tenant, decoded.device), []).extend(decoded.readings)
    expected: dict[tuple[str, str], list[Reading]] = {}
    for d in devices:
        expected.setdefault((d.tenant, d.device), []).extend(d.readings)
    assert back == expected  # every reading, each device's in order


def test_a_full_record_is_split_and_order_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 3 * (records.READING_OVERHEAD_BYTES + len("power_kw")))
    batch = RecordBatch(7, [0], Partitioner())
    for ts in range(10):
        batch.add(_device("m-1", (ts, "power_kw", float(ts))))
    out = batch.records()
    assert [len(r.readings) for _, r in out] == [3, 3, 3, 1]
    assert [row[1] for _, r in out for row in r.readings] == list(range(10))
