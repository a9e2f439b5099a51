from __future__ import annotations

import math

import pytest

from meterflow.sparkplug import (
    BD_SEQ_METRIC,
    REBIRTH_METRIC,
    AliasTable,
    DecodedMetric,
    MessageType,
    SparkplugError,
    decode_payload,
    encode_dbirth,
    encode_ddata,
    encode_ddeath,
    encode_nbirth,
    encode_ncmd_rebirth,
    encode_ndeath,
    next_seq,
    parse_topic,
    topic,
)
from meterflow.sparkplug import sparkplug_b_pb2 as pb

TS = 1763712000000


def _single_metric(**fields: object) -> bytes:
    """A payload built field by field, for encodings meterflow's own encoders never produce."""
    payload = pb.Payload(timestamp=TS, seq=1)
    payload.metrics.add(**fields)
    return payload.SerializeToString()


# --- topics --------------------------------------------------------------------------------------


def test_node_and_device_topics_parse() -> None:
    node = parse_topic("spBv1.0/acme/NBIRTH/gw-1")
    assert node is not None
    assert (node.group, node.message_type, node.edge_node, node.device) == (
        "acme",
        MessageType.NBIRTH,
        "gw-1",
        None,
    )
    device = parse_topic("spBv1.0/acme/DDATA/gw-1/m.01")
    assert device is not None
    assert (device.message_type, device.device) == (MessageType.DDATA, "m.01")


@pytest.mark.parametrize("message_type", list(MessageType))
def test_topic_formats_what_parse_reads(message_type: MessageType) -> None:
    device = "bat-7" if message_type.is_device else None
    formatted = topic("acme", message_type, "gw-1", device)
    parsed = parse_topic(formatted)
    assert parsed is not None
    assert (parsed.group, parsed.message_type, parsed.edge_node, parsed.device) == (
        "acme",
        message_type,
        "gw-1",
        device,
    )


@pytest.mark.parametrize(
    "raw",
    [
        "spAv1.0/acme/NBIRTH/gw-1",  # Sparkplug A namespace
        "spBv1.0/acme/DDATA/gw-1/m-1/extra",
        "meterflow/v1/acme/gw-1/telemetry",
        "spBv1.0/acme/NBIRTH",
        "spBv1.0/acme/NPUBLISH/gw-1",  # no such verb
        "spBv1.0/acme/ddata/gw-1/m-1",  # verbs are upper case
        "spBv1.0/STATE/host-1",  # a host application's topic, no group
        "spBv1.0/acme/STATE/gw-1",
        "spBv1.0/ACME/NBIRTH/gw-1",  # tenant must be lower case
        "spBv1.0/acme\n/NBIRTH/gw-1",
        "spBv1.0/acme/NBIRTH/-gw",
        "spBv1.0/acme/DDATA/gw-1/.m",
        "spBv1.0/acme/DDATA/gw-1",  # device verb without device
        "spBv1.0/acme/NDATA/gw-1/m-1",  # node verb with device
        "spBv1.0/acme/DDATA/gw-1/+",
    ],
)
def test_foreign_or_invalid_topics_are_refused(raw: str) -> None:
    assert parse_topic(raw) is None


@pytest.mark.parametrize(
    ("group", "message_type", "edge_node", "device"),
    [
        ("Acme", MessageType.NDATA, "gw-1", None),
        ("acme", MessageType.NDATA, "gw/1", None),
        ("acme", MessageType.DDATA, "gw-1", None),
        ("acme", MessageType.NBIRTH, "gw-1", "m-1"),
        ("acme", MessageType.DBIRTH, "gw-1", "m 1"),
    ],
)
def test_topic_refuses_ids_the_collector_would_reject(
    group: str, message_type: MessageType, edge_node: str, device: str | None
) -> None:
    with pytest.raises(ValueError, match="not a meterflow Sparkplug topic"):
        topic(group, message_type, edge_node, device)


# --- seq -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq", "expected"), [(0, 1), (1, 2), (254, 255), (255, 0)])
def test_seq_wraps_after_255(seq: int, expected: int) -> None:
    assert next_seq(seq) == expected


@pytest.mark.parametrize("seq", [-1, 256])
def test_seq_out_of_range_is_refused(seq: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.255"):
        next_seq(seq)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        encode_ddeath(TS, seq)


# --- encoder round trips -------------------------------------------------------------------------


def test_nbirth_round_trip() -> None:
    decoded = decode_payload(encode_nbirth(bd_seq=7, ts_ms=TS))
    assert (decoded.ts_ms, decoded.seq) == (TS, 0)
    assert decoded.metrics == (
        DecodedMetric(BD_SEQ_METRIC, None, TS, 7, pb.DataType.Int64, False, False),
        DecodedMetric(REBIRTH_METRIC, None, TS, False, pb.DataType.Boolean, False, False),
    )


def test_ndeath_carries_bd_seq_and_no_seq() -> None:
    decoded = decode_payload(encode_ndeath(bd_seq=255, ts_ms=TS))
    assert (decoded.ts_ms, decoded.seq) == (TS, None)
    assert [(m.name, m.value, m.datatype) for m in decoded.metrics] == [
        (BD_SEQ_METRIC, 255, pb.DataType.Int64)
    ]


def test_dbirth_round_trip_carries_names_and_aliases() -> None:
    decoded = decode_payload(
        encode_dbirth([("energy_import_kwh", 1, 12345.67), ("power_kw", 2, -42.1)], TS, seq=1)
    )
    assert (decoded.ts_ms, decoded.seq) == (TS, 1)
    assert decoded.metrics == (
        DecodedMetric("energy_import_kwh", 1, TS, 12345.67, pb.DataType.Double, False, False),
        DecodedMetric("power_kw", 2, TS, -42.1, pb.DataType.Double, False, False),
    )


def test_ddata_round_trip_by_alias_with_history() -> None:
    points = [(1, TS - 60_000, 12345.0), (1, TS, 12346.5), (2, TS, 41.9)]
    decoded = decode_payload(encode_ddata(points, TS, seq=2, is_historical=True))
    assert decoded.seq == 2
    assert [(m.name, m.alias, m.ts_ms, m.value, m.is_historical) for m in decoded.metrics] == [
        (None, 1, TS - 60_000, 12345.0, True),
        (None, 1, TS, 12346.5, True),
        (None, 2, TS, 41.9, True),
    ]


def test_ddata_round_trip_by_name() -> None:
    decoded = decode_payload(encode_ddata([("soc_pct", TS, 63.2)], TS, seq=3))
    assert decoded.metrics == (DecodedMetric("soc_pct", None, TS, 63.2, pb.DataType.Double, False, False),)


def test_ddeath_round_trip() -> None:
    decoded = decode_payload(encode_ddeath(TS, seq=4))
    assert (decoded.ts_ms, decoded.seq, decoded.metrics) == (TS, 4, ())


def test_ncmd_rebirth_round_trip() -> None:
    decoded = decode_payload(encode_ncmd_rebirth(TS))
    assert (decoded.ts_ms, decoded.seq) == (TS, None)
    assert decoded.metrics == (
        DecodedMetric(REBIRTH_METRIC, None, TS, True, pb.DataType.Boolean, False, False),
    )


# --- value decoding ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datatype", "field", "raw", "expected"),
    [
        # Width of the type (Tahu Python) and of the field (Tahu Java) both decode.
        (pb.DataType.Int8, "int_value", 0xFF, -1),
        (pb.DataType.Int8, "int_value", 0xFFFFFFFF, -1),
        (pb.DataType.Int8, "int_value", 0x80, -128),
        (pb.DataType.Int8, "int_value", 0x7F, 127),
        (pb.DataType.Int16, "int_value", 0x8000, -32768),
        (pb.DataType.Int16, "int_value", 0xFFFF8000, -32768),
        (pb.DataType.Int16, "int_value", 0x7FFF, 32767),
        (pb.DataType.Int32, "int_value", 0xFFFFFFFE, -2),
        (pb.DataType.Int32, "int_value", 0x80000000, -(2**31)),
        (pb.DataType.Int32, "long_value", 0xFFFFFFFFFFFFFFFE, -2),
        (pb.DataType.Int64, "long_value", 0xFFFFFFFFFFFFFFFF, -1),
        (pb.DataType.Int64, "long_value", 2**63, -(2**63)),
        (pb.DataType.Int64, "long_value", 2**63 - 1, 2**63 - 1),
        (pb.DataType.UInt8, "int_value", 0xFF, 255),
        (pb.DataType.UInt32, "int_value", 0xFFFFFFFF, 2**32 - 1),
        (pb.DataType.UInt32, "long_value", 0xFFFFFFFF, 2**32 - 1),
        (pb.DataType.UInt64, "long_value", 2**64 - 1, 2**64 - 1),
        (pb.DataType.Float, "float_value", 12.1, 12.1),
        (pb.DataType.Double, "double_value", -0.5, -0.5),
        (pb.DataType.Boolean, "boolean_value", True, True),
        (pb.DataType.String, "string_value", "on", "on"),
        (pb.DataType.Text, "string_value", "text", "text"),
    ],
)
def test_values_decode_per_datatype(datatype: int, field: str, raw: object, expected: object) -> None:
    (metric,) = decode_payload(_single_metric(name="x", datatype=datatype, **{field: raw})).metrics
    assert metric.value == expected
    assert type(metric.value) is type(expected)
    assert metric.datatype == datatype


@pytest.mark.parametrize(
    ("datatype", "fields"),
    [
        (pb.DataType.Int8, {"int_value": 0x1FF}),  # neither 8- nor 32-bit two's complement
        (pb.DataType.UInt8, {"int_value": 256}),
        (pb.DataType.Double, {"string_value": "1.0"}),  # value field contradicts the datatype
        (pb.DataType.Int32, {"double_value": 1.0}),
        (pb.DataType.DateTime, {"long_value": TS}),
        (pb.DataType.Bytes, {"bytes_value": b"\x00"}),
        (pb.DataType.DataSet, {"dataset_value": pb.Payload.DataSet(num_of_columns=0)}),
        (pb.DataType.Unknown, {"double_value": 1.0}),
        (pb.DataType.Double, {}),
    ],
)
def test_unreadable_values_decode_to_none_with_datatype_kept(
    datatype: int, fields: dict[str, object]
) -> None:
    (metric,) = decode_payload(_single_metric(name="x", datatype=datatype, **fields)).metrics
    assert (metric.value, metric.datatype, metric.is_null) == (None, datatype, False)


def test_explicit_null() -> None:
    (metric,) = decode_payload(_single_metric(alias=3, datatype=pb.DataType.Double, is_null=True)).metrics
    assert (metric.value, metric.is_null) == (None, True)


def test_non_finite_doubles_reach_the_caller() -> None:
    # The collector, not the codec, dead-letters them with reason non_finite.
    (metric,) = decode_payload(encode_ddata([(1, TS, math.inf)], TS, seq=0)).metrics
    assert metric.value == math.inf


# --- aliases -------------------------------------------------------------------------------------


def _birth_table() -> AliasTable:
    return AliasTable(
        decode_payload(encode_dbirth([("energy_import_kwh", 1, 0.0), ("power_kw", 2, 0.0)], TS, 1)).metrics
    )


def test_alias_resolves_to_birth_name() -> None:
    table = _birth_table()
    data = decode_payload(encode_ddata([(2, TS, 5.0), (1, TS, 10.0), (9, TS, 1.0)], TS, seq=2)).metrics
    assert [table.resolve(m) for m in data] == ["power_kw", "energy_import_kwh", None]


def test_named_data_metric_resolves_to_its_own_name() -> None:
    (metric,) = decode_payload(encode_ddata([("soc_pct", TS, 50.0)], TS, seq=2)).metrics
    assert _birth_table().resolve(metric) == "soc_pct"


def test_data_metric_without_datatype_takes_its_birth_datatype() -> None:
    table = AliasTable(
        decode_payload(
            pb.Payload(
                timestamp=TS,
                seq=1,
                metrics=[
                    pb.Payload.Metric(name="power_kw", alias=4, datatype=pb.DataType.Int16, int_value=0)
                ],
            ).SerializeToString()
        ).metrics
    )
    raw = _single_metric(alias=4, timestamp=TS, int_value=0xFFFF)
    (without_birth,) = decode_payload(raw).metrics
    assert (without_birth.value, without_birth.datatype) == (None, pb.DataType.Unknown)
    (with_birth,) = decode_payload(raw, births=table).metrics
    assert (with_birth.value, with_birth.datatype) == (-1, pb.DataType.Int16)


def test_birth_reusing_an_alias_is_refused() -> None:
    birth = decode_payload(encode_dbirth([("power_kw", 1, 0.0), ("soc_pct", 1, 0.0)], TS, 1))
    with pytest.raises(SparkplugError, match="alias 1"):
        AliasTable(birth.metrics)


def test_birth_metric_without_name_is_refused() -> None:
    with pytest.raises(SparkplugError, match="no name"):
        AliasTable(decode_payload(encode_ddata([(1, TS, 0.0)], TS, 1)).metrics)


# --- garbage -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'{"ts": 1763712000000, "values": {"power_kw": 1}}',  # JSON on a Sparkplug topic
        b"hello world",
        b"\xff\xff\xff",
        bytes(range(256)),
        encode_dbirth([("power_kw", 1, 1.0)], TS, 1)[:-3],  # truncated
    ],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(SparkplugError, match="not a Sparkplug B payload"):
        decode_payload(data)


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    # Valid wire format, but proto2 parsers do not check that strings are UTF-8.
    payload = pb.Payload(timestamp=TS, seq=1)
    payload.metrics.add(name="power_kw", datatype=pb.DataType.Double, double_value=1.0)
    raw = payload.SerializeToString().replace(b"power_kw", b"power\xffkw")
    (metric,) = decode_payload(raw).metrics
    assert (metric.name, metric.value) == ("power\ufffdkw", 1.0)
