"""Refusals a client meets every day, each answered as the schema's Problem says: a client generated from
the OpenAPI schema parses every one of them (schemathesis samples these; here each is asked for)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from meterflow.settings import Settings
from tests.integration.test_api_fixtures import ApiServer, Fleet

pytestmark = pytest.mark.integration

JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "array": list,
    "object": dict,
}


@pytest.fixture(scope="module")
def enterprise(api: ApiServer, fleet: Fleet) -> Iterator[httpx.Client]:
    with api.client() as http:
        r = http.post(
            "/v1/api-keys", json={"role": "enterprise", "tenant": fleet.tenant, "label": "problems"}
        )
        assert r.status_code == 201, r.text
    with api.client(str(r.json()["key"])) as client:
        yield client


def _conforms(body: Any, schema: dict[str, Any]) -> None:
    """The Problem schema's shape, checked by hand: required members, member types, `errors` items."""
    assert isinstance(body, dict)
    assert set(schema["required"]) <= set(body), body
    for name, member in schema["properties"].items():
        if name not in body:
            continue
        assert isinstance(body[name], JSON_TYPES[member["type"]]), (name, body)
    for error in body.get("errors", []):
        item = schema["properties"]["errors"]["items"]
        assert isinstance(error, dict) and set(item["required"]) <= set(error), error
        assert isinstance(error["msg"], str) and isinstance(error["loc"], list), error


def test_everyday_refusals_are_documented_problems(
    api: ApiServer, fleet: Fleet, enterprise: httpx.Client
) -> None:
    openapi = httpx.get(f"{api.url}/openapi.json").json()
    problem = openapi["components"]["schemas"]["Problem"]
    device = f"{fleet.site}-grid"
    refusals: list[tuple[int, httpx.Response]] = [
        (401, httpx.get(f"{api.url}/v1/enterprises")),
        (401, httpx.get(f"{api.url}/v1/enterprises", headers={"Authorization": "Bearer mf_guess"})),
        (404, enterprise.get(f"/v1/enterprises/{fleet.other}")),
        (422, enterprise.get(f"/v1/sites/{fleet.site}/load", params={"start": "yesterday"})),
        (
            400,
            enterprise.get(
                f"/v1/sites/{fleet.site}/load", params={"start": "2025-03-10", "end": "2025-03-09"}
            ),
        ),
        # A route's own 422 with a list of broken rules (it once listed bare strings).
        (
            422,
            enterprise.put(
                f"/v1/devices/{device}/resource",
                json={"tenant": fleet.tenant, "resource_class": "building_load"},
            ),
        ),
    ]
    with api.client() as admin:
        # A zone the server cannot load (it once made every carbon account of the tenant a 500).
        refusals.append(
            (422, admin.post("/v1/enterprises", json={"tenant": "x", "name": "X", "timezone": "../x"}))
        )
    for status, response in refusals:
        where = f"{response.request.method} {response.request.url}"
        assert response.status_code == status, (where, response.text)
        assert response.headers["content-type"] == "application/problem+json", where
        assert response.headers["cache-control"] == "no-store", where
        _conforms(response.json(), problem)


def test_a_tenant_stored_with_an_unloadable_zone_still_gets_its_account(
    api: ApiServer, base_settings: Settings
) -> None:
    """Registration refuses such a zone now; one stored before (schemathesis stored `\\U000dea45`) made the
    tenant's carbon account and its export a 500."""
    tenant = f"tz{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        conn.execute(
            "INSERT INTO tenants (tenant_id, name, timezone) VALUES (%s, %s, %s)",
            (tenant, tenant, "\U000dea45"),
        )
    with api.client() as admin:
        for path in ("carbon-account", "carbon-account/export"):
            response = admin.get(f"/v1/enterprises/{tenant}/{path}", params={"year": 2025})
            assert response.status_code == 200, (path, response.text)
