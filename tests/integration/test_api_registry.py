"""Registry lists: filters and keyset pagination."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_api_fixtures import ApiServer, Fleet

pytestmark = pytest.mark.integration


def _all_pages(api: ApiServer, path: str, params: dict[str, Any]) -> list[list[dict[str, Any]]]:
    pages = []
    cursor = None
    with api.client() as http:
        while True:
            r = http.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            body = r.json()
            pages.append(body["data"])
            cursor = body["next_cursor"]
            if cursor is None:
                return pages


def test_lists_filter_and_page(api: ApiServer, fleet: Fleet) -> None:
    devices = _all_pages(api, "/v1/devices", {"tenant": fleet.tenant, "limit": 1})
    assert [len(p) for p in devices] == [1, 1]
    assert [p[0]["device"] for p in devices] == [f"{fleet.site}-grid", f"{fleet.site}-pv"]
    (pv,) = _all_pages(api, "/v1/devices", {"tenant": fleet.tenant, "device_type": "pv"})
    assert [d["device"] for d in pv] == [f"{fleet.site}-pv"]
    peers = _all_pages(api, "/v1/enterprises", {"industry_code": fleet.industry, "limit": 2})
    assert [len(p) for p in peers] == [2, 1]
    assert sorted(e["tenant"] for p in peers for e in p) == sorted(fleet.peers)
    sites = [
        s["site"] for p in _all_pages(api, "/v1/sites", {"province": "zhejiang", "limit": 500}) for s in p
    ]
    assert {f"{t}-s1" for t in fleet.peers} <= set(sites)
    with api.client() as http:
        bad = http.get("/v1/sites", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 400 and bad.json()["type"].endswith("/bad-cursor")
