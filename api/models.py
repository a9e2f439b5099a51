"""Request and response models of the query API (separate from the Kafka record format)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from meterflow.contract import DEVICE_PATTERN, GATEWAY_PATTERN, TENANT_PATTERN

T = TypeVar("T")

TenantId = Annotated[str, Field(pattern=TENANT_PATTERN)]
ObjectId = Annotated[str, Field(pattern=DEVICE_PATTERN)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnterpriseIn(_In):
    tenant: TenantId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    role: Literal["enterprise", "operator"] = "enterprise"
    industry_code: str | None = None
    timezone: str = "Asia/Shanghai"
    annual_output_value_cny: (
        Annotated[float, Field(gt=0, description="for carbon intensity per output")] | None
    ) = None


class Enterprise(EnterpriseIn):
    created_at: datetime


class SiteIn(_In):
    tenant: TenantId
    site: ObjectId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    floor_area_m2: Annotated[float, Field(gt=0)] | None = None
    timezone: str | None = None
    province: str | None = Field(default=None, description="pinyin id, selects the grid emission factor")
    latitude: Annotated[float, Field(ge=-90, le=90)] | None = None
    longitude: Annotated[float, Field(ge=-180, le=180)] | None = None


class Site(SiteIn):
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
    rated_power_kw: Annotated[float, Field(gt=0)] | None = None
    register_max: Annotated[float, Field(gt=0)] | None = None
    register_resolution: Annotated[float, Field(gt=0)] = 0.01
    telemetry_interval_s: Annotated[int, Field(gt=0)] = 60
    energy_capacity_kwh: Annotated[float, Field(gt=0)] | None = None
    soc_min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    soc_max_pct: Annotated[float, Field(ge=0, le=100)] = 95.0
    vpp: Annotated[str, Field(pattern=DEVICE_PATTERN)] | None = None
    topology_node: str | None = None


class Device(DeviceIn):
    created_at: datetime


class GreenCertificateIn(_In):
    """A block of green electricity certificates (GEC, 1 certificate = 1,000 kWh) retired for a period."""

    tenant: TenantId
    certificate: ObjectId
    period_start: date
    period_end: date
    certificates: Annotated[int, Field(gt=0)]


class GreenCertificate(GreenCertificateIn):
    created_at: datetime


class MeterExchangeIn(_In):
    """A meter replaced at `ts`: the old meter's last (removal) read and the new meter's first (install)
    read. meterflow never differences a register across an exchange."""

    tenant: TenantId
    metric: Literal["energy_import_kwh", "energy_export_kwh", "gas_nm3", "heat_gj", "fuel_l"]
    ts: datetime
    removal_read: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    install_read: Annotated[float, Field(ge=0, allow_inf_nan=False)]


class MeterExchange(MeterExchangeIn):
    device: str
    created_at: datetime


class MultiplierIn(_In):
    """Instrument transformer ratios and meter constant; the register advance times their product is the
    energy, from `effective_from` until the next entry."""

    tenant: TenantId
    effective_from: datetime
    ct_ratio: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    vt_ratio: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    meter_constant: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0


class Multiplier(MultiplierIn):
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
