"""VPP flexibility: pure numba kernels over numpy arrays, no I/O.

Each resource's flexibility for a required duration ``T`` is worked out from its ratings and its latest
telemetry (docs/vpp.md, reference notes section 5.1 and checklist F). "Up" is less consumption or more
generation, "down" the opposite; both are changes from the resource's operating point, so never negative:

* battery: ``up = min(P_dis_max, (SoC - SoC_min) x E x eta / T) + P``,
  ``down = min(P_cha_max, (SoC_max - SoC) x E / eta / T) - P`` (``P`` signed, positive = charging: stopping a
  charge adds to up, an ongoing discharge already uses part of the discharge headroom);
* 5G base station: its backup battery may carry the station's own load but never below the reserved SoC
  (``floor = max(SoC_min, reserve)``), so ``up = min(P_dis_max, usable energy / T, load)``; down as a battery
  that cannot export;
* PV: ``down = current output`` when curtailable, ``up = 0`` (an unknown available power is never promised);
* EV charger: ``up = P - P_min``, ``down = P_max - P`` while a vehicle charges, nothing while idle;
* flexible building load: ``up = share x load`` while ``T`` is within its maximum shed duration.

A device that reports ``flex_up_kw`` / ``flex_down_kw`` itself is taken at its word. Deliverable figures are
multiplied by a derating factor per class; nameplate figures use the ratings alone (full SoC band, rated
power) with no derating. Resources silent for more than ``stale_factor`` telemetry intervals (or never
heard) are stale: counted, and left out of deliverable figures. Nameplate covers every registered resource.

`processing.flex_reference` is the slow, obviously correct version; property tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numba import njit
from numpy.typing import NDArray

from processing.kernels import F64, I8, I32, I64, NO_TS

BATTERY: Final = 0
PV: Final = 1
EV_CHARGER: Final = 2
BUILDING_LOAD: Final = 3
BASE_STATION: Final = 4
CLASS_NAMES: Final = ("battery", "pv", "ev_charger", "building_load", "base_station")
N_CLASSES: Final = len(CLASS_NAMES)

# Telemetry kept per resource, row order of `Telemetry.value`; other metrics only prove the device alive.
METRICS: Final = ("power_kw", "soc_pct", "flex_up_kw", "flex_down_kw")
M_POWER: Final = 0
M_SOC: Final = 1
M_FLEX_UP: Final = 2
M_FLEX_DOWN: Final = 3
M_OTHER: Final = -1  # a reading of another metric
NOT_A_RESOURCE: Final = -1


@dataclass(frozen=True, slots=True)
class Models:
    """Ratings of n resources. Missing ratings are 0 (no flexibility from them), never NaN."""

    cls: I8
    group: I32  # VPP index
    node: I32  # topology node index (global: a node belongs to one VPP)
    rated_kw: F64  # PV rating, EV maximum, building peak load, inverter limit of storage
    charge_max_kw: F64
    discharge_max_kw: F64
    energy_kwh: F64
    soc_min_pct: F64
    soc_max_pct: F64
    reserve_pct: F64  # base stations: SoC kept for backup, never dispatched
    efficiency: F64  # one-way, charge and discharge alike
    curtailable: NDArray[np.bool_]
    min_kw: F64  # EV minimum charging power
    shed_share: F64  # building: share of the current load that can be shed
    max_shed_min: F64  # building: longest shed; inf when unlimited
    interval_ms: I64  # telemetry interval

    def __len__(self) -> int:
        return int(self.cls.size)


@dataclass(slots=True)
class Telemetry:
    """Latest value and its timestamp per (metric, resource); NaN / NO_TS when never reported."""

    value: F64  # shape (len(METRICS), n)
    ts: I64  # shape (len(METRICS), n)
    last_seen_ms: I64  # newest reading of any metric

    @classmethod
    def empty(cls, n: int) -> Telemetry:
        return cls(
            np.full((len(METRICS), n), np.nan),
            np.full((len(METRICS), n), NO_TS, np.int64),
            np.full(n, NO_TS, np.int64),
        )


@dataclass(frozen=True, slots=True)
class Capacity:
    """Totals per VPP and per node; ``*_kw`` arrays have one column per required duration."""

    up_kw: F64  # (groups, durations), derated, online resources only
    down_kw: F64
    nameplate_up_kw: F64  # (groups, durations), every resource, ratings only
    nameplate_down_kw: F64
    online: I64  # (groups,)
    stale: I64
    node_up_kw: F64  # (nodes, durations)
    node_down_kw: F64
    node_online: I64
    node_stale: I64
    stale_mask: NDArray[np.bool_]  # (resources,)


@njit(cache=True, nogil=True)
def apply_readings(
    resource: I32, metric: I8, ts: I64, value: F64, tel_value: F64, tel_ts: I64, seen: I64
) -> int:
    """Keep the newest reading per (metric, resource); any reading of a resource updates its last-seen
    time. Rows whose resource is NOT_A_RESOURCE are skipped. Returns how many latest values changed."""
    changed = 0
    for i in range(resource.size):
        r = resource[i]
        if r < 0:
            continue
        if ts[i] > seen[r]:
            seen[r] = ts[i]
        m = metric[i]
        if m >= 0 and ts[i] >= tel_ts[m, r]:
            tel_ts[m, r] = ts[i]
            if tel_value[m, r] != value[i]:
                tel_value[m, r] = value[i]
                changed += 1
    return changed


@njit(cache=True, nogil=True, inline="always")
def _flex(
    c: int,
    rated: float,
    cha_max: float,
    dis_max: float,
    energy: float,
    soc_min: float,
    soc_max: float,
    reserve: float,
    eta: float,
    curtailable: bool,
    min_kw: float,
    share: float,
    max_shed_min: float,
    power: float,
    soc: float,
    t_min: float,
) -> tuple[float, float]:
    t_h = t_min / 60.0
    p = 0.0 if np.isnan(power) else power
    up = 0.0
    down = 0.0
    if c in (BATTERY, BASE_STATION):
        floor = max(soc_min, reserve)
        e_up = 0.0
        e_down = 0.0
        if not np.isnan(soc):
            e_up = max(0.0, (soc - floor) / 100.0 * energy * eta)
            e_down = max(0.0, (soc_max - soc) / 100.0 * energy / eta)
        if c == BATTERY:
            up = min(dis_max, e_up / t_h) + p
            down = min(cha_max, e_down / t_h) - p
        else:
            up = min(min(dis_max, e_up / t_h), max(p, 0.0))
            down = min(cha_max, e_down / t_h)
    elif c == PV:
        if curtailable:
            down = max(-p, 0.0)
    elif c == EV_CHARGER:
        if p > 0.0:
            up = p - min_kw
            down = rated - p
    elif c == BUILDING_LOAD and t_min <= max_shed_min:
        up = share * max(p, 0.0)
    return max(up, 0.0), max(down, 0.0)


@njit(cache=True, nogil=True, inline="always")
def _nameplate(
    c: int,
    rated: float,
    cha_max: float,
    dis_max: float,
    energy: float,
    soc_min: float,
    soc_max: float,
    reserve: float,
    eta: float,
    curtailable: bool,
    min_kw: float,
    share: float,
    max_shed_min: float,
    t_min: float,
) -> tuple[float, float]:
    t_h = t_min / 60.0
    up = 0.0
    down = 0.0
    if c in (BATTERY, BASE_STATION):
        band = max(0.0, soc_max - max(soc_min, reserve)) / 100.0 * energy
        up = min(dis_max, band * eta / t_h)
        down = min(cha_max, band / eta / t_h)
    elif c == PV:
        if curtailable:
            down = rated
    elif c == EV_CHARGER:
        up = max(0.0, rated - min_kw)
        down = rated
    elif c == BUILDING_LOAD and t_min <= max_shed_min:
        up = share * rated
    return up, down


@njit(cache=True, nogil=True)
def aggregate(
    cls: I8,
    group: I32,
    node: I32,
    rated: F64,
    cha_max: F64,
    dis_max: F64,
    energy: F64,
    soc_min: F64,
    soc_max: F64,
    reserve: F64,
    eta: F64,
    curtailable: NDArray[np.bool_],
    min_kw: F64,
    share: F64,
    max_shed_min: F64,
    interval_ms: I64,
    tel_value: F64,
    seen: I64,
    now_ms: int,
    stale_factor: float,
    durations_min: F64,
    derate: F64,
    up: F64,
    down: F64,
    np_up: F64,
    np_down: F64,
    online: I64,
    stale: I64,
    node_up: F64,
    node_down: F64,
    node_online: I64,
    node_stale: I64,
    stale_mask: NDArray[np.bool_],
) -> None:
    """One pass over all resources into zeroed output arrays (see `capacity` for the shapes)."""
    for r in range(cls.size):
        g = group[r]
        nd = node[r]
        c = cls[r]
        is_stale = seen[r] == NO_TS or now_ms - seen[r] > stale_factor * interval_ms[r]
        stale_mask[r] = is_stale
        if is_stale:
            stale[g] += 1
            node_stale[nd] += 1
        else:
            online[g] += 1
            node_online[nd] += 1
        f_up = tel_value[M_FLEX_UP, r]
        f_down = tel_value[M_FLEX_DOWN, r]
        for d in range(durations_min.size):
            t = durations_min[d]
            n_up, n_down = _nameplate(
                c, rated[r], cha_max[r], dis_max[r], energy[r], soc_min[r], soc_max[r], reserve[r],
                eta[r], curtailable[r], min_kw[r], share[r], max_shed_min[r], t,
            )  # fmt: skip
            np_up[g, d] += n_up
            np_down[g, d] += n_down
            if is_stale:
                continue
            a_up, a_down = _flex(
                c, rated[r], cha_max[r], dis_max[r], energy[r], soc_min[r], soc_max[r], reserve[r],
                eta[r], curtailable[r], min_kw[r], share[r], max_shed_min[r],
                tel_value[M_POWER, r], tel_value[M_SOC, r], t,
            )  # fmt: skip
            if not np.isnan(f_up):
                a_up = max(f_up, 0.0)
            if not np.isnan(f_down):
                a_down = max(f_down, 0.0)
            a_up *= derate[c]
            a_down *= derate[c]
            up[g, d] += a_up
            down[g, d] += a_down
            node_up[nd, d] += a_up
            node_down[nd, d] += a_down


def capacity(
    models: Models,
    telemetry: Telemetry,
    *,
    n_groups: int,
    n_nodes: int,
    now_ms: int,
    durations_min: F64,
    derate: F64,
    stale_factor: float = 3.0,
) -> Capacity:
    """Capacity of every VPP and node now. ``derate`` has one factor per class (CLASS_NAMES order)."""
    d = durations_min.size
    n = len(models)
    out = Capacity(
        np.zeros((n_groups, d)),
        np.zeros((n_groups, d)),
        np.zeros((n_groups, d)),
        np.zeros((n_groups, d)),
        np.zeros(n_groups, np.int64),
        np.zeros(n_groups, np.int64),
        np.zeros((n_nodes, d)),
        np.zeros((n_nodes, d)),
        np.zeros(n_nodes, np.int64),
        np.zeros(n_nodes, np.int64),
        np.zeros(n, np.bool_),
    )
    m = models
    aggregate(
        m.cls, m.group, m.node, m.rated_kw, m.charge_max_kw, m.discharge_max_kw, m.energy_kwh,
        m.soc_min_pct, m.soc_max_pct, m.reserve_pct, m.efficiency, m.curtailable, m.min_kw,
        m.shed_share, m.max_shed_min, m.interval_ms, telemetry.value, telemetry.last_seen_ms,
        now_ms, stale_factor, durations_min.astype(np.float64), derate.astype(np.float64),
        out.up_kw, out.down_kw, out.nameplate_up_kw, out.nameplate_down_kw, out.online, out.stale,
        out.node_up_kw, out.node_down_kw, out.node_online, out.node_stale, out.stale_mask,
    )  # fmt: skip
    return out


def warm_up() -> None:
    """Compile the kernels (cached on disk) before the first poll."""
    one = np.ones(1)
    models = Models(
        np.array([BATTERY], np.int8), np.zeros(1, np.int32), np.zeros(1, np.int32),
        one, one, one, one, one, one, one, one, np.zeros(1, np.bool_), one, one, np.full(1, np.inf),
        np.ones(1, np.int64),
    )  # fmt: skip
    tel = Telemetry.empty(1)
    apply_readings(
        np.zeros(1, np.int32), np.zeros(1, np.int8), np.zeros(1, np.int64), np.zeros(1),
        tel.value, tel.ts, tel.last_seen_ms,
    )  # fmt: skip
    capacity(
        models, tel, n_groups=1, n_nodes=1, now_ms=0, durations_min=np.array([15.0]),
        derate=np.ones(N_CLASSES),
    )  # fmt: skip
