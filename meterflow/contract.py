"""The wire contract (../shared/contract-v1.md) and meterflow's internal Kafka record format.

Owns: identifier patterns, canonical metric names and their plausible ranges, MQTT topic shapes, the
gateway-batch payload model, the versioned Kafka record that carries readings from ingest to processing,
and the dead-letter record every stage writes. Every stage imports
from here; nothing here does I/O.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, Literal, NamedTuple

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, with_config
from typing_extensions import TypedDict

TENANT_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,62}$"
DEVICE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
GATEWAY_PATTERN: Final = DEVICE_PATTERN

TOPIC_ROOT: Final = "meterflow/v1"


class MetricKind(enum.StrEnum):
    CUMULATIVE = "cumulative"
    INSTANTANEOUS = "instantaneous"


CANONICAL_METRICS: Final[dict[str, MetricKind]] = {
    "energy_import_kwh": MetricKind.CUMULATIVE,
    "energy_export_kwh": MetricKind.CUMULATIVE,
    "power_kw": MetricKind.INSTANTANEOUS,
    "reactive_power_kvar": MetricKind.INSTANTANEOUS,
    "gas_nm3": MetricKind.CUMULATIVE,
    "heat_gj": MetricKind.CUMULATIVE,
    "fuel_l": MetricKind.CUMULATIVE,
    "soc_pct": MetricKind.INSTANTANEOUS,
    "flex_up_kw": MetricKind.INSTANTANEOUS,
    "flex_down_kw": MetricKind.INSTANTANEOUS,
}


class DeadLetterReason(enum.StrEnum):
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    NON_FINITE = "non_finite"
    FUTURE_TS = "future_ts"
    TOO_LARGE = "too_large"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_DEVICE = "unknown_device"
    TENANT_MISMATCH = "tenant_mismatch"
    UNKNOWN_METRIC = "unknown_metric"
    # A value outside its metric's plausible range (METRIC_RANGES, or a tighter one from the registry).
    OUT_OF_RANGE = "out_of_range"
    # A timestamp before the configured floor (IngestSettings.min_ts).
    PAST_TS = "past_ts"
    # A message that carries nothing: {}, [], {"device": []}, points without values, Sparkplug DATA
    # without metrics. Refused rather than ignored, so a misconfigured gateway shows up.
    EMPTY = "empty"
    # The summary a gateway gets, once a minute at most, while its dead letters exceed its byte budget.
    DLQ_BUDGET = "dlq_budget"
    # A second reading of a stored (device, metric, ts) with another value: the first stays (processor).
    CONFLICTING_DUPLICATE = "conflicting_duplicate"


class MetricRange(NamedTuple):
    low: float
    high: float


# The widest values a real meter of any size reports, per canonical metric. A reading outside is a fault
# or an attack and is refused (out_of_range): aggregates add up millions of readings, and a few values
# near float64's limit (1.8e308) turn every sum they enter into inf or NaN. Within these bounds a sum of
# 1e12 readings stays below 1e26. They are wide on purpose: what is merely implausible for one device
# (a power spike, a register jump) is stored, flagged and kept out of the figures by the processor.
# Overridable per metric (IngestSettings.metric_ranges); the registry can make them tighter per device.
METRIC_RANGES: Final[dict[str, MetricRange]] = {
    # Registers never show a negative count; 12 digits (1 TWh, 1e12 Nm3, GJ or litres) exceed any
    # register a meter has, with or without a multiplier folded in.
    "energy_import_kwh": MetricRange(0.0, 1e12),
    "energy_export_kwh": MetricRange(0.0, 1e12),
    "gas_nm3": MetricRange(0.0, 1e12),
    "heat_gj": MetricRange(0.0, 1e12),
    "fuel_l": MetricRange(0.0, 1e12),
    # 100 GW either way: four times the largest power station (Three Gorges, 22.5 GW).
    "power_kw": MetricRange(-1e8, 1e8),
    "reactive_power_kvar": MetricRange(-1e8, 1e8),
    "flex_up_kw": MetricRange(-1e8, 1e8),
    "flex_down_kw": MetricRange(-1e8, 1e8),
    # A percentage; a battery management system may drift a little past 0-100 after calibration (the
    # processor flags beyond 100), beyond [-10, 110] it is not a state of charge.
    "soc_pct": MetricRange(-10.0, 110.0),
}
# Metrics outside the canonical set (kept when IngestSettings.unknown_metrics is "keep").
OTHER_METRIC_RANGE: Final = MetricRange(-1e15, 1e15)
# Metrics a device's rated power bounds (IngestSettings.rated_power_factor x rated_power_kw).
RATED_POWER_METRICS: Final = frozenset({"power_kw", "reactive_power_kvar", "flex_up_kw", "flex_down_kw"})
# Timestamps before this are refused (past_ts) unless configured otherwise: no meter reads before it,
# and far-past values (year 1, -1e15 ms) are outside what PostgreSQL stores.
DEFAULT_MIN_TS_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _epoch_ms(value: object) -> object:
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError("ts must be epoch milliseconds or an RFC 3339 string") from exc
    if parsed.tzinfo is None:
        raise ValueError("an RFC 3339 timestamp needs an offset")
    # Integer arithmetic: a float timestamp() can be off by one millisecond.
    return (parsed - _EPOCH) // timedelta(milliseconds=1)


# Epoch milliseconds, or an RFC 3339 string with offset, normalised to epoch milliseconds.
# Strict int keeps 1.5, true or "123" from slipping through as a timestamp.
TimestampMs = Annotated[int, Field(strict=True), BeforeValidator(_epoch_ms)]


# A TypedDict rather than a model: validating a gateway batch builds no object per point (the
# collector validates every point of every message). Validate with a pydantic TypeAdapter.
@with_config(ConfigDict(extra="forbid"))
class TelemetryPoint(TypedDict):
    """One ``{"ts": ..., "values": {...}}`` object of the gateway and single-device forms."""

    ts: TimestampMs
    # bool is a subclass of int in Python; strict float keeps true/false and strings out.
    values: dict[str, Annotated[float, Field(strict=True)] | Annotated[int, Field(strict=True)]]


@dataclass(frozen=True, slots=True)
class TelemetryTopic:
    tenant: str
    gateway: str
    device: str | None  # set for the single-device form


_TENANT_RE = re.compile(TENANT_PATTERN)
_DEVICE_RE = re.compile(DEVICE_PATTERN)


def parse_telemetry_topic(topic: str) -> TelemetryTopic | None:
    """Parse ``meterflow/v1/{tenant}/{gateway}[/{device}]/telemetry``; None when it is not one."""
    parts = topic.split("/")
    if len(parts) not in (5, 6) or parts[0] != "meterflow" or parts[1] != "v1" or parts[-1] != "telemetry":
        return None
    tenant, gateway = parts[2], parts[3]
    device = parts[4] if len(parts) == 6 else None
    if not _TENANT_RE.match(tenant) or not _DEVICE_RE.match(gateway):
        return None
    if device is not None and not _DEVICE_RE.match(device):
        return None
    return TelemetryTopic(tenant=tenant, gateway=gateway, device=device)


def gateway_telemetry_topic(tenant: str, gateway: str) -> str:
    return f"{TOPIC_ROOT}/{tenant}/{gateway}/telemetry"


def is_valid_device_id(device: str) -> bool:
    return _DEVICE_RE.match(device) is not None


# --- Kafka records ------------------------------------------------------------------------------
# JSON (orjson) keeps records inspectable with any Kafka tool; readings are positional to keep them
# small. Every record carries its version in "v", so consumers read old and new records side by side.
#
# v1: all readings of one device from one MQTT message, keyed tenant/device so that a device's
#     readings stay in order in one partition.
# v2: readings of many devices of one tenant and one gateway that all map to the same partition, each
#     reading naming its device by index into "devices". Keyed by tenant/<first device> and sent to the
#     partition the default partitioner gives every one of its devices' tenant/device keys, so the
#     device -> partition mapping and per-device order are those of v1, with far fewer records.

RECORD_V1: Final = 1
RECORD_V2: Final = 2


# Named tuples, not frozen dataclasses: the collector builds one per reading, and a frozen
# dataclass costs about three times as much to build.
class Reading(NamedTuple):
    ts_ms: int
    metric: str
    value: float


class DeviceReadings(NamedTuple):
    tenant: str
    gateway: str
    device: str
    received_ms: int
    readings: tuple[Reading, ...]

    def kafka_key(self) -> bytes:
        return device_key(self.tenant, self.device)

    def encode(self) -> bytes:
        """This device's readings as a v1 record."""
        return orjson.dumps(
            {
                "v": RECORD_V1,
                "tenant": self.tenant,
                "gateway": self.gateway,
                "device": self.device,
                "received_ms": self.received_ms,
                "readings": [(r.ts_ms, r.metric, r.value) for r in self.readings],
            }
        )


def device_key(tenant: str, device: str) -> bytes:
    """The Kafka key that places a device in its partition (v1 key; v2 partitions by it too)."""
    return f"{tenant}/{device}".encode()


# (index into GatewayRecord.devices, ts_ms, metric, value)
ReadingRow = tuple[int, int, str, float]


@dataclass(slots=True)
class GatewayRecord:
    """A v2 record: readings of devices of one tenant and gateway that share one partition.

    The caller keeps the partition invariant; this only encodes. Readings of one device keep their
    order; readings of different devices may interleave.
    """

    tenant: str
    gateway: str
    received_ms: int
    devices: list[str]
    readings: list[ReadingRow]

    def kafka_key(self) -> bytes:
        return device_key(self.tenant, self.devices[0])

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": RECORD_V2,
                "tenant": self.tenant,
                "gateway": self.gateway,
                "received_ms": self.received_ms,
                "devices": self.devices,
                "readings": self.readings,
            }
        )


class RecordError(ValueError):
    """A Kafka record that is not a readable meterflow record of a known version."""


class _RecordV1(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    v: int
    tenant: str
    gateway: str
    device: str
    received_ms: int
    readings: list[tuple[int, str, float]]


class _RecordV2(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    v: int
    tenant: str
    gateway: str
    received_ms: int
    devices: list[str] = Field(min_length=1)
    readings: list[tuple[int, int, str, float]]


def decode_record(raw: bytes) -> DeviceReadings:
    """A v1 record. Readers of both versions use `decode_records`."""
    try:
        doc = _RecordV1.model_validate_json(raw)
    except ValueError as exc:
        raise RecordError(f"undecodable record: {exc}") from exc
    if doc.v != RECORD_V1:
        raise RecordError(f"unsupported record version {doc.v}")
    return _v1_readings(doc)


def decode_records(raw: bytes) -> list[DeviceReadings]:
    """A v1 or v2 record as per-device readings: one entry per device that has readings, in the order
    of each device's first reading, each device's readings in record order."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"undecodable record: {exc}") from exc
    version = doc.get("v") if isinstance(doc, dict) else None
    try:
        if version == RECORD_V1:
            return [_v1_readings(_RecordV1.model_validate(doc))]
        if version == RECORD_V2:
            return _v2_readings(_RecordV2.model_validate(doc))
    except ValueError as exc:
        raise RecordError(f"undecodable record: {exc}") from exc
    raise RecordError(f"unsupported record version {version!r}")


def _v1_readings(doc: _RecordV1) -> DeviceReadings:
    return DeviceReadings(
        tenant=doc.tenant,
        gateway=doc.gateway,
        device=doc.device,
        received_ms=doc.received_ms,
        readings=tuple(Reading(ts, metric, value) for ts, metric, value in doc.readings),
    )


def _v2_readings(doc: _RecordV2) -> list[DeviceReadings]:
    per_device: dict[int, list[Reading]] = {}
    n_devices = len(doc.devices)
    for index, ts, metric, value in doc.readings:
        if not 0 <= index < n_devices:
            raise RecordError(f"a reading names device index {index} of {n_devices}")
        per_device.setdefault(index, []).append(Reading(ts, metric, value))
    return [
        DeviceReadings(doc.tenant, doc.gateway, doc.devices[index], doc.received_ms, tuple(readings))
        for index, readings in per_device.items()
    ]


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)


def validation_summary(exc: ValidationError) -> str:
    """One line per problem, ``field: message``, for dead letters and reports."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in exc.errors())


# --- dead letters ------------------------------------------------------------------------------
# v2: one record per rejected message (or per refused record for the processor and intensity service),
# listing what was refused in it. `reasons` counts every rejection by reason; `rejected` lists them in
# order (reason, device, point index, metric, detail), cut once its encoding reaches the larger of the
# payload's size and DEAD_LETTER_MIN_LIST_BYTES, so a record stays within a small multiple of the payload
# however many points one message gets refused.

DEAD_LETTER_V2: Final = 2
DEAD_LETTER_MIN_LIST_BYTES: Final = 2048
# Details quote input (metric names, device ids): cut, so that one long name cannot inflate a record.
DEAD_LETTER_DETAIL_CHARS: Final = 200
# MQTT allows 64 KB topics: a letter names its origin (topic, tenant, gateway) cut to this, so that a
# bad topic with an empty payload cannot make a letter far larger than its payload.
DEAD_LETTER_ORIGIN_CHARS: Final = 512


class DeadLetterEntry(TypedDict, total=False):
    reason: str
    detail: str
    device: str
    # The point's index in its device's list (JSON forms) or the metric's index (Sparkplug).
    point: int
    metric: str


def encode_dead_letter(
    *,
    reason: str,
    detail: str,
    payload: bytes | bytearray,
    cap: int,
    received_ms: int,
    binary: bool = False,
    rejected: list[DeadLetterEntry] | None = None,
    **origin: object,
) -> bytes:
    """A record of the dead-letter topic: why (`reason` and `detail` name the first problem, `rejected`
    lists them all when there are several), where it came from (`origin`: topic, tenant, partition, ...)
    and the payload, cut at `cap` bytes. Binary payloads (Sparkplug protobuf) are kept as base64 so that
    they survive JSON intact."""
    entries = rejected if rejected else [DeadLetterEntry(reason=reason, detail=detail)]
    reasons: dict[str, int] = {}
    for entry in entries:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    budget = max(len(payload), DEAD_LETTER_MIN_LIST_BYTES)
    listed: list[DeadLetterEntry] = []
    used = 0
    for entry in entries:
        short = _short_entry(entry)
        used += len(orjson.dumps(short)) + 1
        if used > budget:
            break
        listed.append(short)
    kept = payload[:cap]
    return orjson.dumps(
        {
            "v": DEAD_LETTER_V2,
            "reason": reason,
            "detail": detail[:DEAD_LETTER_DETAIL_CHARS],
            **{k: v[:DEAD_LETTER_ORIGIN_CHARS] if isinstance(v, str) else v for k, v in origin.items()},
            "received_ms": received_ms,
            "reasons": reasons,
            "rejected": listed,
            "rejected_total": len(entries),
            "rejected_truncated": len(listed) < len(entries),
            "payload": base64.b64encode(kept).decode() if binary else kept.decode("utf-8", errors="replace"),
            "payload_encoding": "base64" if binary else "utf-8",
            "payload_bytes": len(payload),
            "payload_truncated": len(payload) > cap,
        }
    )


def _short_entry(entry: DeadLetterEntry) -> DeadLetterEntry:
    short = entry.copy()
    if "detail" in short:
        short["detail"] = short["detail"][:DEAD_LETTER_DETAIL_CHARS]
    if "metric" in short:
        short["metric"] = short["metric"][:DEAD_LETTER_DETAIL_CHARS]
    return short


# --- grid carbon intensity ------------------------------------------------------------------------
# Time-varying grid intensity per zone (reference notes §2, checklist E.28): estimated figures for load
# shifting and comparison, never part of compliance totals (those use the annual factors).

ZONE_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
INTENSITY_RECORD_V1: Final = 1
# 1970 to 2200, as the API's time ranges: what PostgreSQL stores and the API can ask for.
_INTENSITY_TS_MAX: Final = 7_258_118_400_000
# Printable text: PostgreSQL refuses NUL in text, and a label has no use for control characters.
_LABEL_PATTERN: Final = r"^[^\x00-\x1f\x7f]+$"


class SignalType(enum.StrEnum):
    # What the figure averages: all generation serving the zone, or the generators that respond to a
    # change in load (WattTime's MOER; only for avoided-emission estimates, never for an inventory).
    AVERAGE = "average"
    MARGINAL = "marginal"


class EmissionBasis(enum.StrEnum):
    LIFECYCLE = "lifecycle"  # includes upstream (Electricity Maps' default)
    DIRECT = "direct"  # combustion only, as the MEE grid factors


class GridIntensityPoint(BaseModel):
    """One intensity value for a zone over ``[ts, ts + duration_s)``: a record of the intensity topic,
    keyed by zone so that one zone's points stay in order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = INTENSITY_RECORD_V1
    zone: Annotated[str, Field(pattern=ZONE_PATTERN)]
    ts: Annotated[TimestampMs, Field(ge=0, lt=_INTENSITY_TS_MAX)]
    duration_s: Annotated[int, Field(strict=True, gt=0, le=86_400)] = 3600
    g_co2e_per_kwh: Annotated[float, Field(ge=0, le=5000, allow_inf_nan=False)]
    signal_type: SignalType = SignalType.AVERAGE
    basis: EmissionBasis = EmissionBasis.LIFECYCLE
    # Modelled rather than measured (e.g. a generation-mix estimate): every figure meterflow derives
    # from this feed is labelled estimated anyway; this says what the publisher claims.
    is_estimated: bool = True
    # A forecast never replaces a value that is not one.
    is_forecast: bool = False
    source: Annotated[str, Field(min_length=1, max_length=200, pattern=_LABEL_PATTERN)]
    model_version: Annotated[str, Field(max_length=200, pattern=_LABEL_PATTERN)] | None = None

    def kafka_key(self) -> bytes:
        return self.zone.encode()

    def encode(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))
