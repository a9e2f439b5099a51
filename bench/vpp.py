"""`meterflow bench vpp`: recompute the capacity of a VPP fleet (every resource, 15/30/60 minutes, per VPP
and per topology node) with the numba kernel the vpp service runs, beside a numpy vectorised
implementation of the same formulas on the same arrays in the same run; the totals are checked equal.

The fleet is a mix of batteries, PV, EV chargers, building loads and 5G base stations spread over VPPs
and nodes, with random state, some device-reported flexibility and about 5 % stale resources. Both
implementations run on one thread (numba kernels are not parallel; numpy's element-wise work is too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from processing import flex
from processing.kernels import F64, NO_TS

NOW_MS = 1_767_225_600_000
DURATIONS = np.array([15.0, 30.0, 60.0])
DERATE = np.array([0.95, 0.8, 0.7, 0.6, 0.9])
ROUNDS = 15

T = TypeVar("T")


def make_fleet(n: int, *, n_groups: int, n_nodes: int, seed: int = 7) -> tuple[flex.Models, flex.Telemetry]:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, flex.N_CLASSES, n).astype(np.int8)
    rated = rng.uniform(5, 500, n)
    soc_min = rng.uniform(0, 20, n)
    models = flex.Models(
        cls=cls,
        group=rng.integers(0, n_groups, n).astype(np.int32),
        node=rng.integers(0, n_nodes, n).astype(np.int32),
        rated_kw=rated,
        charge_max_kw=rated * rng.uniform(0.5, 1.0, n),
        discharge_max_kw=rated * rng.uniform(0.5, 1.0, n),
        energy_kwh=rated * rng.uniform(1, 4, n),
        soc_min_pct=soc_min,
        soc_max_pct=rng.uniform(80, 100, n),
        reserve_pct=np.where(cls == flex.BASE_STATION, 50.0, 0.0),
        efficiency=rng.uniform(0.85, 0.98, n),
        curtailable=rng.random(n) < 0.7,
        min_kw=np.where(cls == flex.EV_CHARGER, 6.0, 0.0),
        shed_share=np.where(cls == flex.BUILDING_LOAD, rng.uniform(0.05, 0.25, n), 0.0),
        max_shed_min=np.where(rng.random(n) < 0.5, np.inf, 30.0),
        interval_ms=rng.choice(np.array([1_000, 15_000, 60_000], np.int64), n),
    )
    tel = flex.Telemetry.empty(n)
    tel.value[flex.M_POWER] = rng.uniform(-1, 1, n) * rated
    tel.value[flex.M_SOC] = rng.uniform(0, 100, n)
    reported = rng.random(n) < 0.1
    tel.value[flex.M_FLEX_UP] = np.where(reported, rng.uniform(0, 50, n), np.nan)
    tel.value[flex.M_FLEX_DOWN] = np.where(reported, rng.uniform(0, 50, n), np.nan)
    silent = rng.random(n) < 0.05
    tel.last_seen_ms = np.where(silent, NO_TS, NOW_MS - rng.integers(0, 2 * models.interval_ms)).astype(
        np.int64
    )
    return models, tel


def numpy_capacity(
    m: flex.Models,
    tel: flex.Telemetry,
    *,
    n_groups: int,
    n_nodes: int,
    now_ms: int,
    stale_factor: float = 3.0,
) -> tuple[F64, F64, F64, F64, F64, F64]:
    """The same formulas as `processing.flex`, element-wise over whole arrays, bincount per group/node."""
    seen = tel.last_seen_ms
    stale = (seen == NO_TS) | (now_ms - seen > stale_factor * m.interval_ms)
    p = np.nan_to_num(tel.value[flex.M_POWER], nan=0.0)
    soc = tel.value[flex.M_SOC]
    f_up, f_down = tel.value[flex.M_FLEX_UP], tel.value[flex.M_FLEX_DOWN]
    storage = (m.cls == flex.BATTERY) | (m.cls == flex.BASE_STATION)
    floor = np.maximum(m.soc_min_pct, m.reserve_pct)
    e_up = np.nan_to_num(np.maximum(0.0, (soc - floor) / 100.0 * m.energy_kwh * m.efficiency), nan=0.0)
    e_down = np.nan_to_num(
        np.maximum(0.0, (m.soc_max_pct - soc) / 100.0 * m.energy_kwh / m.efficiency), nan=0.0
    )
    band = np.maximum(0.0, m.soc_max_pct - floor) / 100.0 * m.energy_kwh
    charging = p > 0
    weight = np.where(stale, 0.0, DERATE[m.cls])
    shape = (n_groups, DURATIONS.size)
    up, down = np.zeros(shape), np.zeros(shape)
    np_up, np_down = np.zeros(shape), np.zeros(shape)
    node_up, node_down = np.zeros((n_nodes, DURATIONS.size)), np.zeros((n_nodes, DURATIONS.size))
    for d, t_min in enumerate(DURATIONS):
        t_h = t_min / 60.0
        dis = np.minimum(m.discharge_max_kw, e_up / t_h)
        cha = np.minimum(m.charge_max_kw, e_down / t_h)
        shed_ok = t_min <= m.max_shed_min
        a_up = np.select(
            [m.cls == flex.BATTERY, m.cls == flex.BASE_STATION, m.cls == flex.EV_CHARGER, m.cls == flex.BUILDING_LOAD],
            [dis + p, np.minimum(dis, np.maximum(p, 0.0)), np.where(charging, p - m.min_kw, 0.0),
             np.where(shed_ok, m.shed_share * np.maximum(p, 0.0), 0.0)],
            0.0,
        )  # fmt: skip
        a_down = np.select(
            [m.cls == flex.BATTERY, m.cls == flex.BASE_STATION, m.cls == flex.EV_CHARGER, m.cls == flex.PV],
            [cha - p, cha, np.where(charging, m.rated_kw - p, 0.0),
             np.where(m.curtailable, np.maximum(-p, 0.0), 0.0)],
            0.0,
        )  # fmt: skip
        a_up = np.where(np.isnan(f_up), np.maximum(a_up, 0.0), np.maximum(f_up, 0.0)) * weight
        a_down = np.where(np.isnan(f_down), np.maximum(a_down, 0.0), np.maximum(f_down, 0.0)) * weight
        n_up = np.select(
            [storage, m.cls == flex.EV_CHARGER, m.cls == flex.BUILDING_LOAD],
            [np.minimum(m.discharge_max_kw, band * m.efficiency / t_h), np.maximum(0.0, m.rated_kw - m.min_kw),
             np.where(shed_ok, m.shed_share * m.rated_kw, 0.0)],
            0.0,
        )  # fmt: skip
        n_down = np.select(
            [storage, m.cls == flex.EV_CHARGER, m.cls == flex.PV],
            [np.minimum(m.charge_max_kw, band / m.efficiency / t_h), m.rated_kw,
             np.where(m.curtailable, m.rated_kw, 0.0)],
            0.0,
        )  # fmt: skip
        up[:, d] = np.bincount(m.group, a_up, n_groups)
        down[:, d] = np.bincount(m.group, a_down, n_groups)
        np_up[:, d] = np.bincount(m.group, n_up, n_groups)
        np_down[:, d] = np.bincount(m.group, n_down, n_groups)
        node_up[:, d] = np.bincount(m.node, a_up, n_nodes)
        node_down[:, d] = np.bincount(m.node, a_down, n_nodes)
    return up, down, np_up, np_down, node_up, node_down


def _median_s(fn: Callable[[], T], rounds: int) -> tuple[float, T]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)), out


def run_vpp_bench(
    *, resources: int, vpps: int, nodes: int, rounds: int = ROUNDS, tick: Callable[[str], None]
) -> dict[str, object]:
    tick(f"building a fleet of {resources:,} resources in {vpps} VPPs and {nodes:,} nodes")
    models, tel = make_fleet(resources, n_groups=vpps, n_nodes=nodes)
    tick("compiling the kernel")
    flex.warm_up()

    def kernel() -> flex.Capacity:
        return flex.capacity(
            models, tel, n_groups=vpps, n_nodes=nodes, now_ms=NOW_MS, durations_min=DURATIONS, derate=DERATE
        )

    def vectorised() -> tuple[F64, F64, F64, F64, F64, F64]:
        return numpy_capacity(models, tel, n_groups=vpps, n_nodes=nodes, now_ms=NOW_MS)

    tick(f"numba kernel, median of {rounds} recomputations")
    numba_s, got = _median_s(kernel, rounds)
    tick(f"numpy vectorised, median of {rounds} recomputations")
    numpy_s, want = _median_s(vectorised, rounds)
    pairs = zip(
        (
            got.up_kw,
            got.down_kw,
            got.nameplate_up_kw,
            got.nameplate_down_kw,
            got.node_up_kw,
            got.node_down_kw,
        ),
        want,
        strict=True,
    )
    if not all(np.allclose(a, b, rtol=1e-9, atol=1e-6) for a, b in pairs):
        raise RuntimeError("numba and numpy capacities differ")
    numba_ms, numpy_ms = numba_s * 1000, numpy_s * 1000
    return {
        "bench": "vpp",
        "metric": "recompute_ms",
        "value": round(numba_ms, 3),
        "unit": "ms",
        "peer": "numpy",
        "peer_value": round(numpy_ms, 3),
        "ratio": round(numpy_ms / numba_ms, 2),
        "resources": resources,
        "vpps": vpps,
        "nodes": nodes,
        "durations_min": DURATIONS.tolist(),
        "online": int(got.online.sum()),
        "stale": int(got.stale.sum()),
        "up_kw_30min": round(float(got.up_kw[:, 1].sum()), 1),
    }
