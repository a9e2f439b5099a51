"""Demand-response events of a VPP: create, list, evaluate against a baseline, export an OpenADR 3 style
report. Load is the VPP's net imported energy per 15 minutes (``agg_15m``, scope ``vpp``); baselines and
performance come from `processing.dr`."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.access import Access, AccessDep
from api.models import Page, Power, Ratio
from api.problems import Problem
from api.query import fetch_dicts
from api.routes.intensity import QUARTER_MS, intensity_steps
from meterflow.contract import ZONE_PATTERN, EmissionBasis, SignalType
from meterflow.settings import Settings
from processing import dr
from processing.kernels import F64

router = APIRouter(prefix="/v1", tags=["demand response"])

INTERVAL = timedelta(minutes=15)
EventId = Annotated[int, Path(ge=1, le=2**63 - 1)]
BaselineName = Literal["CN_JS_5WD", "CN_BJ_5of10", "CAISO_10of10", "CN_JS_RT15"]


class DrEventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: datetime = Field(description="on the 15-minute grid, RFC 3339 with offset")
    end: datetime = Field(description="exclusive; same local day as start (or its midnight)")
    direction: Literal["up", "down"] = Field(description="up: less consumption / more generation")
    committed_kw: Power  # a divisor of delivered power: bounded, strictly numeric
    baseline: BaselineName = "CN_JS_5WD"
    valid_ratio: Ratio | None = Field(
        default=None, description="delivered / committed needed for a valid response; default from settings"
    )
    program: Annotated[str, Field(max_length=200)] | None = None


class DrEvent(BaseModel):
    event_id: int
    vpp: str
    start: datetime
    end: datetime
    direction: str
    committed_kw: float
    baseline: str
    valid_ratio: float
    program: str | None
    created_at: datetime


class IntervalResult(BaseModel):
    start: datetime
    end: datetime
    baseline_kw: float
    actual_kw: float | None
    delivered_kw: float | None
    performance_ratio: float | None
    avoided_co2e_kg: float | None = Field(
        default=None,
        description="(baseline - actual) kWh x the marginal intensity of `marginal_zone`; estimated, "
        "null when not asked for, not measured or not covered",
    )


class TotalResult(BaseModel):
    baseline_kwh: float
    actual_kwh: float | None
    delivered_kw: float | None = Field(description="(baseline energy - actual energy) / duration")
    performance_ratio: float | None = Field(description="delivered_kw / committed_kw")
    valid: bool | None = Field(
        description="performance_ratio >= valid_ratio; null until every interval is in"
    )
    complete: bool
    avoided_co2e_kg: float | None = Field(
        default=None, description="sum over the intervals; null unless every one has a figure"
    )


class DrResult(BaseModel):
    event: DrEvent
    baseline_method: str
    baseline_days: list[date]
    adjustment: float
    excluded_days: list[date]
    intervals: list[IntervalResult]
    total: TotalResult
    marginal_zone: str | None = Field(
        default=None, description="zone whose marginal intensity valued the avoided emissions (estimated)"
    )


class Holiday(BaseModel):
    day: date
    name: str


class HolidayIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)]


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


_EVENT_COLS = (
    "event_id, vpp, start_at AS start, end_at AS end, direction, committed_kw, baseline, valid_ratio, program, "
    "created_at"
)


def _local_window(settings: Settings, start: datetime, end: datetime) -> tuple[date, int, int]:
    """Local day and interval range of an event; 422 when it is off the grid or spans days."""
    zone = ZoneInfo(settings.vpp.timezone)
    if start.tzinfo is None or end.tzinfo is None:
        raise Problem(
            400, "naive-time", "Time zone required", "start and end need an offset, e.g. Z or +08:00"
        )
    try:
        s, e = start.astimezone(zone), end.astimezone(zone)
    except OverflowError as exc:
        raise Problem(422, "invalid-event", "Invalid event", "start or end out of range") from exc
    if e <= s:
        raise Problem(422, "invalid-event", "Invalid event", "end must be after start")
    for t in (s, e):
        if t.minute % 15 or t.second or t.microsecond:
            raise Problem(
                422, "invalid-event", "Invalid event", "start and end must be on the 15-minute grid"
            )
    first = (s.hour * 60 + s.minute) // 15
    last = first + round((e - s) / INTERVAL)
    if last > dr.INTERVALS_PER_DAY:
        raise Problem(
            422, "invalid-event", "Invalid event", f"an event stays within one local day ({zone.key})"
        )
    return s.date(), first, last


@router.post("/vpps/{vpp}/dr-events", status_code=201)
async def create_event(vpp: str, body: DrEventIn, who: AccessDep, request: Request) -> DrEvent:
    """Create a demand-response event (the VPP's owner or an admin)."""
    await who.vpp(request, vpp, manage=True)
    settings = _settings(request)
    _local_window(settings, body.start, body.end)
    rows = await fetch_dicts(
        request,
        "INSERT INTO dr_events (vpp, start_at, end_at, direction, committed_kw, baseline, valid_ratio, program) "
        "VALUES (%(vpp)s, %(start)s, %(end)s, %(direction)s, %(committed_kw)s, %(baseline)s, %(valid_ratio)s, "
        f"%(program)s) RETURNING {_EVENT_COLS}",
        {**body.model_dump(), "vpp": vpp, "valid_ratio": body.valid_ratio or settings.vpp.dr_valid_ratio},
    )
    return DrEvent.model_validate(rows[0])


@router.get("/vpps/{vpp}/dr-events")
async def list_events(vpp: str, who: AccessDep, request: Request) -> Page[DrEvent]:
    await who.vpp(request, vpp)
    rows = await fetch_dicts(
        request,
        f"SELECT {_EVENT_COLS} FROM dr_events WHERE vpp = %(vpp)s ORDER BY start_at DESC",
        {"vpp": vpp},
    )
    return Page[DrEvent](data=[DrEvent.model_validate(r) for r in rows])


async def _event(request: Request, who: Access, event_id: int) -> DrEvent:
    rows = await fetch_dicts(
        request, f"SELECT {_EVENT_COLS} FROM dr_events WHERE event_id = %(id)s", {"id": event_id}
    )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no DR event {event_id}")
    event = DrEvent.model_validate(rows[0])
    try:
        await who.vpp(request, event.vpp)
    except Problem as exc:
        raise Problem(404, "not-found", "Not found", f"no DR event {event_id}") from exc
    return event


@router.get("/dr-events/{event_id}")
async def get_event(event_id: EventId, who: AccessDep, request: Request) -> DrEvent:
    return await _event(request, who, event_id)


async def _history(
    request: Request, vpp: str, zone: ZoneInfo, first_day: date, last_day: date
) -> tuple[dict[date, F64], set[date]]:
    """Net load kW per local day and interval (NaN where no data), and days with VEE-flagged data."""
    start = datetime.combine(first_day, datetime.min.time(), zone)
    end = datetime.combine(last_day + timedelta(days=1), datetime.min.time(), zone)
    rows = await fetch_dicts(
        request,
        """SELECT bucket, metric, total, n_flagged FROM agg_15m
           WHERE scope = 'vpp' AND tenant_id = '' AND entity_id = %(vpp)s
             AND metric IN ('energy_import_kwh', 'energy_export_kwh')
             AND bucket >= %(start)s AND bucket < %(end)s""",
        {"vpp": vpp, "start": start, "end": end},
    )
    history: dict[date, F64] = {}
    failed: set[date] = set()
    for row in rows:
        local = row["bucket"].astimezone(zone)
        day = local.date()
        kw = history.setdefault(day, np.full(dr.INTERVALS_PER_DAY, np.nan))
        i = (local.hour * 60 + local.minute) // 15
        sign = 1.0 if row["metric"] == "energy_import_kwh" else -1.0
        kw[i] = (0.0 if np.isnan(kw[i]) else kw[i]) + sign * float(row["total"]) / dr.INTERVAL_H
        if row["n_flagged"]:
            failed.add(day)
    return history, failed


def _days_touched(start: datetime, end: datetime, zone: ZoneInfo) -> list[date]:
    first, last = start.astimezone(zone).date(), (end - INTERVAL).astimezone(zone).date()
    return [first + timedelta(days=k) for k in range((last - first).days + 1)]


async def _avoided_kg(
    request: Request, event: DrEvent, zone: str, basis: EmissionBasis, perf: dr.Performance
) -> F64:
    """Per interval: (baseline - actual) kWh x the marginal intensity over it, in kg (WattTime's
    recommended use of a marginal signal; NaN where not measured or not covered)."""
    steps = await intensity_steps(request, zone, SignalType.MARGINAL, basis, event.start, event.end)
    first = int(event.start.timestamp() * 1000)
    starts = first + np.arange(perf.baseline_kw.size, dtype=np.int64) * QUARTER_MS
    g_per_kwh = steps.mean_over(starts, starts + QUARTER_MS)
    kwh = (perf.baseline_kw - perf.actual_kw) * dr.INTERVAL_H
    return kwh * g_per_kwh / 1000


async def _evaluate(
    request: Request,
    event: DrEvent,
    method: str,
    marginal_zone: str | None = None,
    basis: EmissionBasis = EmissionBasis.DIRECT,
) -> DrResult:
    settings = _settings(request)
    zone = ZoneInfo(settings.vpp.timezone)
    day, first, last = _local_window(settings, event.start, event.end)
    lookback = day - timedelta(days=settings.vpp.dr_lookback_days)
    history, failed = await _history(request, event.vpp, zone, lookback, day)
    others = await fetch_dicts(
        request,
        "SELECT start_at, end_at FROM dr_events WHERE vpp = %(vpp)s AND event_id <> %(id)s "
        "AND end_at > %(from)s AND start_at < %(to)s",
        {
            "vpp": event.vpp,
            "id": event.event_id,
            "from": datetime.combine(lookback, datetime.min.time(), zone),
            "to": event.start,
        },
    )
    event_days = {d for r in others for d in _days_touched(r["start_at"], r["end_at"], zone)}
    holidays = {r["day"] for r in await fetch_dicts(request, "SELECT day FROM dr_holidays", {})}
    excluded = frozenset(event_days | failed | holidays)
    spec = dr.Event(day, first, last, holidays=frozenset(holidays))
    try:
        baseline = dr.BASELINES[method](history, spec, excluded)
    except dr.InsufficientHistory as exc:
        raise Problem(422, "insufficient-history", "Baseline not computable", str(exc)) from exc
    today = history.get(day, np.full(dr.INTERVALS_PER_DAY, np.nan))
    actual = today[first:last].copy()
    # Intervals not over yet are not measured, whatever partial data they hold.
    now_local = datetime.now(zone)
    for k in range(actual.size):
        if event.start + (k + 1) * INTERVAL > now_local:
            actual[k] = np.nan
    perf = dr.performance(
        baseline.kw,
        actual,
        direction="up" if event.direction == "up" else "down",
        committed_kw=event.committed_kw,
        valid_ratio=event.valid_ratio,
    )

    def num(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 6)

    avoided = (
        np.full(actual.size, np.nan)
        if marginal_zone is None
        else await _avoided_kg(request, event, marginal_zone, basis, perf)
    )

    intervals = [
        IntervalResult(
            start=event.start + k * INTERVAL,
            end=event.start + (k + 1) * INTERVAL,
            baseline_kw=round(float(perf.baseline_kw[k]), 6),
            actual_kw=num(perf.actual_kw[k]),
            delivered_kw=num(perf.delivered_kw[k]),
            performance_ratio=num(perf.ratio[k]),
            avoided_co2e_kg=num(avoided[k]),
        )
        for k in range(actual.size)
    ]
    complete = perf.total_delivered_kw is not None
    return DrResult(
        event=event,
        baseline_method=baseline.method,
        baseline_days=list(baseline.days),
        adjustment=baseline.adjustment,
        excluded_days=sorted(d for d in excluded if d >= lookback),
        intervals=intervals,
        total=TotalResult(
            baseline_kwh=round(float(perf.baseline_kw.sum() * dr.INTERVAL_H), 6),
            actual_kwh=round(float(perf.actual_kw.sum() * dr.INTERVAL_H), 6) if complete else None,
            delivered_kw=None if perf.total_delivered_kw is None else round(perf.total_delivered_kw, 6),
            performance_ratio=None if perf.performance_ratio is None else round(perf.performance_ratio, 6),
            valid=perf.valid,
            complete=complete,
            avoided_co2e_kg=None if np.isnan(avoided).any() else round(float(avoided.sum()), 6),
        ),
        marginal_zone=marginal_zone,
    )


@router.get("/dr-events/{event_id}/result")
async def event_result(
    event_id: EventId,
    who: AccessDep,
    request: Request,
    baseline: Annotated[BaselineName | None, Query(description="default: the event's own baseline")] = None,
    marginal_zone: Annotated[
        str | None,
        Query(
            pattern=ZONE_PATTERN, description="value the change in load with this zone's marginal intensity"
        ),
    ] = None,
    basis: EmissionBasis = EmissionBasis.DIRECT,
) -> DrResult:
    """Baseline, actual and delivered kW per interval and in total, performance against the commitment;
    with `marginal_zone`, the emissions the event avoided (estimated, never part of compliance totals)."""
    event = await _event(request, who, event_id)
    return await _evaluate(request, event, baseline or event.baseline, marginal_zone, basis)


@router.get("/dr-events/{event_id}/report")
async def event_report(
    event_id: EventId, who: AccessDep, request: Request, baseline: BaselineName | None = None
) -> dict[str, Any]:
    """The result as an OpenADR 3 style report: one resource (the VPP), 15-minute intervals with BASELINE
    and DEMAND (kW, mean) and DELTA_USAGE (kWh delivered) payloads, DATA_QUALITY MISSING where not measured."""
    event = await _event(request, who, event_id)
    result = await _evaluate(request, event, baseline or event.baseline)
    intervals = []
    for k, iv in enumerate(result.intervals):
        payloads: list[dict[str, Any]] = [{"type": "BASELINE", "values": [iv.baseline_kw]}]
        if iv.actual_kw is None or iv.delivered_kw is None:
            payloads.append({"type": "DATA_QUALITY", "values": ["MISSING"]})
        else:
            payloads += [
                {"type": "DEMAND", "values": [iv.actual_kw]},
                {"type": "DELTA_USAGE", "values": [round(iv.delivered_kw * dr.INTERVAL_H, 6)]},
                {"type": "DATA_QUALITY", "values": ["OK"]},
            ]
        intervals.append({"id": k, "payloads": payloads})
    return {
        "objectType": "REPORT",
        "programID": event.program or "meterflow-dr",
        "eventID": str(event.event_id),
        "clientName": event.vpp,
        "reportName": f"dr-event-{event.event_id}-{result.baseline_method}",
        "payloadDescriptors": [
            {
                "objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                "payloadType": "BASELINE",
                "readingType": "MEAN",
                "units": "KW",
            },
            {
                "objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                "payloadType": "DEMAND",
                "readingType": "MEAN",
                "units": "KW",
            },
            {
                "objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                "payloadType": "DELTA_USAGE",
                "readingType": "SUMMED",
                "units": "KWH",
            },
            {"objectType": "REPORT_PAYLOAD_DESCRIPTOR", "payloadType": "DATA_QUALITY"},
        ],
        "resources": [
            {
                "resourceName": event.vpp,
                "intervalPeriod": {"start": event.start.isoformat(), "duration": "PT15M"},
                "intervals": intervals,
            }
        ],
        # Not part of OpenADR: the totals the report settles on.
        "x-meterflow-performance": {
            "direction": event.direction,
            "committed_kw": event.committed_kw,
            "baseline_days": [d.isoformat() for d in result.baseline_days],
            # Avoided emissions are an estimate on request (`result?marginal_zone=`), not a performance figure.
            **result.total.model_dump(exclude={"avoided_co2e_kg"}),
        },
    }


@router.put("/dr-holidays/{day}")
async def put_holiday(day: date, body: HolidayIn, who: AccessDep, request: Request) -> Holiday:
    """A holiday: never a baseline day, and not a working day. Holidays apply to every VPP's baselines,
    so only admins set them."""
    who.require_admin()
    rows = await fetch_dicts(
        request,
        "INSERT INTO dr_holidays (day, name) VALUES (%(day)s, %(name)s) "
        "ON CONFLICT (day) DO UPDATE SET name = EXCLUDED.name RETURNING day, name",
        {"day": day, "name": body.name},
    )
    return Holiday.model_validate(rows[0])


@router.get("/dr-holidays")
async def list_holidays(who: AccessDep, request: Request) -> Page[Holiday]:
    rows = await fetch_dicts(request, "SELECT day, name FROM dr_holidays ORDER BY day", {})
    return Page[Holiday](data=[Holiday.model_validate(r) for r in rows])
