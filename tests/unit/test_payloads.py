from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.payloads import Limits, parse_message
from meterflow.contract import METRIC_RANGES, DeadLetterReason, TelemetryTopic, encode_dead_letter
from meterflow.settings import IngestSettings, Settings

TOPIC = TelemetryTopic("acme", "gw-1", None)
LIMITS = Limits(max_payload_bytes=10_000, max_future_skew_ms=300_000)
LIMITS_BIG = Limits(max_payload_bytes=256 * 1024, max_future_skew_ms=300_000)
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
    assert [r.reason for r in result.rejected] == [DeadLetterReason.NON_FINITE]


def _hundred(bad_literal: bytes, at: int = 37) -> bytes:
    """100 readings of one device, the one at `at` written as `bad_literal` (not valid for orjson)."""
    points = [{"ts": NOW - i * 1000, "values": {"power_kw": 1000.0 + i}} for i in range(100)]
    raw = orjson.dumps({"m-1": points})
    return raw.replace(b'"power_kw":' + str(1000.0 + at).encode(), b'"power_kw":' + bad_literal, 1)


@pytest.mark.parametrize(
    "literal", [b"1e309", b"-1e309", b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 5000]
)
def test_a_literal_orjson_refuses_rejects_only_its_reading(literal: bytes) -> None:
    result = parse_message(TOPIC, _hundred(literal), received_ms=NOW, limits=LIMITS_BIG)
    assert result.reading_count == 99
    assert [(r.reason, r.device, r.point, r.metric) for r in result.rejected] == [
        (DeadLetterReason.NON_FINITE, "m-1", 37, "power_kw")
    ]


@pytest.mark.parametrize(
    "payload",
    [
        b'["\\ud800", 1e309]',  # a lone surrogate the Kafka encoder could not write
        b"[" * 5000 + b"1e309" + b"]" * 5000,  # deeper than the stdlib parser's recursion
        b'{"m-1": [{"ts": 1, "values": {"power_kw": 1e309}}',  # cut short
        b'\xff{"m-1": [{"ts": 1, "values": {"power_kw": 1e309}}]}',  # not UTF-8
    ],
)
def test_what_neither_parser_reads_is_invalid_json(payload: bytes) -> None:
    result = parse_message(TOPIC, payload, received_ms=NOW, limits=LIMITS_BIG)
    assert [r.reason for r in result.rejected] == [DeadLetterReason.INVALID_JSON]


@pytest.mark.parametrize(
    ("metric", "value"),
    [
        ("power_kw", 1e308),
        ("power_kw", -1e308),
        ("energy_import_kwh", 1.8e19),
        ("energy_import_kwh", 1.2e29),
        ("energy_import_kwh", -1.0),
        ("soc_pct", 1e6),
        ("vendor_temp_c", 1e300),  # no canonical range: the generic one
    ],
)
def test_extreme_finite_values_are_out_of_range_and_siblings_stay(metric: str, value: float) -> None:
    result = parse(
        {
            "m-1": [
                {"ts": NOW, "values": {metric: value, "reactive_power_kvar": 3.0}},
                {"ts": NOW - 60_000, "values": {"power_kw": 4.0}},
            ]
        }
    )
    assert result.reading_count == 2  # type: ignore[attr-defined]
    assert [(r.reason, r.point, r.metric) for r in result.rejected] == [  # type: ignore[attr-defined]
        (DeadLetterReason.OUT_OF_RANGE, 0, metric)
    ]


def test_an_integer_beyond_64_bits_is_out_of_range() -> None:
    raw = b'{"m-1": [{"ts": %d, "values": {"power_kw": 18446744073709551616, "soc_pct": 50}}]}' % NOW
    result = parse_message(TOPIC, raw, received_ms=NOW, limits=LIMITS)
    assert result.reading_count == 1
    assert [r.reason for r in result.rejected] == [DeadLetterReason.OUT_OF_RANGE]


def test_configured_ranges_replace_the_contracts() -> None:
    settings = IngestSettings(
        metric_ranges={"power_kw": (-10.0, 10.0)}, min_ts=datetime(2020, 1, 1, tzinfo=UTC)
    )
    limits = Limits.from_settings(settings)
    assert limits.ranges["energy_import_kwh"] == METRIC_RANGES["energy_import_kwh"]
    result = parse_message(
        TOPIC,
        orjson.dumps(
            {
                "m-1": [
                    {"ts": NOW, "values": {"power_kw": 11.0, "energy_import_kwh": 5.0}},
                    {"ts": 1_546_300_800_000, "values": {"power_kw": 1.0}},  # 2019-01-01
                ]
            }
        ),
        received_ms=NOW,
        limits=limits,
    )
    assert result.reading_count == 1
    assert [r.reason for r in result.rejected] == [DeadLetterReason.OUT_OF_RANGE, DeadLetterReason.PAST_TS]


@pytest.mark.parametrize("ts", [-1_000_000_000_000_000, "0001-01-01T00:00:00Z", 0, 946_684_799_999])
def test_timestamps_before_the_floor_are_past_ts(ts: int | str) -> None:
    result = parse(
        {"m-1": [{"ts": ts, "values": {"power_kw": 1.0}}, {"ts": NOW, "values": {"power_kw": 2.0}}]}
    )
    assert result.reading_count == 1  # type: ignore[attr-defined]
    assert [(r.reason, r.point) for r in result.rejected] == [(DeadLetterReason.PAST_TS, 0)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("doc", "topic"),
    [
        ({}, TOPIC),
        ([], TOPIC),
        ({"m-1": []}, TOPIC),
        ({"m-1": [], "m-2": []}, TOPIC),
        ({"m-1": [{"ts": NOW, "values": {}}]}, TOPIC),
        ([], TelemetryTopic("acme", "gw-1", "m-9")),
    ],
)
def test_empty_messages_are_refused_as_empty(doc: object, topic: TelemetryTopic) -> None:
    result = parse(doc, topic)
    assert result.accepted == []  # type: ignore[attr-defined]
    assert [r.reason for r in result.rejected] == [DeadLetterReason.EMPTY]  # type: ignore[attr-defined]


def test_rejections_name_the_point_they_refuse_in_the_slow_path_too() -> None:
    result = parse(
        {
            "m-1": [
                {"ts": NOW, "values": {"power_kw": "high"}},
                {"ts": NOW, "values": {"power_kw": 1.0}},
                {"ts": NOW + 3_600_000, "values": {"power_kw": 2.0}},
            ]
        }
    )
    assert [(r.reason, r.point) for r in result.rejected] == [  # type: ignore[attr-defined]
        (DeadLetterReason.SCHEMA, 0),
        (DeadLetterReason.FUTURE_TS, 2),
    ]


def test_single_device_form_accepts_object_or_array() -> None:
    topic = TelemetryTopic("acme", "gw-1", "m-9")
    one = parse({"ts": NOW, "values": {"power_kw": 1}}, topic)
    many = parse([{"ts": NOW, "values": {"power_kw": 1}}, {"ts": NOW + 1, "values": {"power_kw": 2}}], topic)
    assert one.reading_count == 1 and many.reading_count == 2  # type: ignore[attr-defined]


def test_batch_that_is_not_an_object_is_a_schema_error() -> None:
    result = parse([1, 2, 3])
    assert [r.reason for r in result.rejected] == [DeadLetterReason.SCHEMA]  # type: ignore[attr-defined]


@pytest.mark.parametrize("bounds", [(5.0, 1.0), (float("nan"), 1.0), (0.0, float("inf"))])
def test_a_range_that_would_refuse_everything_or_nothing_is_a_settings_error(
    bounds: tuple[float, float],
) -> None:
    with pytest.raises(ValidationError):
        IngestSettings(metric_ranges={"power_kw": bounds})


def test_ranges_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERFLOW_INGEST__METRIC_RANGES", '{"power_kw": [-5e5, 5e5]}')
    monkeypatch.setenv("METERFLOW_INGEST__MIN_TS", "2010-01-01T00:00:00Z")
    limits = Limits.from_settings(Settings().ingest)
    assert limits.ranges["power_kw"] == (-5e5, 5e5)
    assert limits.min_ts_ms == 1_262_304_000_000


_LITERALS = st.sampled_from(
    [b"1e309", b"-1e309", b"NaN", b"Infinity", b"1e308", b"18446744073709551616", b"-0", b"1"]
)
_SCALAR = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=8)
_POINT = st.fixed_dictionaries(
    {
        "ts": st.integers(-(2**63), 2**63 - 1) | st.just(NOW),
        "values": st.dictionaries(st.text(max_size=8), _SCALAR, max_size=3),
    }
)
_JSON = (
    st.dictionaries(st.text(max_size=8), st.lists(_POINT | _SCALAR, max_size=4), max_size=3)
    | st.lists(_POINT, max_size=3)
    | st.recursive(
        _SCALAR,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    )
)


@settings(max_examples=300, deadline=None)
@given(doc=_JSON, literal=_LITERALS, topic=st.sampled_from([TOPIC, TelemetryTopic("acme", "gw-1", "m-9")]))
def test_any_json_with_any_number_literal_is_read_or_refused_never_a_crash(
    doc: object, literal: bytes, topic: TelemetryTopic
) -> None:
    """Whatever arrives, the result encodes: its readings to Kafka, its refusals to one dead letter."""
    payload = orjson.dumps(doc).replace(b"null", literal, 1)
    result = parse_message(topic, payload, received_ms=NOW, limits=LIMITS_BIG)
    assert result.accepted or result.rejected
    for device in result.accepted:
        device.encode()
    if result.rejected:
        encode_dead_letter(
            reason="x",
            detail="x",
            payload=payload,
            cap=1000,
            received_ms=NOW,
            rejected=[r.entry() for r in result.rejected],
        )
