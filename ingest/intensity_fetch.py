"""Pull grid intensity from its providers' APIs, for `meterflow intensity fetch`.

* **Electricity Maps** (API v3): ``GET {base}/carbon-intensity/{latest|history|forecast}?zone=
  &emissionFactorType=`` with the ``auth-token`` header (direct by default, as the annual MEE factors;
  Electricity Maps' own default is lifecycle).
* **WattTime** (API v3): ``GET {base}/login`` with HTTP Basic auth gives a token that lasts about 30
  minutes; ``GET {base}/v3/{historical|forecast}?region=&signal_type=`` with it as a Bearer token.
  ``/v3/historical`` takes at most 32 days per call.

Responses are converted by the parsers of `ingest.intensity`, so a fetched point and a point from a
saved response are the same. Transient failures (connection errors, 429, 5xx) are retried with
exponential backoff; a 429's ``Retry-After`` is honoured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, cast

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from ingest.intensity import Defaults, Parsed, parse_electricitymaps, parse_watttime
from meterflow.contract import EmissionBasis
from meterflow.settings import IntensitySettings

ELECTRICITYMAPS_URL: Final = "https://api.electricitymaps.com/v3"
WATTTIME_URL: Final = "https://api.watttime.org"
# WattTime tokens last about 30 minutes; renew a little before.
WATTTIME_TOKEN_TTL_S: Final = 25 * 60
WATTTIME_MAX_SPAN: Final = timedelta(days=32)
ATTEMPTS: Final = 5

ElectricityMapsKind = Literal["latest", "history", "forecast"]
WattTimeKind = Literal["historical", "forecast"]
WattTimeSignal = Literal["co2_moer", "co2_aoer"]


class ProviderError(RuntimeError):
    """The provider refused the request (bad credentials, no access to the zone, bad parameters)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, httpx.HTTPStatusError) and (
        exc.response.status_code == 429 or exc.response.status_code >= 500
    )


def _retry_after_s(exc: BaseException | None) -> float:
    if isinstance(exc, httpx.HTTPStatusError):
        header = exc.response.headers.get("retry-after", "")
        if header.isdigit():
            return float(header)
    return 0.0


async def _get(
    http: httpx.AsyncClient,
    url: str,
    *,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    auth: tuple[str, str] | None = None,
) -> httpx.Response:
    """GET with retries of transient failures; ProviderError for a refusal."""
    retrying = AsyncRetrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(ATTEMPTS),
        wait=lambda state: max(
            wait_exponential(multiplier=0.5, max=30)(state),
            _retry_after_s(state.outcome.exception() if state.outcome else None),
        ),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            response = await http.get(url, params=params, headers=headers, auth=auth)
            if response.status_code == 429 or response.status_code >= 500:
                response.raise_for_status()
    if response.status_code >= 400:
        raise ProviderError(response.status_code, f"GET {url}: {response.status_code} {response.text[:300]}")
    return response


@dataclass
class ElectricityMaps:
    http: httpx.AsyncClient
    token: str
    base_url: str = ELECTRICITYMAPS_URL

    async def fetch(
        self, zone: str, kind: ElectricityMapsKind, basis: EmissionBasis = EmissionBasis.DIRECT
    ) -> Parsed:
        response = await _get(
            self.http,
            f"{self.base_url}/carbon-intensity/{kind}",
            params={"zone": zone, "emissionFactorType": basis.value},
            headers={"auth-token": self.token},
        )
        return parse_electricitymaps(response.text, Defaults(zone=zone))


@dataclass
class WattTime:
    http: httpx.AsyncClient
    username: str
    password: str
    base_url: str = WATTTIME_URL
    _token: str | None = field(default=None, init=False)
    _token_at: float = field(default=0.0, init=False)

    async def _bearer(self, *, renew: bool = False) -> str:
        if renew or self._token is None or time.monotonic() - self._token_at > WATTTIME_TOKEN_TTL_S:
            response = await _get(self.http, f"{self.base_url}/login", auth=(self.username, self.password))
            token = response.json().get("token")
            if not isinstance(token, str):
                raise ProviderError(response.status_code, "WattTime /login answered without a token")
            self._token, self._token_at = token, time.monotonic()
        return self._token

    async def fetch(
        self,
        region: str,
        signal: WattTimeSignal,
        kind: WattTimeKind,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> Parsed:
        """`historical` covers [start, end) (default: the last 24 hours, at most 32 days); `forecast` is
        the current forecast."""
        params: dict[str, str] = {"region": region, "signal_type": signal}
        if kind == "historical":
            hi = end or datetime.now(UTC)
            lo = start or hi - timedelta(days=1)
            if hi - lo > WATTTIME_MAX_SPAN:
                raise ValueError("WattTime gives at most 32 days of history per request")
            params |= {"start": lo.isoformat(), "end": hi.isoformat()}
        url = f"{self.base_url}/v3/{kind}"
        try:
            token = await self._bearer()
            response = await _get(self.http, url, params=params, headers={"Authorization": f"Bearer {token}"})
        except ProviderError as exc:
            if exc.status != 401:
                raise
            # The token expired early: log in again, once.
            token = await self._bearer(renew=True)
            response = await _get(self.http, url, params=params, headers={"Authorization": f"Bearer {token}"})
        return parse_watttime(response.text, Defaults(forecast=kind == "forecast"))


Provider = Literal["electricitymaps", "watttime"]
KINDS: Final[dict[str, tuple[str, ...]]] = {
    "electricitymaps": ("latest", "history", "forecast"),
    "watttime": ("historical", "forecast"),
}


async def fetch_once(
    settings: IntensitySettings,
    provider: Provider,
    zones: list[str],
    kinds: list[str],
    signal: WattTimeSignal = "co2_moer",
    basis: EmissionBasis = EmissionBasis.DIRECT,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Parsed:
    """Every zone's requested kinds from one provider, as one list of points. A request the provider
    refuses or answers with something unreadable is reported among the rejects (named by zone and kind)
    and the others go on. ValueError (from `check_request`) for what no retry would fix."""
    check_request(settings, provider, kinds)
    parsed = Parsed()
    async with httpx.AsyncClient(timeout=30, transport=transport) as http:
        client = _client(http, settings, provider)
        for zone in zones:
            for kind in kinds:
                try:
                    if isinstance(client, ElectricityMaps):
                        got = await client.fetch(zone, cast(ElectricityMapsKind, kind), basis)
                    else:
                        got = await client.fetch(zone, signal, cast(WattTimeKind, kind))
                except (ProviderError, httpx.HTTPError, ValueError) as exc:
                    parsed.rejected.append((f"{zone} {kind}", f"{type(exc).__name__}: {exc}"))
                    continue
                parsed.points += got.points
                parsed.rejected += [(f"{zone} {kind} {where}", why) for where, why in got.rejected]
    return parsed


def check_request(settings: IntensitySettings, provider: Provider, kinds: list[str]) -> None:
    """ValueError for an unknown kind or missing credentials."""
    unknown = sorted(set(kinds) - set(KINDS[provider]))
    if unknown:
        raise ValueError(f"{provider} has no {unknown}; choose from {', '.join(KINDS[provider])}")
    _credentials(settings, provider)


def _credentials(settings: IntensitySettings, provider: Provider) -> tuple[str, str]:
    """(user or token, password or ""); ValueError naming the settings when they are missing."""
    if provider == "electricitymaps":
        if settings.electricitymaps_token is None:
            raise ValueError(
                "set METERFLOW_INTENSITY__ELECTRICITYMAPS_TOKEN to your Electricity Maps API token"
            )
        return settings.electricitymaps_token.get_secret_value(), ""
    if settings.watttime_username is None or settings.watttime_password is None:
        raise ValueError(
            "set METERFLOW_INTENSITY__WATTTIME_USERNAME and METERFLOW_INTENSITY__WATTTIME_PASSWORD"
        )
    return settings.watttime_username, settings.watttime_password.get_secret_value()


def _client(
    http: httpx.AsyncClient, settings: IntensitySettings, provider: Provider
) -> ElectricityMaps | WattTime:
    """One client per round, so that WattTime logs in once."""
    user, password = _credentials(settings, provider)
    if provider == "electricitymaps":
        return ElectricityMaps(http, user, settings.electricitymaps_url)
    return WattTime(http, user, password, settings.watttime_url)
