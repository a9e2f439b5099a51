"""API keys: created and revoked by admins, stored as SHA-256 hashes, scoped to a role and tenant."""

from __future__ import annotations

from typing import Annotated, Literal

import psycopg
from fastapi import APIRouter, Query, Request
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field

from api.access import AccessDep
from api.auth import KeyCache, hash_key, new_key
from api.models import ApiKeyCreated, ApiKeyOut, Page, TenantId
from api.problems import Problem
from api.query import pool

router = APIRouter(prefix="/v1", tags=["api keys"])

_COLS = "key_id, role, tenant_id AS tenant, label, created_at, revoked_at"
# Keys bound to no tenant: admins see everything, regulators read every tenant's aggregates and accounts.
UNBOUND_ROLES = ("admin", "regulator")


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["admin", "enterprise", "operator", "regulator"]
    tenant: TenantId | None = None
    label: Annotated[str, Field(max_length=200)] | None = None


@router.post("/api-keys", status_code=201)
async def create_key(body: ApiKeyIn, who: AccessDep, request: Request) -> ApiKeyCreated:
    """Issue a key; the key itself is returned once. Enterprise and operator keys need a tenant; admin
    and regulator keys have none."""
    who.require_admin()
    if body.role not in UNBOUND_ROLES and body.tenant is None:
        raise Problem(422, "tenant-required", "Tenant required", f"{body.role} keys are bound to a tenant")
    if body.role in UNBOUND_ROLES and body.tenant is not None:
        raise Problem(
            422,
            "invalid-key",
            f"{body.role.capitalize()} keys have no tenant",
            f"leave tenant out for {body.role} keys",
        )
    key_id, key = new_key()
    try:
        async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "INSERT INTO api_keys (key_id, key_hash, tenant_id, role, label) VALUES (%s, %s, %s, %s, %s) "
                f"RETURNING {_COLS}",
                (key_id, hash_key(key), body.tenant, body.role, body.label),
            )
            row = await cur.fetchone()
    except psycopg.errors.ForeignKeyViolation as exc:
        raise Problem(422, "unknown-reference", "Unknown tenant", f"no enterprise {body.tenant!r}") from exc
    if row is None:
        raise RuntimeError("INSERT ... RETURNING returned no row")
    return ApiKeyCreated.model_validate({**row, "key": key})


@router.get("/api-keys")
async def list_keys(
    who: AccessDep,
    request: Request,
    tenant: str | None = None,
    include_revoked: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    cursor: str | None = None,
) -> Page[ApiKeyOut]:
    """Keys (never their secrets), in key-id order. Admin only."""
    who.require_admin()
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {_COLS} FROM api_keys WHERE (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s) "
            "AND (%(all)s OR revoked_at IS NULL) AND key_id > %(after)s ORDER BY key_id LIMIT %(limit)s",
            {"tenant": tenant, "all": include_revoked, "after": cursor or "", "limit": limit + 1},
        )
        rows = await cur.fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return Page[ApiKeyOut](
        data=[ApiKeyOut.model_validate(r) for r in rows], next_cursor=rows[-1]["key_id"] if more else None
    )


@router.delete("/api-keys/{key_id}")
async def revoke_key(key_id: str, who: AccessDep, request: Request) -> ApiKeyOut:
    """Revoke a key: refused at once by this process, within `api.key_cache_s` by the others. Admin only."""
    who.require_admin()
    if key_id == who.key_id:
        raise Problem(409, "conflict", "Cannot revoke own key", "revoke it with another admin key")
    async with pool(request).connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = %s RETURNING {_COLS}",
            (key_id,),
        )
        row = await cur.fetchone()
    if row is None:
        raise Problem(404, "not-found", "Not found", f"no API key {key_id!r}")
    cache: KeyCache = request.app.state.key_cache
    cache.forget(key_id)
    return ApiKeyOut.model_validate(row)
