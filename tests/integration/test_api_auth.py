"""Keys, roles and rate limits; every route of the OpenAPI schema walked with a foreign enterprise key."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from meterflow.settings import Settings
from tests.integration.test_api_fixtures import ApiServer, Fleet, serve

pytestmark = pytest.mark.integration


def _key(api: ApiServer, role: str, tenant: str | None) -> tuple[str, str]:
    with api.client() as http:
        r = http.post("/v1/api-keys", json={"role": role, "tenant": tenant, "label": "test"})
        assert r.status_code == 201, r.text
        body = r.json()
        return body["key_id"], body["key"]


def test_keys_are_created_scoped_and_revoked(api: ApiServer, fleet: Fleet) -> None:
    key_id, key = _key(api, "enterprise", fleet.tenant)
    with api.client(key) as http:
        assert http.get("/v1/enterprises").json()["data"][0]["tenant"] == fleet.tenant
        assert len(http.get("/v1/enterprises").json()["data"]) == 1
        forbidden = http.post("/v1/api-keys", json={"role": "admin"})
        assert forbidden.status_code == 403
        assert forbidden.headers["content-type"] == "application/problem+json"
    with api.client() as http:
        listed = http.get("/v1/api-keys", params={"tenant": fleet.tenant}).json()["data"]
        assert key_id in {k["key_id"] for k in listed} and all("key" not in k for k in listed)
        assert http.delete(f"/v1/api-keys/{key_id}").json()["revoked_at"] is not None
        assert http.post("/v1/api-keys", json={"role": "enterprise"}).status_code == 422
    with api.client(key) as http:
        refused = http.get("/v1/enterprises")
        assert refused.status_code == 401 and refused.json()["type"].endswith("/unauthorized")
    assert httpx.get(f"{api.url}/v1/enterprises").status_code == 401


def test_rate_limit_answers_429_with_retry_after(base_settings: Settings, fleet: Fleet) -> None:
    for limited in serve(base_settings, rate_limit_per_s=1.0, rate_limit_burst=3):
        _, key = _key(limited, "enterprise", fleet.tenant)
        with limited.client(key) as http:
            codes = [http.get("/v1/enterprises").status_code for _ in range(5)]
            assert codes[:3] == [200, 200, 200] and codes[-1] == 429
            r = http.get("/v1/enterprises")
            assert r.status_code == 429
            assert r.headers["content-type"] == "application/problem+json"
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["type"].endswith("/rate-limited")


def _foreign(fleet: Fleet) -> dict[str, Any]:
    """Values naming the other tenant's objects wherever a parameter or field could select one."""
    return {
        "tenant": fleet.other,
        "site": fleet.other_site,
        "device": fleet.other_device,
        "vpp": fleet.other,
        "gateway": f"{fleet.other}-gw",
        "year": 2025,
        "start": "2025-03-01T00:00:00+08:00",
        "end": "2025-04-01T00:00:00+08:00",
        "name": "x",
        "certificate": "c1",
        "period_start": "2025-01-01",
        "period_end": "2026-01-01",
        "certificates": 1,
        "value_added_cny": 1.0,
        "role": "enterprise",
        "metric": "energy_import_kwh",
        "ts": "2025-01-01T00:00:00Z",
        "removal_read": 1,
        "install_read": 0,
        "effective_from": "2025-01-01T00:00:00Z",
        "zone": "zhejiang",  # grid zones are reference data, not a tenant's
    }


def _generic(schema: dict[str, Any], fleet: Fleet) -> Any:
    options = [schema, *schema.get("anyOf", [])]
    for option in options:
        if "enum" in option:
            return option["enum"][0]
    types = {o.get("type") for o in options}
    if "integer" in types or "number" in types:
        return 1
    if "boolean" in types:
        return False
    return fleet.other


def _params(op: dict[str, Any], path: str, fleet: Fleet) -> tuple[str, dict[str, Any]]:
    """The path with the other tenant's ids, and the query parameters that select data (others left
    at their defaults so that the request is valid)."""
    foreign = _foreign(fleet)
    query: dict[str, Any] = {}
    for p in op.get("parameters", []):
        name, schema = p["name"], p.get("schema", {})
        value = foreign.get(name, _generic(schema, fleet))
        if p["in"] == "path":
            path = path.replace("{" + name + "}", str(value))
        elif p["in"] == "query" and (name in foreign or p.get("required")):
            query[name] = value
    return path, query


def _body(op: dict[str, Any], components: dict[str, Any], fleet: Fleet) -> dict[str, Any] | None:
    """A valid body aimed at the other tenant, built from the operation's request schema."""
    if "requestBody" not in op:
        return None
    ref = op["requestBody"]["content"]["application/json"]["schema"].get("$ref", "")
    model = components.get(ref.rsplit("/", 1)[-1], {})
    foreign = _foreign(fleet)
    props: dict[str, Any] = model.get("properties", {})
    body = {k: foreign[k] for k in props if k in foreign}
    for name in model.get("required", []):
        body.setdefault(name, _generic(props.get(name, {}), fleet))
    return body


def test_foreign_enterprise_key_never_reads_another_tenant(api: ApiServer, fleet: Fleet) -> None:
    """Every operation of the schema, with every parameter naming the other tenant's objects: nothing
    of the other tenant comes back, and nothing is written for it."""
    _, key = _key(api, "enterprise", fleet.tenant)
    schema = httpx.get(f"{api.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    marker = re.compile(re.escape(fleet.other))
    walked = 0
    with api.client(key) as http:
        for path, operations in schema["paths"].items():
            for method, op in operations.items():
                url, selected = _params(op, path, fleet)
                # With the tenant named, and without (a key then defaults to its own tenant).
                without = {k: v for k, v in selected.items() if k != "tenant"}
                for params in (selected, without) if without != selected else (selected,):
                    if "stream" in url:
                        # A stream of another tenant's VPP would never end: a status line is enough.
                        with http.stream(method.upper(), url, params=params) as r:
                            status, text = r.status_code, "" if r.status_code < 300 else r.read().decode()
                    else:
                        r = http.request(
                            method.upper(), url, params=params, json=_body(op, components, fleet)
                        )
                        status, text = r.status_code, r.text
                    walked += 1
                    where = f"{method.upper()} {url} {params}"
                    assert status != 500, where
                    if method != "get":
                        assert status in (403, 404, 422), f"{where} wrote for another tenant: {status} {text}"
                    elif status < 300:
                        # Success only for what is not tenant data (reference data, own tenant's lists).
                        assert not marker.search(text), (
                            f"{where} answered with the other tenant's data: {text[:300]}"
                        )
                    else:
                        assert r.headers["content-type"] == "application/problem+json", where
    assert walked >= 30


def test_operator_reads_aggregates_across_tenants_but_not_their_accounts(
    api: ApiServer, fleet: Fleet
) -> None:
    """Contract: operators see VPP capacity and aggregates across tenants, no other tenant's raw readings
    (nor its carbon account, which is the enterprise's own)."""
    _, key = _key(api, "operator", fleet.tenant)
    day = {"start": "2025-03-10T00:00:00+08:00", "end": "2025-03-11T00:00:00+08:00"}
    with api.client(key) as http:
        load = http.get(f"/v1/sites/{fleet.other_site}/load", params={**day, "tenant": fleet.other})
        assert load.status_code == 200 and load.json()["tenant"] == fleet.other
        readings = http.get(
            f"/v1/devices/{fleet.other_device}/readings", params={**day, "tenant": fleet.other}
        )
        assert readings.status_code == 404
        carbon = http.get(f"/v1/enterprises/{fleet.other}/carbon", params=day)
        assert carbon.status_code == 404
        assert (
            http.get(f"/v1/enterprises/{fleet.other}/carbon-account", params={"year": 2025}).status_code
            == 404
        )
