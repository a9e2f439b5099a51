"""Slow, obviously correct versions of `processing.flex`: one resource at a time, written the way the
formulas read in docs/vpp.md, over plain Python objects. Property tests compare the kernels with this."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from processing import flex


@dataclass(frozen=True, slots=True)
class Resource:
    cls: int
    group: int
    node: int
    rated_kw: float = 0.0
    charge_max_kw: float = 0.0
    discharge_max_kw: float = 0.0
    energy_kwh: float = 0.0
    soc_min_pct: float = 0.0
    soc_max_pct: float = 100.0
    reserve_pct: float = 0.0
    efficiency: float = 1.0
    curtailable: bool = False
    min_kw: float = 0.0
    shed_share: float = 0.0
    max_shed_min: float = math.inf
    interval_ms: int = 60_000


@dataclass(slots=True)
class State:
    """Latest telemetry; None when never reported."""

    power_kw: float | None = None
    soc_pct: float | None = None
    flex_up_kw: float | None = None
    flex_down_kw: float | None = None
    last_seen_ms: int | None = None


@dataclass(slots=True)
class Totals:
    up: float = 0.0
    down: float = 0.0
    nameplate_up: float = 0.0
    nameplate_down: float = 0.0
    online: int = 0
    stale: int = 0


@dataclass(slots=True)
class Result:
    groups: dict[int, dict[float, Totals]] = field(default_factory=dict)
    nodes: dict[int, dict[float, Totals]] = field(default_factory=dict)
    stale: list[bool] = field(default_factory=list)


def is_stale(r: Resource, s: State, now_ms: int, stale_factor: float) -> bool:
    if s.last_seen_ms is None:
        return True
    return now_ms - s.last_seen_ms > stale_factor * r.interval_ms


def storage_energy(r: Resource, soc: float | None) -> tuple[float, float]:
    """Energy that can leave (after losses) and enter (before losses) the store, kWh."""
    if soc is None:
        return 0.0, 0.0
    floor = max(r.soc_min_pct, r.reserve_pct)
    out_kwh = max(0.0, (soc - floor) / 100 * r.energy_kwh * r.efficiency)
    in_kwh = max(0.0, (r.soc_max_pct - soc) / 100 * r.energy_kwh / r.efficiency)
    return out_kwh, in_kwh


def flexibility(r: Resource, s: State, minutes: float) -> tuple[float, float]:
    """(up, down) in kW sustained for `minutes`, before derating."""
    if s.flex_up_kw is not None or s.flex_down_kw is not None:
        computed = flexibility(r, State(s.power_kw, s.soc_pct), minutes)
        up = computed[0] if s.flex_up_kw is None else max(0.0, s.flex_up_kw)
        down = computed[1] if s.flex_down_kw is None else max(0.0, s.flex_down_kw)
        return up, down
    hours = minutes / 60
    power = s.power_kw or 0.0
    if r.cls == flex.BATTERY:
        out_kwh, in_kwh = storage_energy(r, s.soc_pct)
        up = min(r.discharge_max_kw, out_kwh / hours) + power
        down = min(r.charge_max_kw, in_kwh / hours) - power
    elif r.cls == flex.BASE_STATION:
        out_kwh, in_kwh = storage_energy(r, s.soc_pct)
        station_load = max(power, 0.0)
        up = min(r.discharge_max_kw, out_kwh / hours, station_load)
        down = min(r.charge_max_kw, in_kwh / hours)
    elif r.cls == flex.PV:
        output = max(-power, 0.0)
        up, down = 0.0, (output if r.curtailable else 0.0)
    elif r.cls == flex.EV_CHARGER:
        charging = power > 0
        up = power - r.min_kw if charging else 0.0
        down = r.rated_kw - power if charging else 0.0
    elif r.cls == flex.BUILDING_LOAD:
        up = r.shed_share * max(power, 0.0) if minutes <= r.max_shed_min else 0.0
        down = 0.0
    else:
        raise ValueError(f"unknown resource class {r.cls}")
    return max(up, 0.0), max(down, 0.0)


def nameplate(r: Resource, minutes: float) -> tuple[float, float]:
    hours = minutes / 60
    if r.cls in (flex.BATTERY, flex.BASE_STATION):
        band_kwh = max(0.0, r.soc_max_pct - max(r.soc_min_pct, r.reserve_pct)) / 100 * r.energy_kwh
        return (
            min(r.discharge_max_kw, band_kwh * r.efficiency / hours),
            min(r.charge_max_kw, band_kwh / r.efficiency / hours),
        )
    if r.cls == flex.PV:
        return 0.0, (r.rated_kw if r.curtailable else 0.0)
    if r.cls == flex.EV_CHARGER:
        return max(0.0, r.rated_kw - r.min_kw), r.rated_kw
    if r.cls == flex.BUILDING_LOAD:
        return (r.shed_share * r.rated_kw if minutes <= r.max_shed_min else 0.0), 0.0
    raise ValueError(f"unknown resource class {r.cls}")


def capacity(
    resources: list[Resource],
    states: list[State],
    *,
    now_ms: int,
    durations_min: list[float],
    derate: list[float],
    stale_factor: float = 3.0,
) -> Result:
    result = Result()
    for r, s in zip(resources, states, strict=True):
        stale = is_stale(r, s, now_ms, stale_factor)
        result.stale.append(stale)
        for minutes in durations_min:
            g = result.groups.setdefault(r.group, {}).setdefault(minutes, Totals())
            n = result.nodes.setdefault(r.node, {}).setdefault(minutes, Totals())
            n_up, n_down = nameplate(r, minutes)
            g.nameplate_up += n_up
            g.nameplate_down += n_down
            if stale:
                g.stale += 1
                n.stale += 1
                continue
            g.online += 1
            n.online += 1
            up, down = flexibility(r, s, minutes)
            g.up += up * derate[r.cls]
            g.down += down * derate[r.cls]
            n.up += up * derate[r.cls]
            n.down += down * derate[r.cls]
    return result
