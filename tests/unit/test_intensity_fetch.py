"""The provider clients of `meterflow intensity fetch` against canned responses in the providers'
documented shapes (httpx's MockTransport: no network in unit tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import httpx
import pytest
from pydantic import SecretStr

from ingest import intensity_fetch
from ingest.intensity import Parsed
from ingest.intensity_fetch import ElectricityMaps, ProviderError, WattTime, fetch_once
from meterflow.settings import IntensitySettings

Handler = Callable[[httpx.Request], httpx.Response]
T = TypeVar("T")

EM_HISTORY = {
    "zone": "DE",
    "history": [
        {"zone": "DE", "carbonIntensity": 302, "datetime": "2025-03-10T00:00:00.000Z", "isEstimated": False,
         "emissionFactorType": "lifecycle", "temporalGranularity": "hourly"},
        {"zone": "DE", "carbonIntensity": 298, "datetime": "2025-03-10T01:00:00.000Z", "isEstimated": True,
         "estimationMethod": "TIME_SLICER_AVERAGE", "emissionFactorType": "lifecycle", "temporalGranularity": "hourly"},
    ],
}  # fmt: skip
WT_FORECAST = {
    "meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer", "units": "lbs_co2_per_mwh",
             "data_point_period_seconds": 300, "model": {"date": "2024-10-01"},
             "generated_at": "2025-03-10T00:00:00+00:00"},
    "data": [{"point_time": "2025-03-10T00:05:00+00:00", "value": 900.0}],
}  # fmt: skip


def _run(handler: Handler, use: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await use(http)

    return asyncio.run(go())


def test_electricitymaps_sends_the_token_and_zone() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=EM_HISTORY)

    parsed = _run(
        handler, lambda http: ElectricityMaps(http, "tok", "https://em.test/v3").fetch("DE", "history")
    )
    assert [str(r.url) for r in seen] == [
        "https://em.test/v3/carbon-intensity/history?zone=DE&emissionFactorType=direct"
    ]
    assert seen[0].headers["auth-token"] == "tok"
    points = parsed.points
    assert [(p.zone, p.g_co2e_per_kwh, p.is_estimated, p.model_version) for p in points] == [
        ("DE", 302, False, None),
        ("DE", 298, True, "TIME_SLICER_AVERAGE"),
    ]


def test_watttime_logs_in_once_and_again_when_the_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intensity_fetch, "ATTEMPTS", 2)
    calls: list[str] = []
    tokens = iter(["t1", "t2"])
    refused = {"t1": 1}  # the first token is refused once, as if it had expired early

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/login":
            assert request.headers["authorization"].startswith("Basic ")
            return httpx.Response(200, json={"token": next(tokens)})
        token = request.headers["authorization"].removeprefix("Bearer ")
        if refused.get(token, 0) > 0:
            refused[token] -= 1
            return httpx.Response(401, json={"error": "expired"})
        assert (
            request.url.params["region"] == "CAISO_NORTH" and request.url.params["signal_type"] == "co2_moer"
        )
        return httpx.Response(200, json=WT_FORECAST)

    async def twice(http: httpx.AsyncClient) -> tuple[Parsed, Parsed]:
        client = WattTime(http, "u", "p", "https://wt.test")
        return await client.fetch("CAISO_NORTH", "co2_moer", "forecast"), await client.fetch(
            "CAISO_NORTH", "co2_moer", "forecast"
        )

    first, _ = _run(handler, twice)
    assert calls == ["/login", "/v3/forecast", "/login", "/v3/forecast", "/v3/forecast"]
    [p] = first.points
    assert p.g_co2e_per_kwh == pytest.approx(900 * 0.453592)
    assert (p.signal_type, p.is_forecast, p.duration_s) == ("marginal", True, 300)


def test_watttime_history_asks_for_a_window_of_at_most_32_days() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/login":
            return httpx.Response(200, json={"token": "t"})
        return httpx.Response(200, json={**WT_FORECAST, "data": []})

    start, end = datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 2, tzinfo=UTC)
    _run(handler, lambda http: WattTime(http, "u", "p", "https://wt.test").fetch(
        "CAISO_NORTH", "co2_aoer", "historical", start=start, end=end))  # fmt: skip
    params = seen[-1].url.params
    assert (params["start"], params["end"], params["signal_type"]) == (
        start.isoformat(),
        end.isoformat(),
        "co2_aoer",
    )
    with pytest.raises(ValueError, match="32 days"):
        _run(handler, lambda http: WattTime(http, "u", "p").fetch(
            "CAISO_NORTH", "co2_moer", "historical", start=datetime(2025, 1, 1, tzinfo=UTC), end=end))  # fmt: skip


def test_transient_failures_are_retried_and_refusals_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intensity_fetch, "wait_exponential", lambda **_: lambda _state: 0.0)
    statuses = iter([503, 429, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        status = next(statuses)
        return httpx.Response(status, json=EM_HISTORY if status == 200 else {}, headers={"retry-after": "0"})

    parsed = _run(flaky, lambda http: ElectricityMaps(http, "tok").fetch("DE", "history"))
    assert len(parsed.points) == 2

    def refusing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": "no access to zone"})

    with pytest.raises(ProviderError, match="403") as refused:
        _run(refusing, lambda http: ElectricityMaps(http, "tok").fetch("CN", "latest"))
    assert refused.value.status == 403


def test_missing_credentials_and_unknown_kinds_are_explained() -> None:
    with pytest.raises(ValueError, match="METERFLOW_INTENSITY__ELECTRICITYMAPS_TOKEN"):
        asyncio.run(fetch_once(IntensitySettings(), "electricitymaps", ["DE"], ["history"]))
    with pytest.raises(ValueError, match="WATTTIME_USERNAME"):
        asyncio.run(fetch_once(IntensitySettings(), "watttime", ["CAISO_NORTH"], ["forecast"]))
    settings = IntensitySettings(electricitymaps_token=SecretStr("t"))
    with pytest.raises(ValueError, match="has no"):
        asyncio.run(fetch_once(settings, "electricitymaps", ["DE"], ["historical"]))


def test_a_zone_the_provider_refuses_does_not_stop_the_others() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params["zone"] == "CN":
            return httpx.Response(403, json={"error": "zone not in your plan"})
        if request.url.params["zone"] == "XX":
            return httpx.Response(200, text="<html>maintenance</html>")
        return httpx.Response(200, json=EM_HISTORY)

    settings = IntensitySettings(electricitymaps_token=SecretStr("t"))
    parsed = asyncio.run(
        fetch_once(
            settings,
            "electricitymaps",
            ["CN", "XX", "DE"],
            ["history"],
            transport=httpx.MockTransport(handler),
        )
    )
    assert len(parsed.points) == 2
    assert [where for where, _ in parsed.rejected] == ["CN history", "XX history"]
    assert "403" in parsed.rejected[0][1] and "not JSON" in parsed.rejected[1][1]
