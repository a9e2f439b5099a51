"""Security headers, the access log without query strings, and a database that cannot answer: tried as
an attacker (or a careless proxy) would, against the API under uvicorn without the stack."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import psycopg_pool
import pytest
import uvicorn
from prometheus_client import REGISTRY
from uvicorn.logging import AccessFormatter

from api.app import create_app
from tests.integration.test_api_fixtures import free_port

pytestmark = pytest.mark.unit

API_CSP = "default-src 'none'; frame-ancestors 'none'"


class _UnreachablePool:
    """A pool every connection of which times out, as under a flood or with the database down."""

    def connection(self, timeout: float | None = None) -> AbstractAsyncContextManager[Any]:
        raise psycopg_pool.PoolTimeout("couldn't get a connection after 30.00 sec")


class _Lines(logging.Handler):
    """Access lines as uvicorn's own formatter writes them to the log file."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s'))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


_INTEGRITY_ERRORS: dict[str, type[psycopg.errors.IntegrityError]] = {
    "check": psycopg.errors.CheckViolation,  # e.g. a registry guard trigger
    "not-null": psycopg.errors.NotNullViolation,
    "unique": psycopg.errors.UniqueViolation,
}


async def _raise(error: str) -> None:
    """What a route that did not expect a registry rule's refusal, or has a bug, lets through."""
    if error == "bug":
        raise ZeroDivisionError("float division by zero")
    raise _INTEGRITY_ERRORS[error]("device d1 is not enrolled in VPP v1")


@dataclass
class Served:
    http: httpx.Client
    access: _Lines


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The API under uvicorn with uvicorn's logging set-up (as `meterflow api` runs it), without the
    lifespan; its pool never gives a connection."""
    app = create_app()
    app.state.pool = _UnreachablePool()
    app.add_api_route("/probe/{error}", _raise)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), lifespan="off", log_level="info")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    access = _Lines()
    logging.getLogger("uvicorn.access").addHandler(access)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=30) as http:
            yield Served(http, access)
    finally:
        logging.getLogger("uvicorn.access").removeHandler(access)
        server.should_exit = True
        thread.join(timeout=10)


def test_api_answers_are_neither_cached_nor_sniffed_nor_framed(served: Served) -> None:
    for response in (
        served.http.get("/healthz"),
        # 500, from the outermost error handler; uvicorn then drops the connection, so none is reused.
        served.http.get("/probe/bug", headers={"Connection": "close"}),
        served.http.get("/v1/enterprises"),  # no key: 401 problem
        served.http.get("/v1/no-such-route"),
        served.http.get("/openapi.json"),
    ):
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", response.url
        assert headers["cache-control"] == "no-store", response.url
        assert headers["x-frame-options"] == "DENY", response.url
        assert headers["referrer-policy"] == "no-referrer", response.url
        assert headers["content-security-policy"] == API_CSP, response.url


def test_a_refusal_is_a_problem_the_schema_describes(served: Served) -> None:
    response = served.http.get("/v1/enterprises")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    problem = served.http.get("/openapi.json").json()["components"]["schemas"]["Problem"]
    body = response.json()
    assert set(problem["required"]) <= set(body)
    assert body["type"].endswith("/unauthorized") and body["status"] == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_interactive_docs_still_load_their_scripts_but_cannot_be_framed(served: Served) -> None:
    response = served.http.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == "frame-ancestors 'none'"
    assert response.headers["cache-control"] == "no-store"


def test_dashboard_files_keep_their_own_policy(served: Served) -> None:
    page = served.http.get("/dashboard/")
    assert page.status_code == 200
    # Static files hold no tenant data: revalidated, not forbidden to cache.
    assert page.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    missing = served.http.get("/dashboard/no-such-file.js")
    assert missing.status_code == 404
    assert missing.headers["cache-control"] == "no-store"
    assert missing.headers["x-content-type-options"] == "nosniff"


def test_a_database_that_cannot_answer_is_503_with_retry_after_not_500(served: Served) -> None:
    labels = {"status": "503", "type": "unavailable"}
    before = REGISTRY.get_sample_value("meterflow_api_problems_total", labels) or 0.0
    # A key the cache does not know: checking it needs the database.
    response = served.http.get("/v1/enterprises", headers={"Authorization": "Bearer mf_x_guessed"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "5"
    assert response.headers["cache-control"] == "no-store"
    assert response.json()["type"].endswith("/unavailable")
    assert REGISTRY.get_sample_value("meterflow_api_problems_total", labels) == before + 1


def test_access_log_never_holds_a_query_string(served: Served) -> None:
    served.access.lines.clear()
    secret = "acme-c2VjcmV0LWN1cnNvcg"
    assert served.http.get(f"/healthz?tenant={secret}&cursor={secret}").status_code == 200
    assert served.http.get(f"/v1/enterprises?industry_code={secret}").status_code == 401
    lines = served.access.lines
    assert len(lines) == 2, lines
    assert all(secret not in line and "?" not in line for line in lines), lines
    assert "/healthz" in lines[0] and "/v1/enterprises" in lines[1]


@pytest.mark.parametrize(("error", "status"), [("check", 422), ("not-null", 422), ("unique", 409)])
def test_a_write_a_registry_rule_refuses_is_a_problem_not_500(
    served: Served, error: str, status: int
) -> None:
    response = served.http.get(f"/probe/{error}")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert "not enrolled" in response.json()["detail"]
