from __future__ import annotations

import orjson

from ingest.payloads import Limits, parse_message
from meterflow.contract import DeadLetterReason, TelemetryTopic

TOPIC = TelemetryTopic("acme", "gw-1", None)
LIMITS = Limits(max_payload_bytes=10_000, max_future_skew_ms=300_000)
NOW = 1763712000000


def parse(doc: object, topic: TelemetryTopic = TOPIC) -> object:
    return parse_message(topic, orjson.dumps(doc), received_ms=NOW, limits=LIMITS)


def test_gateway_batch_becomes_one_record_per_device() -> None:
    result = parse(
        {
            "m-001": [
                {"ts": NOW, "values": {"energy_import_kwh": 12345.67, "power_kw": 42.1}},
                {"ts": NOW + 60_000 - 300_000, "values": {"energy_import_kwh": 12346.37}},
            ],
            "bat-7": [{"ts": NOW, "values": {"soc_pct": 63.2, "power_kw": -120}}],
        }
    )
    assert result.rejected == []  # type: ignore[attr-defined]
    by_device = {d.device: d for d in result.accepted}  # type: ignore[attr-defined]
    assert set(by_device) == {"m-001", "bat-7"}
    assert len(by_device["m-001"].readings) == 3
    assert result.reading_count == 5  # type: ignore[attr-defined]


def test_one_bad_reading_does_not_reject_its_siblings() -> None:
    result = parse(
        {
            "m-001": [{"ts": NOW, "values": {"power_kw": 1.0}}, {"ts": NOW, "values": {"power_kw": "high"}}],
            "m-002": [{"ts": NOW + 3_600_000, "values": {"power_kw": 2.0}}],
            "m-003": [{"ts": NOW, "values": {"power_kw": 3.0}}],
        }
    )
    reasons = sorted(r.reason for r in result.rejected)  # type: ignore[attr-defined]
    assert reasons == [DeadLetterReason.FUTURE_TS, DeadLetterReason.SCHEMA]
    assert sorted(d.device for d in result.accepted) == ["m-001", "m-003"]  # type: ignore[attr-defined]


def test_invalid_json_and_oversized_payloads_are_rejected_whole() -> None:
    bad = parse_message(TOPIC, b"{not json", received_ms=NOW, limits=LIMITS)
    assert [r.reason for r in bad.rejected] == [DeadLetterReason.INVALID_JSON]
    big = parse_message(TOPIC, b" " * 10_001, received_ms=NOW, limits=LIMITS)
    assert [r.reason for r in big.rejected] == [DeadLetterReason.TOO_LARGE]


def test_overflowing_number_is_non_finite() -> None:
    result = parse_message(
        TOPIC,
        b'{"m-1": [{"ts": 1763712000000, "values": {"power_kw": 1e999}}]}',
        received_ms=NOW,
        limits=LIMITS,
    )
    assert result.accepted == []
    assert [r.reason for r in result.rejected] in (
        [DeadLetterReason.NON_FINITE],
        [DeadLetterReason.INVALID_JSON],
    )


def test_single_device_form_accepts_object_or_array() -> None:
    topic = TelemetryTopic("acme", "gw-1", "m-9")
    one = parse({"ts": NOW, "values": {"power_kw": 1}}, topic)
    many = parse([{"ts": NOW, "values": {"power_kw": 1}}, {"ts": NOW + 1, "values": {"power_kw": 2}}], topic)
    assert one.reading_count == 1 and many.reading_count == 2  # type: ignore[attr-defined]


def test_batch_that_is_not_an_object_is_a_schema_error() -> None:
    result = parse([1, 2, 3])
    assert [r.reason for r in result.rejected] == [DeadLetterReason.SCHEMA]  # type: ignore[attr-defined]
