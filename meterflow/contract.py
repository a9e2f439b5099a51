"""The wire contract (../shared/contract-v1.md) and meterflow's internal Kafka record format.

Owns: identifier patterns, canonical metric names, MQTT topic shapes, the gateway-batch payload model,
and the versioned Kafka record that carries readings from ingest to processing. Every stage imports
from here; nothing here does I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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


class TelemetryPoint(BaseModel):
    """One ``{"ts": ..., "values": {...}}`` object of the gateway and single-device forms."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

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


# --- Kafka record, version 1 -------------------------------------------------------------------
# One record carries all readings of one device from one MQTT message, keyed by tenant/device so a
# device's readings stay in order in one partition. JSON (orjson) keeps records inspectable with any
# Kafka tool; readings are positional triples to keep records small.

RECORD_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Reading:
    ts_ms: int
    metric: str
    value: float


@dataclass(frozen=True, slots=True)
class DeviceReadings:
    tenant: str
    gateway: str
    device: str
    received_ms: int
    readings: tuple[Reading, ...]

    def kafka_key(self) -> bytes:
        return f"{self.tenant}/{self.device}".encode()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": RECORD_VERSION,
                "tenant": self.tenant,
                "gateway": self.gateway,
                "device": self.device,
                "received_ms": self.received_ms,
                "readings": [(r.ts_ms, r.metric, r.value) for r in self.readings],
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


def decode_record(raw: bytes) -> DeviceReadings:
    try:
        doc = _RecordV1.model_validate_json(raw)
    except ValueError as exc:
        raise RecordError(f"undecodable record: {exc}") from exc
    if doc.v != RECORD_VERSION:
        raise RecordError(f"unsupported record version {doc.v}")
    return DeviceReadings(
        tenant=doc.tenant,
        gateway=doc.gateway,
        device=doc.device,
        received_ms=doc.received_ms,
        readings=tuple(Reading(ts, metric, value) for ts, metric, value in doc.readings),
    )


def now_ms() -> int:
    return int(datetime.now(UTC).timestamp() * 1000)
