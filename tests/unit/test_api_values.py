"""Registry and submitted values as an attacker sends them: subnormals, 1e308, booleans and strings for
numbers are refused by the models; grading never divides by (almost) zero (issue 13, findings 5 and 6)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, ValidationError

from api.grading import Peer, grade, intensity, load_schemes
from api.models import (
    DeviceIn,
    Enterprise,
    EnterpriseIn,
    GreenCertificateIn,
    MeterExchangeIn,
    MultiplierIn,
    OutputValue,
    OutputValueIn,
    SiteIn,
)
from api.routes.dr import DrEventIn
from api.routes.vpp import ResourceIn

ZJ = "zhejiang-carbon-efficiency"
NOW = datetime(2026, 1, 1, tzinfo=UTC)

BASE: dict[type[BaseModel], dict[str, Any]] = {
    OutputValueIn: {"period_start": "2026-01-01", "period_end": "2027-01-01"},
    EnterpriseIn: {"tenant": "acme", "name": "Acme"},
    SiteIn: {"tenant": "acme", "site": "s1", "name": "Plant"},
    DeviceIn: {"tenant": "acme", "device": "m1"},
    MultiplierIn: {"tenant": "acme", "effective_from": "2026-01-01T00:00:00Z"},
    MeterExchangeIn: {
        "tenant": "acme",
        "metric": "energy_import_kwh",
        "ts": "2026-01-01T00:00:00Z",
        "removal_read": 1.0,
        "install_read": 0.0,
    },
    GreenCertificateIn: {
        "tenant": "acme",
        "certificate": "c1",
        "period_start": "2026-01-01",
        "period_end": "2026-02-01",
        "certificates": 1,
    },
    ResourceIn: {"tenant": "acme", "resource_class": "battery"},
    DrEventIn: {
        "start": "2026-01-01T10:00:00+08:00",
        "end": "2026-01-01T11:00:00+08:00",
        "direction": "up",
        "committed_kw": 100.0,
    },
}

HOSTILE = [5e-324, -5e-324, 2.2250738585072014e-308, 1e308, -1e308, 1.8e19, 1.2e29, "1e309", "true", '"7"']
FIELDS = [
    (OutputValueIn, "value_added_cny"),
    (OutputValueIn, "output_value_cny"),
    (OutputValueIn, "product_quantity"),
    (EnterpriseIn, "annual_output_value_cny"),
    (SiteIn, "floor_area_m2"),
    (DeviceIn, "rated_power_kw"),
    (DeviceIn, "register_max"),
    (DeviceIn, "register_resolution"),
    (DeviceIn, "energy_capacity_kwh"),
    (MultiplierIn, "ct_ratio"),
    (MultiplierIn, "vt_ratio"),
    (MultiplierIn, "meter_constant"),
    (MeterExchangeIn, "removal_read"),
    (MeterExchangeIn, "install_read"),
    (ResourceIn, "rated_power_kw"),
    (ResourceIn, "energy_capacity_kwh"),
    (ResourceIn, "max_shed_min"),
    (DrEventIn, "committed_kw"),
    (DrEventIn, "valid_ratio"),
]


def _json(model: type[BaseModel], field: str, literal: object) -> str:
    body = dict(BASE[model])
    body.pop(field, None)
    head = orjson.dumps(body).decode()[:-1]
    return f'{head}, "{field}": {literal}}}'


@pytest.mark.parametrize(("model", "field"), FIELDS)
@pytest.mark.parametrize("literal", HOSTILE)
def test_absurd_registry_values_are_refused(model: type[BaseModel], field: str, literal: object) -> None:
    if field.endswith("_read") and literal in (5e-324, 2.2250738585072014e-308):
        pytest.skip("a register read of (almost) zero is a real read")
    with pytest.raises(ValidationError):
        model.model_validate_json(_json(model, field, literal))


@pytest.mark.parametrize(("model", "field"), FIELDS)
def test_sane_values_pass(model: type[BaseModel], field: str) -> None:
    model.model_validate_json(_json(model, field, 12.5))
    model.model_validate_json(_json(model, field, 12))  # a JSON integer is a number


@pytest.mark.parametrize(
    ("field", "literal"),
    [("efficiency", "5e-324"), ("efficiency", "true"), ("sheddable_share", "1e308"), ("charge_max_kw", "1e308"),
     ("min_power_kw", "-5e-324"), ("reserved_soc_pct", "1e308"), ("soc_min_pct", "true")],
)  # fmt: skip
def test_resource_models_refuse_absurd_shares_and_powers(field: str, literal: str) -> None:
    with pytest.raises(ValidationError):
        ResourceIn.model_validate_json(_json(ResourceIn, field, literal))


@pytest.mark.parametrize("literal", ["true", "1.5", '"3"', "1e12"])
def test_counts_are_json_integers(literal: str) -> None:
    with pytest.raises(ValidationError):
        GreenCertificateIn.model_validate_json(_json(GreenCertificateIn, "certificates", literal))
    with pytest.raises(ValidationError):
        DeviceIn.model_validate_json(_json(DeviceIn, "telemetry_interval_s", literal))


def test_values_stored_before_the_bounds_stay_readable() -> None:
    """A row written before the bounds existed is still answered (the routes computing with it check it)."""
    Enterprise.model_validate(
        {**BASE[EnterpriseIn], "timezone": "UTC", "annual_output_value_cny": 5e-324, "created_at": NOW}
    )
    OutputValue.model_validate(
        {"period_start": date(2026, 1, 1), "period_end": date(2027, 1, 1), "value_added_cny": 5e-324,
         "output_value_cny": None, "product_quantity": 1e-300, "product_unit": None, "tenant": "acme",
         "created_at": NOW}
    )  # fmt: skip


@pytest.mark.parametrize("value_added", [5e-324, 0.0, -1.0, float("inf"), float("nan")])
def test_intensity_has_no_figure_without_a_positive_finite_value_added(value_added: float) -> None:
    assert intensity(1_000.0, value_added) is None


def test_intensity_of_non_finite_emissions_is_no_figure() -> None:
    assert intensity(float("nan"), 10_000.0) is None
    assert intensity(1e308, 1.0) is None  # 1e308 t per 10^4 CNY x 1e4 overflows


def test_grading_refuses_peers_whose_value_added_is_subnormal() -> None:
    """5e-324 CNY summed over peers divides to inf or by zero: the grade is refused, never a 500."""
    scheme = load_schemes().schemes[ZJ]
    peers = [Peer(f"p{i}", co2e_kg=1_000.0, value_added_cny=5e-324) for i in range(5)]
    g = grade(ZJ, scheme, 1.0, "C33", peers, 5)
    assert g.grade is None and g.k is None and g.refused


def test_grading_refuses_a_k_that_overflows() -> None:
    scheme = load_schemes().schemes[ZJ]
    peers = [Peer(f"p{i}", co2e_kg=1e-300, value_added_cny=1e15) for i in range(5)]
    g = grade(ZJ, scheme, 1e300, "C33", peers, 5)
    assert g.grade is None and g.k is None and g.refused
