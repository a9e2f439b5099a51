from __future__ import annotations

import pytest
from pydantic import ValidationError

from meterflow.contract import (
    DeviceReadings,
    Reading,
    RecordError,
    TelemetryPoint,
    decode_record,
    parse_telemetry_topic,
)


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
    a = TelemetryPoint.model_validate({"ts": 1763712000000, "values": {"power_kw": 1}})
    b = TelemetryPoint.model_validate({"ts": "2025-11-21T16:00:00+08:00", "values": {"power_kw": 1}})
    assert a.ts == b.ts == 1763712000000


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
        TelemetryPoint.model_validate(point)


def test_record_round_trip() -> None:
    rec = DeviceReadings(
        "acme", "gw-1", "m-1", 5, (Reading(1, "power_kw", 2.5), Reading(1, "energy_import_kwh", 7.0))
    )
    assert decode_record(rec.encode()) == rec
    assert rec.kafka_key() == b"acme/m-1"


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
