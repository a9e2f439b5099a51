from __future__ import annotations

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from meterflow.contract import (
    DeviceReadings,
    GatewayRecord,
    Reading,
    RecordError,
    TelemetryPoint,
    decode_record,
    decode_records,
    parse_telemetry_topic,
)

POINT = TypeAdapter(TelemetryPoint)


def test_gateway_and_device_topics_parse() -> None:
    t = parse_telemetry_topic("meterflow/v1/acme/gw-1/telemetry")
    assert t is not None and (t.tenant, t.gateway, t.device) == ("acme", "gw-1", None)
    d = parse_telemetry_topic("meterflow/v1/acme/gw-1/m.01/telemetry")
    assert d is not None and d.device == "m.01"


@pytest.mark.parametrize(
    "topic",
    [
        "meterflow/v1/ACME/gw/telemetry",  # tenant must be lower case
        "meterflow/v2/acme/gw/telemetry",
        "meterflow/v1/acme/gw/attributes",
        "meterflow/v1/acme/telemetry",
        "meterflow/v1/acme/gw/-bad/telemetry",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    assert parse_telemetry_topic(topic) is None


def test_timestamp_accepts_epoch_ms_and_rfc3339_with_offset() -> None:
    a = POINT.validate_python({"ts": 1763712000000, "values": {"power_kw": 1}})
    b = POINT.validate_python({"ts": "2025-11-21T16:00:00+08:00", "values": {"power_kw": 1}})
    assert a["ts"] == b["ts"] == 1763712000000


@pytest.mark.parametrize(
    "point",
    [
        {"ts": "2025-11-21T16:00:00", "values": {"power_kw": 1}},  # no offset
        {"ts": 1763712000000, "values": {"power_kw": True}},
        {"ts": 1763712000000, "values": {"power_kw": "1.0"}},
        {"ts": 1763712000000, "values": {"power_kw": 1}, "extra": 1},
    ],
)
def test_invalid_points_are_refused(point: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        POINT.validate_python(point)


def test_record_round_trip() -> None:
    rec = DeviceReadings(
        "acme", "gw-1", "m-1", 5, (Reading(1, "power_kw", 2.5), Reading(1, "energy_import_kwh", 7.0))
    )
    assert decode_record(rec.encode()) == rec
    assert decode_records(rec.encode()) == [rec]
    assert rec.kafka_key() == b"acme/m-1"


def test_v2_record_matches_the_spec_and_decodes_per_device() -> None:
    record = GatewayRecord(
        "acme",
        "gw-1",
        5,
        ["m-001", "bat-7"],
        [(0, 10, "power_kw", 1.5), (1, 10, "soc_pct", 63.2), (0, 20, "power_kw", 1.75)],
    )
    assert record.kafka_key() == b"acme/m-001"
    assert orjson.loads(record.encode()) == {
        "v": 2,
        "tenant": "acme",
        "gateway": "gw-1",
        "received_ms": 5,
        "devices": ["m-001", "bat-7"],
        "readings": [[0, 10, "power_kw", 1.5], [1, 10, "soc_pct", 63.2], [0, 20, "power_kw", 1.75]],
    }
    assert decode_records(record.encode()) == [
        DeviceReadings(
            "acme", "gw-1", "m-001", 5, (Reading(10, "power_kw", 1.5), Reading(20, "power_kw", 1.75))
        ),
        DeviceReadings("acme", "gw-1", "bat-7", 5, (Reading(10, "soc_pct", 63.2),)),
    ]


def test_v2_device_without_readings_yields_nothing() -> None:
    record = GatewayRecord("acme", "gw-1", 5, ["m-001", "idle"], [(0, 10, "power_kw", 1.0)])
    assert [d.device for d in decode_records(record.encode())] == ["m-001"]


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b'{"v": 2}',
        b'{"v": 99, "tenant": "a", "gateway": "g", "device": "d", "received_ms": 1, "readings": []}',
    ],
)
def test_bad_records_raise_record_error(raw: bytes) -> None:
    with pytest.raises(RecordError):
        decode_record(raw)
    with pytest.raises(RecordError):
        decode_records(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"v": 2, "tenant": "a", "gateway": "g", "received_ms": 1, "devices": ["d"], '
        b'"readings": [[1, 10, "power_kw", 1.0]]}',  # device index out of range
        b'{"v": 2, "tenant": "a", "gateway": "g", "received_ms": 1, "devices": [], "readings": []}',
        b'{"v": 2, "tenant": "a", "gateway": "g", "received_ms": 1, "devices": ["d"], '
        b'"readings": [[0, 10, "power_kw"]]}',
    ],
)
def test_bad_v2_records_raise_record_error(raw: bytes) -> None:
    with pytest.raises(RecordError):
        decode_records(raw)
