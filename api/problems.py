"""RFC 9457 problem details for every error the API returns, and their place in the OpenAPI schema."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://meterflow.dev/problems/"
MEDIA_TYPE = "application/problem+json"
# A database that is down or overloaded is a condition a client can wait out, not a bug.
UNAVAILABLE_RETRY_S = 5

PROBLEMS = Counter(
    "meterflow_api_problems_total", "Error responses by status and problem type", ["status", "type"]
)


class Problem(Exception):
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(detail)
        self.status, self.slug, self.title, self.detail, self.extra = status, slug, title, detail, extra
        self.headers = headers


def _response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    body = {
        "type": PROBLEM_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    body.update(extra)
    PROBLEMS.labels(str(status), slug).inc()
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return _response(
            exc.status, exc.slug, exc.title, exc.detail, request.url.path, exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return _response(422, "validation", "Invalid request", "see errors", request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return _response(
            exc.status_code, slug, str(exc.detail), str(exc.detail), request.url.path, exc.headers
        )

    @app.exception_handler(psycopg.errors.DataError)
    async def _data(request: Request, exc: psycopg.errors.DataError) -> JSONResponse:
        # SQLSTATE class 22: a value the database cannot take (a NUL byte in text, a number out of
        # range), which only a request can bring.
        return _response(400, "invalid-value", "Invalid value", str(exc).splitlines()[0], request.url.path)

    @app.exception_handler(psycopg.errors.IntegrityError)
    async def _integrity(request: Request, exc: psycopg.errors.IntegrityError) -> JSONResponse:
        # SQLSTATE class 23 a route did not expect: a constraint or guard trigger of the registry
        # refused the write, which is the request's fault, never the server's.
        detail = str(exc.diag.message_primary or exc)
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return _response(409, "conflict", "Already exists", detail, request.url.path)
        return _response(422, "constraint", "Refused by a registry rule", detail, request.url.path)

    @app.exception_handler(psycopg.OperationalError)
    async def _unavailable(request: Request, exc: psycopg.OperationalError) -> JSONResponse:
        # A pool timeout, a lost connection or a cancelled statement: the request was fine.
        log.warning(
            "database unavailable on %s: %s", request.url.path, str(exc).splitlines()[0] if str(exc) else exc
        )
        return _response(
            503,
            "unavailable",
            "Service unavailable",
            "the database did not answer in time; retry later",
            request.url.path,
            {"Retry-After": str(UNAVAILABLE_RETRY_S)},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _response(500, "internal", "Internal error", "the error was logged", request.url.path)


# --- OpenAPI ---------------------------------------------------------------------------------------

_PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `type` is stable, `detail` is for people. A request that does "
    "not fit the schema (`.../validation`, 422) lists one entry in `errors` per offending value.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "instance"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string", "description": "the request path"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
_DESCRIPTIONS = {
    400: "Invalid request (a range, cursor or value the route refuses)",
    401: "Missing, unknown or revoked API key",
    403: "The key's role may not do this",
    404: "Not found, or not visible to this key",
    409: "Conflicts with what exists",
    422: "The request does not fit the schema, or names an unknown reference",
    429: "Rate limit of the key exceeded",
    503: "The database or a service the route needs is not available; retry later",
}
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": '`Bearer`, with `error="invalid_token"` for a key that is not valid',
        "schema": {"type": "string"},
    }
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def _problem_response(status: int, description: str | None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description or _DESCRIPTIONS.get(status, "Error"),
        "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    if status == 401:
        response["headers"] = _CHALLENGE
    return response


def document(schema: dict[str, Any], statuses: Mapping[tuple[str, str], Collection[int]]) -> None:
    """Give every operation (path, method) its problem responses as `application/problem+json`, in place.

    FastAPI documents only its own 422, as `application/json` of a shape this API never sends; an error
    a route declares without content (e.g. `responses={503: {...}}`) gets the problem schema too."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = _PROBLEM_SCHEMA
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses: dict[str, Any] = operation.setdefault("responses", {})
            codes = {int(code) for code in responses if code.isdigit() and int(code) >= 400}
            codes |= set(statuses.get((path, method), ()))
            for code in sorted(codes):
                described = responses.get(str(code), {}).get("description")
                # FastAPI's generic text for the 422 it adds says less than ours.
                if described == "Validation Error":
                    described = None
                responses[str(code)] = _problem_response(code, described)
