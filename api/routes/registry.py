"""Registry: enterprises (tenants), sites, gateways (with MQTT credentials) and devices."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from psycopg.rows import dict_row

from api.access import AccessDep, Kind
from api.models import (
    Device,
    DeviceIn,
    Enterprise,
    EnterpriseIn,
    Gateway,
    GatewayCreated,
    GatewayIn,
    GreenCertificate,
    GreenCertificateIn,
    MeterExchange,
    MeterExchangeIn,
    MqttCredentials,
    Multiplier,
    MultiplierIn,
    Page,
    Site,
    SiteIn,
    SitePatch,
)
from api.problems import Problem
from api.query import fetch_dicts, insert_returning, pool, write_errors
from api.routes.vpp import enrol_directly
from meterflow import brokerauth
from meterflow.contract import DEVICE_PATTERN, TENANT_PATTERN, gateway_telemetry_topic
from meterflow.settings import Settings

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["registry"])


Limit = Annotated[int, Query(ge=1, le=5000, description="page size")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]


def _cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(values)).decode()


def _after(cursor: str | None, width: int) -> list[str]:
    """The sort key a page starts after; empty strings (before everything) for the first page."""
    if cursor is None:
        return [""] * width
    try:
        values = orjson.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError) as exc:
        raise Problem(400, "bad-cursor", "Invalid cursor", "pass next_cursor back unchanged") from exc
    if not isinstance(values, list) or len(values) != width or not all(isinstance(v, str) for v in values):
        raise Problem(400, "bad-cursor", "Invalid cursor", "pass next_cursor back unchanged")
    return [str(v) for v in values]


def _page(
    rows: list[dict[str, Any]], limit: int, keys: tuple[str, ...]
) -> tuple[list[dict[str, Any]], str | None]:
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, _cursor([str(rows[-1][k]) for k in keys])


# --- enterprises ---------------------------------------------------------------------------------


_TENANT_COLS = "tenant_id AS tenant, name, role, industry_code, timezone, annual_output_value_cny, created_at"


@router.post("/enterprises", status_code=201)
async def create_enterprise(body: EnterpriseIn, who: AccessDep, request: Request) -> Enterprise:
    """Register an enterprise (tenant). Admin only."""
    who.require_admin()
    row = await insert_returning(
        request,
        "INSERT INTO tenants (tenant_id, name, role, industry_code, timezone, annual_output_value_cny) "
        "VALUES (%(tenant)s, %(name)s, %(role)s, %(industry_code)s, %(timezone)s, %(annual_output_value_cny)s) "
        f"RETURNING {_TENANT_COLS}",
        body.model_dump(),
    )
    return Enterprise.model_validate(row)


@router.get("/enterprises")
async def list_enterprises(
    who: AccessDep,
    request: Request,
    industry_code: str | None = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page[Enterprise]:
    """Enterprises visible to this key, in tenant order."""
    (after,) = _after(cursor, 1)
    rows = await fetch_dicts(
        request,
        f"SELECT {_TENANT_COLS} FROM tenants "
        "WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
        "AND (%(industry)s::text IS NULL OR industry_code = %(industry)s) AND tenant_id > %(after)s "
        "ORDER BY tenant_id LIMIT %(limit)s",
        {
            "tenant": who.tenant_scope(None, Kind.ACCOUNT),
            "industry": industry_code,
            "after": after,
            "limit": limit + 1,
        },
    )
    rows, next_cursor = _page(rows, limit, ("tenant",))
    return Page[Enterprise](data=[Enterprise.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.get("/enterprises/{tenant}")
async def get_enterprise(tenant: str, who: AccessDep, request: Request) -> Enterprise:
    who.read_tenant(tenant, Kind.ACCOUNT)
    rows = await fetch_dicts(
        request,
        f"SELECT {_TENANT_COLS} FROM tenants WHERE tenant_id = %(tenant)s",
        {"tenant": tenant},
    )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no enterprise {tenant!r}")
    return Enterprise.model_validate(rows[0])


# --- sites -----------------------------------------------------------------------------------------

_SITE_COLS = (
    "tenant_id AS tenant, site_id AS site, name, floor_area_m2, timezone, province, latitude, longitude, "
    "grid_zone, created_at"
)


@router.post("/sites", status_code=201)
async def create_site(body: SiteIn, who: AccessDep, request: Request) -> Site:
    """Register a site of an enterprise. Admin only."""
    who.require_admin()
    row = await insert_returning(
        request,
        "INSERT INTO sites (tenant_id, site_id, name, floor_area_m2, timezone, province, latitude, longitude, "
        "grid_zone) VALUES (%(tenant)s, %(site)s, %(name)s, %(floor_area_m2)s, %(timezone)s, %(province)s, "
        f"%(latitude)s, %(longitude)s, %(grid_zone)s) RETURNING {_SITE_COLS}",
        body.model_dump(),
    )
    return Site.model_validate(row)


@router.patch("/sites/{site}")
async def update_site(
    site: Annotated[str, PathParam(pattern=DEVICE_PATTERN)],
    body: SitePatch,
    who: AccessDep,
    request: Request,
    tenant: Annotated[str, Query(pattern=TENANT_PATTERN)],
) -> Site:
    """Change a site's name or grid zone (null: back to its province). Admin only. The province, time
    zone and floor area stay as registered: past carbon and EUI figures depend on them."""
    who.require_admin()
    changes = body.model_dump(exclude_unset=True)
    assignments = ", ".join(f"{column} = %({column})s" for column in changes) or "site_id = site_id"
    rows = await fetch_dicts(
        request,
        f"UPDATE sites SET {assignments} WHERE tenant_id = %(tenant)s AND site_id = %(site)s RETURNING {_SITE_COLS}",
        {**changes, "tenant": tenant, "site": site},
    )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no site {site!r} of {tenant!r}")
    return Site.model_validate(rows[0])


@router.get("/sites")
async def list_sites(
    who: AccessDep,
    request: Request,
    tenant: str | None = None,
    province: str | None = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page[Site]:
    """Sites visible to this key, in (tenant, site) order."""
    after_tenant, after_site = _after(cursor, 2)
    rows = await fetch_dicts(
        request,
        f"SELECT {_SITE_COLS} FROM sites WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
        "AND (%(province)s::text IS NULL OR province = %(province)s) AND (tenant_id, site_id) > (%(at)s, %(as)s) "
        "ORDER BY tenant_id, site_id LIMIT %(limit)s",
        {
            "tenant": who.tenant_scope(tenant, Kind.ACCOUNT),
            "province": province,
            "at": after_tenant,
            "as": after_site,
            "limit": limit + 1,
        },
    )
    rows, next_cursor = _page(rows, limit, ("tenant", "site"))
    return Page[Site](data=[Site.model_validate(r) for r in rows], next_cursor=next_cursor)


# --- gateways --------------------------------------------------------------------------------------

_GATEWAY_COLS = "tenant_id AS tenant, gateway_id AS gateway, enabled, created_at"


@router.post("/gateways", status_code=201)
async def create_gateway(body: GatewayIn, who: AccessDep, request: Request) -> GatewayCreated:
    """Register a gateway; its MQTT password is returned once and the broker's auth is reloaded."""
    who.require_admin()
    password = secrets.token_urlsafe(24)
    row = await insert_returning(
        request,
        "INSERT INTO gateways (tenant_id, gateway_id, mqtt_password_hash) "
        f"VALUES (%(tenant)s, %(gateway)s, %(hash)s) RETURNING {_GATEWAY_COLS}",
        {**body.model_dump(), "hash": brokerauth.hash_password(password)},
    )
    await sync_broker_auth(request)
    return GatewayCreated.model_validate(
        {
            **row,
            "mqtt": MqttCredentials(
                username=body.gateway,
                password=password,
                topic=gateway_telemetry_topic(body.tenant, body.gateway),
            ),
        }
    )


@router.get("/gateways")
async def list_gateways(
    who: AccessDep,
    request: Request,
    tenant: str | None = None,
    enabled: bool | None = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page[Gateway]:
    """Gateways visible to this key, in gateway order."""
    (after,) = _after(cursor, 1)
    rows = await fetch_dicts(
        request,
        f"SELECT {_GATEWAY_COLS} FROM gateways WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
        "AND (%(enabled)s::boolean IS NULL OR enabled = %(enabled)s) AND gateway_id > %(after)s "
        "ORDER BY gateway_id LIMIT %(limit)s",
        {
            "tenant": who.tenant_scope(tenant, Kind.RAW),
            "enabled": enabled,
            "after": after,
            "limit": limit + 1,
        },
    )
    rows, next_cursor = _page(rows, limit, ("gateway",))
    return Page[Gateway](data=[Gateway.model_validate(r) for r in rows], next_cursor=next_cursor)


@router.post("/gateways/{gateway}/credentials")
async def rotate_gateway_credentials(gateway: str, who: AccessDep, request: Request) -> GatewayCreated:
    """Issue a new MQTT password for a gateway (the old one stops working at once). Admin only."""
    who.require_admin()
    password = secrets.token_urlsafe(24)
    rows = await fetch_dicts(
        request,
        "UPDATE gateways SET mqtt_password_hash = %(hash)s WHERE gateway_id = %(gateway)s "
        f"RETURNING {_GATEWAY_COLS}",
        {"gateway": gateway, "hash": brokerauth.hash_password(password)},
    )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no gateway {gateway!r}")
    await sync_broker_auth(request)
    row = rows[0]
    return GatewayCreated.model_validate(
        {
            **row,
            "mqtt": MqttCredentials(
                username=gateway, password=password, topic=gateway_telemetry_topic(row["tenant"], gateway)
            ),
        }
    )


TRAILING_RELOAD_S = 1.0


async def sync_broker_auth(request: Request) -> None:
    settings: Settings = request.app.state.settings
    rows = await fetch_dicts(
        request, "SELECT tenant_id, gateway_id, mqtt_password_hash FROM gateways WHERE enabled", {}
    )
    await asyncio.to_thread(_write_broker_auth, settings, rows)
    # A reload signal sent while the broker is still reloading from the previous one is lost, which
    # would leave the newest credentials refused for good: send a trailing one once writes settle.
    state = request.app.state
    pending: asyncio.Task[None] | None = getattr(state, "trailing_broker_reload", None)
    if pending is not None and not pending.done():
        pending.cancel()
    state.trailing_broker_reload = asyncio.create_task(_trailing_reload(settings))


async def _trailing_reload(settings: Settings) -> None:
    await asyncio.sleep(TRAILING_RELOAD_S)
    brokerauth.reload(settings.state_path / "mosquitto" / "mosquitto.pid")


def _write_broker_auth(settings: Settings, rows: list[dict[str, Any]]) -> None:
    folder: Path = settings.state_path / "mosquitto"
    if not folder.exists():
        log.warning("no broker folder at %s: gateway credentials stored but not synced", folder)
        return
    passwd = folder / "passwd"
    service = brokerauth.service_account(
        passwd, settings.mqtt.service_user, settings.mqtt.service_password.get_secret_value()
    )
    brokerauth.sync(
        passwd_file=passwd,
        acl_file=folder / "acl",
        pid_file=folder / "mosquitto.pid",
        service=[service],
        gateways=[
            brokerauth.GatewayAccount(r["tenant_id"], r["gateway_id"], r["mqtt_password_hash"]) for r in rows
        ],
    )


# --- devices ---------------------------------------------------------------------------------------

# Request field -> column, for the columns a device is registered with.
_DEVICE_FIELDS = {
    "tenant": "tenant_id", "device": "device_id", "site": "site_id", "gateway": "gateway_id",
    "device_type": "device_type", "carrier": "carrier", "role": "role", "rated_power_kw": "rated_power_kw",
    "register_max": "register_max", "register_resolution": "register_resolution",
    "telemetry_interval_s": "telemetry_interval_s", "energy_capacity_kwh": "energy_capacity_kwh",
    "soc_min_pct": "soc_min_pct", "soc_max_pct": "soc_max_pct", "vpp": "vpp", "topology_node": "topology_node",
}  # fmt: skip
_DEVICE_COLS = ", ".join([*(f"{col} AS {name}" for name, col in _DEVICE_FIELDS.items()), "created_at"])


@router.post("/devices", status_code=201)
async def create_device(body: DeviceIn, who: AccessDep, request: Request) -> Device:
    """Register a meter or VPP resource. Admin only; a `vpp` (registered with POST /v1/vpps) enrols the
    device in it at once, as an approved enrolment."""
    who.require_admin()
    async with (
        pool(request).connection() as conn,
        conn.transaction(),
        conn.cursor(row_factory=dict_row) as cur,
    ):
        with write_errors():
            if body.vpp is not None:
                # Enrolment first (its key onto devices is checked at commit): the device row then carries
                # its VPP from the start, so its membership history includes the readings it backfills.
                await enrol_directly(
                    cur, vpp=body.vpp, tenant=body.tenant, device=body.device, key_id=who.key_id
                )
            await cur.execute(
                f"INSERT INTO devices ({', '.join(_DEVICE_FIELDS.values())}) "
                f"VALUES ({', '.join(f'%({name})s' for name in _DEVICE_FIELDS)}) RETURNING {_DEVICE_COLS}",
                body.model_dump(),
            )
            row = await cur.fetchone()
    return Device.model_validate(row)


@router.get("/devices")
async def list_devices(
    who: AccessDep,
    request: Request,
    tenant: str | None = None,
    site: str | None = None,
    device_type: str | None = None,
    vpp: str | None = None,
    limit: Limit = 500,
    cursor: Cursor = None,
) -> Page[Device]:
    """Devices visible to this key, in (tenant, device) order."""
    after_tenant, after_device = _after(cursor, 2)
    rows = await fetch_dicts(
        request,
        f"SELECT {_DEVICE_COLS} FROM devices WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
        "AND (%(site)s::text IS NULL OR site_id = %(site)s) AND (%(type)s::text IS NULL OR device_type = %(type)s) "
        "AND (%(vpp)s::text IS NULL OR vpp = %(vpp)s) AND (tenant_id, device_id) > (%(at)s, %(ad)s) "
        "ORDER BY tenant_id, device_id LIMIT %(limit)s",
        {
            "tenant": who.tenant_scope(tenant, Kind.RAW),
            "site": site,
            "type": device_type,
            "vpp": vpp,
            "at": after_tenant,
            "ad": after_device,
            "limit": limit + 1,
        },
    )
    rows, next_cursor = _page(rows, limit, ("tenant", "device"))
    return Page[Device](data=[Device.model_validate(r) for r in rows], next_cursor=next_cursor)


# --- meter exchanges and multipliers ---------------------------------------------------------------


@router.post("/devices/{device}/meter-exchanges", status_code=201)
async def create_meter_exchange(
    device: str, body: MeterExchangeIn, who: AccessDep, request: Request
) -> MeterExchange:
    """Register a meter exchange (removal and install reads at one timestamp). Admin only."""
    who.require_admin()
    row = await insert_returning(
        request,
        "INSERT INTO meter_exchanges (tenant_id, device_id, metric, ts, removal_read, install_read) "
        "VALUES (%(tenant)s, %(device)s, %(metric)s, %(ts)s, %(removal_read)s, %(install_read)s) "
        "RETURNING tenant_id AS tenant, device_id AS device, metric, ts, removal_read, install_read, created_at",
        {**body.model_dump(), "device": device},
    )
    return MeterExchange.model_validate(row)


@router.post("/devices/{device}/multipliers", status_code=201)
async def create_multiplier(device: str, body: MultiplierIn, who: AccessDep, request: Request) -> Multiplier:
    """Set a device's CT x VT ratios and meter constant from a point in time. Admin only."""
    who.require_admin()
    row = await insert_returning(
        request,
        "INSERT INTO meter_multipliers (tenant_id, device_id, effective_from, ct_ratio, vt_ratio, meter_constant) "
        "VALUES (%(tenant)s, %(device)s, %(effective_from)s, %(ct_ratio)s, %(vt_ratio)s, %(meter_constant)s) "
        "RETURNING tenant_id AS tenant, device_id AS device, effective_from, ct_ratio, vt_ratio, meter_constant, "
        "created_at",
        {**body.model_dump(), "device": device},
    )
    return Multiplier.model_validate(row)


# --- green certificates ----------------------------------------------------------------------------

_CERTIFICATE_COLS = (
    "tenant_id AS tenant, certificate_id AS certificate, period_start, period_end, certificates, created_at"
)


@router.post("/green-certificates", status_code=201)
async def create_green_certificates(
    body: GreenCertificateIn, who: AccessDep, request: Request
) -> GreenCertificate:
    """Record a block of green electricity certificates retired for a period (market-based Scope 2).
    Admins, or the enterprise's own key."""
    who.write_tenant(body.tenant)
    if body.period_end <= body.period_start:
        raise Problem(422, "invalid-period", "Invalid period", "period_end must be after period_start")
    row = await insert_returning(
        request,
        "INSERT INTO green_certificates (tenant_id, certificate_id, period_start, period_end, certificates) "
        "VALUES (%(tenant)s, %(certificate)s, %(period_start)s, %(period_end)s, %(certificates)s) "
        f"RETURNING {_CERTIFICATE_COLS}",
        body.model_dump(),
    )
    return GreenCertificate.model_validate(row)


@router.get("/green-certificates")
async def list_green_certificates(
    who: AccessDep, request: Request, tenant: str | None = None
) -> Page[GreenCertificate]:
    rows = await fetch_dicts(
        request,
        f"SELECT {_CERTIFICATE_COLS} FROM green_certificates WHERE %(tenant)s::text IS NULL OR tenant_id = %(tenant)s "
        "ORDER BY tenant_id, period_start, certificate_id",
        {"tenant": who.tenant_scope(tenant, Kind.ACCOUNT)},
    )
    return Page[GreenCertificate](data=[GreenCertificate.model_validate(r) for r in rows])
