"""The fleet description: enterprises, sites, gateways, meters and VPP resources, as one YAML file.

The same description drives the simulation and registers everything through the API, so what the
simulator publishes and what meterflow knows about can never drift apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from meterflow.contract import DEVICE_PATTERN, GATEWAY_PATTERN, TENANT_PATTERN

DeviceType = Literal["meter", "battery", "pv", "ev_charger", "base_station"]
Carrier = Literal["electricity", "natural_gas", "heat", "diesel"]
Role = Literal["grid", "submeter", "resource"]
SiteProfile = Literal["factory", "commercial", "telecom"]
PayloadFormat = Literal["json-batch", "json-single", "sparkplug"]

# Reading intervals must divide a minute so that every 1-minute bucket is closed by a reading on its
# boundary: that is what makes per-bucket ground truth exact rather than interpolated.
INTERVALS_S = (5, 10, 12, 15, 20, 30, 60)

REGISTER_METRIC: dict[Carrier, str] = {
    "electricity": "energy_import_kwh",
    "natural_gas": "gas_nm3",
    "heat": "heat_gj",
    "diesel": "fuel_l",
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Shift(_Spec):
    start_h: Annotated[float, Field(ge=0, lt=24)]
    end_h: Annotated[float, Field(gt=0, le=24)]


class DeviceSpec(_Spec):
    device: Annotated[str, Field(pattern=DEVICE_PATTERN)]
    type: DeviceType = "meter"
    carrier: Carrier = "electricity"
    role: Role = "submeter"
    rated_power_kw: Annotated[float, Field(gt=0)] = Field(
        description="meters: the circuit's peak load; gas/heat/diesel meters: peak flow per hour in "
        "their register unit; resources: inverter or charger rating"
    )
    register_resolution: Annotated[float, Field(gt=0)] = 0.01
    register_max: Annotated[float, Field(gt=0)] = 99_999_999.99
    initial_register: Annotated[float, Field(ge=0)] = 0.0
    interval_s: int = 60
    energy_capacity_kwh: Annotated[float, Field(gt=0)] | None = None
    soc_min_pct: Annotated[float, Field(ge=0, le=100)] = 10.0
    soc_max_pct: Annotated[float, Field(ge=0, le=100)] = 95.0
    vpp: str | None = None
    topology_node: str | None = None
    # A building load in a VPP: this share of its current load is shed during the VPP's DR events.
    sheddable_share: Annotated[float, Field(ge=0, le=1)] = 0.0
    max_shed_min: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        exponent = math.log10(self.register_resolution)
        if abs(exponent - round(exponent)) > 1e-9 or not -6 <= round(exponent) <= 0:
            raise ValueError("register_resolution must be a power of ten between 1e-6 and 1")
        if self.interval_s not in INTERVALS_S:
            raise ValueError(f"interval_s must be one of {INTERVALS_S}")
        if self.initial_register > self.register_max:
            raise ValueError("initial_register exceeds register_max")
        if self.type == "battery" and self.energy_capacity_kwh is None:
            raise ValueError("a battery needs energy_capacity_kwh")
        if self.soc_min_pct >= self.soc_max_pct:
            raise ValueError("soc_min_pct must be below soc_max_pct")
        if self.type != "meter" and self.carrier != "electricity":
            raise ValueError("only meters measure carriers other than electricity")
        if self.sheddable_share > 0 and (
            self.vpp is None or self.type != "meter" or self.carrier != "electricity"
        ):
            raise ValueError("only an electricity meter in a VPP (a building load) can shed load")
        return self

    @property
    def register_metrics(self) -> tuple[str, ...]:
        """The cumulative registers this device reports, in publishing order."""
        if self.carrier != "electricity":
            return (REGISTER_METRIC[self.carrier],)
        if self.type in ("battery", "pv") or self.role == "grid":
            return ("energy_import_kwh", "energy_export_kwh")
        return ("energy_import_kwh",)


class GatewaySpec(_Spec):
    gateway: Annotated[str, Field(pattern=GATEWAY_PATTERN)]
    format: PayloadFormat = "json-batch"
    devices: list[DeviceSpec]


class SiteSpec(_Spec):
    site: Annotated[str, Field(pattern=DEVICE_PATTERN)]
    name: str
    profile: SiteProfile = "factory"
    province: str = "zhejiang"
    latitude: Annotated[float, Field(ge=-90, le=90)] = 30.27
    longitude: Annotated[float, Field(ge=-180, le=180)] = 120.15
    floor_area_m2: Annotated[float, Field(gt=0)] | None = None
    shifts: list[Shift] = Field(
        default_factory=lambda: [Shift(start_h=8, end_h=16), Shift(start_h=16, end_h=24)]
    )
    gateways: list[GatewaySpec]


class GreenCertificateSpec(_Spec):
    """A block of green electricity certificates (1 GEC = 1,000 kWh) retired against one period."""

    certificate: Annotated[str, Field(pattern=DEVICE_PATTERN)]
    period_start: date
    period_end: date
    certificates: Annotated[int, Field(gt=0)]


class EnterpriseSpec(_Spec):
    tenant: Annotated[str, Field(pattern=TENANT_PATTERN)]
    name: str
    industry_code: str
    timezone: str = "Asia/Shanghai"
    annual_output_value_cny: Annotated[float, Field(gt=0)] | None = None
    green_certificates: list[GreenCertificateSpec] = Field(default_factory=list)
    sites: list[SiteSpec]


class DrEventSpec(_Spec):
    """A demand-response event: every building load of the VPP sheds its sheddable share in [start, end)."""

    vpp: str
    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end <= self.start:
            raise ValueError("a DR event ends after it starts")
        return self


class FleetSpec(_Spec):
    version: Literal[1] = 1
    seed: int = 0
    enterprises: list[EnterpriseSpec]
    dr_events: list[DrEventSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        tenants = [e.tenant for e in self.enterprises]
        if len(set(tenants)) != len(tenants):
            raise ValueError("tenant ids must be unique")
        gateways = [g.gateway for _, _, g in self.gateways()]
        if len(set(gateways)) != len(gateways):
            raise ValueError("gateway ids must be unique (they are MQTT usernames)")
        for enterprise in self.enterprises:
            devices = [d.device for site in enterprise.sites for g in site.gateways for d in g.devices]
            if len(set(devices)) != len(devices):
                raise ValueError(f"device ids must be unique within tenant {enterprise.tenant}")
            grid_meters = {
                site.site: sum(
                    1
                    for g in site.gateways
                    for d in g.devices
                    if d.role == "grid" and d.carrier == "electricity"
                )
                for site in enterprise.sites
            }
            for site_id, count in grid_meters.items():
                if count != 1:
                    raise ValueError(f"site {site_id} needs exactly one electricity grid meter, has {count}")
        return self

    def gateways(self) -> Iterator[tuple[EnterpriseSpec, SiteSpec, GatewaySpec]]:
        for enterprise in self.enterprises:
            for site in enterprise.sites:
                for gateway in site.gateways:
                    yield enterprise, site, gateway

    def devices(self) -> Iterator[tuple[EnterpriseSpec, SiteSpec, GatewaySpec, DeviceSpec]]:
        for enterprise, site, gateway in self.gateways():
            for device in gateway.devices:
                yield enterprise, site, gateway, device

    @property
    def device_count(self) -> int:
        return sum(1 for _ in self.devices())

    @classmethod
    def load(cls, path: Path) -> FleetSpec:
        return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))

    def dump(self, path: Path) -> None:
        doc = self.model_dump(mode="json", exclude_defaults=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")


# Where generated sites are placed: (province id, latitude, longitude) of a major industrial city.
_LOCATIONS = (
    ("zhejiang", 30.27, 120.15),
    ("jiangsu", 32.06, 118.80),
    ("guangdong", 23.13, 113.26),
    ("shandong", 36.65, 117.12),
    ("hebei", 38.04, 114.51),
    ("sichuan", 30.57, 104.07),
    ("shanghai", 31.23, 121.47),
    ("hubei", 30.59, 114.31),
)
# GB/T 4754-2017 industry divisions typical of large energy users.
_FACTORY_INDUSTRIES = ("C26", "C30", "C31", "C33", "C38", "C39")
_COMMERCIAL_INDUSTRIES = ("K70", "L72", "F52")


def generate_fleet(
    *,
    enterprises: int = 3,
    sites_per_enterprise: int = 1,
    meters_per_site: int = 5,
    vpp_resources: int = 0,
    seed: int = 0,
    vpp: str = "vpp-east",
    interval_s: int = 60,
    payload_format: PayloadFormat = "json-batch",
    max_devices_per_gateway: int = 200,
    tenant_prefix: str = "",
    vpp_buildings: int = 0,
) -> FleetSpec:
    """A plausible fleet from a few numbers: factories and office campuses, plus a telecom operator
    whose tower sites hold the 5G base stations when VPP resources are asked for.

    VPP resources are spread round-robin over the sites as batteries, PV, EV chargers and base stations.
    `tenant_prefix` keeps several generated fleets apart on one installation (tests, demos).
    `vpp_buildings` office-campus feeders join the VPP as building loads that shed 20 % of their load
    (for up to two hours) during the fleet's DR events.
    """
    rng = random.Random(seed)
    specs: list[EnterpriseSpec] = []
    resource_kinds: list[DeviceType] = ["battery", "pv", "ev_charger", "base_station"]
    resource_slots = [resource_kinds[i % 4] for i in range(vpp_resources)]
    bts = [k for k in resource_slots if k == "base_station"]
    behind_meter = [k for k in resource_slots if k != "base_station"]
    n_sites = max(1, enterprises * sites_per_enterprise)
    per_site_resources: list[list[DeviceType]] = [[] for _ in range(n_sites)]
    for i, kind in enumerate(behind_meter):
        per_site_resources[i % n_sites].append(kind)

    site_index = 0
    buildings_left = vpp_buildings
    for e in range(enterprises):
        commercial = e % 3 == 2
        profile: SiteProfile = "commercial" if commercial else "factory"
        tenant = f"{tenant_prefix}{'campus' if commercial else 'factory'}-{e:03d}"
        sites: list[SiteSpec] = []
        for s in range(sites_per_enterprise):
            province, lat, lon = _LOCATIONS[(e + s) % len(_LOCATIONS)]
            prefix = f"s{s:02d}"
            devices = _site_meters(rng, prefix, profile, meters_per_site, interval_s)
            if commercial and buildings_left:
                devices, buildings_left = _building_loads(devices, buildings_left, vpp, site_index)
            devices += _resources(rng, prefix, per_site_resources[site_index], vpp, site_index, interval_s)
            site_index += 1
            sites.append(
                SiteSpec(
                    site=f"site-{s:02d}",
                    name=f"{tenant} site {s}",
                    profile=profile,
                    province=province,
                    latitude=lat + rng.uniform(-0.3, 0.3),
                    longitude=lon + rng.uniform(-0.3, 0.3),
                    floor_area_m2=round(rng.uniform(8_000, 80_000), -2),
                    shifts=[
                        Shift(start_h=0, end_h=8),
                        Shift(start_h=8, end_h=16),
                        Shift(start_h=16, end_h=24),
                    ]
                    if rng.random() < 0.3
                    else [Shift(start_h=8, end_h=16), Shift(start_h=16, end_h=24)],
                    gateways=_gateways(
                        f"{tenant}-s{s:02d}", devices, payload_format, max_devices_per_gateway
                    ),
                )
            )
        specs.append(
            EnterpriseSpec(
                tenant=tenant,
                name=f"Simulated {'campus' if commercial else 'factory'} {e}",
                industry_code=rng.choice(_COMMERCIAL_INDUSTRIES if commercial else _FACTORY_INDUSTRIES),
                annual_output_value_cny=round(rng.uniform(2e8, 5e9), -6),
                green_certificates=[
                    GreenCertificateSpec(
                        certificate=f"gec-{e:03d}-2026",
                        period_start=date(2026, 1, 1),
                        period_end=date(2027, 1, 1),
                        certificates=rng.randint(100, 5_000),
                    )
                ]
                if rng.random() < 0.5
                else [],
                sites=sites,
            )
        )
    if bts:
        specs.append(
            _telecom(
                rng,
                f"{tenant_prefix}telco",
                len(bts),
                vpp,
                interval_s,
                payload_format,
                max_devices_per_gateway,
            )
        )
    return FleetSpec(seed=seed, enterprises=specs)


def _site_meters(
    rng: random.Random, prefix: str, profile: SiteProfile, count: int, interval_s: int
) -> list[DeviceSpec]:
    feeders = max(1, count - 1)
    loads = [round(rng.uniform(80, 900), 0) for _ in range(feeders)]
    devices = [
        DeviceSpec(
            device=f"{prefix}-main",
            role="grid",
            rated_power_kw=round(sum(loads) * 1.5, 0),
            register_resolution=0.01,
            initial_register=round(rng.uniform(1e4, 5e6), 2),
            interval_s=interval_s,
        )
    ]
    devices += [
        DeviceSpec(
            device=f"{prefix}-{'line' if profile == 'factory' else 'feeder'}-{i:02d}",
            role="submeter",
            rated_power_kw=kw,
            register_resolution=0.01,
            initial_register=round(rng.uniform(1e3, 1e6), 2),
            interval_s=interval_s,
        )
        for i, kw in enumerate(loads)
    ]
    if profile == "factory" and rng.random() < 0.7:
        devices.append(
            DeviceSpec(
                device=f"{prefix}-gas-01",
                carrier="natural_gas",
                role="grid",
                rated_power_kw=round(rng.uniform(50, 600), 0),
                register_resolution=0.01,
                initial_register=round(rng.uniform(1e3, 1e6), 2),
                interval_s=interval_s,
            )
        )
    if profile == "commercial":
        devices.append(
            DeviceSpec(
                device=f"{prefix}-heat-01",
                carrier="heat",
                role="grid",
                rated_power_kw=round(rng.uniform(2, 12), 1),
                register_resolution=0.001,
                register_max=999_999.999,
                initial_register=round(rng.uniform(1e2, 1e5), 3),
                interval_s=interval_s,
            )
        )
    return devices


BUILDING_SHED_SHARE = 0.2  # the average reduction office buildings sustained in trials (reference 5.1)
BUILDING_MAX_SHED_MIN = 120.0


def _building_loads(
    devices: list[DeviceSpec], wanted: int, vpp: str, site_index: int
) -> tuple[list[DeviceSpec], int]:
    """Turn up to `wanted` of a campus's feeders into VPP building loads; returns how many are still wanted."""
    out = []
    for d in devices:
        if wanted and d.role == "submeter" and d.carrier == "electricity":
            d = d.model_copy(
                update={
                    "role": "resource",
                    "vpp": vpp,
                    "topology_node": f"node-{site_index % 40:02d}",
                    "sheddable_share": BUILDING_SHED_SHARE,
                    "max_shed_min": BUILDING_MAX_SHED_MIN,
                }
            )
            wanted -= 1
        out.append(d)
    return out, wanted


def _resources(
    rng: random.Random, prefix: str, kinds: list[DeviceType], vpp: str, site_index: int, interval_s: int
) -> list[DeviceSpec]:
    devices: list[DeviceSpec] = []
    for i, kind in enumerate(kinds):
        node = f"node-{site_index % 40:02d}"
        common = {"role": "resource", "vpp": vpp, "topology_node": node, "interval_s": interval_s}
        if kind == "battery":
            kw = round(rng.choice((100, 250, 500, 1000)) * rng.uniform(0.8, 1.2), 0)
            devices.append(
                DeviceSpec(
                    device=f"{prefix}-bat-{i:04d}",
                    type="battery",
                    rated_power_kw=kw,
                    energy_capacity_kwh=kw * rng.choice((1, 2, 2, 4)),
                    register_resolution=0.01,
                    **common,
                )
            )
        elif kind == "pv":
            devices.append(
                DeviceSpec(
                    device=f"{prefix}-pv-{i:04d}",
                    type="pv",
                    rated_power_kw=round(rng.uniform(50, 2000), 0),
                    register_resolution=0.01,
                    **common,
                )
            )
        else:
            devices.append(
                DeviceSpec(
                    device=f"{prefix}-ev-{i:04d}",
                    type="ev_charger",
                    rated_power_kw=rng.choice((7.0, 11.0, 22.0, 60.0, 120.0)),
                    register_resolution=0.01,
                    **common,
                )
            )
    return devices


def _telecom(
    rng: random.Random,
    tenant: str,
    base_stations: int,
    vpp: str,
    interval_s: int,
    payload_format: PayloadFormat,
    max_devices_per_gateway: int,
) -> EnterpriseSpec:
    per_site = 100
    sites: list[SiteSpec] = []
    for s in range((base_stations + per_site - 1) // per_site):
        province, lat, lon = _LOCATIONS[s % len(_LOCATIONS)]
        n = min(per_site, base_stations - s * per_site)
        stations = [
            DeviceSpec(
                device=f"bts-{s:03d}-{i:03d}",
                type="base_station",
                role="resource",
                rated_power_kw=round(rng.uniform(3.0, 6.0), 1),
                energy_capacity_kwh=round(rng.uniform(10, 25), 1),
                register_resolution=0.001,
                initial_register=round(rng.uniform(1e3, 5e4), 3),
                interval_s=interval_s,
                vpp=vpp,
                topology_node=f"node-{s % 40:02d}",
            )
            for i in range(n)
        ]
        main = DeviceSpec(
            device=f"main-{s:03d}",
            role="grid",
            rated_power_kw=round(sum(d.rated_power_kw for d in stations) * 1.5, 0),
            initial_register=round(rng.uniform(1e4, 1e6), 2),
            interval_s=interval_s,
        )
        sites.append(
            SiteSpec(
                site=f"towers-{s:03d}",
                name=f"tower cluster {s}",
                profile="telecom",
                province=province,
                latitude=lat,
                longitude=lon,
                gateways=_gateways(
                    f"{tenant}-t{s:03d}", [main, *stations], payload_format, max_devices_per_gateway
                ),
            )
        )
    return EnterpriseSpec(
        tenant=tenant,
        name="Simulated mobile operator",
        industry_code="I63",
        annual_output_value_cny=round(rng.uniform(1e9, 1e10), -6),
        sites=sites,
    )


def _gateways(
    prefix: str, devices: list[DeviceSpec], payload_format: PayloadFormat, max_devices: int
) -> list[GatewaySpec]:
    return [
        GatewaySpec(
            gateway=f"{prefix}-gw{i // max_devices}",
            format=payload_format,
            devices=devices[i : i + max_devices],
        )
        for i in range(0, len(devices), max_devices)
    ]
