"""FastAPI application factory: lifespan-managed connection pool, routers, problem+json errors, an
OpenAPI schema that documents them, security headers and an access log without query strings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

# JSON answers never render; the interactive docs load Swagger UI and ReDoc from their CDN, and the
# dashboard sets its own policy.
_API_CSP = "default-src 'none'; frame-ancestors 'none'"
_DOCS_CSP = "frame-ancestors 'none'"
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


class SecurityHeaders:
    """Headers on every response: answers carry tenant data, so no cache may keep them (`no-store`),
    no browser may sniff them into something executable, frame them or leak the URL as a referrer.
    The dashboard's static files are no tenant data: they keep their revalidation policy."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        dashboard = path == "/dashboard" or path.startswith("/dashboard/")
        csp = _DOCS_CSP if path in _DOCS_PATHS else _API_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                if not (dashboard and "cache-control" in headers):
                    headers["Cache-Control"] = "no-store"
                if "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = csp
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AccessLogWithoutQuery(logging.Filter):
    """uvicorn's access line carries the query string, where tenants, sites, devices and cursors are:
    the line keeps only the path. Installed on the `uvicorn.access` logger, so every way of running
    the API (CLI, bench, compose, tests) is covered."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn logs '%s - "%s %s HTTP/%s" %d' with (client, method, path?query, version, status).
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].partition("?")[0], args[3], args[4])
        return True


def install_access_log_filter() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogWithoutQuery) for f in access.filters):
        access.addFilter(AccessLogWithoutQuery())


def _depends_on(dependant: Dependant, call: object) -> bool:
    return any(d.call is call or _depends_on(d, call) for d in dependant.dependencies)


def _has_input(dependant: Dependant) -> bool:
    params = (
        dependant.path_params,
        dependant.query_params,
        dependant.header_params,
        dependant.cookie_params,
        dependant.body_params,
    )
    return any(params) or any(_has_input(d) for d in dependant.dependencies)


def problem_statuses(routes: Sequence[BaseRoute]) -> dict[tuple[str, str], set[int]]:
    """(path, method) -> the error statuses a route can answer, from what it depends on: a key (401,
    403, a foreign tenant's 404, 429, and 503 when the database cannot check it), input (400, 422),
    writes (409)."""
    statuses: dict[tuple[str, str], set[int]] = {}
    for route in iter_route_contexts(routes):
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        dependant: Dependant = route.dependant
        codes: set[int] = set()
        if _depends_on(dependant, auth.principal):
            codes |= {400, 401, 403, 404, 429, 503}
        if _has_input(dependant):
            codes |= {400, 422}
        for method in route.methods or ():
            method_codes = codes | {409} if codes and method not in ("GET", "HEAD") else codes
            statuses[(str(route.path_format), method.lower())] = method_codes
    return statuses


# (method, path, status) -> links to (method, path) with their parameters as runtime expressions:
# what a client does next with what it created, and what schemathesis' stateful phase follows.
_LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/enterprises", "201"): {
        "GetEnterprise": ("get", "/v1/enterprises/{tenant}", {"tenant": "$response.body#/tenant"}),
        "ListSites": ("get", "/v1/sites", {"tenant": "$response.body#/tenant"}),
    },
    ("post", "/v1/sites", "201"): {
        "UpdateSite": (
            "patch",
            "/v1/sites/{site}",
            {"site": "$response.body#/site", "tenant": "$response.body#/tenant"},
        ),
        "SiteLoad": (
            "get",
            "/v1/sites/{site}/load",
            {"site": "$response.body#/site", "tenant": "$response.body#/tenant"},
        ),
    },
    ("post", "/v1/gateways", "201"): {
        "RotateCredentials": (
            "post",
            "/v1/gateways/{gateway}/credentials",
            {"gateway": "$response.body#/gateway"},
        ),
    },
    ("post", "/v1/devices", "201"): {
        "DeviceReadings": (
            "get",
            "/v1/devices/{device}/readings",
            {"device": "$response.body#/device", "tenant": "$response.body#/tenant"},
        ),
        "DeviceResource": (
            "get",
            "/v1/devices/{device}/resource",
            {"device": "$response.body#/device", "tenant": "$response.body#/tenant"},
        ),
    },
    ("post", "/v1/green-certificates", "201"): {
        "ListCertificates": ("get", "/v1/green-certificates", {"tenant": "$response.body#/tenant"}),
    },
    ("post", "/v1/enterprises/{tenant}/output-values", "201"): {
        "ListOutputValues": (
            "get",
            "/v1/enterprises/{tenant}/output-values",
            {"tenant": "$request.path.tenant"},
        ),
        "CarbonAccount": (
            "get",
            "/v1/enterprises/{tenant}/carbon-account",
            {"tenant": "$request.path.tenant", "year": "$response.body#/year"},
        ),
    },
    ("post", "/v1/emission-factors", "201"): {
        "GetFactor": ("get", "/v1/emission-factors/{factor_id}", {"factor_id": "$response.body#/factor_id"}),
    },
    ("post", "/v1/api-keys", "201"): {
        "RevokeKey": ("delete", "/v1/api-keys/{key_id}", {"key_id": "$response.body#/key_id"}),
    },
    ("post", "/v1/vpps", "201"): {
        "GetVpp": ("get", "/v1/vpps/{vpp}", {"vpp": "$response.body#/vpp"}),
        "UpdateVpp": ("patch", "/v1/vpps/{vpp}", {"vpp": "$response.body#/vpp"}),
        "RequestEnrolment": ("post", "/v1/vpps/{vpp}/enrolments", {"vpp": "$response.body#/vpp"}),
        "VppCapacity": ("get", "/v1/vpps/{vpp}/capacity", {"vpp": "$response.body#/vpp"}),
        "VppEvents": ("get", "/v1/vpps/{vpp}/dr-events", {"vpp": "$response.body#/vpp"}),
    },
    ("post", "/v1/vpps/{vpp}/enrolments", "201"): {
        "Approve": (
            "post",
            "/v1/vpp-enrolments/{enrolment_id}/approve",
            {"enrolment_id": "$response.body#/enrolment_id"},
        ),
        "Reject": (
            "post",
            "/v1/vpp-enrolments/{enrolment_id}/reject",
            {"enrolment_id": "$response.body#/enrolment_id"},
        ),
        "Leave": (
            "post",
            "/v1/vpp-enrolments/{enrolment_id}/leave",
            {"enrolment_id": "$response.body#/enrolment_id"},
        ),
        "ListEnrolments": ("get", "/v1/vpp-enrolments", {"vpp": "$request.path.vpp"}),
    },
    ("post", "/v1/vpps/{vpp}/dr-events", "201"): {
        "GetEvent": ("get", "/v1/dr-events/{event_id}", {"event_id": "$response.body#/event_id"}),
        "EventResult": ("get", "/v1/dr-events/{event_id}/result", {"event_id": "$response.body#/event_id"}),
        "EventReport": ("get", "/v1/dr-events/{event_id}/report", {"event_id": "$response.body#/event_id"}),
    },
}


# Answers that are not (only) JSON: (method, path) -> the 200 response's content by media type.
_MEDIA: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/v1/enterprises/{tenant}/carbon-account/export"): {
        "text/csv": {"schema": {"type": "string", "description": "one line per figure, with a header line"}},
        "application/json": {"schema": {"$ref": "#/components/schemas/CarbonAccount"}},
    },
    ("get", "/v1/vpps/{vpp}/capacity/stream"): {
        "text/event-stream": {
            "schema": {"type": "string", "description": "`data:` events of CapacityNow JSON and keep-alives"}
        },
    },
}


def _add_media_types(schema: dict[str, Any]) -> None:
    paths: dict[str, Any] = schema["paths"]
    for (method, path), content in _MEDIA.items():
        paths[path][method]["responses"]["200"]["content"] = content


def _add_links(schema: dict[str, Any]) -> None:
    paths: dict[str, Any] = schema["paths"]
    for (method, path, status), links in _LINKS.items():
        response = paths[path][method]["responses"][status]
        response["links"] = {
            name: {"operationId": paths[target][target_method]["operationId"], "parameters": parameters}
            for name, (target_method, target, parameters) in links.items()
        }


class MeterflowApi(FastAPI):
    """FastAPI whose OpenAPI schema tells the truth about errors, authentication and links, and whose
    every answer carries the security headers."""

    _documented: int | None = None

    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's server-error middleware, so a 500 carries the headers too.
        return SecurityHeaders(super().build_middleware_stack())

    def openapi(self) -> dict[str, Any]:
        schema = super().openapi()
        if self._documented != id(schema):
            statuses = problem_statuses(self.routes)
            problems.document(schema, statuses)
            schema["components"]["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key"}
            }
            for (path, method), codes in statuses.items():
                if 401 in codes:
                    schema["paths"][path][method]["security"] = [{"apiKey": []}]
            _add_media_types(schema)
            _add_links(schema)
            self._documented = id(schema)
        return schema


def create_app(settings: Settings | None = None) -> FastAPI:
    cfg = settings or Settings()
    # Here, not only in the CLI: `uvicorn --factory api.app:app_factory` (how several workers run) must
    # refuse a published or weak secret, a bootstrap admin key above all, just as `meterflow api` does.
    cfg.require_secrets()

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

    app = MeterflowApi(
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
    install_access_log_filter()
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

    @app.get("/readyz", tags=["ops"], responses={503: {"description": "The database does not answer"}})
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
