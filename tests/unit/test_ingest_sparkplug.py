from __future__ import annotations

import math

import pytest

from ingest.payloads import Limits, Rejection
from ingest.sparkplug import REBIRTH_INTERVAL_MS, SparkplugResult, SparkplugSessions
from meterflow.contract import DeadLetterReason, DeviceReadings, Reading
from meterflow.sparkplug import (
    REBIRTH_METRIC,
    MessageType,
    SparkplugTopic,
    decode_payload,
    encode_dbirth,
    encode_ddata,
    encode_ddeath,
    encode_nbirth,
    encode_ndeath,
    parse_topic,
    topic,
)
from meterflow.sparkplug import sparkplug_b_pb2 as pb
from simulators.encoding import GatewayEncoder
from simulators.engine import Batch, DevicePoint

TS = 1763712000000
MINUTE = 60_000
SKEW = 300_000
LIMITS = Limits(max_payload_bytes=4096, max_future_skew_ms=SKEW)
TENANT, GW, DEV = "acme", "gw-1", "m-1"
NCMD_TOPIC = f"spBv1.0/{TENANT}/NCMD/{GW}"
BIRTH = [("energy_import_kwh", 1, 100.0), ("power_kw", 2, 5.0)]

Row = tuple[str, int, str, float]


def _send(
    sessions: SparkplugSessions,
    kind: MessageType,
    payload: bytes,
    device: str | None = None,
    *,
    received_ms: int = TS,
) -> SparkplugResult:
    if kind.is_device and device is None:
        device = DEV
    parsed = parse_topic(topic(TENANT, kind, GW, device))
    assert parsed is not None
    return sessions.handle(parsed, payload, received_ms=received_ms, limits=LIMITS)


def _rows(result: SparkplugResult) -> list[Row]:
    return [(d.device, r.ts_ms, r.metric, r.value) for d in result.accepted for r in d.readings]


def _reasons(result: SparkplugResult) -> list[tuple[DeadLetterReason, str, str | None]]:
    return [(r.reason, r.detail, r.device) for r in result.rejected]


def _metric(**fields: object) -> pb.Payload.Metric:
    return pb.Payload.Metric(**fields)  # type: ignore[arg-type]


def _raw(*metrics: pb.Payload.Metric, ts_ms: int | None = TS, seq: int | None = 2) -> bytes:
    """A payload built field by field, for what the codec's encoders never produce."""
    payload = pb.Payload(metrics=list(metrics))
    if ts_ms is not None:
        payload.timestamp = ts_ms
    if seq is not None:
        payload.seq = seq
    return payload.SerializeToString()


def _born(*, track_seq: bool = True, bd_seq: int = 0) -> SparkplugSessions:
    """Sessions that have seen the node's NBIRTH (seq 0) and DEV's DBIRTH (seq 1) with BIRTH's aliases."""
    sessions = SparkplugSessions(track_seq=track_seq)
    _send(sessions, MessageType.NBIRTH, encode_nbirth(bd_seq, TS, seq=0))
    _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1))
    return sessions


def _assert_rebirth_request(result: SparkplugResult, received_ms: int = TS) -> None:
    assert result.rebirth is not None
    ncmd_topic, payload = result.rebirth
    assert ncmd_topic == NCMD_TOPIC
    decoded = decode_payload(payload)
    assert decoded.ts_ms == received_ms
    assert [(m.name, m.value) for m in decoded.metrics] == [(REBIRTH_METRIC, True)]


# --- births and aliases ----------------------------------------------------------------------------


def test_births_then_aliased_data() -> None:
    sessions = SparkplugSessions()
    nbirth = _send(sessions, MessageType.NBIRTH, encode_nbirth(bd_seq=3, ts_ms=TS, seq=0))
    # bdSeq and Node Control/Rebirth are protocol metadata: neither readings nor rejections.
    assert nbirth == SparkplugResult()
    assert sessions.is_online(TENANT, GW)

    dbirth = _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1), received_ms=TS + 1)
    assert dbirth.accepted == [
        DeviceReadings(
            TENANT,
            GW,
            DEV,
            TS + 1,
            (Reading(TS, "energy_import_kwh", 100.0), Reading(TS, "power_kw", 5.0)),
        )
    ]
    assert (dbirth.rejected, dbirth.rebirth, dbirth.offline) == ([], None, [])

    points: list[tuple[int | str, int, float]] = [
        (1, TS + MINUTE, 101.0),
        (2, TS + MINUTE, 6.0),
        (1, TS + 2 * MINUTE, 102.5),
    ]
    ddata = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=2), received_ms=TS + 3 * MINUTE)
    # Several readings of one device in one message: one DeviceReadings, as in the JSON forms.
    assert len(ddata.accepted) == 1
    assert _rows(ddata) == [
        (DEV, TS + MINUTE, "energy_import_kwh", 101.0),
        (DEV, TS + MINUTE, "power_kw", 6.0),
        (DEV, TS + 2 * MINUTE, "energy_import_kwh", 102.5),
    ]
    assert (ddata.rejected, ddata.rebirth, sessions.seq_gaps) == ([], None, 0)


def test_aliases_are_per_device() -> None:
    sessions = _born()
    _send(sessions, MessageType.DBIRTH, encode_dbirth([("soc_pct", 1, 50.0)], TS, seq=2), "bat-7")
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 51.0)], TS, seq=3), "bat-7")
    assert _rows(result) == [("bat-7", TS, "soc_pct", 51.0)]
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 101.0)], TS, seq=4))
    assert _rows(result) == [(DEV, TS, "energy_import_kwh", 101.0)]


def test_named_metrics_and_history_are_accepted_alongside_aliases() -> None:
    sessions = _born()
    points: list[tuple[int | str, int, float]] = [(2, TS - MINUTE, 4.0), ("soc_pct", TS - MINUTE, 60.0)]
    result = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=2, is_historical=True))
    assert _rows(result) == [(DEV, TS - MINUTE, "power_kw", 4.0), (DEV, TS - MINUTE, "soc_pct", 60.0)]
    assert result.rejected == []


def test_data_without_datatype_takes_it_from_the_birth() -> None:
    sessions = SparkplugSessions()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    birth = _raw(_metric(name="power_kw", alias=5, datatype=pb.DataType.Int16, int_value=3), seq=1)
    assert _rows(_send(sessions, MessageType.DBIRTH, birth)) == [(DEV, TS, "power_kw", 3.0)]
    # Int16 -1 as the type's two's complement, with only the alias and no datatype.
    result = _send(sessions, MessageType.DDATA, _raw(_metric(alias=5, int_value=0xFFFF), seq=2))
    assert _rows(result) == [(DEV, TS, "power_kw", -1.0)]


def test_new_dbirth_replaces_the_devices_aliases() -> None:
    sessions = _born()
    _send(sessions, MessageType.DBIRTH, encode_dbirth([("power_kw", 1, 7.0)], TS, seq=2))
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 8.0), (2, TS, 9.0)], TS, seq=3))
    assert _rows(result) == [(DEV, TS, "power_kw", 8.0)]
    assert _reasons(result) == [
        (DeadLetterReason.SCHEMA, "alias 2 not declared in the birth certificate", DEV)
    ]
    _assert_rebirth_request(result)


def test_birth_with_contradicting_aliases_is_refused_whole() -> None:
    sessions = _born()
    bad = encode_dbirth([("power_kw", 1, 7.0), ("soc_pct", 1, 50.0)], TS, seq=2)
    result = _send(sessions, MessageType.DBIRTH, bad)
    assert result.accepted == []
    ((reason, detail, device),) = _reasons(result)
    assert (reason, device) == (DeadLetterReason.SCHEMA, DEV)
    assert detail.startswith("unusable birth certificate: ") and "alias 1" in detail
    # The aliases of the DBIRTH before it are gone too: the device has declared itself anew.
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 8.0)], TS, seq=3))
    assert _reasons(result) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]


def test_protocol_metadata_in_births_is_skipped_silently() -> None:
    sessions = SparkplugSessions()
    nbirth = _raw(
        _metric(name="bdSeq", datatype=pb.DataType.Int64, long_value=0),
        _metric(name=REBIRTH_METRIC, datatype=pb.DataType.Boolean, boolean_value=False),
        _metric(name="Node Control/Reboot", datatype=pb.DataType.Boolean, boolean_value=False),
        _metric(name="Properties/Hardware Make", datatype=pb.DataType.String, string_value="acme"),
        _metric(name="Properties/Uptime", datatype=pb.DataType.Double, double_value=12.0),
        seq=0,
    )
    assert _send(sessions, MessageType.NBIRTH, nbirth) == SparkplugResult()


def test_null_in_birth_declares_a_metric_without_a_reading() -> None:
    sessions = SparkplugSessions()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    birth = _raw(
        _metric(name="power_kw", alias=1, datatype=pb.DataType.Double, is_null=True),
        _metric(name="soc_pct", alias=2, datatype=pb.DataType.Double, double_value=55.0),
        seq=1,
    )
    result = _send(sessions, MessageType.DBIRTH, birth)
    assert (_rows(result), result.rejected) == ([(DEV, TS, "soc_pct", 55.0)], [])
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 3.0)], TS, seq=2))
    assert _rows(result) == [(DEV, TS, "power_kw", 3.0)]


def test_node_level_birth_and_data_belong_to_the_edge_node_as_device() -> None:
    sessions = SparkplugSessions()
    nbirth = _raw(
        _metric(name="bdSeq", datatype=pb.DataType.Int64, long_value=0),
        _metric(name=REBIRTH_METRIC, datatype=pb.DataType.Boolean, boolean_value=False),
        _metric(name="power_kw", alias=1, datatype=pb.DataType.Float, float_value=12.1),
        seq=0,
    )
    assert _rows(_send(sessions, MessageType.NBIRTH, nbirth)) == [(GW, TS, "power_kw", 12.1)]
    ndata = _raw(_metric(alias=1, timestamp=TS + MINUTE, float_value=13.5), seq=1)
    result = _send(sessions, MessageType.NDATA, ndata)
    assert result.accepted == [DeviceReadings(TENANT, GW, GW, TS, (Reading(TS + MINUTE, "power_kw", 13.5),))]
    # Node aliases do not serve devices: DDATA resolves only through its own DBIRTH.
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=2))
    assert _reasons(result) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]


# --- data before birth, rebirth requests ------------------------------------------------------------


def test_data_before_any_birth_rejects_aliases_and_requests_one_rebirth() -> None:
    sessions = SparkplugSessions()
    points: list[tuple[int | str, int, float]] = [(1, TS, 101.0), (2, TS, 6.0), ("soc_pct", TS, 60.0)]
    first = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=7))
    assert _rows(first) == [(DEV, TS, "soc_pct", 60.0)]
    assert _reasons(first) == [
        (DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV),
        (DeadLetterReason.SCHEMA, "alias 2 without a birth certificate", DEV),
    ]
    _assert_rebirth_request(first)
    assert not sessions.is_online(TENANT, GW)

    # Not asked again while the request may still be answered...
    again = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=8), received_ms=TS + 10_000)
    assert len(again.rejected) == 2
    assert again.rebirth is None
    node_level = _send(
        sessions, MessageType.NDATA, encode_ddata([("power_kw", TS, 1.0)], TS, seq=9), received_ms=TS + 20_000
    )
    assert (_rows(node_level), node_level.rebirth) == ([(GW, TS, "power_kw", 1.0)], None)
    # ...but again once the interval has passed without a birth.
    later = TS + REBIRTH_INTERVAL_MS
    _assert_rebirth_request(
        _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=10), received_ms=later), later
    )


def test_named_data_from_an_unborn_node_is_accepted_and_still_asks_for_a_birth() -> None:
    sessions = SparkplugSessions()
    result = _send(sessions, MessageType.DDATA, encode_ddata([("power_kw", TS, 2.0)], TS, seq=0))
    assert (_rows(result), result.rejected) == ([(DEV, TS, "power_kw", 2.0)], [])
    _assert_rebirth_request(result)


def test_nbirth_clears_the_rebirth_throttle() -> None:
    sessions = SparkplugSessions()
    _assert_rebirth_request(_send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=5)))
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0), received_ms=TS + 1_000)
    # Born, but DEV has not sent its DBIRTH: the alias is still unknown, and asking is allowed again.
    result = _send(
        sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=1), received_ms=TS + 2_000
    )
    assert _reasons(result) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]
    _assert_rebirth_request(result, TS + 2_000)


def test_one_rebirth_request_per_message() -> None:
    sessions = _born()
    # A seq gap and two unknown aliases in one message.
    result = _send(sessions, MessageType.DDATA, encode_ddata([(8, TS, 1.0), (9, TS, 2.0)], TS, seq=5))
    assert len(result.rejected) == 2
    _assert_rebirth_request(result)
    assert sessions.seq_gaps == 1


def test_metric_without_name_or_alias_is_refused_without_rebirth() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDATA, _raw(_metric(datatype=pb.DataType.Double, double_value=1.0)))
    assert _reasons(result) == [(DeadLetterReason.SCHEMA, "metric without name or alias", DEV)]
    assert result.rebirth is None


# --- seq -----------------------------------------------------------------------------------------------


def test_seq_gap_is_counted_and_requests_rebirth_but_data_is_kept() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDATA, encode_ddata([(2, TS, 6.0)], TS, seq=3))  # 2 was lost
    assert _rows(result) == [(DEV, TS, "power_kw", 6.0)]
    assert result.rejected == []
    _assert_rebirth_request(result)
    assert sessions.seq_gaps == 1
    # Counting resumes from the seq received.
    result = _send(sessions, MessageType.DDATA, encode_ddata([(2, TS, 7.0)], TS, seq=4))
    assert (result.rebirth, sessions.seq_gaps) == (None, 1)


def test_seq_gap_is_ignored_without_seq_tracking() -> None:
    sessions = _born(track_seq=False)
    for seq in (9, 3, 3):
        result = _send(sessions, MessageType.DDATA, encode_ddata([(2, TS, 6.0)], TS, seq=seq))
        assert (_rows(result), result.rebirth) == ([(DEV, TS, "power_kw", 6.0)], None)
    assert sessions.seq_gaps == 0


def test_seq_wraps_after_255_and_every_node_message_counts() -> None:
    sessions = SparkplugSessions()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=253))
    _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=254))
    _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=255))
    _send(sessions, MessageType.DDEATH, encode_ddeath(TS, seq=0))
    _send(sessions, MessageType.NDATA, encode_ddata([("power_kw", TS, 1.0)], TS, seq=1))
    assert sessions.seq_gaps == 0
    _send(sessions, MessageType.NDATA, encode_ddata([("power_kw", TS, 1.0)], TS, seq=1))  # repeated
    assert sessions.seq_gaps == 1


def test_nbirth_restarts_seq_counting() -> None:
    sessions = _born()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(1, TS, seq=0))
    _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1))
    assert sessions.seq_gaps == 0


# --- deaths --------------------------------------------------------------------------------------------


def test_current_ndeath_takes_the_node_offline_and_ends_its_aliases() -> None:
    sessions = _born(bd_seq=4)
    result = _send(sessions, MessageType.NDEATH, encode_ndeath(4, TS))
    assert result == SparkplugResult(offline=[(TENANT, GW, None)])
    assert not sessions.is_online(TENANT, GW)
    after = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=2))
    assert _reasons(after) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]
    _assert_rebirth_request(after)


def test_stale_ndeath_is_ignored() -> None:
    # The node reconnected (bdSeq 5); the broker publishes the will of the old connection late.
    sessions = _born(bd_seq=4)
    _send(sessions, MessageType.NBIRTH, encode_nbirth(5, TS, seq=0))
    _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1))
    assert _send(sessions, MessageType.NDEATH, encode_ndeath(4, TS)) == SparkplugResult()
    assert sessions.is_online(TENANT, GW)
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=2))
    assert (_rows(result), result.rebirth) == ([(DEV, TS, "energy_import_kwh", 1.0)], None)


def test_ndeath_of_a_node_never_born_here_is_believed() -> None:
    sessions = SparkplugSessions()
    assert _send(sessions, MessageType.NDEATH, encode_ndeath(9, TS)).offline == [(TENANT, GW, None)]


def test_ddeath_takes_the_device_offline_and_ends_its_aliases() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDEATH, encode_ddeath(TS, seq=2))
    assert result == SparkplugResult(offline=[(TENANT, GW, DEV)])
    assert sessions.is_online(TENANT, GW)
    after = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=3))
    assert _reasons(after) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]
    _assert_rebirth_request(after)


# --- values and timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_values_are_refused_one_by_one(value: float) -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 101.0), (2, TS, value)], TS, seq=2))
    assert _rows(result) == [(DEV, TS, "energy_import_kwh", 101.0)]
    assert _reasons(result) == [(DeadLetterReason.NON_FINITE, f"power_kw={value}", DEV)]


def test_future_timestamps_are_refused_per_point() -> None:
    sessions = _born()
    horizon = TS + SKEW
    points: list[tuple[int | str, int, float]] = [
        (1, horizon, 101.0),
        (1, horizon + 1, 102.0),
        (2, horizon + 1, 6.0),
    ]
    result = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=2))
    assert _rows(result) == [(DEV, horizon, "energy_import_kwh", 101.0)]
    assert _reasons(result) == [
        (
            DeadLetterReason.FUTURE_TS,
            f"energy_import_kwh: ts {horizon + 1} is beyond receive time + skew",
            DEV,
        ),
        (DeadLetterReason.FUTURE_TS, f"power_kw: ts {horizon + 1} is beyond receive time + skew", DEV),
    ]


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({"datatype": pb.DataType.Double, "double_value": 1e308}, 1e308),
        ({"datatype": pb.DataType.Double, "double_value": -1e308}, -1e308),
        ({"datatype": pb.DataType.Float, "float_value": 1.2e29}, 1.2e29),
        ({"datatype": pb.DataType.UInt64, "long_value": 2**64 - 1}, float(2**64 - 1)),
    ],
)
def test_extreme_values_are_out_of_range_per_metric(fields: dict[str, object], value: float) -> None:
    sessions = _born()
    result = _send(
        sessions,
        MessageType.DDATA,
        _raw(
            _metric(name="energy_import_kwh", timestamp=TS, datatype=pb.DataType.Double, double_value=101.0),
            _metric(name="power_kw", timestamp=TS, **fields),
        ),
    )
    assert _rows(result) == [(DEV, TS, "energy_import_kwh", 101.0)]
    assert [(r.reason, r.device, r.point, r.metric) for r in result.rejected] == [
        (DeadLetterReason.OUT_OF_RANGE, DEV, 1, "power_kw")
    ]
    assert math.isclose(float(result.rejected[0].detail.split("=")[1].split()[0]), value, rel_tol=1e-6)


def test_timestamps_before_the_floor_are_refused_per_metric() -> None:
    sessions = _born()
    points: list[tuple[int | str, int, float]] = [(1, 0, 100.0), (1, 946_684_799_999, 100.5), (2, TS, 6.0)]
    result = _send(sessions, MessageType.DDATA, encode_ddata(points, TS, seq=2))
    assert _rows(result) == [(DEV, TS, "power_kw", 6.0)]
    assert [(r.reason, r.point) for r in result.rejected] == [
        (DeadLetterReason.PAST_TS, 0),
        (DeadLetterReason.PAST_TS, 1),
    ]


@pytest.mark.parametrize("kind", [MessageType.DDATA, MessageType.NDATA])
def test_data_without_metrics_is_refused_as_empty(kind: MessageType) -> None:
    sessions = _born()
    result = _send(sessions, kind, _raw())
    assert result.accepted == []
    assert [r.reason for r in result.rejected] == [DeadLetterReason.EMPTY]


def test_births_without_readings_are_not_empty() -> None:
    sessions = SparkplugSessions()
    result = _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    assert (result.accepted, result.rejected) == ([], [])


def test_future_birth_values_are_refused_too() -> None:
    sessions = SparkplugSessions()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    result = _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS + SKEW + 1, seq=1))
    assert [r.reason for r in result.rejected] == [DeadLetterReason.FUTURE_TS] * 2
    # The aliases still count: only the values were refused.
    result = _send(sessions, MessageType.DDATA, encode_ddata([(2, TS, 6.0)], TS, seq=2))
    assert _rows(result) == [(DEV, TS, "power_kw", 6.0)]


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"datatype": pb.DataType.Boolean, "boolean_value": True}, "x: datatype Boolean is not a number"),
        ({"datatype": pb.DataType.String, "string_value": "1.5"}, "x: datatype String is not a number"),
        ({"datatype": pb.DataType.DateTime, "long_value": TS}, "x: datatype DateTime is not a number"),
        ({"datatype": pb.DataType.Bytes, "bytes_value": b"\x01"}, "x: datatype Bytes is not a number"),
        ({"datatype": 99, "double_value": 1.0}, "x: datatype 99 is not a number"),
        ({"datatype": pb.DataType.Double, "string_value": "1.0"}, "x: value does not fit datatype Double"),
        ({"datatype": pb.DataType.Double, "is_null": True}, "x: null value"),
    ],
)
def test_values_that_are_not_numbers_are_schema_errors(fields: dict[str, object], detail: str) -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDATA, _raw(_metric(name="x", timestamp=TS, **fields)))
    assert (result.accepted, _reasons(result)) == ([], [(DeadLetterReason.SCHEMA, detail, DEV)])


def test_non_numeric_birth_values_are_schema_errors_too() -> None:
    sessions = SparkplugSessions()
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    birth = _raw(
        _metric(name="relay_closed", alias=1, datatype=pb.DataType.Boolean, boolean_value=True),
        _metric(name="power_kw", alias=2, datatype=pb.DataType.Double, double_value=5.0),
        seq=1,
    )
    result = _send(sessions, MessageType.DBIRTH, birth)
    assert _rows(result) == [(DEV, TS, "power_kw", 5.0)]
    assert _reasons(result) == [
        (DeadLetterReason.SCHEMA, "relay_closed: datatype Boolean is not a number", DEV)
    ]


@pytest.mark.parametrize(
    ("int_fields", "expected"),
    [
        ({"datatype": pb.DataType.Int32, "int_value": 0xFFFFFFFE}, -2.0),
        ({"datatype": pb.DataType.UInt64, "long_value": 2**40}, float(2**40)),
    ],
)
def test_integer_values_become_floats(int_fields: dict[str, object], expected: float) -> None:
    sessions = _born()
    # Not a canonical metric: 2**40 is beyond any plausible power or register.
    metric = _metric(name="vendor_count", timestamp=TS, **int_fields)
    result = _send(sessions, MessageType.DDATA, _raw(metric))
    assert _rows(result) == [(DEV, TS, "vendor_count", expected)]
    assert type(result.accepted[0].readings[0].value) is float


def test_missing_metric_timestamp_falls_back_to_the_payload_timestamp() -> None:
    sessions = _born()
    metric = _metric(name="power_kw", datatype=pb.DataType.Double, double_value=3.0)
    assert _rows(_send(sessions, MessageType.DDATA, _raw(metric, ts_ms=TS - MINUTE))) == [
        (DEV, TS - MINUTE, "power_kw", 3.0)
    ]
    result = _send(sessions, MessageType.DDATA, _raw(metric, ts_ms=None, seq=3))
    assert (result.accepted, _reasons(result)) == (
        [],
        [(DeadLetterReason.SCHEMA, "power_kw: no timestamp in the metric or the payload", DEV)],
    )


# --- unreadable payloads and topics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", [MessageType.NBIRTH, MessageType.DBIRTH, MessageType.DDATA, MessageType.NDATA, MessageType.NDEATH]
)
def test_garbage_is_a_schema_error(kind: MessageType) -> None:
    sessions = _born()
    result = _send(sessions, kind, b'{"ts": 1763712000000, "values": {"power_kw": 1}}')
    device = DEV if kind.is_device else GW
    ((reason, detail, rejected_device),) = _reasons(result)
    assert (reason, rejected_device) == (DeadLetterReason.SCHEMA, device)
    assert detail.startswith("not a Sparkplug B payload")
    assert (result.accepted, result.offline) == ([], [])


def test_oversize_is_refused_before_decoding() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDATA, b"\xff" * (LIMITS.max_payload_bytes + 1))
    assert _reasons(result) == [
        (DeadLetterReason.TOO_LARGE, f"{LIMITS.max_payload_bytes + 1} bytes > limit 4096", DEV)
    ]


def test_unreadable_nbirth_ends_the_previous_session() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.NBIRTH, b"\xff\xff")
    assert [r.reason for r in result.rejected] == [DeadLetterReason.SCHEMA]
    assert not sessions.is_online(TENANT, GW)
    after = _send(sessions, MessageType.DDATA, encode_ddata([(1, TS, 1.0)], TS, seq=2))
    assert _reasons(after) == [(DeadLetterReason.SCHEMA, "alias 1 without a birth certificate", DEV)]
    _assert_rebirth_request(after)
    # Its bdSeq is unknown, so no NDEATH can be shown stale.
    assert _send(sessions, MessageType.NDEATH, encode_ndeath(7, TS)).offline == [(TENANT, GW, None)]


def test_unreadable_ddeath_still_takes_the_device_offline() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.DDEATH, b"\xff\xff")
    assert [r.reason for r in result.rejected] == [DeadLetterReason.SCHEMA]
    assert result.offline == [(TENANT, GW, DEV)]


def test_unreadable_ndeath_does_not_take_the_node_offline() -> None:
    sessions = _born()
    result = _send(sessions, MessageType.NDEATH, b"\xff" * (LIMITS.max_payload_bytes + 1))
    assert [r.reason for r in result.rejected] == [DeadLetterReason.TOO_LARGE]
    assert (result.offline, sessions.is_online(TENANT, GW)) == ([], True)


def test_invalid_device_id_is_a_schema_error() -> None:
    sessions = _born()
    odd = SparkplugTopic(group=TENANT, message_type=MessageType.DDATA, edge_node=GW, device="m 1")
    result = sessions.handle(odd, encode_ddata([(1, TS, 1.0)], TS, seq=2), received_ms=TS, limits=LIMITS)
    assert result == SparkplugResult(
        rejected=[Rejection(DeadLetterReason.SCHEMA, "invalid device id", "m 1")]
    )


@pytest.mark.parametrize(("kind", "device"), [(MessageType.NCMD, None), (MessageType.DCMD, DEV)])
def test_commands_are_not_telemetry(kind: MessageType, device: str | None) -> None:
    sessions = SparkplugSessions()
    rebirth = _raw(_metric(name=REBIRTH_METRIC, datatype=pb.DataType.Boolean, boolean_value=True), seq=None)
    assert _send(sessions, kind, rebirth, device) == SparkplugResult()
    assert _send(sessions, kind, b"garbage", device) == SparkplugResult()
    # Nor do they touch a node's session: its first real message still asks for a birth.
    _assert_rebirth_request(_send(sessions, MessageType.NDATA, encode_ddata([("power_kw", TS, 1.0)], TS, 0)))


# --- the simulator's Sparkplug gateways -----------------------------------------------------------


def test_simulator_publishes_read_back_to_the_batch_values() -> None:
    devices = ["m-1", "bat-7"]
    encoder = GatewayEncoder(TENANT, GW, devices, "sparkplug")
    batches = [
        Batch(
            gateway=0,
            ts_ms=TS,
            points={
                0: [
                    DevicePoint(TS, {"energy_import_kwh": 12345.67, "power_kw": 42.1}),
                    DevicePoint(TS + MINUTE, {"energy_import_kwh": 12346.37, "power_kw": 41.9}),
                ],
                1: [DevicePoint(TS, {"soc_pct": 63.2, "power_kw": -120.0})],
            },
        ),
        Batch(
            gateway=0,
            ts_ms=TS + 2 * MINUTE,
            points={
                0: [DevicePoint(TS + 2 * MINUTE, {"energy_import_kwh": 12347.0, "power_kw": 40.0})],
                1: [DevicePoint(TS + 2 * MINUTE, {"soc_pct": 63.0, "power_kw": -118.5})],
            },
        ),
    ]
    publishes = [encoder.birth(TS)]
    publishes += encoder.encode(batches[0])
    publishes += encoder.encode(batches[1], historical=True)  # store-and-forward backlog
    publishes.append(encoder.will(TS))

    sessions = SparkplugSessions()
    data_rows: list[Row] = []
    birth_rows: list[Row] = []
    offline: list[tuple[str, str, str | None]] = []
    for raw_topic, payload in publishes:
        parsed = parse_topic(raw_topic)
        assert parsed is not None
        result = sessions.handle(parsed, payload, received_ms=TS + 5 * MINUTE, limits=LIMITS)
        assert (result.rejected, result.rebirth) == ([], None)
        (data_rows if parsed.message_type is MessageType.DDATA else birth_rows).extend(_rows(result))
        offline += result.offline

    expected = [
        (devices[d], p.ts_ms, metric, value)
        for batch in batches
        for d, points in batch.points.items()
        for p in points
        for metric, value in p.values.items()
    ]
    assert sorted(data_rows) == sorted(expected)
    # A DBIRTH declares the device with its first point's values, which are readings too.
    first_points = [(devices[d], pts[0]) for d, pts in batches[0].points.items()]
    assert sorted(birth_rows) == sorted(
        (device, p.ts_ms, metric, value) for device, p in first_points for metric, value in p.values.items()
    )
    assert sessions.seq_gaps == 0
    assert offline == [(TENANT, GW, None)]
    assert not sessions.is_online(TENANT, GW)


def test_a_node_declaring_ever_new_devices_keeps_a_bounded_number_of_alias_tables() -> None:
    """The reviewer's flood: DBIRTHs for fresh device ids, each alias table kept until the node dies."""
    sessions = SparkplugSessions(track_seq=False, max_devices_per_node=5)
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    refused = []
    for i in range(50):
        result = _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1), f"fresh-{i}")
        refused += [r for r in result.rejected if r.reason is DeadLetterReason.TOO_LARGE]
    assert len(refused) == 45
    assert sum(len(node.devices) for node in sessions._nodes.values()) == 5
    # A device already born may be born again at the cap.
    again = _send(sessions, MessageType.DBIRTH, encode_dbirth(BIRTH, TS, seq=1), "fresh-0")
    assert not again.rejected and again.accepted


def test_a_node_declaring_huge_births_keeps_a_bounded_number_of_metrics() -> None:
    """The reviewer's flood with few devices: DBIRTHs of a thousand metrics each, for fresh ids. What the
    node holds stays under its metric cap; at the default cap (100,000) that is a few tens of MB."""
    import tracemalloc

    metrics = [(f"m{i}", 10 + i, 1.0) for i in range(1_000)]  # about 30 KB of Sparkplug each
    limits = Limits(max_payload_bytes=256 * 1024, max_future_skew_ms=SKEW)
    sessions = SparkplugSessions(track_seq=False, max_metrics_per_node=20_000)
    _send(sessions, MessageType.NBIRTH, encode_nbirth(0, TS, seq=0))
    tracemalloc.start()
    refused = 0
    for i in range(30):
        parsed = parse_topic(topic(TENANT, MessageType.DBIRTH, GW, f"huge-{i}"))
        assert parsed is not None
        result = sessions.handle(parsed, encode_dbirth(metrics, TS, seq=1), received_ms=TS, limits=limits)
        refused += sum(r.reason is DeadLetterReason.TOO_LARGE for r in result.rejected)
        del result
    held_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    (node,) = sessions._nodes.values()
    held = sum(map(len, node.devices.values())) + len(node.aliases or ())
    assert held <= 20_000
    # The NBIRTH's own metrics count too, so the 20th birth no longer fits.
    assert len(node.devices) == 19 and refused == 11
    assert held_bytes / held * 100_000 < 64 * 1024**2, held_bytes
