"""Daily carbon figures of an enterprise from what the processor wrote: each site's boundary-meter
quantities per local day (sums of 15-minute intervals, which align with local days in every time zone
with a whole-quarter-hour offset) times the factors of `meterflow.carbon`. Figures are computed when
asked, so a final factor replacing a provisional one changes them without reprocessing anything."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from meterflow.carbon.accounting import (
    QUANTITY_OF_METRIC,
    CertificateBalance,
    CertificateBlock,
    day_emissions,
)


async def daily_emissions(
    conn: psycopg.AsyncConnection[Any], tenant: str, start: date, end: date
) -> list[dict[str, Any]]:
    """One row per local day in [start, end) that has boundary-meter data (see `day_emissions`).
    Green certificates are retired in day order from the start of the earliest block, so a day's
    market-based figure does not depend on the range asked for."""
    cur = await conn.execute("SELECT timezone FROM tenants WHERE tenant_id = %s", (tenant,))
    row = await cur.fetchone()
    if row is None:
        return []
    zone = ZoneInfo(str(row[0]))
    cur = await conn.execute("SELECT site_id, province FROM sites WHERE tenant_id = %s", (tenant,))
    provinces = {str(site): (str(p) if p else None) for site, p in await cur.fetchall()}
    cur = await conn.execute(
        "SELECT period_start, period_end, certificates FROM green_certificates WHERE tenant_id = %s",
        (tenant,),
    )
    blocks = [CertificateBlock(s, e, int(n)) for s, e, n in await cur.fetchall()]
    first = min([start, *(b.start for b in blocks)])
    cur = await conn.execute(
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
    by_day: dict[date, dict[str, dict[str, float]]] = {}
    for day, site, metric, total in await cur.fetchall():
        by_day.setdefault(day, {}).setdefault(str(site), {})[QUANTITY_OF_METRIC[str(metric)]] = float(total)
    await conn.commit()
    certificates = CertificateBalance(blocks)
    rows = []
    for day in sorted(by_day):
        figures = day_emissions(tenant, day, by_day[day], provinces, certificates)
        if day >= start:
            rows.append(figures)
    return rows
