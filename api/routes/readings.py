"""Raw readings of one device, keyset-paginated in (ts, metric) order."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from api.access import Access, AccessDep, Kind
from api.models import ReadingOut, Readings
from api.problems import Problem
from meterflow.settings import Settings

router = APIRouter(prefix="/v1", tags=["readings"])

MAX_RANGE = timedelta(days=366)


def _encode_cursor(ts: datetime, metric: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([ts.isoformat(), metric])).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        ts, metric = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(ts), str(metric)
    except (ValueError, TypeError) as exc:
        raise Problem(400, "bad-cursor", "Invalid cursor", "pass next_cursor back unchanged") from exc


def _resolve_tenant(who: Access, tenant: str | None) -> str:
    scoped = who.tenant_scope(tenant, Kind.RAW)
    if scoped is None:
        raise Problem(400, "tenant-required", "Tenant required", "admin keys must pass ?tenant=")
    return scoped


@router.get("/devices/{device}/readings")
async def device_readings(
    device: str,
    who: AccessDep,
    request: Request,
    start: Annotated[datetime, Query(description="inclusive, RFC 3339")],
    end: Annotated[datetime, Query(description="exclusive, RFC 3339")],
    metric: str | None = None,
    tenant: str | None = None,
    limit: Annotated[int | None, Query(ge=1)] = None,
    cursor: str | None = None,
) -> Readings:
    """Raw readings of a device in [start, end), oldest first."""
    settings: Settings = request.app.state.settings
    if start.tzinfo is None or end.tzinfo is None:
        raise Problem(
            400, "naive-time", "Time zone required", "start and end need an offset, e.g. Z or +08:00"
        )
    if end <= start:
        raise Problem(400, "empty-range", "Empty range", "end must be after start")
    if end - start > MAX_RANGE:
        raise Problem(400, "range-too-large", "Range too large", f"at most {MAX_RANGE.days} days per request")
    page = min(limit or settings.api.default_page_size, settings.api.max_page_size)
    tenant_id = _resolve_tenant(who, tenant)
    after_ts, after_metric = _decode_cursor(cursor) if cursor else (datetime.min.replace(tzinfo=UTC), "")
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            "SELECT 1 FROM devices WHERE tenant_id = %s AND device_id = %s", (tenant_id, device)
        )
        known = await cur.fetchone()
        await cur.execute(
            "SELECT ts, metric, value, gateway_id AS gateway, received_at FROM readings "
            "WHERE tenant_id = %(tenant)s AND device_id = %(device)s AND ts >= %(start)s AND ts < %(end)s "
            "AND (%(metric)s::text IS NULL OR metric = %(metric)s) AND (ts, metric) > (%(after_ts)s, %(after_m)s) "
            "ORDER BY ts, metric LIMIT %(limit)s",
            {
                "tenant": tenant_id,
                "device": device,
                "start": start,
                "end": end,
                "metric": metric,
                "after_ts": after_ts,
                "after_m": after_metric,
                "limit": page + 1,
            },
        )
        rows = await cur.fetchall()
    if not rows and known is None:
        raise Problem(
            404, "not-found", "Not found", f"no device {device!r} with readings for tenant {tenant_id!r}"
        )
    more = len(rows) > page
    rows = rows[:page]
    next_cursor = _encode_cursor(rows[-1]["ts"], rows[-1]["metric"]) if more else None
    return Readings(
        tenant=tenant_id,
        device=device,
        data=[ReadingOut.model_validate(r) for r in rows],
        next_cursor=next_cursor,
    )
