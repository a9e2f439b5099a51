"""MQTT payloads -> canonical per-device readings, with a dead-letter reason for everything refused.

Pure: no I/O. The fast path validates a whole gateway batch with one TypeAdapter; only when that fails
does it fall back to validating each point, so one bad reading never rejects its valid siblings.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from math import isfinite
from typing import NamedTuple

import orjson
from pydantic import TypeAdapter, ValidationError

from meterflow.contract import (
    DEFAULT_MIN_TS_MS,
    METRIC_RANGES,
    OTHER_METRIC_RANGE,
    DeadLetterEntry,
    DeadLetterReason,
    DeviceReadings,
    MetricRange,
    Reading,
    TelemetryPoint,
    TelemetryTopic,
    is_valid_device_id,
)
from meterflow.settings import IngestSettings


# A named tuple, not a frozen dataclass: a hostile message makes one per point, 130,000 in 256 KiB, and
# a frozen dataclass costs several times as much to build.
class Rejection(NamedTuple):
    reason: DeadLetterReason
    detail: str
    device: str | None = None
    # Where in the message: the point's index in its device's list (the metric's for Sparkplug).
    point: int | None = None
    metric: str | None = None

    def entry(self) -> DeadLetterEntry:
        entry = DeadLetterEntry(reason=self.reason.value, detail=self.detail)
        if self.device is not None:
            entry["device"] = self.device
        if self.point is not None:
            entry["point"] = self.point
        if self.metric is not None:
            entry["metric"] = self.metric
        return entry


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
    min_ts_ms: int = DEFAULT_MIN_TS_MS
    ranges: Mapping[str, MetricRange] = field(default_factory=lambda: METRIC_RANGES)
    other_range: MetricRange = OTHER_METRIC_RANGE

    @classmethod
    def from_settings(cls, ingest: IngestSettings) -> Limits:
        overrides = {metric: MetricRange(*bounds) for metric, bounds in ingest.metric_ranges.items()}
        return cls(
            max_payload_bytes=ingest.max_payload_bytes,
            max_future_skew_ms=ingest.max_future_skew_s * 1000,
            min_ts_ms=(ingest.min_ts - _EPOCH) // timedelta(milliseconds=1),
            ranges={**METRIC_RANGES, **overrides},
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
        doc = _load_non_finite(payload, exc)
        if isinstance(doc, Rejection):
            result.rejected.append(doc)
            return result

    if topic.device is not None:
        per_device = {topic.device: doc if isinstance(doc, list) else [doc]}
    elif isinstance(doc, dict):
        per_device = doc
    elif doc == []:
        result.rejected.append(Rejection(DeadLetterReason.EMPTY, "the message carries no readings"))
        return result
    else:
        result.rejected.append(Rejection(DeadLetterReason.SCHEMA, "a gateway batch must be a JSON object"))
        return result

    positions: dict[str, list[int]] | None = None
    try:
        validated: dict[str, list[TelemetryPoint]] = _BATCH.validate_python(per_device)
    except ValidationError:
        positions = {}
        validated = _validate_each(per_device, result, positions)

    horizon = received_ms + limits.max_future_skew_ms
    floor = limits.min_ts_ms
    ranges, other = limits.ranges, limits.other_range
    tenant, gateway = topic.tenant, topic.gateway
    for device, points in validated.items():
        if not _valid_device(device):
            result.rejected.append(Rejection(DeadLetterReason.SCHEMA, "invalid device id", device[:64]))
            continue
        where = None if positions is None else positions.get(device)
        readings: list[Reading] = []
        for i, point in enumerate(points):
            ts = point["ts"]
            if ts > horizon or ts < floor:
                index = i if where is None else where[i]
                result.rejected.append(_bad_ts(ts, horizon, device, index))
                continue
            for metric, value in point["values"].items():
                low, high = ranges.get(metric, other)
                fval = float(value)
                # NaN fails both comparisons.
                if low <= fval <= high:
                    readings.append(Reading(ts, metric, fval))
                    continue
                index = i if where is None else where[i]
                result.rejected.append(_bad_value(metric, fval, low, high, device, index))
        if readings:
            result.accepted.append(DeviceReadings(tenant, gateway, device, received_ms, tuple(readings)))
    if not result.accepted and not result.rejected:
        result.rejected.append(Rejection(DeadLetterReason.EMPTY, "the message carries no readings"))
    return result


def _load_non_finite(payload: bytes, refused: orjson.JSONDecodeError) -> object:
    """The JSON document orjson refused, or an invalid_json rejection.

    orjson refuses numbers beyond float64 (1e309) and NaN/Infinity literals. Read that way, one such
    value would lose its whole message; the stdlib parser reads them as non-finite floats, which the
    value checks refuse point by point. Anything orjson could not write back (a lone surrogate) is
    refused here rather than by the Kafka encoder."""
    try:
        doc = json.loads(payload.decode("utf-8"), parse_int=_json_int)
        orjson.dumps(doc)
    except (ValueError, RecursionError, orjson.JSONEncodeError):
        return Rejection(DeadLetterReason.INVALID_JSON, str(refused))
    return doc


def _json_int(text: str) -> int | float:
    """An integer as orjson reads it: beyond 64 bits, a float (inf beyond float64)."""
    if len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return float(text)


def _bad_ts(ts: int, horizon: int, device: str, index: int) -> Rejection:
    if ts > horizon:
        return Rejection(DeadLetterReason.FUTURE_TS, f"ts {ts} is beyond receive time + skew", device, index)
    return Rejection(DeadLetterReason.PAST_TS, f"ts {ts} is before the timestamp floor", device, index)


def _bad_value(
    metric: str, value: float, low: float, high: float, device: str, index: int | None
) -> Rejection:
    if isfinite(value):
        detail = f"{metric}={value!r} outside [{low!r}, {high!r}]"
        return Rejection(DeadLetterReason.OUT_OF_RANGE, detail, device, index, metric)
    return Rejection(DeadLetterReason.NON_FINITE, f"{metric}={value}", device, index, metric)


_NOT_A_POINT = 'a point must be an object with "ts" and a "values" object'


def _validate_each(
    per_device: Mapping[str, object], result: ParseResult, positions: dict[str, list[int]]
) -> dict[str, list[TelemetryPoint]]:
    """The valid points of each device, with their indexes in the device's list in `positions`."""
    good: dict[str, list[TelemetryPoint]] = {}
    for device, points in per_device.items():
        if not isinstance(points, list):
            result.rejected.append(
                Rejection(DeadLetterReason.SCHEMA, "expected a list of points", device[:64])
            )
            continue
        kept: list[TelemetryPoint] = []
        where: list[int] = []
        for index, raw in enumerate(points):
            # Refused without pydantic when the shape is wrong: a ValidationError costs ~15 us, and a
            # 256 KiB message holds 130,000 points like `1` or `{}`.
            if type(raw) is not dict or type(raw.get("values")) is not dict or "ts" not in raw:
                result.rejected.append(Rejection(DeadLetterReason.SCHEMA, _NOT_A_POINT, device[:64], index))
                continue
            try:
                kept.append(_POINT.validate_python(raw))
                where.append(index)
            except ValidationError as exc:
                result.rejected.append(Rejection(_reason_for(exc), _summarise(exc), device[:64], index))
        if kept:
            good[device] = kept
            positions[device] = where
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
