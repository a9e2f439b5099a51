"""MQTT payloads -> canonical per-device readings, with a dead-letter reason for everything refused.

Pure: no I/O. The fast path validates a whole gateway batch with one TypeAdapter; only when that fails
does it fall back to validating each point, so one bad reading never rejects its valid siblings.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import isfinite

import orjson
from pydantic import TypeAdapter, ValidationError

from meterflow.contract import (
    DeadLetterReason,
    DeviceReadings,
    Reading,
    TelemetryPoint,
    TelemetryTopic,
    is_valid_device_id,
)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: DeadLetterReason
    detail: str
    device: str | None = None


@dataclass(slots=True)
class ParseResult:
    accepted: list[DeviceReadings] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def reading_count(self) -> int:
        return sum(len(d.readings) for d in self.accepted)


_BATCH = TypeAdapter(dict[str, list[TelemetryPoint]])
_POINT = TypeAdapter(TelemetryPoint)
# A fleet has a bounded set of device ids; each is checked against the pattern once.
_valid_device = functools.lru_cache(maxsize=100_000)(is_valid_device_id)


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int
    max_future_skew_ms: int


def parse_message(topic: TelemetryTopic, payload: bytes, *, received_ms: int, limits: Limits) -> ParseResult:
    result = ParseResult()
    if len(payload) > limits.max_payload_bytes:
        result.rejected.append(
            Rejection(DeadLetterReason.TOO_LARGE, f"{len(payload)} bytes > limit {limits.max_payload_bytes}")
        )
        return result
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        result.rejected.append(Rejection(DeadLetterReason.INVALID_JSON, str(exc)))
        return result

    if topic.device is not None:
        per_device = {topic.device: doc if isinstance(doc, list) else [doc]}
    elif isinstance(doc, dict):
        per_device = doc
    else:
        result.rejected.append(Rejection(DeadLetterReason.SCHEMA, "a gateway batch must be a JSON object"))
        return result

    try:
        validated: dict[str, list[TelemetryPoint]] = _BATCH.validate_python(per_device)
    except ValidationError:
        validated = _validate_each(per_device, result)

    horizon = received_ms + limits.max_future_skew_ms
    tenant, gateway = topic.tenant, topic.gateway
    for device, points in validated.items():
        if not _valid_device(device):
            result.rejected.append(Rejection(DeadLetterReason.SCHEMA, "invalid device id", device[:64]))
            continue
        readings: list[Reading] = []
        for point in points:
            ts = point["ts"]
            if ts > horizon:
                result.rejected.append(
                    Rejection(DeadLetterReason.FUTURE_TS, f"ts {ts} is beyond receive time + skew", device)
                )
                continue
            for metric, value in point["values"].items():
                fval = float(value)
                if not isfinite(fval):
                    result.rejected.append(
                        Rejection(DeadLetterReason.NON_FINITE, f"{metric}={value}", device)
                    )
                    continue
                readings.append(Reading(ts, metric, fval))
        if readings:
            result.accepted.append(DeviceReadings(tenant, gateway, device, received_ms, tuple(readings)))
    return result


def _validate_each(per_device: Mapping[str, object], result: ParseResult) -> dict[str, list[TelemetryPoint]]:
    good: dict[str, list[TelemetryPoint]] = {}
    for device, points in per_device.items():
        if not isinstance(points, list):
            result.rejected.append(
                Rejection(DeadLetterReason.SCHEMA, "expected a list of points", device[:64])
            )
            continue
        kept: list[TelemetryPoint] = []
        for raw in points:
            try:
                kept.append(_POINT.validate_python(raw))
            except ValidationError as exc:
                result.rejected.append(Rejection(_reason_for(exc), _summarise(exc), device[:64]))
        if kept:
            good[device] = kept
    return good


def _reason_for(exc: ValidationError) -> DeadLetterReason:
    for err in exc.errors():
        if err["type"] == "finite_number":
            return DeadLetterReason.NON_FINITE
    return DeadLetterReason.SCHEMA


def _summarise(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}"
