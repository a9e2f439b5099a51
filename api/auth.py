"""API keys: stored as SHA-256 hashes, scoped to a role and (except admins) a tenant."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from psycopg_pool import AsyncConnectionPool

from api.problems import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: str
    tenant: str | None

    def can_read_tenant(self, tenant: str) -> bool:
        return self.role == "admin" or self.tenant == tenant


def hash_key(key: str) -> str:
    # API keys are 256-bit random tokens, so a fast hash is enough; no password stretching needed.
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    return key_id, f"mf_{key_id}_{secrets.token_urlsafe(32)}"


async def ensure_bootstrap_admin(pool: AsyncConnectionPool, configured_key: str | None) -> None:
    """Register METERFLOW_BOOTSTRAP_ADMIN_KEY, or generate and print one when no admin key exists."""
    async with pool.connection() as conn:
        if configured_key:
            await conn.execute(
                "INSERT INTO api_keys (key_id, key_hash, role, label) VALUES ('bootstrap', %s, 'admin', "
                "'METERFLOW_BOOTSTRAP_ADMIN_KEY') ON CONFLICT (key_id) DO UPDATE SET key_hash = EXCLUDED.key_hash, "
                "revoked_at = NULL",
                (hash_key(configured_key),),
            )
            return
        cur = await conn.execute("SELECT 1 FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1")
        if await cur.fetchone():
            return
        key_id, key = new_key()
        await conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, role, label) VALUES (%s, %s, 'admin', 'generated at first start')",
            (key_id, hash_key(key)),
        )
        # Printed once, on purpose: there is no other way to learn a generated key.
        log.warning("generated the first admin API key (shown once, store it now): %s", key)


async def principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Problem(401, "unauthorized", "Missing API key", "Send `Authorization: Bearer <api key>`.")
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT key_id, role, tenant_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
            (hash_key(token),),
        )
        row = await cur.fetchone()
    if row is None:
        raise Problem(401, "unauthorized", "Invalid API key", "The key is unknown or revoked.")
    return Principal(key_id=str(row[0]), role=str(row[1]), tenant=None if row[2] is None else str(row[2]))


PrincipalDep = Annotated[Principal, Depends(principal)]


def require_admin(who: Principal) -> None:
    if who.role != "admin":
        raise Problem(403, "forbidden", "Admin role required", f"key {who.key_id} has role {who.role}")


def require_tenant(who: Principal, tenant: str) -> None:
    if not who.can_read_tenant(tenant):
        # 404, not 403: a foreign key must not learn which tenants exist.
        raise Problem(404, "not-found", "Not found", f"no tenant {tenant!r} visible to this key")
