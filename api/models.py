"""Request and response models of the query API (separate from the Kafka record format)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from meterflow.contract import DEVICE_PATTERN, GATEWAY_PATTERN, TENANT_PATTERN, ZONE_PATTERN

T = TypeVar("T")

TenantId = Annotated[str, Field(pattern=TENANT_PATTERN)]
ObjectId = Annotated[str, Field(pattern=DEVICE_PATTERN)]


def _known_zone(name: str) -> str:
    # Local days, bills and carbon days are computed in it: a name the server cannot load would fail
    # every later figure of the tenant, not this request.
    try:
        ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError) as exc:
        raise ValueError(f"unknown time zone {name!r}: an IANA name such as Asia/Shanghai") from exc
    return name


TimeZone = Annotated[str, Field(max_length=64), AfterValidator(_known_zone)]


def _bounded(low: float, high: float, *, description: str | None = None) -> object:
    """A registry or submitted figure: a JSON number (strict: `true` and "1" are not numbers), finite, and
    within bounds no real figure leaves. The lower bound keeps subnormals like 5e-324 out of divisors (a
    quotient by one is inf, a tenth of one is 0); the upper keeps sums and products far from overflow."""
    return Field(strict=True, ge=low, le=high, allow_inf_nan=False, description=description)


# Bounds of registry values (docs/api.md#validation-bounds). Stored values are read back without them:
# a row written before they existed must stay readable (the routes that compute with it check it).
Money = Annotated[float, _bounded(1.0, 1e15)]  # CNY: one yuan to a thousand trillion
Quantity = Annotated[float, _bounded(1e-6, 1e15)]
Area = Annotated[float, _bounded(1e-3, 1e9)]  # m2: up to 1,000 km2
Power = Annotated[float, _bounded(1e-6, 1e8)]  # kW: up to 100 GW, as the contract's power range
RegisterCount = Annotated[float, _bounded(0.0, 1e12)]  # as the contract's register range
Ratio = Annotated[float, _bounded(1e-6, 1e6)]
Percent = Annotated[float, _bounded(0.0, 100.0)]
PowerOrZero = Annotated[float, _bounded(0.0, 1e8)]
Share = Annotated[float, _bounded(0.0, 1.0)]
Efficiency = Annotated[float, _bounded(0.01, 1.0)]  # a divisor of stored energy
Minutes = Annotated[float, _bounded(1e-3, 1e6)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnterpriseIn(_In):
    tenant: TenantId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    role: Literal["enterprise", "operator"] = "enterprise"
    industry_code: str | None = None
    timezone: TimeZone = "Asia/Shanghai"
    annual_output_value_cny: Annotated[Money, Field(description="for carbon intensity per output")] | None = (
        None
    )


class Enterprise(EnterpriseIn):
    timezone: str
    annual_output_value_cny: float | None = None
    created_at: datetime


class SiteIn(_In):
    tenant: TenantId
    site: ObjectId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    floor_area_m2: Area | None = None
    timezone: TimeZone | None = None
    province: str | None = Field(default=None, description="pinyin id, selects the grid emission factor")
    latitude: Annotated[float, _bounded(-90, 90)] | None = None
    longitude: Annotated[float, _bounded(-180, 180)] | None = None
    grid_zone: Annotated[str, Field(pattern=ZONE_PATTERN)] | None = Field(
        default=None,
        description="zone of the time-varying grid intensity that applies (e.g. CN-JS); default: the province id",
    )


class SitePatch(_In):
    # Optional but never null (a site has a name): the default is not validated, an explicit null is.
    name: Annotated[str, Field(min_length=1, max_length=200)] = None  # type: ignore[assignment]
    grid_zone: Annotated[str, Field(pattern=ZONE_PATTERN)] | None = None


class Site(SiteIn):
    timezone: str | None = None
    floor_area_m2: float | None = None
    created_at: datetime


class GatewayIn(_In):
    tenant: TenantId
    gateway: Annotated[str, Field(pattern=GATEWAY_PATTERN)]


class Gateway(GatewayIn):
    enabled: bool
    created_at: datetime


class MqttCredentials(BaseModel):
    username: str
    password: str = Field(description="shown once; only its hash is stored")
    topic: str


class GatewayCreated(Gateway):
    mqtt: MqttCredentials


class DeviceIn(_In):
    tenant: TenantId
    device: ObjectId
    site: ObjectId | None = None
    gateway: ObjectId | None = None
    device_type: Literal["meter", "battery", "pv", "ev_charger", "base_station"] = "meter"
    carrier: Literal["electricity", "natural_gas", "heat", "diesel"] = "electricity"
    role: Literal["grid", "submeter", "resource"] = Field(
        default="grid", description="grid: boundary meter counted in carbon and site load"
    )
    rated_power_kw: Power | None = None
    register_max: Annotated[float, _bounded(1e-6, 1e12)] | None = None
    register_resolution: Annotated[float, _bounded(1e-9, 1e6)] = 0.01
    telemetry_interval_s: Annotated[int, Field(strict=True, gt=0, le=86_400)] = 60
    energy_capacity_kwh: Quantity | None = None
    soc_min_pct: Percent = 10.0
    soc_max_pct: Percent = 95.0
    vpp: Annotated[str, Field(pattern=DEVICE_PATTERN)] | None = None
    topology_node: str | None = None


class Device(DeviceIn):
    rated_power_kw: float | None = None
    register_max: float | None = None
    register_resolution: float = 0.01
    telemetry_interval_s: int = 60
    energy_capacity_kwh: float | None = None
    created_at: datetime


class GreenCertificateIn(_In):
    """A block of green electricity certificates (GEC, 1 certificate = 1,000 kWh) retired for a period."""

    tenant: TenantId
    certificate: ObjectId
    period_start: date
    period_end: date
    certificates: Annotated[int, Field(strict=True, gt=0, le=2**31 - 1)]


class GreenCertificate(GreenCertificateIn):
    created_at: datetime


class MeterExchangeIn(_In):
    """A meter replaced at `ts`: the old meter's last (removal) read and the new meter's first (install)
    read. meterflow never differences a register across an exchange."""

    tenant: TenantId
    metric: Literal["energy_import_kwh", "energy_export_kwh", "gas_nm3", "heat_gj", "fuel_l"]
    ts: datetime
    removal_read: RegisterCount
    install_read: RegisterCount


class MeterExchange(MeterExchangeIn):
    removal_read: float
    install_read: float
    device: str
    created_at: datetime


class MultiplierIn(_In):
    """Instrument transformer ratios and meter constant; the register advance times their product is the
    energy, from `effective_from` until the next entry."""

    tenant: TenantId
    effective_from: datetime
    ct_ratio: Ratio = 1.0
    vt_ratio: Ratio = 1.0
    meter_constant: Ratio = 1.0


class Multiplier(MultiplierIn):
    ct_ratio: float = 1.0
    vt_ratio: float = 1.0
    meter_constant: float = 1.0
    device: str
    created_at: datetime


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None


class ReadingOut(BaseModel):
    ts: datetime
    metric: str
    value: float
    gateway: str
    received_at: datetime


class Readings(BaseModel):
    tenant: str
    device: str
    data: list[ReadingOut]
    next_cursor: str | None = Field(default=None, description="pass as `cursor` to get the next page")


# --- load, time of use, energy use intensity --------------------------------------------------------


class QualityCounts(BaseModel):
    """Contributions to the point's intervals by quality class (see docs/processing.md)."""

    measured: int
    estimated: int
    substituted: int
    flagged: int
    uncalibrated: int


# A stored aggregate that is not finite (written before the processor refused such readings) is answered
# as null, never as the string "NaN".
_NULL_IF_NOT_FINITE = "; null when the stored figure is not finite"


class LoadPoint(BaseModel):
    ts: datetime = Field(description="start of the interval")
    energy_kwh: float | None = Field(
        description="net imported active energy: import minus export" + _NULL_IF_NOT_FINITE
    )
    import_kwh: float | None = Field(description="imported active energy" + _NULL_IF_NOT_FINITE)
    export_kwh: float | None = Field(description="exported active energy" + _NULL_IF_NOT_FINITE)
    avg_kw: float | None = Field(
        description="energy_kwh over the hours covered by data" + _NULL_IF_NOT_FINITE
    )
    peak_kw: float | None = Field(
        description="1m: the minute's demand; 15m and coarser: the largest 15-minute demand inside"
        + _NULL_IF_NOT_FINITE
    )
    quality: Literal["measured", "estimated", "substituted"] = Field(description="worst class present")
    complete: bool = Field(description="every 15-minute interval inside (up to now) has data")
    counts: QualityCounts
    late_corrections: int
    corrected_at: datetime | None


class SiteLoad(BaseModel):
    tenant: str
    site: str
    interval: str
    timezone: str
    points: list[LoadPoint]


class TouSlot(BaseModel):
    slot: str
    energy_kwh: float
    share: float | None
    hours: float = Field(description="hours of the range in this slot that have data")


class SiteTou(BaseModel):
    tenant: str
    site: str
    calendar: str
    start: datetime
    end: datetime
    energy_kwh: float
    slots: list[TouSlot]
    peak_valley_ratio: float | None = Field(description="average kW in peak slots over that in valley slots")
    load_factor: float | None = Field(description="energy_kwh / (peak 15-minute kW x hours)")


class TouCalendarOut(BaseModel):
    calendar: str
    name: str
    provinces: list[str]
    source: str
    seasons: list[dict[str, object]]


class SiteEui(BaseModel):
    tenant: str
    site: str
    start: datetime
    end: datetime
    floor_area_m2: float
    energy_kwh: float
    eui_kwh_per_m2: float
    eui_kwh_per_m2_year: float = Field(description="annualised over the hours covered by data")
    hours_with_data: float
    formula: str


# --- carbon -----------------------------------------------------------------------------------------


class CarbonPoint(BaseModel):
    ts: datetime
    days: int = Field(description="days with boundary-meter data in the period")
    co2e_kg: float = Field(description="scope 1 + scope 2 location-based")
    co2e_market_kg: float = Field(description="scope 1 + scope 2 market-based")
    scope1_kg: float
    scope2_location_kg: float
    scope2_market_kg: float
    by_carrier: dict[str, float] = Field(
        description="electricity_location_kg, electricity_market_kg, natural_gas_kg, diesel_kg, heat_kg"
    )
    quantities: dict[str, float]
    green_traced_kwh: float
    provisional: bool = Field(description="a factor stands in for an unpublished year: recomputed later")
    factor_ids: list[str]


class FactorRef(BaseModel):
    factor_id: str
    carrier: str
    kind: str
    region: str
    year: int | None
    value: float
    unit: str
    status: str


class EnterpriseCarbon(BaseModel):
    tenant: str
    interval: str
    timezone: str
    points: list[CarbonPoint]
    factors: list[FactorRef] = Field(description="every factor the points cite")


class OutputValueIn(_In):
    period_start: date
    period_end: date = Field(description="exclusive")
    value_added_cny: Money | None = None
    output_value_cny: Money | None = None
    product_quantity: Quantity | None = None
    product_unit: Annotated[str, Field(max_length=40)] | None = None


class OutputValue(OutputValueIn):
    value_added_cny: float | None = None
    output_value_cny: float | None = None
    product_quantity: float | None = None
    tenant: str
    created_at: datetime


class AccountLine(BaseModel):
    """One figure of a carbon account with how it was obtained."""

    name: str
    value: float | None
    unit: str
    formula: str
    factor_ids: list[str] = []


class Grade(BaseModel):
    scheme: str
    scheme_name: str
    metric: str
    intensity: float = Field(description="L, the enterprise's figure on the scheme's metric")
    level: str = Field(description="band of L across all industry")
    label: str | None = Field(description="grade within the industry; null when refused")
    grade: int | None
    k: float | None = Field(description="L / industry average")
    industry: str | None
    industry_average: float | None
    peers: int
    min_peers: int
    refused: str | None = Field(description="why no grade was given")
    formula: str


class CarbonAccount(BaseModel):
    tenant: str
    year: int
    timezone: str
    days_with_data: int
    energy: dict[str, float] = Field(description="quantities by carrier in contract units")
    scope1_kg: float
    scope2_location_kg: float
    scope2_market_kg: float
    co2e_kg: float
    co2e_market_kg: float
    onsite_renewable_kwh: float
    green_traced_kwh: float
    green_power_share: float | None
    value_added_cny: float | None
    output_value_cny: float | None
    product_quantity: float | None
    product_unit: str | None
    intensity: float | None = Field(description="tCO2 per 10,000 CNY of value added (L)")
    intensity_per_output_value: float | None = Field(description="tCO2 per 10,000 CNY of output value")
    intensity_per_product: float | None = Field(description="tCO2 per product unit")
    provisional: bool
    grade: Grade | None
    lines: list[AccountLine]
    factors: list[FactorRef]


# --- emission factors and API keys -----------------------------------------------------------------


class EmissionFactorIn(_In):
    factor_id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,99}$")]
    carrier: Literal["electricity", "natural_gas", "diesel", "heat"]
    kind: Literal[
        "location_based",
        "market_residual",
        "fossil_only",
        "carbon_market",
        "fuel_combustion",
        "purchased_heat",
    ]
    region: Annotated[str, Field(min_length=1, max_length=40)]
    year: Annotated[int, Field(ge=1990, le=2200)] | None = None
    value: Annotated[float, _bounded(1e-9, 1e6)]
    unit: str
    status: Literal["final", "provisional", "unverified"]
    published: str | None = None
    publisher: Annotated[str, Field(max_length=200)] | None = None
    document: Annotated[str, Field(min_length=1, max_length=500)]
    source_url: Annotated[str, Field(max_length=1000)] | None = None
    evidence: Literal["official", "press", "paper", "3rd-party-code"] = "official"
    inputs: dict[str, float | str] | None = Field(
        default=None, description="fuel-combustion guideline inputs (ncv, carbon content, oxidation)"
    )
    note: Annotated[str, Field(max_length=2000)] | None = None
    replaces: str | None = Field(default=None, description="the factor this one supersedes")


class EmissionFactorOut(BaseModel):
    factor_id: str
    carrier: str
    scope: int
    kind: str
    region: str
    year: int | None
    value: float
    unit: str
    status: str
    provisional: bool
    published: str | None
    publisher: str | None
    document: str | None
    source_url: str | None
    sources: list[dict[str, object]]
    inputs: dict[str, object] | None
    note: str | None
    library_version: int
    origin: str
    replaces: str | None
    superseded_by: str | None
    created_at: datetime


class ApiKeyIn(_In):
    role: Literal["admin", "enterprise", "operator"]
    tenant: TenantId | None = None
    label: Annotated[str, Field(max_length=200)] | None = None


class ApiKeyOut(BaseModel):
    key_id: str
    role: str
    tenant: str | None
    label: str | None
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="shown once; only its hash is stored")


# --- grid intensity (estimated; never part of compliance totals) ----------------------------------------


class IntensityZone(BaseModel):
    zone: str
    signal_type: str
    basis: str
    points: int
    first: datetime
    last_end: datetime = Field(description="end of the newest point")
    sources: list[str]


class IntensityPointOut(BaseModel):
    ts: datetime
    duration_s: int
    g_co2e_per_kwh: float
    is_estimated: bool
    is_forecast: bool
    source: str
    model_version: str | None


class ZoneIntensity(BaseModel):
    zone: str
    signal_type: str
    basis: str
    mean_g_co2e_per_kwh: float | None = Field(description="time-weighted over the covered part of the range")
    covered_share: float = Field(description="share of the range the points cover")
    points: list[IntensityPointOut]


class BestWindow(BaseModel):
    zone: str
    signal_type: str
    basis: str
    window_minutes: int
    start: datetime | None = Field(description="null when no window in the range is fully covered")
    end: datetime | None
    mean_g_co2e_per_kwh: float | None


class EstimatedCarbonPoint(BaseModel):
    ts: datetime
    electricity_import_kwh: float
    covered_kwh: float = Field(description="import in intervals fully covered by intensity points")
    uncovered_kwh: float
    co2e_kg: float = Field(description="covered_kwh x intensity per 15-minute interval; estimated")
    mean_g_co2e_per_kwh: float | None = Field(description="co2e_kg / covered_kwh")
    forecast_kwh: float = Field(description="part of covered_kwh valued with forecast intensity")


class EstimatedCarbon(BaseModel):
    tenant: str
    interval: str
    timezone: str
    signal_type: str
    basis: str
    estimated: Literal[True] = True
    compliance: Literal[False] = Field(
        default=False, description="never part of compliance totals: those are GET /carbon (annual factors)"
    )
    zones: dict[str, str | None] = Field(description="site -> grid zone (null: no zone, all uncovered)")
    sources: list[str]
    points: list[EstimatedCarbonPoint]
