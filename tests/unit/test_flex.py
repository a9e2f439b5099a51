"""VPP flexibility kernels against `processing.flex_reference` on generated fleets, plus a fleet worked
out by hand and the staleness rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing import flex
from processing import flex_reference as ref
from processing.kernels import NO_TS

pytestmark = pytest.mark.unit

PROPERTY = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DURATIONS = [15.0, 30.0, 60.0]
DERATE = [0.95, 0.8, 0.7, 0.6, 0.9]
NOW = 1_767_225_600_000


def to_arrays(resources: list[ref.Resource], states: list[ref.State]) -> tuple[flex.Models, flex.Telemetry]:
    def col(name: str, dtype: type = np.float64) -> np.ndarray:
        return np.array([getattr(r, name) for r in resources], dtype)

    models = flex.Models(
        col("cls", np.int8), col("group", np.int32), col("node", np.int32), col("rated_kw"),
        col("charge_max_kw"), col("discharge_max_kw"), col("energy_kwh"), col("soc_min_pct"),
        col("soc_max_pct"), col("reserve_pct"), col("efficiency"), col("curtailable", np.bool_),
        col("min_kw"), col("shed_share"), col("max_shed_min"), col("interval_ms", np.int64),
    )  # fmt: skip
    tel = flex.Telemetry.empty(len(resources))
    for i, s in enumerate(states):
        for m, name in enumerate(flex.METRICS):
            v = getattr(s, name)
            if v is not None:
                tel.value[m, i] = v
        if s.last_seen_ms is not None:
            tel.last_seen_ms[i] = s.last_seen_ms
    return models, tel


def run_kernel(resources: list[ref.Resource], states: list[ref.State], now: int = NOW) -> flex.Capacity:
    models, tel = to_arrays(resources, states)
    return flex.capacity(
        models,
        tel,
        n_groups=max(r.group for r in resources) + 1,
        n_nodes=max(r.node for r in resources) + 1,
        now_ms=now,
        durations_min=np.array(DURATIONS),
        derate=np.array(DERATE),
    )


finite = st.floats(0, 500, allow_nan=False)
maybe = st.none() | st.floats(-600, 600, allow_nan=False)


@st.composite
def resource(draw: st.DrawFn) -> ref.Resource:
    soc_min = draw(st.floats(0, 60))
    return ref.Resource(
        cls=draw(st.integers(0, flex.N_CLASSES - 1)),
        group=draw(st.integers(0, 2)),
        node=draw(st.integers(0, 4)),
        rated_kw=draw(finite),
        charge_max_kw=draw(finite),
        discharge_max_kw=draw(finite),
        energy_kwh=draw(st.floats(0, 2000)),
        soc_min_pct=soc_min,
        soc_max_pct=draw(st.floats(soc_min, 100)),
        reserve_pct=draw(st.sampled_from([0.0, 30.0, 50.0])),
        efficiency=draw(st.floats(0.5, 1.0)),
        curtailable=draw(st.booleans()),
        min_kw=draw(st.floats(0, 20)),
        shed_share=draw(st.floats(0, 1)),
        max_shed_min=draw(st.sampled_from([math.inf, 15.0, 30.0, 45.0])),
        interval_ms=draw(st.sampled_from([1_000, 15_000, 60_000])),
    )


@st.composite
def state(draw: st.DrawFn) -> ref.State:
    return ref.State(
        power_kw=draw(maybe),
        soc_pct=draw(st.none() | st.floats(0, 100)),
        flex_up_kw=draw(st.none() | st.floats(-10, 500)) if draw(st.booleans()) else None,
        flex_down_kw=draw(st.none() | st.floats(-10, 500)) if draw(st.booleans()) else None,
        last_seen_ms=draw(st.none() | st.integers(NOW - 400_000, NOW + 1_000)),
    )


@PROPERTY
@given(st.lists(st.tuples(resource(), state()), min_size=1, max_size=40))
def test_kernel_matches_reference(fleet: list[tuple[ref.Resource, ref.State]]) -> None:
    resources = [r for r, _ in fleet]
    states = [s for _, s in fleet]
    got = run_kernel(resources, states)
    want = ref.capacity(resources, states, now_ms=NOW, durations_min=DURATIONS, derate=DERATE)
    assert got.stale_mask.tolist() == want.stale
    for g, by_minutes in want.groups.items():
        for d, minutes in enumerate(DURATIONS):
            t = by_minutes[minutes]
            assert got.up_kw[g, d] == pytest.approx(t.up, rel=1e-9, abs=1e-9)
            assert got.down_kw[g, d] == pytest.approx(t.down, rel=1e-9, abs=1e-9)
            assert got.nameplate_up_kw[g, d] == pytest.approx(t.nameplate_up, rel=1e-9, abs=1e-9)
            assert got.nameplate_down_kw[g, d] == pytest.approx(t.nameplate_down, rel=1e-9, abs=1e-9)
            assert (got.online[g], got.stale[g]) == (t.online, t.stale)
    for n, by_minutes in want.nodes.items():
        for d, minutes in enumerate(DURATIONS):
            t = by_minutes[minutes]
            assert got.node_up_kw[n, d] == pytest.approx(t.up, rel=1e-9, abs=1e-9)
            assert got.node_down_kw[n, d] == pytest.approx(t.down, rel=1e-9, abs=1e-9)
            assert (got.node_online[n], got.node_stale[n]) == (t.online, t.stale)
    assert (got.up_kw >= 0).all() and (got.down_kw >= 0).all()
    # Derating factors are at most 1, so derated figures never exceed the underated ones.
    assert got.up_kw.sum() <= underated_up(resources, states).sum() + 1e-6


def underated_up(resources: list[ref.Resource], states: list[ref.State]) -> np.ndarray:
    models, tel = to_arrays(resources, states)
    cap = flex.capacity(
        models,
        tel,
        n_groups=max(r.group for r in resources) + 1,
        n_nodes=max(r.node for r in resources) + 1,
        now_ms=NOW,
        durations_min=np.array(DURATIONS),
        derate=np.ones(flex.N_CLASSES),
    )
    return cap.up_kw


@PROPERTY
@given(
    st.lists(
        st.tuples(st.integers(-1, 3), st.integers(-1, 3), st.integers(0, 50), st.floats(-100, 100)),
        max_size=60,
    )
)
def test_apply_readings_keeps_newest(rows: list[tuple[int, int, int, float]]) -> None:
    n = 4
    tel = flex.Telemetry.empty(n)
    flex.apply_readings(
        np.array([r for r, *_ in rows], np.int32),
        np.array([m for _, m, *_ in rows], np.int8),
        np.array([t for *_, t, _ in rows], np.int64),
        np.array([v for *_, v in rows], np.float64),
        tel.value,
        tel.ts,
        tel.last_seen_ms,
    )
    for r in range(n):
        mine = [(t, v, m) for (rr, m, t, v) in rows if rr == r]
        assert tel.last_seen_ms[r] == (max(t for t, _, _ in mine) if mine else NO_TS)
        for m in range(len(flex.METRICS)):
            of_metric = [(t, i) for i, (t, _, mm) in enumerate(mine) if mm == m]
            if not of_metric:
                assert math.isnan(tel.value[m, r])
                continue
            newest = max(t for t, _ in of_metric)
            # Equal timestamps: the later row in the stream wins.
            last = max(i for t, i in of_metric if t == newest)
            assert tel.value[m, r] == mine[last][1]


def test_capacity_by_hand() -> None:
    """A five-resource VPP on two nodes, worked out by hand for 30 minutes (docs/vpp.md)."""
    fleet = [
        # Battery 200 kWh, 100 kW both ways, SoC 60 % (10..90), eta 0.9, charging at 20 kW.
        # up = min(100, (60-10)% x 200 x 0.9 / 0.5 h = 180) + 20 = 120; down = min(100, 30%x200/0.9/0.5 =
        # 133.3) - 20 = 80.
        (
            ref.Resource(
                flex.BATTERY,
                0,
                0,
                rated_kw=100,
                charge_max_kw=100,
                discharge_max_kw=100,
                energy_kwh=200,
                soc_min_pct=10,
                soc_max_pct=90,
                efficiency=0.9,
            ),
            ref.State(power_kw=20, soc_pct=60, last_seen_ms=NOW - 30_000),
        ),
        # PV 50 kW, curtailable, generating 40 kW: down 40, up 0.
        (
            ref.Resource(flex.PV, 0, 0, rated_kw=50, curtailable=True),
            ref.State(power_kw=-40, last_seen_ms=NOW - 10_000),
        ),
        # EV charger 22 kW, min 6 kW, charging 16 kW: up 10, down 6.
        (
            ref.Resource(flex.EV_CHARGER, 0, 1, rated_kw=22, min_kw=6),
            ref.State(power_kw=16, last_seen_ms=NOW - 10_000),
        ),
        # Base station: 10 kWh backup, 5 kW, reserve 50 %, SoC 100, load 3 kW: up = min(5, 45%x10/0.5=9,
        # 3) = 3 (eta 1); down = min(5, (95-100) -> 0) = 0.
        (
            ref.Resource(
                flex.BASE_STATION,
                0,
                1,
                rated_kw=5,
                charge_max_kw=5,
                discharge_max_kw=5,
                energy_kwh=10,
                soc_min_pct=5,
                soc_max_pct=95,
                reserve_pct=50,
            ),
            ref.State(power_kw=3, soc_pct=100, last_seen_ms=NOW - 10_000),
        ),
        # Building reporting its own flexibility: up 25, down 5 (its 300 kW load is not used).
        (
            ref.Resource(flex.BUILDING_LOAD, 0, 1, rated_kw=400, shed_share=0.2, max_shed_min=60),
            ref.State(power_kw=300, flex_up_kw=25, flex_down_kw=5, last_seen_ms=NOW - 10_000),
        ),
    ]
    resources = [r for r, _ in fleet]
    states = [s for _, s in fleet]
    got = run_kernel(resources, states)
    d = DURATIONS.index(30.0)
    b, pv, ev, bl, bs = DERATE
    assert got.up_kw[0, d] == pytest.approx(120 * b + 0 * pv + 10 * ev + 3 * bs + 25 * bl)
    assert got.down_kw[0, d] == pytest.approx(80 * b + 40 * pv + 6 * ev + 0 * bs + 5 * bl)
    assert got.node_up_kw[0, d] == pytest.approx(120 * b)
    assert got.node_up_kw[1, d] == pytest.approx(10 * ev + 3 * bs + 25 * bl)
    # Nameplate: battery band 80 % x 200 = 160 kWh -> min(100, 288) up, min(100, 355.6) down; PV 0/50;
    # EV 16/22; base station band 45 % x 10 = 4.5 kWh -> min(5, 9) = 5 both ways; building 0.2 x 400 = 80.
    assert got.nameplate_up_kw[0, d] == pytest.approx(100 + 0 + 16 + 5 + 80)
    assert got.nameplate_down_kw[0, d] == pytest.approx(100 + 50 + 22 + 5 + 0)
    assert (got.online[0], got.stale[0]) == (5, 0)
    # 60 minutes: the battery is energy-limited up: min(100, 90) + 20 = 110.
    assert got.up_kw[0, 2] - got.up_kw[0, d] == pytest.approx((110 - 120) * b)


def test_stale_resources_are_counted_and_excluded() -> None:
    r = ref.Resource(flex.EV_CHARGER, 0, 0, rated_kw=22, min_kw=6, interval_ms=60_000)
    fresh = ref.State(power_kw=16, last_seen_ms=NOW - 180_000)  # exactly 3 intervals: still online
    silent = ref.State(power_kw=16, last_seen_ms=NOW - 180_001)
    never = ref.State()
    got = run_kernel([r, r, r], [fresh, silent, never])
    assert got.stale_mask.tolist() == [False, True, True]
    assert (got.online[0], got.stale[0]) == (1, 2)
    assert got.up_kw[0, 0] == pytest.approx(10 * DERATE[flex.EV_CHARGER])
    assert got.nameplate_up_kw[0, 0] == pytest.approx(3 * 16)
