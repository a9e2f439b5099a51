"""The simulated fleet's VPP resources come with resource models the API accepts."""

from __future__ import annotations

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from api.routes.vpp import ResourceIn
from simulators.engine import Simulation
from simulators.publisher import resource_model
from simulators.spec import DrEventSpec, generate_fleet

pytestmark = pytest.mark.unit


def test_every_simulated_resource_has_a_valid_model() -> None:
    fleet = generate_fleet(enterprises=3, vpp_resources=12, vpp_buildings=2, seed=3)
    devices = [d for e in fleet.enterprises for s in e.sites for g in s.gateways for d in g.devices]
    resources = [d for d in devices if d.vpp is not None and d.role == "resource"]
    assert {d.type for d in resources} == {"battery", "pv", "ev_charger", "base_station", "meter"}
    for d in resources:
        model = resource_model(d)
        assert model is not None
        parsed = ResourceIn.model_validate({"tenant": "t", **model})
        if d.type == "base_station":
            assert parsed.reserved_soc_pct > 0
        if d.type == "meter":
            assert parsed.resource_class == "building_load" and parsed.sheddable_share == 0.2
    assert all(resource_model(d) is None for d in devices if d.role != "resource")


def test_buildings_shed_their_share_during_a_dr_event_and_the_truth_says_how_much() -> None:
    spec = generate_fleet(enterprises=3, meters_per_site=3, vpp_buildings=1, seed=5)
    # A Tuesday afternoon in Shanghai: 14:00-15:00 local.
    start = datetime(2026, 3, 17, 13, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
    event = DrEventSpec(vpp="vpp-east", start=start + timedelta(hours=1), end=start + timedelta(hours=2))
    with_event = spec.model_copy(update={"dr_events": [event]})
    t0 = int(start.timestamp() * 1000)
    plain, shedding = Simulation(spec, t0), Simulation(with_event, t0)
    while plain.ts_ms < t0 + 3 * 3_600_000:
        plain.step()
        shedding.step()
    building = next(i for i, d in enumerate(plain.devices) if d.sheddable_share > 0)
    reg = int(plain.import_reg[building])
    resolution = plain.registers[reg].resolution
    # Nothing else differs: the shed is exactly the energy the building did not take.
    not_taken = (plain.counts[reg] - shedding.counts[reg]) * resolution
    truth = sum(float(kwh[building]) for kwh in shedding.shed_kwh.values())
    assert truth > 0
    assert not_taken == pytest.approx(truth, abs=2 * resolution)
    assert sorted(shedding.shed_kwh) == [
        int((event.start + timedelta(minutes=15 * q)).timestamp() * 1000) for q in range(4)
    ]
    # Only the building sheds.
    assert all(
        not np.any(kwh[[i for i in range(len(plain.devices)) if i != building]])
        for kwh in shedding.shed_kwh.values()
    )
