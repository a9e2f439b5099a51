"""API keys: stored as SHA-256 hashes, scoped to a role and (except admins and regulators) a tenant.

This module says who a request comes from; what that key may do is `api.access`."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from api.problems import Problem
from api.ratelimit import TokenBuckets, retry_after_header
from meterflow.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: str
    tenant: str | None


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


REJECTED = Counter(
    "meterflow_api_rejected_requests_total", "Requests refused before the route ran", ["reason"]
)


class KeyCache:
    """Key hash -> principal (None for unknown or revoked keys), kept `ttl_s` seconds."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal | None]] = {}

    def get(self, key_hash: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(key_hash)
        if entry is None or time.monotonic() - entry[0] > self.ttl_s:
            return False, None
        return True, entry[1]

    def put(self, key_hash: str, who: Principal | None) -> None:
        if len(self._entries) > 100_000:
            # Random bad keys must not grow the cache without bound.
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic(), who)

    def forget(self, key_id: str) -> None:
        self._entries = {h: e for h, e in self._entries.items() if e[1] is None or e[1].key_id != key_id}


def install(app: FastAPI, settings: Settings) -> None:
    """Per-process key cache and rate limiter on the app state."""
    app.state.key_cache = KeyCache(settings.api.key_cache_s)
    app.state.rate_limiter = TokenBuckets(settings.api.rate_limit_per_s, settings.api.rate_limit_burst)


async def principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        REJECTED.labels("no-key").inc()
        raise Problem(
            401,
            "unauthorized",
            "Missing API key",
            "Send `Authorization: Bearer <api key>`.",
            headers={"WWW-Authenticate": "Bearer"},  # RFC 9110: a 401 names its scheme
        )
    cache: KeyCache = request.app.state.key_cache
    key_hash = hash_key(token)
    hit, who = cache.get(key_hash)
    if not hit:
        pool: AsyncConnectionPool = request.app.state.pool
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT key_id, role, tenant_id FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                (key_hash,),
            )
            row = await cur.fetchone()
        who = (
            None
            if row is None
            else Principal(
                key_id=str(row[0]), role=str(row[1]), tenant=None if row[2] is None else str(row[2])
            )
        )
        cache.put(key_hash, who)
    if who is None:
        REJECTED.labels("bad-key").inc()
        raise Problem(
            401,
            "unauthorized",
            "Invalid API key",
            "The key is unknown or revoked.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},  # RFC 6750
        )
    limiter: TokenBuckets = request.app.state.rate_limiter
    wait = limiter.take(who.key_id)
    if wait > 0:
        REJECTED.labels("rate-limited").inc()
        raise Problem(
            429,
            "rate-limited",
            "Too many requests",
            f"key {who.key_id} is limited to {limiter.rate:g} requests/s (burst {limiter.burst:g})",
            headers={"Retry-After": retry_after_header(wait)},
        )
    return who
