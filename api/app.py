"""FastAPI application factory: lifespan-managed connection pool, routers, problem+json errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from api import auth, problems
from api.auth import ensure_bootstrap_admin
from api.grading import load_schemes
from api.query import SiteCache
from api.routes import carbon, dashboard, factors, intensity, keys, load, readings, registry
from api.routes import dr as dr_routes
from api.routes import vpp as vpp_routes
from api.tou import load_calendars
from meterflow.runtime import settle_after_start_up
from meterflow.settings import Settings
from processing.carbon import sync_packaged_factors


def create_app(settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as pools:
            pool = AsyncConnectionPool(cfg.db.conninfo(), min_size=1, max_size=cfg.db.pool_max, open=False)
            await pool.open(wait=True, timeout=30)
            pools.push_async_callback(pool.close)
            app.state.pool = pool
            admin_key = cfg.bootstrap_admin_key.get_secret_value() if cfg.bootstrap_admin_key else None
            await ensure_bootstrap_admin(pool, admin_key)
            async with pool.connection() as conn:
                await sync_packaged_factors(conn)
            # Generic plans: a prepared statement on a hypertable otherwise gets a custom plan, that is a
            # full planning with chunk exclusion, on every execution; TimescaleDB excludes chunks at run
            # time.
            read_pool = AsyncConnectionPool(
                cfg.db.conninfo(),
                min_size=1,
                max_size=cfg.db.pool_max,
                kwargs={"autocommit": True, "options": "-c plan_cache_mode=force_generic_plan"},
                open=False,
            )
            await read_pool.open(wait=True, timeout=30)
            pools.push_async_callback(read_pool.close)
            app.state.read_pool = read_pool
            # Fewer, shorter collections once everything start-up made exists: a pause in one lands in
            # some request's tail latency.
            settle_after_start_up()
            try:
                yield
            finally:
                # Let a pending trailing broker reload happen: it makes the last credentials live.
                trailing = getattr(app.state, "trailing_broker_reload", None)
                if trailing is not None:
                    await asyncio.gather(trailing, return_exceptions=True)

    app = FastAPI(
        title="meterflow",
        version="0.1.0",
        description="Meter and VPP telemetry: raw readings, load, carbon accounts and flexibility.",
        lifespan=lifespan,
    )
    app.state.settings = cfg
    # Configuration errors in these data files stop the start-up rather than a request.
    app.state.tou_calendars = load_calendars(cfg.api.tou_calendars_file)
    app.state.grading_schemes = load_schemes(cfg.api.grading_schemes_file)
    auth.install(app, cfg)
    app.state.site_cache = SiteCache(cfg.api.key_cache_s)
    problems.install(app)
    app.include_router(registry.router)
    app.include_router(readings.router)
    app.include_router(load.router)
    app.include_router(carbon.router)
    app.include_router(factors.router)
    app.include_router(keys.router)
    app.include_router(dashboard.router)
    app.include_router(vpp_routes.router)
    app.include_router(dr_routes.router)
    app.include_router(intensity.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz(request: Request) -> Response:
        """Readiness: the database answers."""
        pool: AsyncConnectionPool = request.app.state.pool
        try:
            async with pool.connection(timeout=2) as conn:
                await conn.execute("SELECT 1")
        except Exception as exc:
            raise problems.Problem(503, "not-ready", "Not ready", f"database: {exc}") from exc
        return Response('{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def app_factory() -> FastAPI:
    """Entry point for `uvicorn --factory api.app:app_factory`."""
    return create_app()
