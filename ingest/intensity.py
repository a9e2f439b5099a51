"""Grid carbon intensity into Kafka: points from files or provider responses, or estimated from a
generation mix, published to ``meterflow.grid-intensity.v1`` keyed by zone.

Accepted inputs (``meterflow intensity publish --format``):

* ``jsonl``: one point per line in the wire form (`meterflow.contract.GridIntensityPoint`);
* ``csv``: a header of wire field names (``zone,ts,g_co2e_per_kwh`` at least);
* ``electricitymaps``: a saved response of Electricity Maps' ``/v3/carbon-intensity/{latest,history,
  past-range,forecast}`` (``carbonIntensity`` in gCO2eq/kWh, ``emissionFactorType`` as the basis,
  ``temporalGranularity`` as the duration, ``isEstimated`` kept);
* ``watttime``: a saved response of WattTime's ``/v3/historical`` or ``/v3/forecast`` (``co2_moer`` is
  marginal, ``co2_aoer`` average; ``lbs_co2_per_mwh`` x 0.453592 = g/kWh; operating emissions, so direct).

A row that is not a valid point is reported with its place and reason and not published; the rest are.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError
from rich.progress import Progress

from meterflow.carbon.intensity import MODES, mix_intensity
from meterflow.contract import EmissionBasis, GridIntensityPoint, SignalType, validation_summary
from meterflow.settings import Settings

log = logging.getLogger(__name__)

FORMATS: Final = ("jsonl", "csv", "electricitymaps", "watttime")
LBS_PER_MWH_TO_G_PER_KWH: Final = 0.453592
# Electricity Maps' temporalGranularity -> seconds.
_GRANULARITY_S: Final = {"5_minutes": 300, "15_minutes": 900, "hourly": 3600, "daily": 86_400}
MIX_SOURCE: Final = "meterflow-mix-estimate"
MIX_MODEL: Final = "electricitymaps-default-mode-factors"


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a point takes when its input does not say."""

    zone: str | None = None
    source: str | None = None
    forecast: bool | None = None


@dataclass(slots=True)
class Parsed:
    points: list[GridIntensityPoint] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (where, why)

    def add(self, where: str, fields: dict[str, Any]) -> None:
        try:
            self.points.append(GridIntensityPoint.model_validate(fields))
        except ValidationError as exc:
            self.rejected.append((where, validation_summary(exc)))


def _with_defaults(fields: dict[str, Any], defaults: Defaults) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if v not in (None, "")}
    if defaults.zone is not None:
        out.setdefault("zone", defaults.zone)
    if defaults.source is not None:
        out.setdefault("source", defaults.source)
    if defaults.forecast is not None:
        out["is_forecast"] = defaults.forecast
    return out


def parse_jsonl(text: str, defaults: Defaults) -> Parsed:
    parsed = Parsed()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            parsed.rejected.append((f"line {number}", f"invalid JSON: {exc}"))
            continue
        if not isinstance(doc, dict):
            parsed.rejected.append((f"line {number}", "a point must be a JSON object"))
            continue
        parsed.add(f"line {number}", _with_defaults(doc, defaults))
    return parsed


_CSV_INTS: Final = {"ts", "duration_s"}
_CSV_BOOLS: Final = {"is_estimated", "is_forecast"}


def _number(text: str, kind: type[int] | type[float]) -> object:
    """The number `text` spells, else the text itself (for the point's validation to report)."""
    try:
        return kind(text)
    except ValueError:
        return text


def _csv_value(name: str, text: str) -> object:
    if name in _CSV_INTS:
        return _number(text, int)
    if name in _CSV_BOOLS:
        return {"true": True, "false": False, "1": True, "0": False}.get(text.lower(), text)
    if name == "g_co2e_per_kwh":
        return _number(text, float)
    return text


def parse_csv(text: str, defaults: Defaults) -> Parsed:
    parsed = Parsed()
    reader = csv.DictReader(io.StringIO(text))
    for number, row in enumerate(reader, 2):
        fields = {k: _csv_value(k, (v or "").strip()) for k, v in row.items() if k is not None}
        parsed.add(f"line {number}", _with_defaults(fields, defaults))
    return parsed


def _json_document(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc


def parse_electricitymaps(text: str, defaults: Defaults) -> Parsed:
    doc = _json_document(text)
    if not isinstance(doc, dict):
        raise ValueError("an Electricity Maps response is a JSON object")
    forecast = "forecast" in doc
    entries = doc.get("history") or doc.get("data") or doc.get("forecast") or [doc]
    parsed = Parsed()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            parsed.rejected.append((f"entry {i}", "not a JSON object"))
            continue
        granularity = entry.get("temporalGranularity") or doc.get("temporalGranularity") or "hourly"
        fields = {
            "zone": entry.get("zone") or doc.get("zone"),
            "ts": entry.get("datetime"),
            "g_co2e_per_kwh": entry.get("carbonIntensity"),
            "duration_s": _GRANULARITY_S.get(str(granularity), granularity),
            "signal_type": SignalType.AVERAGE,
            "basis": entry.get("emissionFactorType") or doc.get("emissionFactorType") or "lifecycle",
            "is_estimated": entry.get("isEstimated") is True,
            "is_forecast": forecast,
            "source": "electricitymaps",
            "model_version": entry.get("estimationMethod"),
        }
        parsed.add(f"entry {i}", _with_defaults(fields, defaults))
    return parsed


_WATTTIME_SIGNALS: Final = {"co2_moer": SignalType.MARGINAL, "co2_aoer": SignalType.AVERAGE}


def parse_watttime(text: str, defaults: Defaults) -> Parsed:
    doc = _json_document(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("meta"), dict):
        raise ValueError("a WattTime response is a JSON object with 'meta' and 'data'")
    meta = doc["meta"]
    signal = _WATTTIME_SIGNALS.get(str(meta.get("signal_type")))
    if signal is None:
        raise ValueError(
            f"signal_type {meta.get('signal_type')!r} is not an emission rate ({', '.join(_WATTTIME_SIGNALS)})"
        )
    units = str(meta.get("units", "lbs_co2_per_mwh"))
    if units != "lbs_co2_per_mwh":
        raise ValueError(f"units {units!r}: only lbs_co2_per_mwh is understood")
    model = meta.get("model")
    period = meta.get("data_point_period_seconds")
    # Only forecast responses say when they were generated.
    forecast = "generated_at" in meta
    parsed = Parsed()
    for i, entry in enumerate(doc.get("data") or []):
        if isinstance(entry, dict) and "forecast" in entry:
            raise ValueError(
                "a /v3/forecast/historical response (forecasts of the past): not a signal to store"
            )
        value = entry.get("value") if isinstance(entry, dict) else None
        fields = {
            "zone": meta.get("region"),
            "ts": entry.get("point_time") if isinstance(entry, dict) else None,
            "g_co2e_per_kwh": value * LBS_PER_MWH_TO_G_PER_KWH if isinstance(value, int | float) else value,
            "duration_s": period if isinstance(period, int) else 300,
            "signal_type": signal,
            "basis": EmissionBasis.DIRECT,
            "is_estimated": True,
            "is_forecast": forecast,
            "source": "watttime",
            "model_version": str(model.get("date"))
            if isinstance(model, dict) and model.get("date")
            else None,
        }
        parsed.add(f"data[{i}]", _with_defaults(fields, defaults))
    return parsed


PARSERS: Final[dict[str, Callable[[str, Defaults], Parsed]]] = {
    "jsonl": parse_jsonl,
    "csv": parse_csv,
    "electricitymaps": parse_electricitymaps,
    "watttime": parse_watttime,
}


def guess_format(path: Path, text: str) -> str:
    if path.suffix.lower() == ".csv":
        return "csv"
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    head = text.lstrip()[:2000]
    if '"meta"' in head and '"point_time"' in text:
        return "watttime"
    if '"carbonIntensity"' in text:
        return "electricitymaps"
    return "jsonl"


def read_points(path: Path, fmt: str, defaults: Defaults) -> Parsed:
    text = path.read_text(encoding="utf-8")
    chosen = guess_format(path, text) if fmt == "auto" else fmt
    if chosen not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    return PARSERS[chosen](text, defaults)


# --- estimates from a generation mix ------------------------------------------------------------------


def estimate_from_mix(text: str, zone: str, bases: Iterable[EmissionBasis]) -> Parsed:
    """Points from an hourly (or any ``duration_s``) generation mix: a CSV with ``ts``, optional
    ``duration_s`` and one column per generation mode in MWh (`meterflow.carbon.intensity.MODES`;
    a ``storage`` column is ignored). One average point per row and basis, labelled estimated."""
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    modes = columns - {"ts", "duration_s", "storage"}
    unknown = sorted(modes - set(MODES))
    if "ts" not in columns or unknown:
        raise ValueError(
            f"a mix needs a ts column and generation modes from {', '.join(MODES)}"
            + (f"; unknown columns {unknown}" if unknown else "")
        )
    parsed = Parsed()
    bases = tuple(bases)
    for number, row in enumerate(reader, 2):
        try:
            if None in row or any(row[c] is None for c in columns):
                raise ValueError(f"expected {len(columns)} cells")
            # A blank cell is a missing figure, not zero generation.
            blank = sorted(mode for mode in modes if not (row[mode] or "").strip())
            if blank:
                raise ValueError(f"no generation given for {blank}")
            generation = {mode: float(row[mode]) for mode in modes}
            values = {basis: mix_intensity(generation, basis) for basis in bases}
        except ValueError as exc:
            parsed.rejected.append((f"line {number}", str(exc)))
            continue
        for basis, value in values.items():
            fields = {
                "zone": zone,
                "ts": _number(row["ts"], int),
                "duration_s": _number(row["duration_s"], int) if row.get("duration_s") else 3600,
                "g_co2e_per_kwh": value,
                "signal_type": SignalType.AVERAGE,
                "basis": basis,
                "is_estimated": True,
                "source": MIX_SOURCE,
                "model_version": MIX_MODEL,
            }
            parsed.add(f"line {number}", fields)
    return parsed


# --- publishing -------------------------------------------------------------------------------------


def _chunks(points: list[GridIntensityPoint], size: int) -> Iterator[list[GridIntensityPoint]]:
    for lo in range(0, len(points), size):
        yield points[lo : lo + size]


async def publish(settings: Settings, points: list[GridIntensityPoint], *, progress: bool = True) -> int:
    """Send every point (acks from all replicas, idempotent producer) and wait for each; the count."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    try:
        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("publishing intensity points", total=len(points))
            for chunk in _chunks(points, 500):
                futures = [
                    await producer.send(settings.kafka.intensity_topic, p.encode(), key=p.kafka_key())
                    for p in chunk
                ]
                for future in futures:
                    await future
                bar.advance(task, len(chunk))
    finally:
        await producer.stop()
    log.info("published %d intensity points to %s", len(points), settings.kafka.intensity_topic)
    return len(points)
