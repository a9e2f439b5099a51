"""Site load from the pre-aggregated hypertables: 1m, 15m and 1h from the matching table, 1d and 1mo
rolled up from the 15-minute table with time_bucket in the tenant's zone (sums of intervals, never
averages of averages); time-of-use split and energy use intensity from the same 15-minute sums."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Annotated, Literal

import orjson
import psycopg
from fastapi import APIRouter, Query, Request, Response

from api.access import AccessDep
from api.models import SiteEui, SiteLoad, SiteTou, TouCalendarOut, TouSlot
from api.problems import Problem
from api.query import check_points, read_pool, resolve_site, time_range
from api.tou import Calendars, split
from meterflow.settings import Settings

router = APIRouter(prefix="/v1", tags=["load"])

Interval = Literal["1m", "15m", "1h", "1d", "1mo"]
QUARTER = timedelta(minutes=15)
# Nominal widths, for the point-count limit and the demand of fixed intervals.
WIDTH = {
    "1m": timedelta(minutes=1),
    "15m": QUARTER,
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
    "1mo": timedelta(days=28),
}
TABLE = {"1m": "agg_1m", "15m": "agg_15m", "1h": "agg_1h"}
CALENDAR_BUCKET = {"1d": "1 day", "1mo": "1 month"}

Start = Annotated[datetime, Query(description="inclusive, RFC 3339; without an offset: the tenant's zone")]
End = Annotated[datetime, Query(description="exclusive, RFC 3339; without an offset: the tenant's zone")]

_QUALITY_SUMS = """
    sum(n_measured) AS n_measured, sum(n_estimated) AS n_estimated, sum(n_substituted) AS n_substituted,
    sum(n_flagged) AS n_flagged, sum(n_uncalibrated) AS n_uncalibrated,
    sum(late_corrections) AS late_corrections, max(corrected_at) AS corrected_at"""


def _net_per_bucket(table: str) -> str:
    """Import and export per bucket of one site, with the bucket's quality counts."""
    return f"""
        SELECT bucket,
               coalesce(sum(total) FILTER (WHERE metric = 'energy_import_kwh'), 0) AS imp,
               coalesce(sum(total) FILTER (WHERE metric = 'energy_export_kwh'), 0) AS exp,
               {_QUALITY_SUMS}
        FROM {table}
        WHERE scope = 'site' AND tenant_id = %(tenant)s AND entity_id = %(site)s
          AND metric IN ('energy_import_kwh', 'energy_export_kwh')
          AND bucket >= %(start)s AND bucket < %(end)s
        GROUP BY bucket"""


_ROLLED = """
    sum(imp) AS imp, sum(exp) AS exp, max(imp - exp) AS peak_quarter_kwh, count(*) AS quarters,
    sum(n_measured) AS n_measured, sum(n_estimated) AS n_estimated, sum(n_substituted) AS n_substituted,
    sum(n_flagged) AS n_flagged, sum(n_uncalibrated) AS n_uncalibrated,
    sum(late_corrections) AS late_corrections, max(corrected_at) AS corrected_at"""

SQL: dict[str, str] = {
    "1m": f"SELECT *, NULL::float8 AS peak_quarter_kwh, 1 AS quarters FROM ({_net_per_bucket('agg_1m')}) q ORDER BY bucket",
    "15m": f"SELECT *, imp - exp AS peak_quarter_kwh, 1 AS quarters FROM ({_net_per_bucket('agg_15m')}) q ORDER BY bucket",
    # Energy and quality from the hourly table, peak demand and completeness from its quarter hours:
    # one pass over both, grouped by hour. (A join on the hour ran as a nested loop under generic plans,
    # which guess one row per side: 720 x 720 comparisons for 30 days.)
    "1h": f"""
        SELECT bucket, sum(imp) AS imp, sum(exp) AS exp, sum(n_measured) AS n_measured,
               sum(n_estimated) AS n_estimated, sum(n_substituted) AS n_substituted, sum(n_flagged) AS n_flagged,
               sum(n_uncalibrated) AS n_uncalibrated, sum(late_corrections) AS late_corrections,
               max(corrected_at) AS corrected_at, max(quarter_kwh) AS peak_quarter_kwh, sum(quarter) AS quarters
        FROM (
            SELECT h.*, NULL::float8 AS quarter_kwh, 0 AS quarter, true AS hourly FROM ({_net_per_bucket("agg_1h")}) h
            UNION ALL
            SELECT time_bucket('1 hour', q.bucket), 0, 0, 0, 0, 0, 0, 0, 0, NULL::timestamptz, q.imp - q.exp, 1, false
            FROM ({_net_per_bucket("agg_15m")}) q
        ) u
        GROUP BY bucket HAVING bool_or(hourly)""",
    **{
        interval: f"""
        SELECT time_bucket('{width}'::interval, bucket, %(tz)s) AS bucket, {_ROLLED}
        FROM ({_net_per_bucket("agg_15m")}) q GROUP BY 1 ORDER BY 1"""
        for interval, width in CALENDAR_BUCKET.items()
    },
}


# Where each interval ends, in SQL: calendar intervals end at the next local midnight or month start.
_PERIOD_END = {
    "1m": "bucket + interval '1 minute'",
    "15m": "bucket + interval '15 minutes'",
    "1h": "bucket + interval '1 hour'",
    "1d": "((bucket AT TIME ZONE %(tz)s) + interval '1 day') AT TIME ZONE %(tz)s",
    "1mo": "((bucket AT TIME ZONE %(tz)s) + interval '1 month') AT TIME ZONE %(tz)s",
}
# Hours of data behind a point's average: the interval itself at 1m and 15m, else its quarter hours.
_HOURS = {"1m": "1.0 / 60", "15m": "0.25"}
# RFC 3339 in the tenant's zone, whatever the session's TimeZone: local wall time and its UTC offset.
_OFFSET_S = "extract(epoch FROM (bucket AT TIME ZONE %(tz)s) - (bucket AT TIME ZONE 'UTC'))::int"
_LOCAL_TS = f"""
    to_char(bucket AT TIME ZONE %(tz)s, 'YYYY-MM-DD"T"HH24:MI:SS')
    || CASE WHEN {_OFFSET_S} < 0 THEN '-' ELSE '+' END
    || lpad((abs({_OFFSET_S}) / 3600)::text, 2, '0') || ':' || lpad((abs({_OFFSET_S}) %% 3600 / 60)::text, 2, '0')"""


def _finite(expr: str) -> str:
    """`expr`, or null where it is NaN or infinite: json_build_object would write those as the strings
    "NaN" and "Infinity". The processor books nothing non-finite; this keeps aggregates written before
    it refused such values from answering strings in numeric fields."""
    return f"CASE WHEN ({expr}) IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE ({expr}) END"


def _points_sql(interval: str) -> str:
    """The interval's points as one JSON array built by the database: the route passes it through, so
    no per-point work happens in Python (the response model documents the shape)."""
    hours = _HOURS.get(interval, "0.25 * quarters")
    peak = "(imp - exp) * 60" if interval == "1m" else "coalesce(peak_quarter_kwh, 0) * 4"
    avg = f"CASE WHEN {hours} > 0 THEN (imp - exp) / ({hours}) ELSE 0 END"
    complete = (
        "true"
        if interval in ("1m", "15m")
        else f"""quarters >= greatest(0, floor(extract(epoch FROM
            least({_PERIOD_END[interval]}, %(end)s, now()) - greatest(bucket, %(start)s)) / 900))"""
    )
    return f"""
        SELECT coalesce(json_agg(json_build_object(
            'ts', {_LOCAL_TS},
            'energy_kwh', {_finite("imp - exp")}, 'import_kwh', {_finite("imp")}, 'export_kwh', {_finite("exp")},
            'avg_kw', {_finite(avg)},
            'peak_kw', {_finite(peak)},
            'quality', CASE WHEN n_substituted > 0 THEN 'substituted' WHEN n_estimated > 0 THEN 'estimated'
                            ELSE 'measured' END,
            'complete', {complete},
            'counts', json_build_object('measured', n_measured, 'estimated', n_estimated,
                                        'substituted', n_substituted, 'flagged', n_flagged,
                                        'uncalibrated', n_uncalibrated),
            'late_corrections', late_corrections,
            'corrected_at', corrected_at
        ) ORDER BY bucket), '[]')::text
        FROM ({SQL[interval]}) r"""


POINTS_SQL = {interval: _points_sql(interval) for interval in SQL}


@router.get("/sites/{site}/load", response_model=SiteLoad)
async def site_load(
    site: str,
    who: AccessDep,
    request: Request,
    start: Start,
    end: End,
    interval: Interval = "15m",
    tenant: str | None = None,
) -> Response:
    """Net imported energy, average and peak demand and data quality of a site's boundary meters per
    interval in [start, end). Intervals without data are left out (a bucket with no row is missing)."""
    settings: Settings = request.app.state.settings
    async with read_pool(request).connection() as conn:
        ref = await resolve_site(conn, who, site, tenant, aggregate=True, cache=request.app.state.site_cache)
        lo, hi = time_range(start, end, ref.zone)
        check_points(hi - lo, WIDTH[interval], settings.api.max_points)
        try:
            cur = await conn.execute(
                POINTS_SQL[interval],
                {"tenant": ref.tenant, "site": site, "start": lo, "end": hi, "tz": ref.zone.key},
            )
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise _non_finite(site) from exc
        row = await cur.fetchone()
    points = str(row[0]) if row else "[]"
    head = orjson.dumps(
        {"tenant": ref.tenant, "site": site, "interval": interval, "timezone": ref.zone.key, "points": None}
    )
    # The points array goes in as the database wrote it.
    body = head[: -len(b"null}")] + points.encode() + b"}"
    return Response(body, media_type="application/json")


def _non_finite(site: str) -> Problem:
    return Problem(
        422,
        "non-finite-data",
        "Stored figures are not finite",
        f"site {site!r} has aggregates in this range whose sums overflow or are not numbers, written "
        "before the processor refused such readings (docs/processing.md#values-that-are-refused)",
    )


async def _quarters(
    request: Request, ref_tenant: str, site: str, lo: datetime, hi: datetime
) -> list[tuple[datetime, float]]:
    """Net energy per quarter hour; a problem, not a NaN total, when a stored one is not finite."""
    async with read_pool(request).connection() as conn:
        try:
            cur = await conn.execute(
                f"SELECT bucket, imp - exp FROM ({_net_per_bucket('agg_15m')}) q ORDER BY bucket",
                {"tenant": ref_tenant, "site": site, "start": lo, "end": hi},
            )
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise _non_finite(site) from exc
        quarters = [(b, float(e)) for b, e in await cur.fetchall()]
    if not all(math.isfinite(e) for _, e in quarters) or not math.isfinite(sum(e for _, e in quarters)):
        raise _non_finite(site)
    return quarters


def _calendars(request: Request) -> Calendars:
    calendars: Calendars = request.app.state.tou_calendars
    return calendars


@router.get("/tou-calendars")
async def tou_calendars(who: AccessDep, request: Request) -> list[TouCalendarOut]:
    """The time-of-use calendars this API splits load with (configurable data)."""
    return [
        TouCalendarOut(
            calendar=name,
            name=cal.name,
            provinces=cal.provinces,
            source=cal.source,
            seasons=[s.model_dump() for s in cal.seasons],
        )
        for name, cal in _calendars(request).calendars.items()
    ]


@router.get("/sites/{site}/load/tou")
async def site_tou(
    site: str,
    who: AccessDep,
    request: Request,
    start: Start,
    end: End,
    calendar: str | None = Query(default=None, description="default: the calendar of the site's province"),
    tenant: str | None = None,
) -> SiteTou:
    """A site's net imported energy split by time-of-use slot, with peak-valley ratio and load factor."""
    settings: Settings = request.app.state.settings
    async with read_pool(request).connection() as conn:
        ref = await resolve_site(conn, who, site, tenant, aggregate=True)
    lo, hi = time_range(start, end, ref.zone)
    check_points(hi - lo, QUARTER, settings.api.max_points)
    calendars = _calendars(request)
    name = calendar or calendars.for_province(ref.province)
    if name is None:
        raise Problem(
            422,
            "no-tou-calendar",
            "No time-of-use calendar",
            f"site {site!r} (province {ref.province!r}) has no calendar: pass ?calendar= (see /v1/tou-calendars)",
        )
    if name not in calendars.calendars:
        raise Problem(404, "not-found", "Not found", f"no time-of-use calendar {name!r}")
    cal = calendars.calendars[name]
    quarters = await _quarters(request, ref.tenant, site, lo, hi)
    by_slot = split(cal, ref.zone, quarters)
    total = sum(e for e, _ in by_slot.values())
    slots = [
        TouSlot(slot=s, energy_kwh=e, share=e / total if total else None, hours=n * 0.25)
        for s, (e, n) in by_slot.items()
    ]

    def avg_kw(names: tuple[str, ...]) -> float | None:
        energy = sum(by_slot[s][0] for s in names if s in by_slot)
        hours = sum(by_slot[s][1] for s in names if s in by_slot) * 0.25
        return energy / hours if hours else None

    peak, valley = avg_kw(("peak", "critical_peak")), avg_kw(("valley", "deep_valley"))
    peak_quarter = max((e for _, e in quarters), default=0.0) * 4
    hours = len(quarters) * 0.25
    return SiteTou(
        tenant=ref.tenant,
        site=site,
        calendar=name,
        start=lo,
        end=hi,
        energy_kwh=total,
        slots=slots,
        peak_valley_ratio=peak / valley if peak is not None and valley else None,
        load_factor=total / (peak_quarter * hours) if peak_quarter > 0 and hours else None,
    )


@router.get("/sites/{site}/eui")
async def site_eui(
    site: str,
    who: AccessDep,
    request: Request,
    start: Start,
    end: End,
    tenant: str | None = None,
) -> SiteEui:
    """Energy use intensity of a building: net imported electricity per m2 of floor area."""
    async with read_pool(request).connection() as conn:
        ref = await resolve_site(conn, who, site, tenant, aggregate=True)
    lo, hi = time_range(start, end, ref.zone)
    if hi - lo > timedelta(days=3700):
        raise Problem(400, "range-too-large", "Range too large", "at most ten years per request")
    if ref.floor_area_m2 is None:
        raise Problem(422, "no-floor-area", "No floor area", f"site {site!r} has no floor_area_m2 registered")
    quarters = await _quarters(request, ref.tenant, site, lo, hi)
    energy = sum(e for _, e in quarters)
    hours = len(quarters) * 0.25
    area = float(ref.floor_area_m2)
    return SiteEui(
        tenant=ref.tenant,
        site=site,
        start=lo,
        end=hi,
        floor_area_m2=area,
        energy_kwh=energy,
        eui_kwh_per_m2=energy / area,
        eui_kwh_per_m2_year=energy / area * (8760 / hours) if hours else 0.0,
        hours_with_data=hours,
        formula="EUI = sum of 15-minute net imported kWh / floor area; annualised x 8760 h / hours with data",
    )
