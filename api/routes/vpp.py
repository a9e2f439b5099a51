"""VPPs: resource models, flexibility capacity now / history / per node, a live stream, stale resources.

Capacity figures are what the vpp service (processing/vpp.py) last wrote. Operators and admins see every
VPP; an enterprise key sees the VPPs its own devices belong to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
import psycopg
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field

from api.auth import Principal, PrincipalDep, require_tenant
from api.models import Page
from api.problems import Problem
from api.query import fetch_dicts, pool
from meterflow.contract import DEVICE_PATTERN, TENANT_PATTERN
from meterflow.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["vpp"])

ResourceClass = Literal["battery", "pv", "ev_charger", "building_load", "base_station"]
Duration = Annotated[int, Query(description="required duration, minutes: 15, 30 or 60 by default")]
HISTORY_INTERVALS = {"1m": "1 minute", "15m": "15 minutes", "1h": "1 hour"}
MAX_HISTORY = timedelta(days=93)
# Comment lines keep idle proxies from closing a quiet stream.
KEEPALIVE_S = 15.0


class ResourceIn(BaseModel):
    """A device's resource model. Fields shared with metering (VPP, node, rated power, energy capacity,
    SoC limits, telemetry interval) are stored on the device and updated when given here."""

    model_config = ConfigDict(extra="forbid")

    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)]
    resource_class: ResourceClass
    vpp: Annotated[str, Field(pattern=DEVICE_PATTERN)] | None = None
    topology_node: Annotated[str, Field(min_length=1, max_length=200)] | None = Field(
        default=None, description="substation / feeder / transformer the resource hangs off"
    )
    rated_power_kw: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    energy_capacity_kwh: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    soc_min_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    soc_max_pct: Annotated[float, Field(ge=0, le=100)] | None = None
    telemetry_interval_s: Annotated[int, Field(gt=0, le=86_400)] | None = None
    charge_max_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        default=None, description="storage; default: rated power"
    )
    discharge_max_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        default=None, description="storage; default: rated power"
    )
    efficiency: Annotated[float, Field(gt=0, le=1)] = Field(default=0.95, description="one-way, storage")
    curtailable: bool = Field(default=False, description="PV: can be curtailed on request")
    min_power_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] = Field(
        default=0.0, description="EV charger: minimum charging power"
    )
    sheddable_share: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.0, description="building load: share of the current load that can be shed"
    )
    max_shed_min: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="building load: longest shed; unlimited when absent"
    )
    reserved_soc_pct: Annotated[float, Field(ge=0, le=100)] = Field(
        default=0.0, description="base station: backup SoC that is never dispatched"
    )


class Resource(BaseModel):
    tenant: str
    device: str
    resource_class: ResourceClass
    vpp: str | None
    topology_node: str | None
    rated_power_kw: float | None
    energy_capacity_kwh: float | None
    soc_min_pct: float
    soc_max_pct: float
    telemetry_interval_s: int
    charge_max_kw: float | None
    discharge_max_kw: float | None
    efficiency: float
    curtailable: bool
    min_power_kw: float
    sheddable_share: float
    max_shed_min: float | None
    reserved_soc_pct: float
    updated_at: datetime


class VppSummary(BaseModel):
    vpp: str
    resources: int
    nodes: int
    tenants: int


class CapacityNow(BaseModel):
    vpp: str
    duration_min: int
    up_kw: float
    down_kw: float
    nameplate_up_kw: float
    nameplate_down_kw: float
    devices_online: int
    devices_stale: int
    as_of: datetime


class CapacityPoint(BaseModel):
    ts: datetime
    up_kw: float
    down_kw: float
    nameplate_up_kw: float
    nameplate_down_kw: float
    devices_online: int
    devices_stale: int


class CapacityHistory(BaseModel):
    vpp: str
    interval: str
    duration_min: int
    points: list[CapacityPoint]


class NodeCapacity(BaseModel):
    node: str
    up_kw: float
    down_kw: float
    devices_online: int
    devices_stale: int


class NodesCapacity(BaseModel):
    vpp: str
    duration_min: int
    as_of: datetime | None
    nodes: list[NodeCapacity]


class StaleDevice(BaseModel):
    tenant: str
    device: str
    last_seen: datetime | None
    telemetry_interval_s: int


class StaleDevices(BaseModel):
    vpp: str
    devices: list[StaleDevice]


def _check_duration(request: Request, duration_min: int) -> None:
    settings: Settings = request.app.state.settings
    if duration_min not in settings.vpp.durations_min:
        raise Problem(
            400,
            "bad-duration",
            "Unsupported duration",
            f"duration_min must be one of {list(settings.vpp.durations_min)}",
        )


def _sees_all(who: Principal) -> bool:
    return who.role in ("admin", "operator")


async def require_vpp(request: Request, who: Principal, vpp: str) -> None:
    """404 unless the VPP has resources this key may see."""
    rows = await fetch_dicts(
        request,
        "SELECT 1 FROM devices WHERE vpp = %(vpp)s AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) LIMIT 1",
        {"vpp": vpp, "tenant": None if _sees_all(who) else who.tenant},
    )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no VPP {vpp!r} visible to this key")


# --- resource models -------------------------------------------------------------------------------

_RESOURCE_SQL = """
    SELECT d.tenant_id AS tenant, d.device_id AS device, r.resource_class, d.vpp, d.topology_node,
           d.rated_power_kw, d.energy_capacity_kwh, d.soc_min_pct, d.soc_max_pct, d.telemetry_interval_s,
           r.charge_max_kw, r.discharge_max_kw, r.efficiency, r.curtailable, r.min_power_kw,
           r.sheddable_share, r.max_shed_min, r.reserved_soc_pct, r.updated_at
    FROM vpp_resources r JOIN devices d USING (tenant_id, device_id)
    WHERE d.tenant_id = %(tenant)s AND d.device_id = %(device)s"""


def _check_model(body: ResourceIn, device: dict[str, Any]) -> None:
    """Ratings the class needs, after merging the body with what the device already has."""

    def merged(name: str) -> Any:
        value = getattr(body, name)
        return device[name] if value is None else value

    problems: list[str] = []
    if merged("vpp") is None:
        problems.append("a resource needs a vpp (on the device or in this body)")
    storage = body.resource_class in ("battery", "base_station")
    if storage and merged("energy_capacity_kwh") is None:
        problems.append(f"a {body.resource_class} needs energy_capacity_kwh")
    if merged("rated_power_kw") is None and not (
        storage and body.charge_max_kw is not None and body.discharge_max_kw is not None
    ):
        problems.append(
            "rated_power_kw is needed (storage may give charge_max_kw and discharge_max_kw instead)"
        )
    if body.resource_class == "base_station" and body.reserved_soc_pct <= 0:
        problems.append("a base station needs reserved_soc_pct: the backup share that is never dispatched")
    if body.resource_class == "building_load" and body.sheddable_share <= 0:
        problems.append("a building load needs sheddable_share")
    soc_min, soc_max = merged("soc_min_pct"), merged("soc_max_pct")
    if soc_min >= soc_max:
        problems.append("soc_min_pct must be below soc_max_pct")
    if storage and body.reserved_soc_pct >= soc_max:
        problems.append("reserved_soc_pct must be below soc_max_pct")
    if problems:
        raise Problem(422, "invalid-resource", "Invalid resource model", "; ".join(problems), errors=problems)


@router.put("/devices/{device}/resource")
async def put_resource(device: str, body: ResourceIn, who: PrincipalDep, request: Request) -> Resource:
    """Register or replace the resource model of a device (admin, or the device's own enterprise)."""
    if not (who.role == "admin" or (who.role == "enterprise" and who.tenant == body.tenant)):
        require_tenant(who, body.tenant)
        raise Problem(403, "forbidden", "Not allowed", f"key {who.key_id} cannot register resources")
    params = {"tenant": body.tenant, "device": device, **body.model_dump(exclude={"tenant"})}
    async with (
        pool(request).connection() as conn,
        conn.transaction(),
        conn.cursor(row_factory=dict_row) as cur,
    ):
        await cur.execute(
            "SELECT vpp, rated_power_kw, energy_capacity_kwh, soc_min_pct, soc_max_pct FROM devices "
            "WHERE tenant_id = %(tenant)s AND device_id = %(device)s FOR UPDATE",
            params,
        )
        current = await cur.fetchone()
        if current is None:
            raise Problem(404, "not-found", "Not found", f"no device {device!r} in tenant {body.tenant!r}")
        _check_model(body, current)
        try:
            await cur.execute(
                """UPDATE devices SET
                       vpp = coalesce(%(vpp)s, vpp),
                       topology_node = coalesce(%(topology_node)s, topology_node),
                       rated_power_kw = coalesce(%(rated_power_kw)s, rated_power_kw),
                       energy_capacity_kwh = coalesce(%(energy_capacity_kwh)s, energy_capacity_kwh),
                       soc_min_pct = coalesce(%(soc_min_pct)s, soc_min_pct),
                       soc_max_pct = coalesce(%(soc_max_pct)s, soc_max_pct),
                       telemetry_interval_s = coalesce(%(telemetry_interval_s)s, telemetry_interval_s)
                   WHERE tenant_id = %(tenant)s AND device_id = %(device)s""",
                params,
            )
            await cur.execute(
                """INSERT INTO vpp_resources (tenant_id, device_id, resource_class, charge_max_kw,
                       discharge_max_kw, efficiency, curtailable, min_power_kw, sheddable_share, max_shed_min,
                       reserved_soc_pct)
                   VALUES (%(tenant)s, %(device)s, %(resource_class)s, %(charge_max_kw)s, %(discharge_max_kw)s,
                       %(efficiency)s, %(curtailable)s, %(min_power_kw)s, %(sheddable_share)s, %(max_shed_min)s,
                       %(reserved_soc_pct)s)
                   ON CONFLICT (tenant_id, device_id) DO UPDATE SET resource_class = EXCLUDED.resource_class,
                       charge_max_kw = EXCLUDED.charge_max_kw, discharge_max_kw = EXCLUDED.discharge_max_kw,
                       efficiency = EXCLUDED.efficiency, curtailable = EXCLUDED.curtailable,
                       min_power_kw = EXCLUDED.min_power_kw, sheddable_share = EXCLUDED.sheddable_share,
                       max_shed_min = EXCLUDED.max_shed_min, reserved_soc_pct = EXCLUDED.reserved_soc_pct,
                       updated_at = now()""",
                params,
            )
        except (psycopg.errors.CheckViolation, psycopg.errors.DataError) as exc:
            raise Problem(
                422, "invalid-resource", "Invalid resource model", str(exc.diag.message_primary or exc)
            ) from exc
        await cur.execute(_RESOURCE_SQL, params)
        row = await cur.fetchone()
    return Resource.model_validate(row)


@router.get("/devices/{device}/resource")
async def get_resource(device: str, who: PrincipalDep, request: Request, tenant: str) -> Resource:
    if not _sees_all(who):
        require_tenant(who, tenant)
    rows = await fetch_dicts(request, _RESOURCE_SQL, {"tenant": tenant, "device": device})
    if not rows:
        raise Problem(404, "not-found", "Not found", f"device {device!r} of {tenant!r} has no resource model")
    return Resource.model_validate(rows[0])


# --- capacity --------------------------------------------------------------------------------------


@router.get("/vpps")
async def list_vpps(who: PrincipalDep, request: Request) -> Page[VppSummary]:
    """VPPs with registered resources visible to this key."""
    rows = await fetch_dicts(
        request,
        """SELECT d.vpp, count(*) AS resources, count(DISTINCT coalesce(d.topology_node, '')) AS nodes,
                  count(DISTINCT d.tenant_id) AS tenants
           FROM devices d JOIN vpp_resources r USING (tenant_id, device_id)
           WHERE d.vpp IS NOT NULL AND (%(tenant)s::text IS NULL OR d.vpp IN (
               SELECT vpp FROM devices WHERE tenant_id = %(tenant)s AND vpp IS NOT NULL))
           GROUP BY d.vpp ORDER BY d.vpp""",
        {"tenant": None if _sees_all(who) else who.tenant},
    )
    return Page[VppSummary](data=[VppSummary.model_validate(r) for r in rows])


_NOW_SQL = """
    SELECT vpp, duration_min, up_kw, down_kw, nameplate_up_kw, nameplate_down_kw, devices_online,
           devices_stale, as_of
    FROM vpp_capacity_now WHERE vpp = %(vpp)s AND duration_min = %(duration)s"""


async def _capacity_now(conn: psycopg.AsyncConnection[Any], vpp: str, duration: int) -> CapacityNow | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_NOW_SQL, {"vpp": vpp, "duration": duration})
        row = await cur.fetchone()
    return None if row is None else CapacityNow.model_validate(row)


def _not_computed(vpp: str) -> Problem:
    return Problem(
        503,
        "capacity-not-computed",
        "Capacity not computed yet",
        f"the vpp service has not published VPP {vpp!r} yet (is `meterflow vpp` running?)",
    )


@router.get("/vpps/{vpp}/capacity")
async def capacity_now(
    vpp: str, who: PrincipalDep, request: Request, duration_min: Duration = 15
) -> CapacityNow:
    """Deliverable (derated) and nameplate flexibility up and down, sustained for `duration_min`."""
    _check_duration(request, duration_min)
    await require_vpp(request, who, vpp)
    async with pool(request).connection() as conn:
        now = await _capacity_now(conn, vpp, duration_min)
    if now is None:
        raise _not_computed(vpp)
    return now


@router.get("/vpps/{vpp}/capacity/history")
async def capacity_history(
    vpp: str,
    who: PrincipalDep,
    request: Request,
    start: Annotated[datetime, Query(description="inclusive, RFC 3339")],
    end: Annotated[datetime, Query(description="exclusive, RFC 3339")],
    interval: Literal["1m", "15m", "1h"] = "1m",
    duration_min: Duration = 15,
) -> CapacityHistory:
    """Per-minute capacity; coarser intervals average the minutes (online the fewest, stale the most)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise Problem(
            400, "naive-time", "Time zone required", "start and end need an offset, e.g. Z or +08:00"
        )
    if end <= start:
        raise Problem(400, "empty-range", "Empty range", "end must be after start")
    if start.year < 1970 or end.year > 9000:
        raise Problem(400, "out-of-range", "Time out of range", "start and end must lie in 1970..9000")
    if end - start > MAX_HISTORY:
        raise Problem(
            400, "range-too-large", "Range too large", f"at most {MAX_HISTORY.days} days per request"
        )
    _check_duration(request, duration_min)
    await require_vpp(request, who, vpp)
    rows = await fetch_dicts(
        request,
        """SELECT time_bucket(%(width)s::interval, bucket) AS ts, avg(up_kw) AS up_kw, avg(down_kw) AS down_kw,
                  avg(nameplate_up_kw) AS nameplate_up_kw, avg(nameplate_down_kw) AS nameplate_down_kw,
                  min(devices_online) AS devices_online, max(devices_stale) AS devices_stale
           FROM vpp_capacity_1m
           WHERE vpp = %(vpp)s AND duration_min = %(duration)s AND bucket >= %(start)s AND bucket < %(end)s
           GROUP BY 1 ORDER BY 1""",
        {
            "width": HISTORY_INTERVALS[interval],
            "vpp": vpp,
            "duration": duration_min,
            "start": start,
            "end": end,
        },
    )
    return CapacityHistory(
        vpp=vpp,
        interval=interval,
        duration_min=duration_min,
        points=[CapacityPoint.model_validate(r) for r in rows],
    )


@router.get("/vpps/{vpp}/capacity/nodes")
async def capacity_nodes(
    vpp: str, who: PrincipalDep, request: Request, duration_min: Duration = 15
) -> NodesCapacity:
    """Capacity per topology node (resources without a node are under "")."""
    _check_duration(request, duration_min)
    await require_vpp(request, who, vpp)
    rows = await fetch_dicts(
        request,
        """SELECT node, up_kw, down_kw, devices_online, devices_stale FROM vpp_node_capacity_now
           WHERE vpp = %(vpp)s AND duration_min = %(duration)s ORDER BY node""",
        {"vpp": vpp, "duration": duration_min},
    )
    async with pool(request).connection() as conn:
        now = await _capacity_now(conn, vpp, duration_min)
    return NodesCapacity(
        vpp=vpp,
        duration_min=duration_min,
        as_of=None if now is None else now.as_of,
        nodes=[NodeCapacity.model_validate(r) for r in rows],
    )


@router.get("/vpps/{vpp}/stale-devices")
async def stale_devices(vpp: str, who: PrincipalDep, request: Request) -> StaleDevices:
    """Resources silent for more than 3x their telemetry interval (or never heard), left out of capacity."""
    await require_vpp(request, who, vpp)
    rows = await fetch_dicts(
        request,
        """SELECT tenant_id AS tenant, device_id AS device, last_seen, telemetry_interval_s
           FROM vpp_stale_devices WHERE vpp = %(vpp)s
             AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
           ORDER BY last_seen NULLS FIRST, tenant_id, device_id""",
        {"vpp": vpp, "tenant": None if _sees_all(who) else who.tenant},
    )
    return StaleDevices(vpp=vpp, devices=[StaleDevice.model_validate(r) for r in rows])


# Every open stream holds one database connection.
MAX_STREAMS = 64
_STREAM_SLOTS = asyncio.Semaphore(MAX_STREAMS)


@router.get("/vpps/{vpp}/capacity/stream", response_class=StreamingResponse)
async def capacity_stream(
    vpp: str, who: PrincipalDep, request: Request, duration_min: Duration = 15
) -> StreamingResponse:
    """Server-sent events: the capacity-now JSON at once, then whenever the vpp service publishes a change
    for this VPP (it notifies within its poll of the telemetry that caused it)."""
    _check_duration(request, duration_min)
    await require_vpp(request, who, vpp)
    settings: Settings = request.app.state.settings
    if _STREAM_SLOTS.locked():
        raise Problem(
            503, "too-many-streams", "Too many live streams",
            f"this API process serves at most {MAX_STREAMS} capacity streams at once; poll capacity instead",
        )  # fmt: skip

    async def events() -> AsyncIterator[bytes]:
        # Each stream LISTENs on a connection of its own (outside the pools), opened and closed here
        # so a stream that never starts holds none.
        last: CapacityNow | None = None
        conn: psycopg.AsyncConnection[Any] | None = None
        await _STREAM_SLOTS.acquire()
        try:
            conn = await psycopg.AsyncConnection.connect(settings.db.conninfo(), autocommit=True)
            await conn.execute("LISTEN vpp_capacity")
            while True:
                now = await _capacity_now(conn, vpp, duration_min)
                if now is not None and (
                    last is None or now.model_dump(exclude={"as_of"}) != last.model_dump(exclude={"as_of"})
                ):
                    last = now
                    yield b"data: " + orjson.dumps(now.model_dump(mode="json")) + b"\n\n"
                else:
                    yield b": keepalive\n\n"
                if await request.is_disconnected():
                    return
                # Wake on this VPP's notification, or after the keep-alive period.
                async for notify in conn.notifies(timeout=KEEPALIVE_S):
                    if notify.payload == vpp:
                        break
        except psycopg.OperationalError:
            log.warning("capacity stream of %s ended: database connection lost", vpp)
        finally:
            _STREAM_SLOTS.release()
            if conn is not None:
                await conn.close()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
