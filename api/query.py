"""What the read routes share: who may read which tenant and site, and time ranges in a tenant's zone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import psycopg
from fastapi import Request, Response
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from api.access import Access, Kind
from api.problems import Problem

# Far outside any metering data, and inside what time zone arithmetic can represent.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def pool(request: Request) -> AsyncConnectionPool:
    p: AsyncConnectionPool = request.app.state.pool
    return p


async def fetch_dicts(request: Request, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one statement on the write pool, as dicts."""
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(sql, params)
        rows: list[dict[str, Any]] = await cur.fetchall()
        return rows


@contextmanager
def write_errors() -> Iterator[None]:
    """Database refusals of a registry write as problem+json: a duplicate is 409, an unknown reference
    (such as a VPP owner that is not an operator tenant) 422. A guard trigger's refusal is left to the
    app's `constraint` problem."""
    try:
        yield
    except psycopg.errors.UniqueViolation as exc:
        raise Problem(409, "conflict", "Already exists", str(exc.diag.message_detail or exc)) from exc
    except psycopg.errors.ForeignKeyViolation as exc:
        raise Problem(
            422, "unknown-reference", "Unknown reference", str(exc.diag.message_detail or exc)
        ) from exc


async def insert_returning(request: Request, sql: str, params: dict[str, Any]) -> dict[str, Any]:
    """One INSERT ... RETURNING, refused as `write_errors` words it."""
    with write_errors():
        async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(sql, params)
            row = await cur.fetchone()
    if row is None:
        raise RuntimeError("INSERT ... RETURNING returned no row")
    return row


def read_pool(request: Request) -> AsyncConnectionPool:
    """Autocommit connections for the hot read routes: no BEGIN and COMMIT round trips."""
    p: AsyncConnectionPool = request.app.state.read_pool
    return p


def json_response(payload: dict[str, Any]) -> Response:
    """orjson straight to bytes: for large point lists, validating and serialising them through the
    response model would cost more than the query (the model still documents the shape)."""
    return Response(orjson.dumps(payload), media_type="application/json")


class SiteCache:
    """(site, tenant filter) -> the sites rows, kept `ttl_s` seconds: a site's tenant, zone and area
    change rarely, and the lookup would otherwise be a second query on every load request."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[tuple[str, str | None], tuple[float, list[tuple[Any, ...]]]] = {}

    def get(self, key: tuple[str, str | None]) -> list[tuple[Any, ...]] | None:
        entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return None
        return entry[1]

    def put(self, key: tuple[str, str | None], rows: list[tuple[Any, ...]]) -> None:
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key] = (time.monotonic(), rows)


@dataclass(frozen=True, slots=True)
class SiteRef:
    tenant: str
    site: str
    zone: ZoneInfo
    floor_area_m2: float | None
    province: str | None


def aware(ts: datetime, zone: ZoneInfo) -> datetime:
    """A time without an offset is read in the tenant's zone."""
    return ts.replace(tzinfo=zone) if ts.tzinfo is None else ts


def time_range(start: datetime, end: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    lo, hi = aware(start, zone), aware(end, zone)
    try:
        inside = lo >= EARLIEST and hi <= LATEST
    except OverflowError:
        inside = False
    if not inside:
        raise Problem(400, "out-of-range", "Time out of range", "start and end must lie in 1970-2200")
    if hi <= lo:
        raise Problem(400, "empty-range", "Empty range", "end must be after start")
    return lo, hi


def check_points(span: timedelta, width: timedelta, max_points: int) -> None:
    if span / width > max_points:
        raise Problem(
            400,
            "range-too-large",
            "Range too large",
            f"at most {max_points} points per request; ask for a coarser interval or a shorter range",
        )


def tenant_zone(name: Any) -> ZoneInfo:
    try:
        return ZoneInfo(str(name))
    except (ValueError, KeyError):
        return ZoneInfo("Asia/Shanghai")


async def resolve_site(
    conn: psycopg.AsyncConnection[Any],
    who: Access,
    site: str,
    tenant: str | None,
    *,
    aggregate: bool,
    cache: SiteCache | None = None,
) -> SiteRef:
    """The site as this key may see it (`aggregate`: for a figure summed over its devices; the policy is
    api.access). A site id is unique within a tenant, so a key that sees several tenants names one when
    the id is ambiguous."""
    tenant = who.tenant_scope(tenant, Kind.AGGREGATE if aggregate else Kind.RAW)
    rows = cache.get((site, tenant)) if cache is not None else None
    if rows is None:
        cur = await conn.execute(
            "SELECT s.tenant_id, t.timezone, s.floor_area_m2, s.province FROM sites s JOIN tenants t USING (tenant_id) "
            "WHERE s.site_id = %(site)s AND (%(tenant)s::text IS NULL OR s.tenant_id = %(tenant)s) LIMIT 2",
            {"site": site, "tenant": tenant},
        )
        rows = await cur.fetchall()
        if cache is not None and rows:
            cache.put((site, tenant), rows)
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no site {site!r} visible to this key")
    if len(rows) > 1:
        raise Problem(
            400,
            "tenant-required",
            "Tenant required",
            f"site id {site!r} is in several tenants: pass ?tenant=",
        )
    t, zone, area, province = rows[0]
    return SiteRef(str(t), site, tenant_zone(zone), area, province)


async def resolve_tenant(conn: psycopg.AsyncConnection[Any], who: Access, tenant: str) -> ZoneInfo:
    """The zone of a tenant whose accounts (carbon figures) this key may read."""
    who.read_tenant(tenant, Kind.ACCOUNT)
    cur = await conn.execute("SELECT timezone FROM tenants WHERE tenant_id = %s", (tenant,))
    row = await cur.fetchone()
    if row is None:
        raise Problem(404, "not-found", "Not found", f"no enterprise {tenant!r}")
    return tenant_zone(row[0])
