from __future__ import annotations

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from ingest import records
from ingest.records import Partitioner, RecordBatch
from meterflow.contract import (
    DEAD_LETTER_DETAIL_CHARS,
    DEAD_LETTER_MIN_LIST_BYTES,
    DeadLetterEntry,
    DeviceReadings,
    Reading,
    decode_records,
    device_key,
    encode_dead_letter,
)

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
    out = batch.encoded()
    assert batch.readings == sum(len(d.readings) for d in devices)
    back: dict[tuple[str, str], list[Reading]] = {}
    groups = []
    for partition, key, value in out:
        decoded = decode_records(value)
        groups.append((decoded[0].tenant, decoded[0].gateway, partition))
        assert key == device_key(decoded[0].tenant, decoded[0].device)
        for d in decoded:
            assert d.received_ms == 7
            assert partitioner.partition(d.tenant, d.device, PARTITIONS) == partition
            back.setdefault((d.tenant, d.device), []).extend(d.readings)
    assert len(groups) == len(set(groups))
    expected: dict[tuple[str, str], list[Reading]] = {}
    for d in devices:
        expected.setdefault((d.tenant, d.device), []).extend(d.readings)
    assert back == expected  # every reading, each device's in order


def test_a_record_too_large_is_split_and_order_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 300)
    batch = RecordBatch(7, [0], Partitioner())
    for ts in range(20):
        batch.add(_device(f"m-{ts % 3}", (ts, "power_kw", float(ts))))
    out = batch.encoded()
    assert len(out) > 1
    assert [r.kafka_key() for _, r in batch.records()] == [key for _, key, _ in out]
    assert all(len(value) <= 300 for _, _, value in out)
    back = [(d.device, r.ts_ms) for _, _, value in out for d in decode_records(value) for r in d.readings]
    assert sorted(back, key=lambda x: x[1]) == [(f"m-{ts % 3}", ts) for ts in range(20)]
    for device in ("m-0", "m-1", "m-2"):
        stamps = [ts for d, ts in back if d == device]
        assert stamps == sorted(stamps)


def test_a_record_is_closed_at_max_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_RECORD_READINGS", 4)
    batch = RecordBatch(7, [0], Partitioner())
    for ts in range(10):
        batch.add(_device(f"m-{ts % 2}", (ts, "power_kw", float(ts))))
    out = batch.encoded()
    assert [len(decode_records(value)) for _, _, value in out] == [2, 2, 2]
    back = [(d.device, r.ts_ms) for _, _, value in out for d in decode_records(value) for r in d.readings]
    assert sorted(back, key=lambda x: x[1]) == [(f"m-{ts % 2}", ts) for ts in range(10)]


# --- dead-letter records ---------------------------------------------------------------------------


def test_a_dead_letter_without_a_list_counts_its_one_reason() -> None:
    """The processor's and intensity service's letters: one refused record each."""
    letter = orjson.loads(
        encode_dead_letter(
            reason="undecodable_record", detail="bad", payload=b"\x00\x01", cap=100, received_ms=7, offset=3
        )
    )
    assert letter["v"] == 2 and letter["offset"] == 3
    assert letter["reasons"] == {"undecodable_record": 1}
    assert letter["rejected"] == [{"reason": "undecodable_record", "detail": "bad"}]
    assert (letter["rejected_total"], letter["rejected_truncated"]) == (1, False)


def test_long_names_in_rejections_cannot_inflate_a_letter() -> None:
    payload = b"x" * 1000
    long = "m" * 100_000
    entries = [
        DeadLetterEntry(reason="out_of_range", detail=long, device="d", metric=long) for _ in range(1000)
    ]
    value = encode_dead_letter(
        reason="out_of_range", detail=long, payload=payload, cap=10**6, received_ms=7, rejected=entries
    )
    assert len(value) <= len(payload) + DEAD_LETTER_MIN_LIST_BYTES + 1000
    letter = orjson.loads(value)
    assert letter["reasons"] == {"out_of_range": 1000}
    assert letter["rejected_truncated"] and 0 < len(letter["rejected"]) < 1000
    assert len(letter["rejected"][0]["metric"]) == len(letter["detail"]) == DEAD_LETTER_DETAIL_CHARS
