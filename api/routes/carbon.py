"""Enterprise carbon: points per day, month or year and the annual carbon account with its grade.

Everything is computed at query time from the 15-minute site aggregates and the factor library in
force (`emission_factors`), with `processing.carbon.daily_emissions`, the calculation the simulator's
ground truth is checked against; a factor an admin adds or supersedes changes the figures at once.
Periods are local days of the tenant's zone; months and years are sums of days."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import psycopg
from fastapi import APIRouter, Query, Request, Response
from psycopg.rows import dict_row

from api.access import AccessDep, Kind
from api.grading import Peer, Schemes, grade, intensity
from api.models import (
    AccountLine,
    CarbonAccount,
    CarbonPoint,
    EnterpriseCarbon,
    FactorRef,
    OutputValue,
    OutputValueIn,
    Page,
)
from api.problems import Problem
from api.query import insert_returning, pool, read_pool, resolve_tenant, time_range
from meterflow.carbon.accounting import CARRIER_FIELDS, QUANTITY_FIELDS
from meterflow.carbon.factors import FactorLibrary
from meterflow.settings import Settings
from processing.carbon import NonFiniteFigures, active_library, daily_emissions

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["carbon"])

MAX_DAYS = 3700  # ten years
Year = Annotated[int, Query(ge=2000, le=2100)]


async def factor_library(request: Request, conn: psycopg.AsyncConnection[Any]) -> FactorLibrary:
    """The library in force, rebuilt only when `emission_factors` changed (any process may write it)."""
    cur = await conn.execute("SELECT count(*), max(created_at), count(superseded_by) FROM emission_factors")
    stamp = await cur.fetchone()
    cached: tuple[Any, FactorLibrary] | None = getattr(request.app.state, "factor_library", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    library = await active_library(conn)
    request.app.state.factor_library = (stamp, library)
    return library


def _period(day: date, interval: str) -> date:
    if interval == "1mo":
        return day.replace(day=1)
    if interval == "1y":
        return day.replace(month=1, day=1)
    return day


def _ids(rows: Iterable[dict[str, Any]], column: str) -> list[str]:
    return sorted({i for r in rows for i in str(r[column]).split(",") if i})


def _refs(library: FactorLibrary, ids: Iterable[str]) -> list[FactorRef]:
    out = []
    for factor_id in sorted(set(ids)):
        f = library.get(factor_id)
        out.append(
            FactorRef(
                factor_id=f.id,
                carrier=f.carrier,
                kind=f.kind,
                region=f.region,
                year=f.year,
                value=f.value,
                unit=f.unit,
                status=f.status,
            )
        )
    return out


def _sum(rows: list[dict[str, Any]], name: str, digits: int = 3) -> float:
    total = sum(float(r[name]) for r in rows)
    if not math.isfinite(total):
        raise NonFiniteFigures(f"the sum of {name} is not finite")
    return round(total, digits)


def _per(value: float, divisor: float | None) -> float | None:
    """value / divisor, or None when there is no finite figure (no divisor, or one stored before the API
    bounded it, such as 5e-324, whose quotient is inf)."""
    if not divisor:
        return None
    result = value / divisor
    return result if math.isfinite(result) else None


def _non_finite(tenant: str) -> Problem:
    return Problem(
        422,
        "non-finite-data",
        "Stored figures are not finite",
        f"enterprise {tenant!r} has aggregates in this range whose sums overflow or are not numbers, "
        "written before the processor refused such readings (docs/processing.md#values-that-are-refused)",
    )


def _point(ts: datetime, rows: list[dict[str, Any]]) -> CarbonPoint:
    return CarbonPoint(
        ts=ts,
        days=len(rows),
        co2e_kg=_sum(rows, "co2e_location_kg"),
        co2e_market_kg=_sum(rows, "co2e_market_kg"),
        scope1_kg=_sum(rows, "scope1_kg"),
        scope2_location_kg=_sum(rows, "scope2_location_kg"),
        scope2_market_kg=_sum(rows, "scope2_market_kg"),
        by_carrier={name: _sum(rows, name) for name in CARRIER_FIELDS},
        quantities={name: _sum(rows, name, 6) for name in QUANTITY_FIELDS},
        green_traced_kwh=_sum(rows, "green_traced_kwh", 6),
        provisional=any(r["provisional"] for r in rows),
        factor_ids=_ids(rows, "factor_ids"),
    )


@router.get("/enterprises/{tenant}/carbon")
async def enterprise_carbon(
    tenant: str,
    who: AccessDep,
    request: Request,
    start: Annotated[datetime, Query(description="inclusive; the local day containing it is the first")],
    end: Annotated[datetime, Query(description="exclusive; a partial last local day is included")],
    interval: Literal["1d", "1mo", "1y"] = "1d",
) -> EnterpriseCarbon:
    """Scope 1 and Scope 2 (location- and market-based) emissions per local day, month or year, by
    carrier, with the factor ids behind them."""
    settings: Settings = request.app.state.settings
    async with read_pool(request).connection() as conn:
        zone = await resolve_tenant(conn, who, tenant)
        lo, hi = time_range(start, end, zone)
        first, last = _local_days(lo, hi, zone)
        if (last - first).days > MAX_DAYS or (
            interval == "1d" and (last - first).days > settings.api.max_points
        ):
            raise Problem(400, "range-too-large", "Range too large", f"at most {MAX_DAYS} days per request")
        library = await factor_library(request, conn)
        try:
            days = await daily_emissions(conn, tenant, first, last, library)
        except NonFiniteFigures as exc:
            raise _non_finite(tenant) from exc
    grouped: dict[date, list[dict[str, Any]]] = {}
    for row in days:
        grouped.setdefault(_period(row["day"], interval), []).append(row)
    try:
        points = [_point(datetime.combine(p, time(), zone), rows) for p, rows in sorted(grouped.items())]
    except NonFiniteFigures as exc:
        raise _non_finite(tenant) from exc
    return EnterpriseCarbon(
        tenant=tenant,
        interval=interval,
        timezone=zone.key,
        points=points,
        factors=_refs(library, (i for p in points for i in p.factor_ids)),
    )


def _local_days(lo: datetime, hi: datetime, zone: ZoneInfo) -> tuple[date, date]:
    first = lo.astimezone(zone).date()
    local_hi = hi.astimezone(zone)
    last = local_hi.date() + (
        timedelta(days=1) if local_hi.timetz().replace(tzinfo=None) != time() else timedelta()
    )
    return first, last


# --- output values -----------------------------------------------------------------------------------

_OUTPUT_COLS = (
    "tenant_id AS tenant, period_start, period_end, value_added_cny, output_value_cny, product_quantity, "
    "product_unit, created_at"
)


@router.post("/enterprises/{tenant}/output-values", status_code=201)
async def submit_output_value(
    tenant: str, body: OutputValueIn, who: AccessDep, request: Request
) -> OutputValue:
    """Submit (or resubmit, replacing) value added, output value and product quantity for a period:
    the denominators of carbon intensity. Admins, or the enterprise's own key."""
    who.write_tenant(tenant)
    if body.period_end <= body.period_start:
        raise Problem(422, "invalid-period", "Invalid period", "period_end must be after period_start")
    if body.value_added_cny is None and body.output_value_cny is None and body.product_quantity is None:
        raise Problem(422, "empty-submission", "Nothing submitted", "give at least one of the values")
    row = await insert_returning(
        request,
        "INSERT INTO output_values (tenant_id, period_start, period_end, value_added_cny, output_value_cny, "
        "product_quantity, product_unit, submitted_by) VALUES (%(tenant)s, %(period_start)s, %(period_end)s, "
        "%(value_added_cny)s, %(output_value_cny)s, %(product_quantity)s, %(product_unit)s, %(key)s) "
        "ON CONFLICT (tenant_id, period_start, period_end) DO UPDATE SET value_added_cny = EXCLUDED.value_added_cny, "
        "output_value_cny = EXCLUDED.output_value_cny, product_quantity = EXCLUDED.product_quantity, "
        "product_unit = EXCLUDED.product_unit, submitted_by = EXCLUDED.submitted_by, created_at = now() "
        f"RETURNING {_OUTPUT_COLS}",
        {**body.model_dump(), "tenant": tenant, "key": who.key_id},
    )
    return OutputValue.model_validate(row)


@router.get("/enterprises/{tenant}/output-values")
async def list_output_values(tenant: str, who: AccessDep, request: Request) -> Page[OutputValue]:
    who.read_tenant(tenant, Kind.ACCOUNT)
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_OUTPUT_COLS} FROM output_values WHERE tenant_id = %s ORDER BY period_start, period_end",
            (tenant,),
        )
        rows = await cur.fetchall()
    return Page[OutputValue](data=[OutputValue.model_validate(r) for r in rows])


async def _year_outputs(
    conn: psycopg.AsyncConnection[Any], tenants: list[str], year: int
) -> dict[str, dict[str, Any]]:
    """Per tenant, the year's submitted values: a submission for exactly the year wins, otherwise the
    sum of the submissions inside the year (so monthly submissions add up to the year)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT tenant_id, period_start, period_end, value_added_cny, output_value_cny, product_quantity, "
            "product_unit FROM output_values WHERE tenant_id = ANY(%(t)s) AND period_start >= %(lo)s "
            "AND period_end <= %(hi)s ORDER BY tenant_id, period_start",
            {"t": tenants, "lo": date(year, 1, 1), "hi": date(year + 1, 1, 1)},
        )
        rows = await cur.fetchall()
    out: dict[str, dict[str, Any]] = {}
    for tenant in tenants:
        mine = [r for r in rows if r["tenant_id"] == tenant]
        whole = [
            r
            for r in mine
            if r["period_start"] == date(year, 1, 1) and r["period_end"] == date(year + 1, 1, 1)
        ]
        chosen = whole or mine
        if not chosen:
            continue

        def total(name: str, chosen: list[dict[str, Any]] = chosen) -> float | None:
            values = [float(r[name]) for r in chosen if r[name] is not None]
            return sum(values) if values else None

        units = {r["product_unit"] for r in chosen if r["product_unit"]}
        out[tenant] = {
            "value_added_cny": total("value_added_cny"),
            "output_value_cny": total("output_value_cny"),
            "product_quantity": total("product_quantity") if len(units) <= 1 else None,
            "product_unit": units.pop() if len(units) == 1 else None,
        }
    return out


# --- carbon account ----------------------------------------------------------------------------------


async def _account(request: Request, who: AccessDep, tenant: str, year: int, scheme: str) -> CarbonAccount:
    """The account, or a problem when the tenant's stored figures are not finite (never a 500 or NaN)."""
    try:
        return await _account_figures(request, who, tenant, year, scheme)
    except NonFiniteFigures as exc:
        raise _non_finite(tenant) from exc


async def _account_figures(
    request: Request, who: AccessDep, tenant: str, year: int, scheme: str
) -> CarbonAccount:
    settings: Settings = request.app.state.settings
    schemes: Schemes = request.app.state.grading_schemes
    if scheme not in schemes.schemes:
        raise Problem(
            404, "not-found", "Not found", f"no grading scheme {scheme!r}; known: {sorted(schemes.schemes)}"
        )
    async with read_pool(request).connection() as conn:
        zone = await resolve_tenant(conn, who, tenant)
        library = await factor_library(request, conn)
        first, last = date(year, 1, 1), date(year + 1, 1, 1)
        days = await daily_emissions(conn, tenant, first, last, library)
        lo, hi = datetime.combine(first, time(), zone), datetime.combine(last, time(), zone)
        try:
            cur = await conn.execute(
                "SELECT coalesce(sum(a.total), 0) FROM agg_15m a JOIN devices d "
                "ON d.tenant_id = a.tenant_id AND d.device_id = a.entity_id "
                "WHERE a.scope = 'device' AND a.tenant_id = %(t)s AND d.device_type = 'pv' "
                "AND a.metric = 'energy_export_kwh' AND a.bucket >= %(lo)s AND a.bucket < %(hi)s",
                {"t": tenant, "lo": lo, "hi": hi},
            )
        except psycopg.errors.NumericValueOutOfRange as exc:
            raise NonFiniteFigures("on-site generation overflows") from exc
        row = await cur.fetchone()
        onsite = float(row[0]) if row else 0.0
        if not math.isfinite(onsite):
            raise NonFiniteFigures("on-site generation is not finite")
        cur = await conn.execute(
            "SELECT t.industry_code, coalesce(array_agg(p.tenant_id) FILTER (WHERE p.tenant_id IS NOT NULL), '{}') "
            "FROM tenants t LEFT JOIN tenants p ON p.industry_code = t.industry_code "
            "WHERE t.tenant_id = %s GROUP BY t.industry_code",
            (tenant,),
        )
        found = await cur.fetchone()
        industry: str | None = found[0] if found else None
        industry_tenants: list[str] = list(found[1]) if found and industry else [tenant]
        outputs = await _year_outputs(conn, sorted({tenant, *industry_tenants}), year)
        peers: list[Peer] = []
        co2e = _sum(days, "co2e_location_kg")
        for peer in industry_tenants if industry else []:
            va = outputs.get(peer, {}).get("value_added_cny")
            if va is None:
                continue
            try:
                peer_days = (
                    days if peer == tenant else await daily_emissions(conn, peer, first, last, library)
                )
                peers.append(Peer(peer, _sum(peer_days, "co2e_location_kg"), va))
            except NonFiniteFigures:
                # Another tenant's poisoned figures must not refuse this account: that peer is left out
                # of the industry average (`peers` in the grade counts who is in).
                log.warning("peer %s left out of the %s average: figures not finite", peer, industry)
        cur = await conn.execute(
            "SELECT annual_output_value_cny FROM tenants WHERE tenant_id = %s", (tenant,)
        )
        registered = await cur.fetchone()
    mine = outputs.get(tenant, {})
    value_added = mine.get("value_added_cny")
    output_value = mine.get("output_value_cny") or (
        float(registered[0]) if registered and registered[0] is not None else None
    )
    product, unit = mine.get("product_quantity"), mine.get("product_unit")
    energy = {name: _sum(days, name, 6) for name in QUANTITY_FIELDS}
    green_traced = _sum(days, "green_traced_kwh", 6)
    consumption = energy["electricity_import_kwh"] + onsite - energy["electricity_export_kwh"]
    green = green_traced + max(0.0, onsite - energy["electricity_export_kwh"])
    share = _per(green, consumption) if consumption > 0 else None
    l_value = intensity(co2e, value_added) if value_added else None
    per_output = intensity(co2e, output_value) if output_value else None
    per_product = _per(co2e / 1000, product)
    scope_ids = {
        name: _ids(days, f"{name}_factor_ids") for name in ("scope1", "scope2_location", "scope2_market")
    }
    graded = (
        grade(scheme, schemes.schemes[scheme], l_value, industry, peers, settings.api.grading_min_peers)
        if l_value is not None
        else None
    )
    quantities_formula = (
        f"sum of the boundary meters' 15-minute intervals over the local days of {year} ({zone.key})"
    )
    lines = [
        *(
            AccountLine(name=n, value=energy[n], unit=n.rsplit("_", 1)[-1], formula=quantities_formula)
            for n in QUANTITY_FIELDS
        ),
        AccountLine(
            name="scope1_kg",
            value=_sum(days, "scope1_kg"),
            unit="kgCO2",
            formula="sum over days and sites of fuel quantity x fuel-combustion factor",
            factor_ids=scope_ids["scope1"],
        ),
        AccountLine(
            name="scope2_location_kg",
            value=_sum(days, "scope2_location_kg"),
            unit="kgCO2",
            formula="sum over days and sites of imported kWh x grid factor of the site's province (year of the day, "
            "latest published when not yet out) + purchased heat GJ x heat factor",
            factor_ids=scope_ids["scope2_location"],
        ),
        AccountLine(
            name="scope2_market_kg",
            value=_sum(days, "scope2_market_kg"),
            unit="kgCO2",
            formula="sum over days and sites of (imported kWh - green certificates retired that day) x residual-mix "
            "factor (grid factor where none exists) + purchased heat",
            factor_ids=scope_ids["scope2_market"],
        ),
        AccountLine(
            name="co2e_kg",
            value=co2e,
            unit="kgCO2",
            formula="scope1_kg + scope2_location_kg",
            factor_ids=sorted({*scope_ids["scope1"], *scope_ids["scope2_location"]}),
        ),
        AccountLine(
            name="co2e_market_kg",
            value=_sum(days, "co2e_market_kg"),
            unit="kgCO2",
            formula="scope1_kg + scope2_market_kg",
            factor_ids=sorted({*scope_ids["scope1"], *scope_ids["scope2_market"]}),
        ),
        AccountLine(
            name="onsite_renewable_kwh",
            value=onsite,
            unit="kWh",
            formula="sum of the PV devices' export (generation) registers over the year",
        ),
        AccountLine(
            name="green_traced_kwh",
            value=green_traced,
            unit="kWh",
            formula="green certificates (1 GEC = 1,000 kWh) retired day by day against imported kWh",
        ),
        AccountLine(
            name="green_power_share",
            value=share,
            unit="1",
            formula="(green_traced_kwh + max(0, onsite_renewable_kwh - electricity_export_kwh)) / "
            "(electricity_import_kwh + onsite_renewable_kwh - electricity_export_kwh)",
        ),
        AccountLine(
            name="value_added_cny",
            value=value_added,
            unit="CNY",
            formula="submitted for the year (or the sum of submissions inside it)",
        ),
        AccountLine(
            name="output_value_cny",
            value=output_value,
            unit="CNY",
            formula="submitted for the year, else the registered annual output value",
        ),
        AccountLine(
            name="intensity",
            value=l_value,
            unit="tCO2/10^4 CNY",
            formula="(co2e_kg / 1000) / (value_added_cny / 10,000); on-site generation is already outside the "
            "grid import, so nothing more is subtracted",
        ),
        AccountLine(
            name="intensity_per_output_value",
            value=per_output,
            unit="tCO2/10^4 CNY",
            formula="(co2e_kg / 1000) / (output_value_cny / 10,000)",
        ),
        AccountLine(
            name="intensity_per_product",
            value=per_product,
            unit=f"tCO2/{unit or 'unit'}",
            formula="(co2e_kg / 1000) / product_quantity",
        ),
    ]
    all_ids = {i for ids in scope_ids.values() for i in ids}
    return CarbonAccount(
        tenant=tenant,
        year=year,
        timezone=zone.key,
        days_with_data=len(days),
        energy=energy,
        scope1_kg=_sum(days, "scope1_kg"),
        scope2_location_kg=_sum(days, "scope2_location_kg"),
        scope2_market_kg=_sum(days, "scope2_market_kg"),
        co2e_kg=co2e,
        co2e_market_kg=_sum(days, "co2e_market_kg"),
        onsite_renewable_kwh=onsite,
        green_traced_kwh=green_traced,
        green_power_share=share,
        value_added_cny=value_added,
        output_value_cny=output_value,
        product_quantity=product,
        product_unit=unit,
        intensity=l_value,
        intensity_per_output_value=per_output,
        intensity_per_product=per_product,
        provisional=any(r["provisional"] for r in days),
        grade=graded,
        lines=lines,
        factors=_refs(library, all_ids),
    )


SchemeParam = Annotated[str, Query(description="grading scheme id")]


@router.get("/enterprises/{tenant}/carbon-account")
async def carbon_account(
    tenant: str,
    who: AccessDep,
    request: Request,
    year: Year,
    scheme: SchemeParam = "zhejiang-carbon-efficiency",
) -> CarbonAccount:
    """An enterprise's carbon account for a calendar year (local days): energy by carrier, Scope 1 and
    both Scope 2 figures, on-site renewables and green-power share, submitted output, intensities and a
    grade, each figure with its formula and factor ids."""
    return await _account(request, who, tenant, year, scheme)


@router.get("/enterprises/{tenant}/carbon-account/export")
async def carbon_account_export(
    tenant: str,
    who: AccessDep,
    request: Request,
    year: Year,
    format: Literal["csv", "json"] = "csv",
    scheme: SchemeParam = "zhejiang-carbon-efficiency",
) -> Response:
    """The carbon account as a file for a regulator's platform: CSV (one line per figure) or JSON."""
    account = await _account(request, who, tenant, year, scheme)
    name = f"carbon-account-{tenant}-{year}"
    if format == "json":
        return Response(
            account.model_dump_json(indent=2),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{name}.json"'},
        )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tenant", "year", "name", "value", "unit", "formula", "factor_ids"])
    for line in account.lines:
        writer.writerow(
            [
                tenant,
                year,
                line.name,
                "" if line.value is None else repr(line.value),
                line.unit,
                line.formula,
                " ".join(line.factor_ids),
            ]
        )
    g = account.grade
    if g is not None:
        for n, v in (
            ("grade_level", g.level),
            ("grade", g.label or ""),
            ("grade_k", g.k),
            ("grade_refused", g.refused or ""),
        ):
            writer.writerow([tenant, year, n, "" if v is None else v, g.scheme, g.formula, ""])
    return Response(
        out.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )
