"""Request and response models of the query API (separate from the Kafka record format)."""

from __future__ import annotations

from datetime import datetime
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


class Enterprise(EnterpriseIn):
    created_at: datetime


class SiteIn(_In):
    tenant: TenantId
    site: ObjectId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    floor_area_m2: Annotated[float, Field(gt=0)] | None = None
    timezone: str | None = None


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
    device_type: str = "meter"
    carrier: str = "electricity"
    rated_power_kw: Annotated[float, Field(gt=0)] | None = None
    register_max: Annotated[float, Field(gt=0)] | None = None
    telemetry_interval_s: Annotated[int, Field(gt=0)] = 60


class Device(DeviceIn):
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
