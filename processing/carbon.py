"""Daily carbon figures of an enterprise from what the processor wrote: each site's boundary-meter
quantities per local day (sums of 15-minute intervals, which align with local days in every time zone
with a whole-quarter-hour offset) times the factors of `meterflow.carbon`. Figures are computed when
asked, so a final factor replacing a provisional one changes them without reprocessing anything.

The factor library in force is the packaged one (meterflow/carbon/factors.yaml) as stored in
``emission_factors``, where admins add factors and supersede provisional ones (`active_library`)."""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import psycopg

from meterflow.carbon import factors as carbon_factors
from meterflow.carbon.accounting import (
    QUANTITY_OF_METRIC,
    CertificateBalance,
    CertificateBlock,
    day_emissions,
)
from meterflow.carbon.factors import EmissionFactor, FactorLibrary

FACTOR_COLUMNS = (
    "factor_id", "carrier", "scope", "kind", "region", "year", "value", "unit", "status", "published",
    "publisher", "document", "source_url", "sources", "inputs", "note", "library_version",
)  # fmt: skip

INSERT_PACKAGED_FACTOR = (
    f"INSERT INTO emission_factors ({', '.join(FACTOR_COLUMNS)}, origin) VALUES "
    f"({', '.join('%(' + c + ')s' for c in FACTOR_COLUMNS)}, 'packaged') ON CONFLICT (factor_id) DO NOTHING"
)


def factor_row(factor: EmissionFactor, library_version: int) -> dict[str, Any]:
    """An `emission_factors` row of a factor; JSON columns as text."""
    first = factor.sources[0]
    return {
        "factor_id": factor.id,
        "carrier": factor.carrier,
        "scope": factor.scope,
        "kind": factor.kind,
        "region": factor.region,
        "year": factor.year,
        "value": factor.value,
        "unit": factor.unit,
        "status": factor.status,
        "published": factor.published,
        "publisher": None,
        "document": first.title,
        "source_url": first.url,
        "sources": orjson.dumps([s.model_dump() for s in factor.sources]).decode(),
        "inputs": None if factor.inputs is None else orjson.dumps(factor.inputs.model_dump()).decode(),
        "note": factor.note,
        "library_version": library_version,
    }


def packaged_factor_rows() -> list[dict[str, Any]]:
    library = carbon_factors.load()
    return [factor_row(f, library.version) for f in library.factors]


async def sync_packaged_factors(conn: psycopg.AsyncConnection[Any]) -> None:
    """Add packaged factors the database does not have yet (existing rows are never touched)."""
    async with conn.cursor() as cur:
        await cur.executemany(INSERT_PACKAGED_FACTOR, packaged_factor_rows())
    await conn.commit()


def library_from_rows(rows: list[dict[str, Any]]) -> FactorLibrary:
    """The packaged library's regions, bibliography and fuel defaults with the factors of `rows` (all
    stored rows: superseded ones are left out and a superseded fuel default follows its successor)."""
    packaged = carbon_factors.load()
    successor = {r["factor_id"]: r["superseded_by"] for r in rows if r["superseded_by"]}

    def current(factor_id: str) -> str:
        seen = set()
        while factor_id in successor and factor_id not in seen:
            seen.add(factor_id)
            factor_id = successor[factor_id]
        return factor_id

    factors = [
        {
            "id": r["factor_id"],
            "carrier": r["carrier"],
            "scope": r["scope"],
            "kind": r["kind"],
            "year": r["year"],
            "region": r["region"],
            "value": r["value"],
            "unit": r["unit"],
            "published": r["published"],
            "status": r["status"],
            "sources": r["sources"],
            "inputs": r["inputs"],
            "note": r["note"],
        }
        for r in rows
        if not r["superseded_by"]
    ]
    return FactorLibrary.model_validate(
        {
            "version": max([packaged.version, *(int(r["library_version"]) for r in rows)]),
            "sources": {k: v.model_dump() for k, v in packaged.sources.items()},
            "fuel_defaults": {c: current(f) for c, f in packaged.fuel_defaults.items()},
            "grid_regions": packaged.grid_regions.model_dump(),
            "factors": factors,
        }
    )


async def active_library(conn: psycopg.AsyncConnection[Any]) -> FactorLibrary:
    cur = await conn.execute(
        f"SELECT {', '.join(FACTOR_COLUMNS)}, superseded_by FROM emission_factors ORDER BY factor_id"
    )
    names = [d.name for d in cur.description or ()]
    rows = [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]
    return library_from_rows(rows)


class NonFiniteFigures(ValueError):
    """A day's stored quantities or figures are not finite numbers: aggregates written before the
    processor refused non-finite and out-of-range readings. Refused rather than answered as NaN."""


async def daily_emissions(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    start: date,
    end: date,
    library: FactorLibrary | None = None,
) -> list[dict[str, Any]]:
    """One row per local day in [start, end) that has boundary-meter data (see `day_emissions`).
    Green certificates are retired in day order from the start of the earliest block, so a day's
    market-based figure does not depend on the range asked for. `library` defaults to the packaged one."""
    cur = await conn.execute("SELECT timezone FROM tenants WHERE tenant_id = %s", (tenant,))
    row = await cur.fetchone()
    if row is None:
        return []
    try:
        zone = ZoneInfo(str(row[0]))
    except (ValueError, ZoneInfoNotFoundError):
        # A zone stored before registration checked it (api.models.TimeZone): the default zone, as the
        # API's load routes read such a tenant (api.query.tenant_zone), instead of no figure at all.
        zone = ZoneInfo("Asia/Shanghai")
    cur = await conn.execute("SELECT site_id, province FROM sites WHERE tenant_id = %s", (tenant,))
    provinces = {str(site): (str(p) if p else None) for site, p in await cur.fetchall()}
    cur = await conn.execute(
        "SELECT period_start, period_end, certificates FROM green_certificates WHERE tenant_id = %s",
        (tenant,),
    )
    blocks = [CertificateBlock(s, e, int(n)) for s, e, n in await cur.fetchall()]
    first = min([start, *(b.start for b in blocks)])
    query = conn.execute(
        """
        SELECT (bucket AT TIME ZONE %(tz)s)::date AS day, entity_id, metric, sum(total)
        FROM agg_15m
        WHERE scope = 'site' AND tenant_id = %(tenant)s AND metric = ANY(%(metrics)s)
          AND bucket >= %(lo)s AND bucket < %(hi)s
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""",
        {
            "tz": str(zone),
            "tenant": tenant,
            "metrics": list(QUANTITY_OF_METRIC),
            "lo": datetime.combine(first, datetime.min.time(), zone),
            "hi": datetime.combine(end, datetime.min.time(), zone),
        },
    )
    try:
        cur = await query
    except psycopg.errors.NumericValueOutOfRange as exc:
        raise NonFiniteFigures(f"{tenant}: daily sums of stored aggregates overflow") from exc
    by_day: dict[date, dict[str, dict[str, float]]] = {}
    for day, site, metric, total in await cur.fetchall():
        by_day.setdefault(day, {}).setdefault(str(site), {})[QUANTITY_OF_METRIC[str(metric)]] = float(total)
    await conn.commit()
    certificates = CertificateBalance(blocks)
    rows = []
    for day in sorted(by_day):
        figures = day_emissions(tenant, day, by_day[day], provinces, certificates, library)
        if not all(math.isfinite(v) for v in figures.values() if isinstance(v, float)):
            raise NonFiniteFigures(f"{tenant}: the figures of {day} are not finite")
        if day >= start:
            rows.append(figures)
    return rows
