"""Sparkplug B 3.0 topics and payloads, the third ingest form of the wire contract.

Group id = tenant, edge node id = gateway. Pure functions over the generated protobuf module: the
simulator encodes with them, the collector decodes with them; neither the MQTT session (bdSeq, seq
tracking, rebirth requests) nor the mapping to canonical metrics lives here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from google.protobuf.message import DecodeError

from meterflow.contract import DEVICE_PATTERN, GATEWAY_PATTERN, TENANT_PATTERN
from meterflow.sparkplug import sparkplug_b_pb2 as pb

NAMESPACE: Final = "spBv1.0"

BD_SEQ_METRIC: Final = "bdSeq"
REBIRTH_METRIC: Final = "Node Control/Rebirth"

_SEQ_MODULUS: Final = 256  # seq and bdSeq both count 0..255 and wrap


class SparkplugError(ValueError):
    """Bytes that are not a usable Sparkplug B payload, or a BIRTH that contradicts itself."""


class MessageType(enum.StrEnum):
    """Verbs of the edge-node namespace ``spBv1.0/{group}/{verb}/{edge node}[/{device}]``.

    STATE is not among them: in Sparkplug 3.0 it is a host application's own topic,
    ``spBv1.0/STATE/{host id}``, with no group or edge node, so it never carries gateway data.
    """

    NBIRTH = "NBIRTH"
    NDATA = "NDATA"
    NDEATH = "NDEATH"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDATA = "DDATA"
    DDEATH = "DDEATH"
    DCMD = "DCMD"

    @property
    def is_device(self) -> bool:
        """Device verbs need a device id in the topic; node verbs must not have one."""
        return self.value.startswith("D")


@dataclass(frozen=True, slots=True)
class SparkplugTopic:
    group: str  # tenant
    message_type: MessageType
    edge_node: str  # gateway
    device: str | None  # set exactly for the device verbs


# fullmatch: with match(), "$" would also accept an id followed by a newline.
_TENANT_RE: Final = re.compile(TENANT_PATTERN)
_GATEWAY_RE: Final = re.compile(GATEWAY_PATTERN)
_DEVICE_RE: Final = re.compile(DEVICE_PATTERN)


def _ids_valid(group: str, message_type: MessageType, edge_node: str, device: str | None) -> bool:
    if not _TENANT_RE.fullmatch(group) or not _GATEWAY_RE.fullmatch(edge_node):
        return False
    if message_type.is_device:
        return device is not None and _DEVICE_RE.fullmatch(device) is not None
    return device is None


def parse_topic(topic: str) -> SparkplugTopic | None:
    """Parse a Sparkplug B edge-node topic; None when it is not one whose ids meterflow accepts."""
    parts = topic.split("/")
    if len(parts) not in (4, 5) or parts[0] != NAMESPACE:
        return None
    try:
        message_type = MessageType(parts[2])
    except ValueError:
        return None
    group, edge_node = parts[1], parts[3]
    device = parts[4] if len(parts) == 5 else None
    if not _ids_valid(group, message_type, edge_node, device):
        return None
    return SparkplugTopic(group=group, message_type=message_type, edge_node=edge_node, device=device)


def topic(group: str, message_type: MessageType, edge_node: str, device: str | None = None) -> str:
    """Format a topic; raises ValueError for ids the collector would refuse, so no publisher sends one."""
    if not _ids_valid(group, message_type, edge_node, device):
        raise ValueError(
            f"not a meterflow Sparkplug topic: group={group!r} type={message_type} "
            f"edge_node={edge_node!r} device={device!r}"
        )
    tail = f"/{device}" if device is not None else ""
    return f"{NAMESPACE}/{group}/{message_type}/{edge_node}{tail}"


def next_seq(seq: int) -> int:
    """The seq (or bdSeq) that follows ``seq``: 255 wraps to 0."""
    _check_seq(seq)
    return (seq + 1) % _SEQ_MODULUS


def _check_seq(seq: int) -> None:
    if not 0 <= seq < _SEQ_MODULUS:
        raise ValueError(f"Sparkplug sequence numbers are 0..255, got {seq}")


# --- encoding ------------------------------------------------------------------------------------


def _payload(ts_ms: int, seq: int | None) -> pb.Payload:
    payload = pb.Payload(timestamp=ts_ms)
    if seq is not None:
        _check_seq(seq)
        payload.seq = seq
    return payload


def _add_bd_seq(payload: pb.Payload, bd_seq: int, ts_ms: int) -> None:
    _check_seq(bd_seq)
    payload.metrics.add(name=BD_SEQ_METRIC, timestamp=ts_ms, datatype=pb.DataType.Int64, long_value=bd_seq)


def encode_nbirth(bd_seq: int, ts_ms: int, seq: int = 0) -> bytes:
    """NBIRTH: bdSeq (matching the NDEATH registered as will) and the mandatory rebirth control."""
    payload = _payload(ts_ms, seq)
    _add_bd_seq(payload, bd_seq, ts_ms)
    payload.metrics.add(
        name=REBIRTH_METRIC, timestamp=ts_ms, datatype=pb.DataType.Boolean, boolean_value=False
    )
    return payload.SerializeToString()


def encode_ndeath(bd_seq: int, ts_ms: int) -> bytes:
    """NDEATH for the MQTT will: only bdSeq, and no seq, which the broker could not keep current."""
    payload = _payload(ts_ms, None)
    _add_bd_seq(payload, bd_seq, ts_ms)
    return payload.SerializeToString()


def encode_dbirth(metrics: Sequence[tuple[str, int, float]], ts_ms: int, seq: int) -> bytes:
    """DBIRTH declaring ``(name, alias, value)`` Double metrics.

    Sparkplug wants aliases unique across the whole edge node, not just the device.
    """
    payload = _payload(ts_ms, seq)
    for name, alias, value in metrics:
        payload.metrics.add(
            name=name, alias=alias, timestamp=ts_ms, datatype=pb.DataType.Double, double_value=value
        )
    return payload.SerializeToString()


def encode_ddata(
    points: Sequence[tuple[int | str, int, float]], ts_ms: int, seq: int, *, is_historical: bool = False
) -> bytes:
    """DDATA with ``(alias or name, ts_ms, value)`` Double points.

    An int key is an alias declared in DBIRTH (the metric then carries no name, as the spec requires);
    a str key is a metric name, for devices that do not use aliases. Several points of one metric with
    different timestamps are store-and-forward history; ``is_historical`` marks them as not current.
    """
    payload = _payload(ts_ms, seq)
    for key, point_ts_ms, value in points:
        metric = payload.metrics.add(timestamp=point_ts_ms, datatype=pb.DataType.Double, double_value=value)
        if isinstance(key, str):
            metric.name = key
        else:
            metric.alias = key
        if is_historical:
            metric.is_historical = True
    return payload.SerializeToString()


def encode_ddeath(ts_ms: int, seq: int) -> bytes:
    """DDEATH: the edge node reports the device offline; it still takes part in the seq count."""
    return _payload(ts_ms, seq).SerializeToString()


def encode_ncmd_rebirth(ts_ms: int) -> bytes:
    """NCMD asking an edge node to rebirth: publish NBIRTH and every DBIRTH again.

    A host application sends it when it cannot read what the node publishes (aliases it never saw
    born, a seq gap). Commands come from the host, not the node, so they carry no seq.
    """
    payload = _payload(ts_ms, None)
    payload.metrics.add(
        name=REBIRTH_METRIC, timestamp=ts_ms, datatype=pb.DataType.Boolean, boolean_value=True
    )
    return payload.SerializeToString()


# --- decoding ------------------------------------------------------------------------------------

MetricValue = float | int | bool | str | None


@dataclass(frozen=True, slots=True)
class DecodedMetric:
    name: str | None
    alias: int | None
    ts_ms: int | None
    # None when is_null, or when the datatype is one meterflow does not read (DataSet, Bytes, ...) or
    # the value does not fit it: the collector dead-letters those instead of guessing.
    value: MetricValue
    datatype: int  # a pb.DataType value; 0 (Unknown) when neither the metric nor its BIRTH gave one
    is_null: bool
    is_historical: bool


@dataclass(frozen=True, slots=True)
class DecodedPayload:
    ts_ms: int | None
    seq: int | None  # absent in NDEATH, NCMD and DCMD
    metrics: tuple[DecodedMetric, ...]


class AliasTable:
    """Names and datatypes a BIRTH declared, to read the DATA messages that follow it.

    DATA metrics may carry only an alias, and only BIRTH must carry a datatype. Sparkplug makes
    aliases unique per edge node, so one table may serve a node and all its devices.
    """

    def __init__(self, birth_metrics: Iterable[DecodedMetric]) -> None:
        self._names: dict[int, str] = {}
        self._datatypes: dict[str, int] = {}
        for metric in birth_metrics:
            if metric.name is None:
                raise SparkplugError(f"BIRTH metric with alias {metric.alias} has no name")
            self._datatypes[metric.name] = metric.datatype
            if metric.alias is None:
                continue
            known = self._names.setdefault(metric.alias, metric.name)
            if known != metric.name:
                # DATA carrying this alias would be ambiguous.
                raise SparkplugError(f"BIRTH declares alias {metric.alias} for {known!r} and {metric.name!r}")

    def __len__(self) -> int:
        """The metrics the BIRTH declared: what the table holds in memory."""
        return len(self._datatypes)

    def resolve(self, metric: DecodedMetric) -> str | None:
        """The metric's name: its own, else the one its alias was born with; None when unknown."""
        return self._name(metric.name, metric.alias)

    def datatype(self, name: str | None, alias: int | None) -> int:
        """The datatype BIRTH declared for the metric with this name or alias; 0 (Unknown) if none."""
        born_as = self._name(name, alias)
        return pb.DataType.Unknown if born_as is None else self._datatypes.get(born_as, pb.DataType.Unknown)

    def _name(self, name: str | None, alias: int | None) -> str | None:
        if name is not None:
            return name
        return None if alias is None else self._names.get(alias)


# Signed integers travel as two's complement in the unsigned int_value (32-bit) or long_value (64-bit).
# Encoders disagree on the width: Eclipse Tahu's Python client wraps at the type's (Int8 -1 -> 0xFF),
# a signed integer widened before it is set wraps at the field's (Int8 -1 -> 0xFFFFFFFF); both decode.
# Either field is read for any integer type, so a 32-bit value sent in long_value still decodes.
_SIGNED_BITS: Final[dict[int, int]] = {
    pb.DataType.Int8: 8,
    pb.DataType.Int16: 16,
    pb.DataType.Int32: 32,
    pb.DataType.Int64: 64,
}
_UNSIGNED_BITS: Final[dict[int, int]] = {
    pb.DataType.UInt8: 8,
    pb.DataType.UInt16: 16,
    pb.DataType.UInt32: 32,
    pb.DataType.UInt64: 64,
}
_FIELD_BITS: Final = {"int_value": 32, "long_value": 64}
_TEXT_TYPES: Final = frozenset({pb.DataType.String, pb.DataType.Text})


def _signed(raw: int, bits: int, field_bits: int) -> int | None:
    sign = 1 << (bits - 1)
    if raw < 1 << bits:
        return raw - (1 << bits) if raw & sign else raw
    if raw >= (1 << field_bits) - sign:
        return raw - (1 << field_bits)
    return None  # neither encoding of a value of this width


def _value(metric: pb.Payload.Metric, datatype: int) -> MetricValue:
    field = metric.WhichOneof("value")
    if field in _FIELD_BITS:
        raw: int = getattr(metric, field)
        if datatype in _SIGNED_BITS:
            return _signed(raw, _SIGNED_BITS[datatype], _FIELD_BITS[field])
        if datatype in _UNSIGNED_BITS:
            return raw if raw < 1 << _UNSIGNED_BITS[datatype] else None
    elif field == "double_value" and datatype == pb.DataType.Double:
        return metric.double_value
    elif field == "float_value" and datatype == pb.DataType.Float:
        # The shortest decimal that is the same float32: a gateway's 12.1 is stored as 12.1,
        # not as the float32's exact 12.100000381469727.
        return float(str(np.float32(metric.float_value)))
    elif field == "boolean_value" and datatype == pb.DataType.Boolean:
        return metric.boolean_value
    elif field == "string_value" and datatype in _TEXT_TYPES:
        return _text(metric.string_value)
    return None


def _text(value: str) -> str:
    # proto2 does not validate UTF-8 on parse, and upb then hands back bytes despite the declared str.
    # Replacing keeps the rest of the payload: the collector dead-letters the metric by its odd name.
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def decode_payload(data: bytes, births: AliasTable | None = None) -> DecodedPayload:
    """Decode a Sparkplug B payload.

    ``births``, the table of the device's (or node's) last BIRTH, supplies datatypes DATA metrics
    leave out; without it such metrics decode with datatype 0 and value None.
    """
    try:
        payload = pb.Payload.FromString(data)
    except DecodeError as exc:
        raise SparkplugError(f"not a Sparkplug B payload ({len(data)} bytes): {exc}") from exc
    metrics = []
    for metric in payload.metrics:
        name = _text(metric.name) if metric.HasField("name") else None
        alias = metric.alias if metric.HasField("alias") else None
        datatype = metric.datatype
        if datatype == pb.DataType.Unknown and births is not None:
            datatype = births.datatype(name, alias)
        metrics.append(
            DecodedMetric(
                name=name,
                alias=alias,
                ts_ms=metric.timestamp if metric.HasField("timestamp") else None,
                value=None if metric.is_null else _value(metric, datatype),
                datatype=datatype,
                is_null=metric.is_null,
                is_historical=metric.is_historical,
            )
        )
    return DecodedPayload(
        ts_ms=payload.timestamp if payload.HasField("timestamp") else None,
        seq=payload.seq if payload.HasField("seq") else None,
        metrics=tuple(metrics),
    )
