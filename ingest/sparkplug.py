"""Sparkplug B messages (contract form 3) -> canonical per-device readings: meterflow as host application.

Pure: no I/O. The collector calls ``SparkplugSessions.handle`` for every message on ``spBv1.0/...``;
the result says what goes to Kafka, what to the dead-letter topic (same ``Rejection`` and reasons as
the JSON forms in ingest.payloads), whether to publish an NCMD asking the edge node to rebirth, and
which nodes or devices went offline.

Sessions, as Sparkplug B 3.0 defines them for a host application:

- An edge node's session runs from its NBIRTH to the NDEATH carrying the same bdSeq. An NDEATH with
  another bdSeq is the MQTT will of a connection the node has already replaced (the broker publishes
  it on session takeover, possibly after the new NBIRTH), so it is ignored.
- Aliases live from a BIRTH to the next BIRTH of the same node or device, the device's DDEATH, or the
  end of the node's session (a new NBIRTH obliges the node to send every DBIRTH again). DDATA resolves
  through its device's DBIRTH, NDATA through the NBIRTH; node-level metrics belong to a "device"
  named after the edge node itself.
- A node we hold no live NBIRTH for (the collector restarted, or the node died) is asked to rebirth;
  what it sends meanwhile is read as far as possible: named metrics are accepted, bare aliases are
  dead-lettered. Rebirth requests to one node are at most one per ``REBIRTH_INTERVAL_MS`` until it
  births again, so a node that cannot help it (or ignores NCMD) is not flooded.
- A payload that cannot be read (too large, not Sparkplug B) is dead-lettered whole, but what its
  topic alone proves still counts: a BIRTH ends what the node or device declared before, a DDEATH
  takes the device offline. An NDEATH must be checked against its bdSeq, so an unreadable one does
  nothing else.

Every metric of a BIRTH or DATA message is a reading if its value is a finite number within its metric's
plausible range and its timestamp within the floor and the future skew (the contract); anything else is
dead-lettered, one rejection per metric point, except the protocol's own metadata
(``_is_protocol_metadata``) and nulls in a BIRTH, which declare a metric with no current value yet. A DATA message without metrics is refused as
`empty`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from ingest.payloads import Limits, ParseResult, Rejection
from meterflow.contract import DeadLetterReason, DeviceReadings, Reading, is_valid_device_id
from meterflow.sparkplug import (
    BD_SEQ_METRIC,
    AliasTable,
    DecodedMetric,
    DecodedPayload,
    MessageType,
    SparkplugError,
    SparkplugTopic,
    decode_payload,
    encode_ncmd_rebirth,
    next_seq,
    topic,
)
from meterflow.sparkplug import sparkplug_b_pb2 as pb

REBIRTH_INTERVAL_MS: Final = 30_000

# Commands are published by host applications (meterflow among them), never by the edge node.
_COMMANDS: Final = frozenset({MessageType.NCMD, MessageType.DCMD})
_BIRTHS: Final = frozenset({MessageType.NBIRTH, MessageType.DBIRTH})
_NUMERIC_TYPES: Final = frozenset(
    {
        pb.DataType.Int8,
        pb.DataType.Int16,
        pb.DataType.Int32,
        pb.DataType.Int64,
        pb.DataType.UInt8,
        pb.DataType.UInt16,
        pb.DataType.UInt32,
        pb.DataType.UInt64,
        pb.DataType.Float,
        pb.DataType.Double,
    }
)


@dataclass(slots=True)
class SparkplugResult(ParseResult):
    """A ParseResult (so registry checks and Kafka writing treat all forms alike) plus session effects."""

    # (NCMD topic, payload) the collector should publish, or None.
    rebirth: tuple[str, bytes] | None = None
    # (tenant, gateway, device); device None means the edge node and with it all its devices.
    offline: list[tuple[str, str, str | None]] = field(default_factory=list)


@dataclass(slots=True)
class _Node:
    online: bool = False  # an NBIRTH read and no NDEATH of its session since
    bd_seq: int | None = None  # of the current session; None: unknown, any NDEATH counts
    last_seq: int | None = None
    aliases: AliasTable | None = None  # from NBIRTH, for NDATA
    devices: dict[str, AliasTable] = field(default_factory=dict)  # from each DBIRTH, for its DDATA
    rebirth_requested_ms: int | None = None


class SparkplugSessions:
    """Sparkplug state of every edge node this collector hears from, keyed by (tenant, gateway).

    ``track_seq=False`` is for MQTT shared subscriptions: each collector then sees only part of a
    node's messages, so gaps in seq say nothing about loss. BIRTH and DEATH topics must still reach
    every collector (subscribe to them without ``$share``): a collector that misses a DBIRTH cannot
    read the device's aliased data and keeps asking for rebirths, each answered to another collector.
    """

    def __init__(
        self,
        *,
        track_seq: bool = True,
        max_devices_per_node: int = 10_000,
        max_metrics_per_node: int = 100_000,
    ) -> None:
        self._track_seq = track_seq
        self._max_devices_per_node = max_devices_per_node
        self._max_metrics_per_node = max_metrics_per_node
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._seq_gaps = 0

    @property
    def seq_gaps(self) -> int:
        """Messages whose seq did not follow the node's previous one (counted only with track_seq)."""
        return self._seq_gaps

    def is_online(self, tenant: str, gateway: str) -> bool:
        """Whether the edge node has a live session: an NBIRTH read and no NDEATH of it since."""
        node = self._nodes.get((tenant, gateway))
        return node is not None and node.online

    def handle(
        self, topic: SparkplugTopic, payload: bytes, *, received_ms: int, limits: Limits
    ) -> SparkplugResult:
        result = SparkplugResult()
        kind = topic.message_type
        if kind in _COMMANDS:
            return result
        device = topic.device if topic.device is not None else topic.edge_node
        if not is_valid_device_id(device):
            result.rejected.append(Rejection(DeadLetterReason.SCHEMA, "invalid device id", device[:64]))
            return result
        key = (topic.group, topic.edge_node)
        if kind is MessageType.NDEATH:
            self._node_death(key, _read(payload, None, limits, device, result), result)
            return result

        node = self._nodes.setdefault(key, _Node())
        if kind is MessageType.NBIRTH:
            decoded = _read(payload, None, limits, device, result)
            self._node_birth(node, decoded, device, result)
            table = node.aliases
        else:
            if not node.online:
                self._request_rebirth(node, topic, received_ms, result)
            # DATA metrics may leave their datatype to the BIRTH that declared them.
            births = node.aliases if kind is MessageType.NDATA else node.devices.get(device)
            decoded = _read(payload, births, limits, device, result)
            if decoded is not None:
                self._check_seq(node, decoded.seq, topic, received_ms, result)
            if kind is MessageType.DBIRTH:
                # Even an unreadable DBIRTH means the device declared itself anew: the old aliases
                # might now name other metrics, so reading through them could mislabel readings.
                node.devices.pop(device, None)
                if len(node.devices) >= self._max_devices_per_node:
                    # Each birth's alias table stays until the node dies: a node declaring ever new
                    # devices would grow every collector without limit.
                    result.rejected.append(
                        Rejection(
                            DeadLetterReason.TOO_LARGE,
                            f"node already holds {len(node.devices)} device births",
                            device,
                        )
                    )
                    return result
                table = None if decoded is None else _birth_table(decoded, device, result)
                if table is not None:
                    held = sum(map(len, node.devices.values())) + len(node.aliases or ())
                    if held + len(table) > self._max_metrics_per_node:
                        # Few devices with huge births hold as much as many small ones.
                        result.rejected.append(
                            Rejection(
                                DeadLetterReason.TOO_LARGE,
                                f"node already holds {held} born metrics; this birth declares {len(table)}",
                                device,
                            )
                        )
                        return result
                    node.devices[device] = table
            elif kind is MessageType.DDEATH:
                node.devices.pop(device, None)
                result.offline.append((topic.group, topic.edge_node, device))
                return result
            else:
                table = births
        # A BIRTH whose aliases contradict each other is dead-lettered whole (_birth_table).
        if decoded is None or (kind in _BIRTHS and table is None):
            return result

        readings = self._readings(node, decoded, table, topic, device, received_ms, limits, result)
        if readings:
            result.accepted.append(
                DeviceReadings(
                    tenant=topic.group,
                    gateway=topic.edge_node,
                    device=device,
                    received_ms=received_ms,
                    readings=tuple(readings),
                )
            )
        return result

    # --- session -----------------------------------------------------------------------------------

    @staticmethod
    def _node_birth(
        node: _Node, decoded: DecodedPayload | None, device: str, result: SparkplugResult
    ) -> None:
        # Any NBIRTH, even one we cannot read, ends the node's previous session and its aliases.
        node.devices.clear()
        node.aliases = None
        if decoded is None:
            # Unknown new session: its data will ask for a rebirth, and any NDEATH may end it.
            node.online = False
            node.bd_seq = None
            node.last_seq = None
            return
        node.online = True
        node.bd_seq = _bd_seq(decoded)
        node.last_seq = _valid_seq(decoded.seq)
        node.aliases = _birth_table(decoded, device, result)
        if node.aliases is not None:
            # A usable birth answers any pending request. After an unusable one the throttle stays, or a
            # node that always births wrong would be asked again on every message.
            node.rebirth_requested_ms = None

    def _node_death(
        self, key: tuple[str, str], decoded: DecodedPayload | None, result: SparkplugResult
    ) -> None:
        if decoded is None:
            return
        node = self._nodes.get(key)
        bd_seq = _bd_seq(decoded)
        if node is not None and node.bd_seq is not None and bd_seq is not None and bd_seq != node.bd_seq:
            return  # stale: the will of a connection the node has since replaced
        # Without a bdSeq on either side the death cannot be shown stale; brokers publish a will only
        # when a connection is really lost, so believing it is the safer error (data corrects it).
        result.offline.append((key[0], key[1], None))
        if node is not None:
            node.online = False
            node.last_seq = None
            node.aliases = None
            node.devices.clear()

    def _check_seq(
        self,
        node: _Node,
        seq: int | None,
        topic: SparkplugTopic,
        received_ms: int,
        result: SparkplugResult,
    ) -> None:
        if not self._track_seq or seq is None:
            return
        expected = None if node.last_seq is None else next_seq(node.last_seq)
        node.last_seq = _valid_seq(seq)
        if expected is not None and seq != expected:
            # Messages were lost (or came out of order); one may have been a BIRTH we now lack.
            self._seq_gaps += 1
            self._request_rebirth(node, topic, received_ms, result)

    @staticmethod
    def _request_rebirth(
        node: _Node, sp_topic: SparkplugTopic, received_ms: int, result: SparkplugResult
    ) -> None:
        # Also keeps a message to one request: a second cause in it finds the request just made.
        last = node.rebirth_requested_ms
        # abs(): a wall clock stepped back must not silence the node until it catches up.
        if last is not None and abs(received_ms - last) < REBIRTH_INTERVAL_MS:
            return
        node.rebirth_requested_ms = received_ms
        result.rebirth = (
            topic(sp_topic.group, MessageType.NCMD, sp_topic.edge_node),
            encode_ncmd_rebirth(received_ms),
        )

    # --- metrics -----------------------------------------------------------------------------------

    def _readings(
        self,
        node: _Node,
        decoded: DecodedPayload,
        table: AliasTable | None,
        sp_topic: SparkplugTopic,
        device: str,
        received_ms: int,
        limits: Limits,
        result: SparkplugResult,
    ) -> list[Reading]:
        horizon = received_ms + limits.max_future_skew_ms
        is_birth = sp_topic.message_type in _BIRTHS
        if not is_birth and not decoded.metrics:
            result.rejected.append(
                Rejection(DeadLetterReason.EMPTY, "a DATA message without metrics", device)
            )
            return []
        readings: list[Reading] = []
        for index, metric in enumerate(decoded.metrics):
            name = metric.name if table is None else table.resolve(metric)
            if name is None:
                result.rejected.append(
                    Rejection(DeadLetterReason.SCHEMA, _unnamed(metric, table), device, index)
                )
                if metric.alias is not None:
                    # Only the node can say what the alias means: ask it to declare its aliases again.
                    self._request_rebirth(node, sp_topic, received_ms, result)
                continue
            if _is_protocol_metadata(name) or (is_birth and metric.is_null):
                # A BIRTH must list every metric the node will report; one without a current value
                # is sent as null, which refuses nothing (a null in DATA is refused: not a number).
                continue
            point = _reading(name, metric, decoded.ts_ms, horizon, limits, device, index)
            if isinstance(point, Rejection):
                result.rejected.append(point)
            else:
                readings.append(point)
        return readings


# --- helpers ---------------------------------------------------------------------------------------


def _read(
    payload: bytes, births: AliasTable | None, limits: Limits, device: str, result: SparkplugResult
) -> DecodedPayload | None:
    if len(payload) > limits.max_payload_bytes:
        result.rejected.append(
            Rejection(
                DeadLetterReason.TOO_LARGE, f"{len(payload)} bytes > limit {limits.max_payload_bytes}", device
            )
        )
        return None
    try:
        return decode_payload(payload, births)
    except SparkplugError as exc:
        # The codec's message already starts "not a Sparkplug B payload". No dedicated reason: the
        # dead-letter reasons are shared by all forms, and invalid_json would mislead.
        result.rejected.append(Rejection(DeadLetterReason.SCHEMA, str(exc), device))
        return None


def _birth_table(decoded: DecodedPayload, device: str, result: SparkplugResult) -> AliasTable | None:
    """The aliases a BIRTH declares; None, with the whole BIRTH dead-lettered, if they contradict."""
    try:
        return AliasTable(decoded.metrics)
    except SparkplugError as exc:
        result.rejected.append(
            Rejection(DeadLetterReason.SCHEMA, f"unusable birth certificate: {exc}", device)
        )
        return None


def _bd_seq(decoded: DecodedPayload) -> int | None:
    for metric in decoded.metrics:
        value = metric.value
        if metric.name == BD_SEQ_METRIC and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _is_protocol_metadata(name: str) -> bool:
    """Metrics Sparkplug itself defines, not measurements: skipped silently wherever they appear.

    bdSeq pairs an NBIRTH with its NDEATH, "Node Control/*" are the commands a node accepts (NBIRTH
    must list "Node Control/Rebirth", a Boolean), "Properties/*" describe the node (make, firmware).
    Canonical metric names never contain "/", so nothing a meter measures is lost.
    """
    return name == BD_SEQ_METRIC or name.startswith(("Node Control/", "Properties/"))


def _unnamed(metric: DecodedMetric, table: AliasTable | None) -> str:
    if metric.alias is None:
        return "metric without name or alias"
    if table is None:
        return f"alias {metric.alias} without a birth certificate"
    return f"alias {metric.alias} not declared in the birth certificate"


def _reading(
    name: str,
    metric: DecodedMetric,
    payload_ts_ms: int | None,
    horizon: int,
    limits: Limits,
    device: str,
    index: int,
) -> Reading | Rejection:
    """One metric point as a reading, or why not, checked in the order the JSON path checks."""
    ts_ms = metric.ts_ms if metric.ts_ms is not None else payload_ts_ms
    if ts_ms is None:
        return Rejection(
            DeadLetterReason.SCHEMA, f"{name}: no timestamp in the metric or the payload", device, index, name
        )
    if ts_ms > horizon:
        detail = f"{name}: ts {ts_ms} is beyond receive time + skew"
        return Rejection(DeadLetterReason.FUTURE_TS, detail, device, index, name)
    if ts_ms < limits.min_ts_ms:
        detail = f"{name}: ts {ts_ms} is before the timestamp floor"
        return Rejection(DeadLetterReason.PAST_TS, detail, device, index, name)
    value = metric.value
    if metric.is_null:
        return Rejection(DeadLetterReason.SCHEMA, f"{name}: null value", device, index, name)
    # bool is an int in Python, so the type check comes first: a Boolean metric is not a number.
    if isinstance(value, bool | str) or metric.datatype not in _NUMERIC_TYPES:
        detail = f"{name}: datatype {_datatype_name(metric.datatype)} is not a number"
        return Rejection(DeadLetterReason.SCHEMA, detail, device, index, name)
    if value is None:
        detail = f"{name}: value does not fit datatype {_datatype_name(metric.datatype)}"
        return Rejection(DeadLetterReason.SCHEMA, detail, device, index, name)
    fval = float(value)
    if not math.isfinite(fval):
        return Rejection(DeadLetterReason.NON_FINITE, f"{name}={value}", device, index, name)
    low, high = limits.ranges.get(name, limits.other_range)
    if not low <= fval <= high:
        detail = f"{name}={fval!r} outside [{low!r}, {high!r}]"
        return Rejection(DeadLetterReason.OUT_OF_RANGE, detail, device, index, name)
    return Reading(ts_ms, name, fval)


def _valid_seq(seq: int | None) -> int | None:
    # seq is a uint64 on the wire; one outside 0..255 cannot be followed, so it is forgotten.
    return seq if seq is not None and 0 <= seq < 256 else None


def _datatype_name(datatype: int) -> str:
    # datatype is a plain uint32 on the wire: a value outside the enum is possible.
    return (
        pb.DataType.Name(pb.DataType.ValueType(datatype))
        if datatype in pb.DataType.values()
        else str(datatype)
    )
