from __future__ import annotations

from simulators.fleet import Fleet, gateway_batch


def make() -> Fleet:
    return Fleet.create(tenant="t", gateway="g", site="s", n_devices=5, seed=7)


def test_same_seed_same_readings() -> None:
    a, b = make(), make()
    for step in range(10):
        assert a.step(step * 60_000, 60) == b.step(step * 60_000, 60)


def test_register_advance_equals_integrated_power() -> None:
    fleet = make()
    first = fleet.step(0, 60)
    second = fleet.step(60_000, 60)
    for device, readings in first.items():
        values = {r.metric: r.value for r in readings}
        advance = {r.metric: r.value for r in second[device]}["energy_import_kwh"] - values[
            "energy_import_kwh"
        ]
        assert abs(advance - values["power_kw"] * 60 / 3600) < 1e-6


def test_gateway_batch_groups_metrics_by_timestamp() -> None:
    batch = gateway_batch(make().step(0, 60))
    point = batch["m-0000"][0]
    assert point["ts"] == 0
    values = point["values"]
    assert isinstance(values, dict) and set(values) == {"energy_import_kwh", "power_kw"}
