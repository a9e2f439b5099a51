"""Time-varying grid carbon intensity and the estimated carbon it gives an enterprise's electricity.

Intensity is reference data (every key reads it), written by the intensity service from Kafka. Figures
derived from it are labelled ``estimated`` and ``compliance: false``: the compliance figures are those of
``GET /v1/enterprises/{tenant}/carbon``, with the annual factors. Methodology:
docs/carbon-methodology.md, "Estimated carbon from time-varying grid intensity"."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import numpy as np
from fastapi import APIRouter, Path, Query, Request
from psycopg.rows import dict_row

from api.access import AccessDep
from api.models import (
    BestWindow,
    EstimatedCarbon,
    EstimatedCarbonPoint,
    IntensityPointOut,
    IntensityZone,
    ZoneIntensity,
)
from api.problems import Problem
from api.query import check_points, read_pool, resolve_tenant, time_range
from meterflow.carbon.intensity import F64, I64, Steps, best_window
from meterflow.contract import ZONE_PATTERN, EmissionBasis, SignalType
from meterflow.settings import Settings

router = APIRouter(prefix="/v1", tags=["grid intensity (estimated)"])

QUARTER = timedelta(minutes=15)
QUARTER_MS = 900_000
FINEST_POINT = timedelta(minutes=5)  # WattTime's and Electricity Maps' finest granularity
# Points last at most a day (the wire contract), so one that starts a day before a range can reach into it.
LONGEST_POINT = timedelta(days=1)
MAX_RANGE = timedelta(days=400)
_UTC = ZoneInfo("UTC")
Zone = Annotated[str, Path(pattern=ZONE_PATTERN)]
Signal = Annotated[SignalType, Query(description="marginal: for avoided-emission estimates only")]
Basis = Annotated[
    EmissionBasis, Query(description="direct (combustion only, as the annual MEE grid factors) or lifecycle")
]

_POINTS_SQL = """
    SELECT (extract(epoch FROM ts) * 1000)::bigint AS ts_ms, ts, duration_s, g_co2e_per_kwh, is_estimated,
           is_forecast, source, model_version
    FROM grid_intensity
    WHERE zone = %(zone)s AND signal_type = %(signal)s AND basis = %(basis)s
      AND ts >= %(lo)s AND ts < %(hi)s
    ORDER BY ts"""


def _range(start: datetime, end: datetime, zone: ZoneInfo = _UTC) -> tuple[datetime, datetime]:
    lo, hi = time_range(start, end, zone)
    if hi - lo > MAX_RANGE:
        raise Problem(400, "range-too-large", "Range too large", f"at most {MAX_RANGE.days} days per request")
    return lo, hi


async def _points(
    request: Request, zone: str, signal: str, basis: str, lo: datetime, hi: datetime
) -> list[dict[str, Any]]:
    async with read_pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_POINTS_SQL, {"zone": zone, "signal": signal, "basis": basis, "lo": lo, "hi": hi})
        rows: list[dict[str, Any]] = await cur.fetchall()
    return rows


async def intensity_steps(
    request: Request, zone: str, signal: SignalType, basis: EmissionBasis, lo: datetime, hi: datetime
) -> Steps:
    """The zone's step function over [lo, hi), with the points that start up to a day before."""
    return _steps(await _points(request, zone, signal.value, basis.value, lo - LONGEST_POINT, hi))


def _steps(rows: list[dict[str, Any]]) -> Steps:
    return Steps.of(
        np.array([r["ts_ms"] for r in rows], np.int64),
        np.array([r["duration_s"] * 1000 for r in rows], np.int64),
        np.array([r["g_co2e_per_kwh"] for r in rows], np.float64),
        np.array([r["is_forecast"] for r in rows], np.bool_),
    )


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


@router.get("/grid-intensity")
async def list_zones(who: AccessDep, request: Request) -> list[IntensityZone]:
    """Every zone, signal type and basis with stored intensity, and the span it covers."""
    async with read_pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute("""
            SELECT zone, signal_type, basis, count(*) AS points, min(ts) AS first,
                   max(ts + make_interval(secs => duration_s)) AS last_end, array_agg(DISTINCT source) AS sources
            FROM grid_intensity GROUP BY zone, signal_type, basis ORDER BY zone, signal_type, basis""")
        rows = await cur.fetchall()
    return [IntensityZone.model_validate(r) for r in rows]


@router.get("/grid-intensity/{zone}")
async def zone_intensity(
    zone: Zone,
    who: AccessDep,
    request: Request,
    start: Annotated[datetime, Query(description="inclusive; without an offset, UTC")],
    end: Annotated[datetime, Query(description="exclusive")],
    signal_type: Signal = SignalType.AVERAGE,
    basis: Basis = EmissionBasis.DIRECT,
) -> ZoneIntensity:
    """The points in force during [start, end) (history and forecast alike, each flagged), and the
    time-weighted mean over the part of the range they cover."""
    lo, hi = _range(start, end)
    settings: Settings = request.app.state.settings
    check_points(hi - lo, FINEST_POINT, settings.api.max_points)
    rows = await _points(request, zone, signal_type.value, basis.value, lo - LONGEST_POINT, hi)
    area, covered_ms = _steps(rows).integral(_ms(lo), _ms(hi))
    return ZoneIntensity(
        zone=zone,
        signal_type=signal_type.value,
        basis=basis.value,
        mean_g_co2e_per_kwh=round(area / covered_ms, 3) if covered_ms > 0 else None,
        covered_share=round(covered_ms / (_ms(hi) - _ms(lo)), 6),
        points=[
            IntensityPointOut.model_validate(r) for r in rows if r["ts_ms"] + 1000 * r["duration_s"] > _ms(lo)
        ],
    )


@router.get("/grid-intensity/{zone}/latest")
async def zone_latest(
    zone: Zone,
    who: AccessDep,
    request: Request,
    signal_type: Signal = SignalType.AVERAGE,
    basis: Basis = EmissionBasis.DIRECT,
) -> IntensityPointOut:
    """The newest value that is not a forecast and has started."""
    async with read_pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT ts, duration_s, g_co2e_per_kwh, is_estimated, is_forecast, source, model_version "
            "FROM grid_intensity WHERE zone = %s AND signal_type = %s AND basis = %s AND NOT is_forecast "
            "AND ts <= now() ORDER BY ts DESC LIMIT 1",
            (zone, signal_type.value, basis.value),
        )
        row = await cur.fetchone()
    if row is None:
        raise Problem(
            404, "not-found", "Not found", f"no {signal_type.value} {basis.value} intensity for zone {zone!r}"
        )
    return IntensityPointOut.model_validate(row)


@router.get("/grid-intensity/{zone}/best-window")
async def zone_best_window(
    zone: Zone,
    who: AccessDep,
    request: Request,
    start: Annotated[datetime, Query(description="earliest start of the window; without an offset, UTC")],
    end: Annotated[datetime, Query(description="latest end of the window")],
    window_minutes: Annotated[int, Query(ge=15, le=24 * 60, multiple_of=15)] = 60,
    signal_type: Signal = SignalType.AVERAGE,
    basis: Basis = EmissionBasis.DIRECT,
) -> BestWindow:
    """The window of `window_minutes`, starting on a quarter hour inside [start, end), with the lowest
    mean intensity: when to run a shiftable load. Only windows fully covered by points count."""
    lo, hi = _range(start, end)
    steps = await intensity_steps(request, zone, signal_type, basis, lo, hi)
    found = best_window(steps, _ms(lo), _ms(hi), window_minutes * 60_000, QUARTER_MS)
    first = None if found is None else datetime.fromtimestamp(found[0] / 1000, UTC)
    return BestWindow(
        zone=zone,
        signal_type=signal_type.value,
        basis=basis.value,
        window_minutes=window_minutes,
        start=first,
        end=None if first is None else first + timedelta(minutes=window_minutes),
        mean_g_co2e_per_kwh=None if found is None else round(found[1], 3),
    )


_SITE_QUARTERS_SQL = """
    SELECT s.site_id, coalesce(s.grid_zone, s.province) AS zone,
           coalesce(array_agg((extract(epoch FROM a.bucket) * 1000)::bigint ORDER BY a.bucket)
                    FILTER (WHERE a.bucket IS NOT NULL), '{}') AS buckets,
           coalesce(array_agg(a.total ORDER BY a.bucket) FILTER (WHERE a.bucket IS NOT NULL), '{}') AS kwh
    FROM sites s
    LEFT JOIN agg_15m a ON a.scope = 'site' AND a.tenant_id = s.tenant_id AND a.entity_id = s.site_id
        AND a.metric = 'energy_import_kwh' AND a.bucket >= %(lo)s AND a.bucket < %(hi)s
    WHERE s.tenant_id = %(tenant)s
    GROUP BY s.site_id, s.grid_zone, s.province ORDER BY s.site_id"""


def _period_ms(buckets_ms: I64, interval: str, zone: ZoneInfo) -> I64:
    """The start of each bucket's reporting period: the bucket, its local hour or its local day."""
    if interval == "15m":
        return buckets_ms
    distinct, back = np.unique(buckets_ms, return_inverse=True)
    starts = []
    for ms in distinct.tolist():
        local = datetime.fromtimestamp(ms / 1000, zone)
        starts.append(_ms(local.replace(minute=0) if interval == "1h" else local.replace(hour=0, minute=0)))
    return np.array(starts, np.int64)[back] if starts else buckets_ms


@router.get("/enterprises/{tenant}/carbon/estimated")
async def estimated_carbon(
    tenant: str,
    who: AccessDep,
    request: Request,
    start: Annotated[datetime, Query(description="inclusive; without an offset, in the tenant's zone")],
    end: Annotated[datetime, Query(description="exclusive")],
    interval: Literal["15m", "1h", "1d"] = "1h",
    basis: Basis = EmissionBasis.DIRECT,
) -> EstimatedCarbon:
    """Estimated Scope 2 electricity emissions with time-varying grid intensity: per 15-minute interval,
    each site's imported kWh x the time-weighted mean intensity of its grid zone over the interval,
    summed per period (quarter hours that start in [start, end) count whole). Intervals the zone's points
    do not fully cover are reported as uncovered, not estimated. Average signals only: a marginal one values a change in load, not a load (see the
    demand-response result's avoided emissions). Never part of compliance totals."""
    signal_type = SignalType.AVERAGE
    settings: Settings = request.app.state.settings
    async with read_pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        tz = await resolve_tenant(conn, who, tenant)
        lo, hi = _range(start, end, tz)
        check_points(hi - lo, QUARTER if interval == "15m" else timedelta(hours=1), settings.api.max_points)
        await cur.execute(_SITE_QUARTERS_SQL, {"tenant": tenant, "lo": lo, "hi": hi})
        sites = await cur.fetchall()
        intensity: dict[str, list[dict[str, Any]]] = {}
        for zone in sorted({str(s["zone"]) for s in sites if s["zone"]}):
            await cur.execute(
                _POINTS_SQL,
                {
                    "zone": zone,
                    "signal": signal_type.value,
                    "basis": basis.value,
                    "lo": lo - LONGEST_POINT,
                    # A last bucket that starts before `end` is counted whole: so are its points.
                    "hi": hi + QUARTER,
                },
            )
            intensity[zone] = await cur.fetchall()
    parts: list[F64] = []  # per site: bucket, import kWh, covered kWh, grams, forecast kWh
    sources: set[str] = set()
    for site in sites:
        buckets = np.array(site["buckets"], np.int64)
        kwh = np.array(site["kwh"], np.float64)
        rows = intensity.get(str(site["zone"]), [])
        sources.update(str(r["source"]) for r in rows)
        steps = _steps(rows)
        g = steps.mean_over(buckets, buckets + QUARTER_MS)
        covered = np.where(np.isnan(g), 0.0, kwh)
        forecast_share = steps.forecast_share(buckets, buckets + QUARTER_MS)
        forecast = np.where(np.nan_to_num(forecast_share) > 0, covered, 0.0)
        parts.append(
            np.stack([buckets.astype(np.float64), kwh, covered, covered * np.nan_to_num(g), forecast])
        )
    table = np.concatenate(parts, axis=1) if parts else np.zeros((5, 0))
    periods, slot = np.unique(_period_ms(table[0].astype(np.int64), interval, tz), return_inverse=True)
    sums = [np.bincount(slot, weights=table[k], minlength=periods.size) for k in range(1, 5)]
    points = [
        EstimatedCarbonPoint(
            ts=datetime.fromtimestamp(int(period) / 1000, tz),
            electricity_import_kwh=round(float(q), 6),
            covered_kwh=round(float(c), 6),
            uncovered_kwh=round(float(q - c), 6),
            co2e_kg=round(float(grams) / 1000, 3),
            mean_g_co2e_per_kwh=round(float(grams / c), 3) if c > 0 else None,
            forecast_kwh=round(float(f), 6),
        )
        for period, q, c, grams, f in zip(periods.tolist(), *(x.tolist() for x in sums), strict=True)
    ]
    return EstimatedCarbon(
        tenant=tenant,
        interval=interval,
        timezone=tz.key,
        signal_type=signal_type.value,
        basis=basis.value,
        zones={str(s["site_id"]): s["zone"] for s in sites},
        sources=sorted(sources),
        points=points,
    )
