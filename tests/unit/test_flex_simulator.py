"""The simulated fleet's VPP resources come with resource models the API accepts."""

from __future__ import annotations

import pytest

from api.routes.vpp import ResourceIn
from simulators.publisher import resource_model
from simulators.spec import generate_fleet

pytestmark = pytest.mark.unit


def test_every_simulated_resource_has_a_valid_model() -> None:
    fleet = generate_fleet(enterprises=3, vpp_resources=12, seed=3)
    devices = [d for e in fleet.enterprises for s in e.sites for g in s.gateways for d in g.devices]
    resources = [d for d in devices if d.vpp is not None and d.role == "resource"]
    assert {d.type for d in resources} == {"battery", "pv", "ev_charger", "base_station"}
    for d in resources:
        model = resource_model(d)
        assert model is not None
        parsed = ResourceIn.model_validate({"tenant": "t", **model})
        if d.type == "base_station":
            assert parsed.reserved_soc_pct > 0
    assert all(resource_model(d) is None for d in devices if d.role != "resource")
