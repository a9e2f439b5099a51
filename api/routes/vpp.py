"""VPPs: the registry of VPPs and their owners, enrolments, resource models, flexibility capacity now /
history / per node, a live stream, stale resources.

A VPP is owned by an operator tenant (or by no one: then only admins act on it). A device joins a VPP only
by an enrolment the VPP's owner or an admin approves; approving sets ``devices.vpp``, the membership the
processor and the vpp service read, and a database trigger refuses any other way (migration 0009).
Capacity figures are what the vpp service (processing/vpp.py) last wrote. Who sees which VPP is
`api.access`.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
import psycopg
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from api.access import DENIED, VISIBLE_VPP_SQL, Access, AccessDep
from api.models import Efficiency, Minutes, Page, Percent, Power, PowerOrZero, Quantity, Share, TenantId
from api.problems import Problem
from api.query import fetch_dicts, pool, write_errors
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
# Open requests wait for owners' decisions (or a withdrawal): no moment to name, so an hour.
OPEN_REQUESTS_RETRY_S = 3600


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
    # Bounded and strictly numeric as the registry's values (docs/api.md#values-bounds-and-non-finite-data).
    rated_power_kw: Power | None = None
    energy_capacity_kwh: Quantity | None = None
    soc_min_pct: Percent | None = None
    soc_max_pct: Percent | None = None
    telemetry_interval_s: Annotated[int, Field(strict=True, gt=0, le=86_400)] | None = None
    charge_max_kw: PowerOrZero | None = Field(default=None, description="storage; default: rated power")
    discharge_max_kw: PowerOrZero | None = Field(default=None, description="storage; default: rated power")
    efficiency: Efficiency = Field(default=0.95, description="one-way, storage")
    curtailable: bool = Field(default=False, description="PV: can be curtailed on request")
    min_power_kw: PowerOrZero = Field(default=0.0, description="EV charger: minimum charging power")
    sheddable_share: Share = Field(
        default=0.0, description="building load: share of the current load that can be shed"
    )
    max_shed_min: Minutes | None = Field(
        default=None, description="building load: longest shed; unlimited when absent"
    )
    reserved_soc_pct: Percent = Field(
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


class VppIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vpp: Annotated[str, Field(pattern=DEVICE_PATTERN)]
    name: Annotated[str, Field(min_length=1, max_length=200)]
    owner: Annotated[TenantId | None, Field(description="an operator tenant; none: admins only")] = None


class VppPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    owner: Annotated[TenantId | None, Field(description="an operator tenant; null: admins only")] = None


class VppSummary(BaseModel):
    vpp: str
    name: str
    owner: str | None
    resources: int = Field(description="approved members with a resource model")
    nodes: int
    tenants: int
    created_at: datetime


EnrolmentStatus = Literal["requested", "approved", "rejected", "left"]


class EnrolmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: TenantId
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)]
    note: Annotated[str, Field(max_length=500)] | None = None


class EnrolmentDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Annotated[str, Field(max_length=500)] | None = None


class Enrolment(BaseModel):
    enrolment_id: int
    vpp: str
    tenant: str
    device: str
    status: EnrolmentStatus
    requested_by: str
    requested_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    left_by: str | None
    left_at: datetime | None
    note: str | None


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
    node: str | None = Field(
        description="null: nodes too small to show to a key that does not manage the VPP, summed "
        '(docs/vpp.md#who-sees-which-node); "": resources without a node'
    )
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


# --- VPPs and enrolments ---------------------------------------------------------------------------

_ENROLMENT_COLS = (
    "enrolment_id, vpp_id AS vpp, tenant_id AS tenant, device_id AS device, status, requested_by, "
    "requested_at, decided_by, decided_at, left_by, left_at, note"
)
# The same, qualified, for joins with vpps.
_ENROLMENT_COLS_E = ", ".join("e." + c for c in _ENROLMENT_COLS.split(", "))
_OPEN = "status IN ('requested', 'approved')"


async def _open_enrolment(
    cur: psycopg.AsyncCursor[dict[str, Any]], tenant: str, device: str
) -> dict[str, Any] | None:
    await cur.execute(
        f"SELECT {_ENROLMENT_COLS} FROM vpp_enrolments WHERE tenant_id = %s AND device_id = %s AND {_OPEN} "
        "FOR UPDATE",
        (tenant, device),
    )
    return await cur.fetchone()


async def enrol_directly(
    cur: psycopg.AsyncCursor[dict[str, Any]],
    *,
    vpp: str,
    tenant: str,
    device: str,
    key_id: str,
    note: str | None = None,
) -> dict[str, Any]:
    """An admin's enrolment: approved at once (a pending request for the same VPP is approved, one for
    another VPP rejected). A member of another VPP leaves it first, in its own request: the membership
    history (device_membership) keeps one change per device and moment."""
    await cur.execute("SELECT 1 FROM vpps WHERE vpp_id = %s", (vpp,))
    if await cur.fetchone() is None:
        raise Problem(422, "unknown-vpp", "Unknown VPP", f"no VPP {vpp!r}: register it with POST /v1/vpps")
    current = await _open_enrolment(cur, tenant, device)
    if current is not None and current["vpp"] == vpp and current["status"] == "approved":
        return current
    if current is not None and current["status"] == "approved":
        raise Problem(
            409,
            "enrolled-elsewhere",
            "Member of another VPP",
            f"device {device!r} is a member of VPP {current['vpp']!r}: leave it first "
            f"(POST /v1/vpp-enrolments/{current['enrolment_id']}/leave)",
        )
    if current is not None:
        decision = "approved" if current["vpp"] == vpp else "rejected"
        await cur.execute(
            f"UPDATE vpp_enrolments SET status = %s, decided_by = %s, decided_at = now() "
            f"WHERE enrolment_id = %s RETURNING {_ENROLMENT_COLS}",
            (decision, key_id, current["enrolment_id"]),
        )
        row = await cur.fetchone()
        if decision == "approved" and row is not None:
            return row
    await cur.execute(
        "INSERT INTO vpp_enrolments (vpp_id, tenant_id, device_id, status, requested_by, decided_by, "
        "decided_at, note) VALUES (%s, %s, %s, 'approved', %s, %s, now(), %s) "
        f"RETURNING {_ENROLMENT_COLS}",
        (vpp, tenant, device, key_id, key_id, note),
    )
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("INSERT ... RETURNING returned no row")
    return row


_SUMMARY_SQL = f"""
    SELECT v.vpp_id AS vpp, v.name, v.owner_tenant AS owner, v.created_at,
           count(r.device_id) AS resources, count(DISTINCT coalesce(d.topology_node, '')) FILTER (
               WHERE r.device_id IS NOT NULL) AS nodes,
           count(DISTINCT d.tenant_id) FILTER (WHERE r.device_id IS NOT NULL) AS tenants
    FROM vpps v
    LEFT JOIN devices d ON d.vpp = v.vpp_id
    LEFT JOIN vpp_resources r ON r.tenant_id = d.tenant_id AND r.device_id = d.device_id
    WHERE {VISIBLE_VPP_SQL} AND (%(one)s::text IS NULL OR v.vpp_id = %(one)s)
    GROUP BY v.vpp_id ORDER BY v.vpp_id"""


@router.post("/vpps", status_code=201)
async def create_vpp(body: VppIn, who: AccessDep, request: Request) -> VppSummary:
    """Register a VPP, owned by an operator tenant or (owner left out) by admins only. Admin only."""
    who.require_admin()
    with write_errors():
        await fetch_dicts(
            request,
            "INSERT INTO vpps (vpp_id, name, owner_tenant) VALUES (%(vpp)s, %(name)s, %(owner)s) RETURNING vpp_id",
            body.model_dump(),
        )
    return await get_vpp(body.vpp, who, request)


@router.patch("/vpps/{vpp}")
async def update_vpp(vpp: str, body: VppPatch, who: AccessDep, request: Request) -> VppSummary:
    """Rename a VPP or hand it to another operator tenant (null: admins only). Admin only."""
    who.require_admin()
    changes = body.model_dump(exclude_unset=True)
    if changes.get("name", "") is None:
        raise Problem(422, "invalid-vpp", "Invalid VPP", "a VPP keeps a name")
    columns = {"name": "name", "owner": "owner_tenant"}
    assignments = ", ".join(f"{columns[k]} = %({k})s" for k in changes) or "vpp_id = vpp_id"
    with write_errors():
        rows = await fetch_dicts(
            request,
            f"UPDATE vpps SET {assignments} WHERE vpp_id = %(vpp)s RETURNING vpp_id",
            {**changes, "vpp": vpp},
        )
    if not rows:
        raise Problem(404, "not-found", "Not found", f"no VPP {vpp!r}")
    return await get_vpp(vpp, who, request)


@router.get("/vpps/{vpp}")
async def get_vpp(vpp: str, who: AccessDep, request: Request) -> VppSummary:
    rows = await fetch_dicts(request, _SUMMARY_SQL, {**who.vpp_params(), "one": vpp})
    if not rows:
        raise who.hidden(f"VPP {vpp!r}")
    return VppSummary.model_validate(rows[0])


class MissBudget:
    """Enrolment requests answered 404 per tenant in the last hour, in this process. A request into a VPP
    the key cannot see yet must succeed (that is how one joins), so the answer tells an existing VPP id
    from an unknown one: this bounds how many ids a tenant can try. Admin keys are not counted."""

    WINDOW_S = 3600.0

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour, self._clock = per_hour, clock
        self._misses: dict[str, deque[float]] = {}

    def _recent(self, tenant: str) -> deque[float]:
        times = self._misses.get(tenant, deque())
        while times and times[0] <= self._clock() - self.WINDOW_S:
            times.popleft()
        if not times:
            self._misses.pop(tenant, None)
        return times

    def check(self, who: Access, tenant: str) -> None:
        if who.is_admin:
            return
        times = self._recent(tenant)
        if len(times) >= self.per_hour:
            DENIED.labels(who.role, "enrolment-misses").inc()
            retry = max(1, math.ceil(times[0] + self.WINDOW_S - self._clock()))
            raise Problem(
                429, "too-many-requests", "Too many enrolment requests",
                f"{self.per_hour} enrolment requests of tenant {tenant!r} named no VPP or device it may "
                "use within the last hour",
                headers={"Retry-After": str(retry)},
            )  # fmt: skip

    def miss(self, who: Access, tenant: str) -> None:
        if not who.is_admin:
            self._misses.setdefault(tenant, self._recent(tenant)).append(self._clock())


def _enrolment_misses(request: Request) -> MissBudget:
    settings: Settings = request.app.state.settings
    budget: MissBudget | None = getattr(request.app.state, "enrolment_misses", None)
    if budget is None:
        budget = request.app.state.enrolment_misses = MissBudget(
            settings.vpp.enrolment_misses_per_tenant_hour
        )
    return budget


async def _check_request_limits(
    cur: psycopg.AsyncCursor[dict[str, Any]], who: Access, settings: Settings, tenant: str, device: str
) -> None:
    """A non-admin request: at most enrolment_requests_per_device_day for the device in the last 24 h
    (withdrawn and rejected ones count, each is a history row), at most
    enrolment_open_requests_per_tenant of the tenant's requests awaiting a decision. 429 beyond."""
    # One tenant's requests are counted and written one at a time, so two cannot both take the last one.
    await cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"vpp-enrolment/{tenant}",))
    await cur.execute(
        """SELECT count(*) AS n,
                  ceil(extract(epoch FROM min(requested_at) + interval '1 day' - now()))::bigint AS retry
           FROM vpp_enrolments
           WHERE tenant_id = %s AND device_id = %s AND requested_at > now() - interval '1 day'""",
        (tenant, device),
    )
    recent = await cur.fetchone()
    per_device = settings.vpp.enrolment_requests_per_device_day
    if recent is not None and recent["n"] >= per_device:
        DENIED.labels(who.role, "enrolment-device-limit").inc()
        raise Problem(
            429, "too-many-requests", "Too many enrolment requests for this device",
            f"device {device!r} was the subject of {per_device} enrolment requests within 24 h",
            headers={"Retry-After": str(max(1, recent["retry"] or 1))},
        )  # fmt: skip
    await cur.execute(
        "SELECT count(*) AS n FROM vpp_enrolments WHERE tenant_id = %s AND status = 'requested'", (tenant,)
    )
    pending = await cur.fetchone()
    per_tenant = settings.vpp.enrolment_open_requests_per_tenant
    if pending is not None and pending["n"] >= per_tenant:
        DENIED.labels(who.role, "enrolment-open-limit").inc()
        raise Problem(
            429, "too-many-requests", "Too many open enrolment requests",
            f"tenant {tenant!r} has {per_tenant} requests awaiting a decision: withdraw some "
            "(POST /v1/vpp-enrolments/{id}/leave) or wait for the owners",
            headers={"Retry-After": str(OPEN_REQUESTS_RETRY_S)},
        )  # fmt: skip


@router.post("/vpps/{vpp}/enrolments", status_code=201)
async def request_enrolment(vpp: str, body: EnrolmentIn, who: AccessDep, request: Request) -> Enrolment:
    """Ask for a device to join a VPP (the device's enterprise): the VPP's owner approves or rejects it.
    An admin's enrolment is approved at once. A device has at most one open (requested or approved)
    enrolment. Requests of other keys are limited per device and day and per tenant awaiting decisions
    (429 with Retry-After), and an unknown VPP is answered as one the key may not see (404)."""
    who.write_tenant(body.tenant)
    settings: Settings = request.app.state.settings
    misses = _enrolment_misses(request)
    misses.check(who, body.tenant)
    async with (
        pool(request).connection() as conn,
        conn.transaction(),
        conn.cursor(row_factory=dict_row) as cur,
    ):
        await cur.execute(
            "SELECT 1 FROM devices WHERE tenant_id = %s AND device_id = %s", (body.tenant, body.device)
        )
        if await cur.fetchone() is None:
            misses.miss(who, body.tenant)
            raise who.hidden(f"device {body.device!r} in tenant {body.tenant!r}")
        if not who.is_admin:
            await _check_request_limits(cur, who, settings, body.tenant, body.device)
        await cur.execute("SELECT 1 FROM vpps WHERE vpp_id = %s", (vpp,))
        if await cur.fetchone() is None:
            misses.miss(who, body.tenant)
            # The answer every VPP route gives a VPP the key may not see (api.access.Access.hidden).
            raise who.hidden(f"VPP {vpp!r}")
        row: dict[str, Any] | None
        with write_errors():
            if who.is_admin:
                row = await enrol_directly(
                    cur, vpp=vpp, tenant=body.tenant, device=body.device, key_id=who.key_id, note=body.note
                )
            else:
                await cur.execute(
                    "INSERT INTO vpp_enrolments (vpp_id, tenant_id, device_id, status, requested_by, note) "
                    f"VALUES (%s, %s, %s, 'requested', %s, %s) RETURNING {_ENROLMENT_COLS}",
                    (vpp, body.tenant, body.device, who.key_id, body.note),
                )
                row = await cur.fetchone()
    log.info("enrolment of %s/%s in VPP %s by key %s", body.tenant, body.device, vpp, who.key_id)
    return Enrolment.model_validate(row)


def _enrolment_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        after = int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except ValueError as exc:
        raise Problem(400, "bad-cursor", "Invalid cursor", "pass next_cursor back unchanged") from exc
    if not 0 <= after < 2**63:
        raise Problem(400, "bad-cursor", "Invalid cursor", "pass next_cursor back unchanged")
    return after


@router.get("/vpp-enrolments")
async def list_enrolments(
    who: AccessDep,
    request: Request,
    vpp: str | None = None,
    tenant: str | None = None,
    status: EnrolmentStatus | None = None,
    decided_by: Annotated[
        str | None,
        Query(
            max_length=200,
            description="the key id (or `migration-0009`) that decided: memberships carried over by the "
            "upgrade to be reviewed",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
    cursor: str | None = None,
) -> Page[Enrolment]:
    """Enrolments this key may see, oldest first: an owner's VPPs' (requests to decide included), a
    tenant's own devices', every one for admins."""
    if who.role == "regulator":
        raise who.deny("regulator-raw", "regulators read aggregates and accounts only")
    rows = await fetch_dicts(
        request,
        f"""SELECT {_ENROLMENT_COLS_E}
            FROM vpp_enrolments e JOIN vpps v USING (vpp_id)
            WHERE (%(all)s OR e.tenant_id = %(own)s OR v.owner_tenant = %(owner)s)
              AND (%(vpp)s::text IS NULL OR e.vpp_id = %(vpp)s)
              AND (%(tenant)s::text IS NULL OR e.tenant_id = %(tenant)s)
              AND (%(status)s::text IS NULL OR e.status = %(status)s)
              AND (%(decided_by)s::text IS NULL OR e.decided_by = %(decided_by)s)
              AND e.enrolment_id > %(after)s
            ORDER BY e.enrolment_id LIMIT %(limit)s""",
        {
            "all": who.is_admin,
            "own": who.tenant,
            "owner": who.tenant if who.role == "operator" else None,
            "vpp": vpp,
            "tenant": tenant,
            "status": status,
            "decided_by": decided_by,
            "after": _enrolment_cursor(cursor),
            "limit": limit + 1,
        },
    )
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = base64.urlsafe_b64encode(str(rows[-1]["enrolment_id"]).encode()).decode() if more else None
    return Page[Enrolment](data=[Enrolment.model_validate(r) for r in rows], next_cursor=next_cursor)


EnrolmentId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


async def _decide(
    request: Request,
    who: Access,
    enrolment_id: int,
    action: Literal["approve", "reject", "leave"],
    note: str | None,
) -> Enrolment:
    """One transition of an enrolment. Approve and reject: the VPP's owner or an admin, of a request.
    Leave: the device's tenant, the VPP's owner or an admin, of a request (withdrawn) or a membership."""
    async with (
        pool(request).connection() as conn,
        conn.transaction(),
        conn.cursor(row_factory=dict_row) as cur,
    ):
        await cur.execute(
            f"SELECT {_ENROLMENT_COLS_E}, v.owner_tenant "
            "FROM vpp_enrolments e JOIN vpps v USING (vpp_id) WHERE e.enrolment_id = %s FOR UPDATE OF e",
            (enrolment_id,),
        )
        row = await cur.fetchone()
        if row is None:
            raise who.hidden(f"enrolment {enrolment_id}")
        manages = who.manages(row["owner_tenant"])
        if not (manages or row["tenant"] == who.tenant):
            raise who.hidden(f"enrolment {enrolment_id}")
        if action != "leave" and not manages:
            raise who.deny("not-vpp-owner", f"only the owner of VPP {row['vpp']!r} (or an admin) decides")
        if action == "leave" and not manages:
            who.write_tenant(row["tenant"])
        allowed = ("requested", "approved") if action == "leave" else ("requested",)
        if row["status"] not in allowed:
            raise Problem(
                409, "conflict", "Enrolment already decided", f"enrolment {enrolment_id} is {row['status']}"
            )
        if action == "leave":
            sql = "status = 'left', left_by = %(key)s, left_at = now()"
            if row["status"] == "requested":
                sql += ", decided_by = %(key)s, decided_at = now()"
        else:
            status = "approved" if action == "approve" else "rejected"
            sql = f"status = '{status}', decided_by = %(key)s, decided_at = now()"
        with write_errors():
            await cur.execute(
                f"UPDATE vpp_enrolments SET {sql}, note = coalesce(%(note)s, note) WHERE enrolment_id = %(id)s "
                f"RETURNING {_ENROLMENT_COLS}",
                {"key": who.key_id, "note": note, "id": enrolment_id},
            )
            updated = await cur.fetchone()
    log.info("enrolment %s: %s by key %s", enrolment_id, action, who.key_id)
    return Enrolment.model_validate(updated)


@router.post("/vpp-enrolments/{enrolment_id}/approve")
async def approve_enrolment(
    enrolment_id: EnrolmentId, who: AccessDep, request: Request, body: EnrolmentDecision | None = None
) -> Enrolment:
    """Admit the device: from now on it counts in the VPP's figures (the VPP's owner or an admin)."""
    return await _decide(request, who, enrolment_id, "approve", None if body is None else body.note)


@router.post("/vpp-enrolments/{enrolment_id}/reject")
async def reject_enrolment(
    enrolment_id: EnrolmentId, who: AccessDep, request: Request, body: EnrolmentDecision | None = None
) -> Enrolment:
    """Refuse a request (the VPP's owner or an admin)."""
    return await _decide(request, who, enrolment_id, "reject", None if body is None else body.note)


@router.post("/vpp-enrolments/{enrolment_id}/leave")
async def leave_enrolment(
    enrolment_id: EnrolmentId, who: AccessDep, request: Request, body: EnrolmentDecision | None = None
) -> Enrolment:
    """Withdraw a request or leave the VPP (the device's enterprise, the VPP's owner or an admin)."""
    return await _decide(request, who, enrolment_id, "leave", None if body is None else body.note)


# --- resource models -------------------------------------------------------------------------------

_RESOURCE_SQL = """
    SELECT d.tenant_id AS tenant, d.device_id AS device, r.resource_class, d.vpp, d.topology_node,
           d.rated_power_kw, d.energy_capacity_kwh, d.soc_min_pct, d.soc_max_pct, d.telemetry_interval_s,
           r.charge_max_kw, r.discharge_max_kw, r.efficiency, r.curtailable, r.min_power_kw,
           r.sheddable_share, r.max_shed_min, r.reserved_soc_pct, r.updated_at
    FROM vpp_resources r JOIN devices d USING (tenant_id, device_id)
    WHERE d.tenant_id = %(tenant)s AND d.device_id = %(device)s"""


def _check_model(body: ResourceIn, device: dict[str, Any], vpp: str | None) -> None:
    """Ratings the class needs, after merging the body with what the device already has; `vpp` is the
    VPP the device is enrolled in or asks to join."""

    def merged(name: str) -> Any:
        value = getattr(body, name)
        return device[name] if value is None else value

    problems: list[str] = []
    if vpp is None:
        problems.append(
            "a resource needs a VPP: an enrolment (POST /v1/vpps/{vpp}/enrolments) or a vpp in this body"
        )
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
        # `errors` in the documented shape of every problem (api.problems), one entry per rule broken.
        errors = [{"loc": ["body"], "msg": msg, "type": "invalid-resource"} for msg in problems]
        raise Problem(422, "invalid-resource", "Invalid resource model", "; ".join(problems), errors=errors)


@router.put("/devices/{device}/resource")
async def put_resource(device: str, body: ResourceIn, who: AccessDep, request: Request) -> Resource:
    """Register or replace the resource model of a device (admin, or the device's own enterprise).

    `vpp` never joins a VPP on an enterprise's word: it must name the VPP of the device's open (requested
    or approved) enrolment, otherwise the request is refused (409 `not-enrolled`) and nothing is written.
    An admin's `vpp` enrols the device directly."""
    who.write_tenant(body.tenant)
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
        enrolment = await _open_enrolment(cur, body.tenant, device)
        enrolled = None if enrolment is None else enrolment["vpp"]
        if body.vpp is not None and body.vpp != enrolled and not who.is_admin:
            DENIED.labels(who.role, "not-enrolled").inc()
            raise Problem(
                409,
                "not-enrolled",
                "Not enrolled in this VPP",
                f"device {device!r} is not enrolled in VPP {body.vpp!r}: ask to join with "
                f"POST /v1/vpps/{body.vpp}/enrolments; its owner approves",
            )
        _check_model(body, current, body.vpp or enrolled)
        # An approved member's model is what the owner admitted into its capacity: only an admin changes
        # it, otherwise a member could raise its nameplate in the owner's figures unasked.
        frozen = enrolment is not None and enrolment["status"] == "approved" and not who.is_admin
        admitted: dict[str, Any] | None = None
        if frozen:
            await cur.execute(_RESOURCE_SQL, params)
            admitted = await cur.fetchone()
        if body.vpp is not None and body.vpp != enrolled:
            with write_errors():
                await enrol_directly(cur, vpp=body.vpp, tenant=body.tenant, device=device, key_id=who.key_id)
        try:
            await cur.execute(
                """UPDATE devices SET
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
        if frozen and _model(admitted) != _model(row):
            DENIED.labels(who.role, "enrolled-model").inc()
            # Raised inside the transaction, so nothing of this request is written.
            raise Problem(
                409,
                "enrolled-model",
                "Resource model fixed by the enrolment",
                f"device {device!r} is an approved member of VPP {enrolled!r}, whose owner admitted this "
                "model: to change it, leave (POST /v1/vpp-enrolments/{id}/leave) and request again, or ask "
                "an admin",
            )
    return Resource.model_validate(row)


def _model(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """A resource row without its write time: what an owner's capacity depends on."""
    return None if row is None else {k: v for k, v in row.items() if k != "updated_at"}


@router.get("/devices/{device}/resource")
async def get_resource(device: str, who: AccessDep, request: Request, tenant: str) -> Resource:
    """A device's resource model: its own tenant, admins, and the owner of the VPP it is a member of."""
    await who.read_resource(request, tenant, device)
    rows = await fetch_dicts(request, _RESOURCE_SQL, {"tenant": tenant, "device": device})
    if not rows:
        raise Problem(404, "not-found", "Not found", f"device {device!r} of {tenant!r} has no resource model")
    return Resource.model_validate(rows[0])


# --- capacity --------------------------------------------------------------------------------------


@router.get("/vpps")
async def list_vpps(who: AccessDep, request: Request) -> Page[VppSummary]:
    """VPPs visible to this key: every one for admins and regulators, an operator's own, and those a
    tenant has an approved member in."""
    rows = await fetch_dicts(request, _SUMMARY_SQL, {**who.vpp_params(), "one": None})
    return Page[VppSummary](data=[VppSummary.model_validate(r) for r in rows])


_NOW_SQL = """
    SELECT vpp, duration_min, up_kw, down_kw, nameplate_up_kw, nameplate_down_kw, devices_online,
           devices_stale, as_of
    FROM vpp_capacity_now WHERE vpp = %(vpp)s AND duration_min = %(duration)s"""


async def _capacity_now(conn: psycopg.AsyncConnection[Any], vpp: str, duration: int) -> CapacityNow | None:
    """What the vpp service published last; zeros for a VPP without members, which it never publishes."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(_NOW_SQL, {"vpp": vpp, "duration": duration})
        row = await cur.fetchone()
        if row is not None:
            return CapacityNow.model_validate(row)
        await cur.execute(
            "SELECT 1 FROM devices d JOIN vpp_resources r USING (tenant_id, device_id) WHERE d.vpp = %s LIMIT 1",
            (vpp,),
        )
        if await cur.fetchone() is not None:
            return None
    return CapacityNow(
        vpp=vpp, duration_min=duration, up_kw=0.0, down_kw=0.0, nameplate_up_kw=0.0, nameplate_down_kw=0.0,
        devices_online=0, devices_stale=0, as_of=datetime.now(UTC),
    )  # fmt: skip


def _not_computed(vpp: str) -> Problem:
    return Problem(
        503,
        "capacity-not-computed",
        "Capacity not computed yet",
        f"the vpp service has not published VPP {vpp!r} yet (is `meterflow vpp` running?)",
    )


@router.get("/vpps/{vpp}/capacity")
async def capacity_now(
    vpp: str, who: AccessDep, request: Request, duration_min: Duration = 15
) -> CapacityNow:
    """Deliverable (derated) and nameplate flexibility up and down, sustained for `duration_min`."""
    _check_duration(request, duration_min)
    await who.vpp(request, vpp)
    async with pool(request).connection() as conn:
        now = await _capacity_now(conn, vpp, duration_min)
    if now is None:
        raise _not_computed(vpp)
    return now


@router.get("/vpps/{vpp}/capacity/history")
async def capacity_history(
    vpp: str,
    who: AccessDep,
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
    await who.vpp(request, vpp)
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
    vpp: str, who: AccessDep, request: Request, duration_min: Duration = 15
) -> NodesCapacity:
    """Capacity per topology node (resources without a node are under ""). A key that does not manage
    the VPP (a member's enterprise, a regulator) sees a node by name only when it holds none or at least
    `node_min_foreign_resources` resources of other tenants; the other nodes are summed in one row whose
    node is null, so no figure of a single other tenant's resource is shown."""
    _check_duration(request, duration_min)
    devices_of = await who.vpp(request, vpp)
    settings: Settings = request.app.state.settings
    rows = await fetch_dicts(
        request,
        """WITH members AS (
               SELECT coalesce(d.topology_node, '') AS node,
                      count(*) FILTER (WHERE d.tenant_id IS DISTINCT FROM %(viewer)s) AS foreign_resources
               FROM devices d JOIN vpp_resources r USING (tenant_id, device_id)
               WHERE d.vpp = %(vpp)s GROUP BY 1)
           SELECT n.node, n.up_kw, n.down_kw, n.devices_online, n.devices_stale,
                  m.foreign_resources
           FROM vpp_node_capacity_now n LEFT JOIN members m USING (node)
           WHERE n.vpp = %(vpp)s AND n.duration_min = %(duration)s ORDER BY n.node""",
        {"vpp": vpp, "duration": duration_min, "viewer": devices_of},
    )
    async with pool(request).connection() as conn:
        now = await _capacity_now(conn, vpp, duration_min)
    manages = devices_of is None and who.role != "regulator"
    return NodesCapacity(
        vpp=vpp,
        duration_min=duration_min,
        as_of=None if now is None else now.as_of,
        nodes=[NodeCapacity.model_validate(r) for r in rows]
        if manages
        else _merge_small_nodes(rows, settings.vpp.node_min_foreign_resources),
    )


def _merge_small_nodes(rows: list[dict[str, Any]], min_foreign: int) -> list[NodeCapacity]:
    """Nodes shown to a key that does not manage the VPP: those with no other tenant's resource or with
    at least `min_foreign` of them by name, the rest summed under node null. A node row left from
    resources that are no longer members (foreign_resources null) is never shown by name."""
    shown: list[NodeCapacity] = []
    merged: NodeCapacity | None = None
    for row in rows:
        foreign = row["foreign_resources"]
        node = NodeCapacity.model_validate(row)
        if foreign is not None and (foreign == 0 or foreign >= min_foreign):
            shown.append(node)
        elif merged is None:
            merged = node.model_copy(update={"node": None})
        else:
            merged.up_kw += node.up_kw
            merged.down_kw += node.down_kw
            merged.devices_online += node.devices_online
            merged.devices_stale += node.devices_stale
    return shown if merged is None else [*shown, merged]


@router.get("/vpps/{vpp}/stale-devices")
async def stale_devices(vpp: str, who: AccessDep, request: Request) -> StaleDevices:
    """Resources silent for more than 3x their telemetry interval (or never heard), left out of capacity:
    every one for the VPP's owner and admins, a member tenant's own only; never for regulators."""
    devices_of = await who.vpp(request, vpp, devices=True)
    rows = await fetch_dicts(
        request,
        """SELECT tenant_id AS tenant, device_id AS device, last_seen, telemetry_interval_s
           FROM vpp_stale_devices WHERE vpp = %(vpp)s
             AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
           ORDER BY last_seen NULLS FIRST, tenant_id, device_id""",
        {"vpp": vpp, "tenant": devices_of},
    )
    return StaleDevices(vpp=vpp, devices=[StaleDevice.model_validate(r) for r in rows])


# Every open stream holds one database connection.
class StreamSlots:
    """Live streams per process and per key. Taken in the handler, before the response starts (no await
    between the check and the take, so two requests cannot both get the last slot), and released once
    whichever of the stream's end or the response's end comes first."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self._held: dict[str, int] = {}
        self._open: set[tuple[str, object]] = set()

    def take(self, key_id: str) -> tuple[str, object]:
        if len(self._open) >= self.total:
            raise Problem(
                503, "too-many-streams", "Too many live streams",
                f"this API process serves at most {self.total} capacity streams at once; poll capacity instead",
                headers={"Retry-After": "30"},
            )  # fmt: skip
        if self._held.get(key_id, 0) >= self.per_key:
            raise Problem(
                429, "too-many-streams", "Too many live streams for this key",
                f"key {key_id} already holds {self.per_key} capacity streams in this process",
                headers={"Retry-After": "30"},
            )  # fmt: skip
        token = (key_id, object())
        self._open.add(token)
        self._held[key_id] = self._held.get(key_id, 0) + 1
        return token

    def release(self, token: tuple[str, object]) -> None:
        if token not in self._open:
            return
        self._open.remove(token)
        key_id = token[0]
        self._held[key_id] -= 1
        if not self._held[key_id]:
            del self._held[key_id]


def _stream_slots(request: Request) -> StreamSlots:
    settings: Settings = request.app.state.settings
    slots: StreamSlots | None = getattr(request.app.state, "stream_slots", None)
    if slots is None:
        slots = request.app.state.stream_slots = StreamSlots(
            settings.api.max_streams, settings.api.max_streams_per_key
        )
    return slots


@router.get("/vpps/{vpp}/capacity/stream", response_class=StreamingResponse)
async def capacity_stream(
    vpp: str, who: AccessDep, request: Request, duration_min: Duration = 15
) -> StreamingResponse:
    """Server-sent events: the capacity-now JSON at once, then whenever the vpp service publishes a change
    for this VPP (it notifies within its poll of the telemetry that caused it)."""
    _check_duration(request, duration_min)
    await who.vpp(request, vpp)
    settings: Settings = request.app.state.settings
    slots = _stream_slots(request)
    slot = slots.take(who.key_id)

    async def events() -> AsyncIterator[bytes]:
        # Each stream LISTENs on a connection of its own (outside the pools), opened and closed here
        # so a stream that never starts holds none.
        last: CapacityNow | None = None
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = await psycopg.AsyncConnection.connect(settings.db.conninfo(), autocommit=True)
            await conn.execute("LISTEN vpp_capacity")
            while await who.still_sees_vpp(conn, vpp):
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
            log.info("capacity stream of %s ended: key %s no longer sees it", vpp, who.key_id)
        except psycopg.OperationalError:
            log.warning("capacity stream of %s ended: database connection lost", vpp)
        finally:
            slots.release(slot)
            if conn is not None:
                await conn.close()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        # A client gone before the stream started never runs `events`: the slot is released here too.
        background=BackgroundTask(slots.release, slot),
    )
