from __future__ import annotations

import copy
import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from meterflow.carbon import (
    NATIONAL,
    ElectricityKind,
    EnergyQuantities,
    FactorLibrary,
    FuelCarrier,
    emissions_kg,
    load,
)
from meterflow.carbon.factors import GasInputs, LiquidInputs

# The 2022 provincial values the press confirms (domain notes §1.3: top and bottom five).
PRESS_CONFIRMED_2022 = {
    "hebei": 0.7252,
    "shanxi": 0.7096,
    "tianjin": 0.7041,
    "neimenggu": 0.6849,
    "anhui": 0.6782,
    "fujian": 0.4092,
    "guangxi": 0.4044,
    "qinghai": 0.1567,
    "sichuan": 0.1404,
    "yunnan": 0.1073,
}


@pytest.fixture(scope="module")
def lib() -> FactorLibrary:
    return load()


@pytest.fixture
def raw() -> dict[str, Any]:
    text = importlib.resources.files("meterflow.carbon").joinpath("factors.yaml").read_text("utf-8")
    doc: dict[str, Any] = yaml.safe_load(text)
    return doc


def _factor(doc: dict[str, Any], factor_id: str) -> dict[str, Any]:
    return next(f for f in doc["factors"] if f["id"] == factor_id)


# --- the library -------------------------------------------------------------------------------


def test_packaged_library_loads_with_every_seed(lib: FactorLibrary) -> None:
    electricity = [f for f in lib.factors if f.carrier == "electricity"]
    provinces = [f for f in electricity if f.region not in (NATIONAL, *lib.grid_regions.regions)]
    regions = [f for f in electricity if f.region in lib.grid_regions.regions]
    assert len(provinces) == 30 * 2  # 2021 and 2022, Xizang missing from the table
    assert {f.year for f in provinces} == {2021, 2022}
    assert len(regions) == 7 * 3
    assert sum(len(r.provinces) for r in lib.grid_regions.regions.values()) == 31
    assert lib.region_of("xizang") == "southwest-china"


@pytest.mark.parametrize(
    ("factor_id", "value"),
    [
        ("cn-mee-nbs-2021-avg-national", 0.5568),
        ("cn-mee-nbs-2022-avg-national", 0.5366),
        ("cn-mee-nbs-2023-avg-national", 0.5306),
        ("cn-mee-nbs-2022-residual-national", 0.5856),
        ("cn-mee-nbs-2023-residual-national", 0.6096),
        ("cn-mee-nbs-2021-fossil-national", 0.8426),
        ("cn-mee-nbs-2022-fossil-national", 0.8325),
        ("cn-mee-nbs-2023-fossil-national", 0.8273),
        ("cn-mee-nbs-2021-avg-region-north-china", 0.7120),
        ("cn-mee-nbs-2022-avg-region-east-china", 0.5617),
        ("cn-mee-nbs-2023-avg-region-southwest-china", 0.2472),
        ("cn-mee-nbs-2021-avg-province-zhejiang", 0.5422),
        ("cn-mee-nbs-2022-avg-province-zhejiang", 0.5153),
        ("cn-mee-nbs-2022-avg-province-guangdong", 0.4403),
        ("cn-mee-carbon-market-2022", 0.5703),
        ("cn-gbt32150-purchased-heat", 110.0),  # 0.11 tCO2/GJ
    ],
)
def test_seed_values_are_the_notes_values(lib: FactorLibrary, factor_id: str, value: float) -> None:
    assert lib.get(factor_id).value == value


def test_status_follows_the_evidence(lib: FactorLibrary) -> None:
    for f in lib.factors:
        if f.carrier != "electricity" or f.region in (NATIONAL, *lib.grid_regions.regions):
            continue
        confirmed = f.year == 2022 and f.region in PRESS_CONFIRMED_2022
        assert f.status == ("final" if confirmed else "unverified"), f.id
        if confirmed:
            assert f.value == PRESS_CONFIRMED_2022[f.region]
    assert all(
        lib.get(f"cn-mee-nbs-2021-avg-region-{r}").status == "unverified" for r in lib.grid_regions.regions
    )
    assert lib.get("cn-mee-nbs-2023-avg-national").status == "final"
    assert lib.get("cn-guideline-diesel").status == "unverified"  # 3rd-party code, density assumed


def test_every_factor_cites_a_bibliography_source(lib: FactorLibrary) -> None:
    bibliography = set(lib.sources.values())
    assert all(set(f.sources) <= bibliography for f in lib.factors)


def test_methodology_lists_every_factor_with_its_value(lib: FactorLibrary) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "carbon-methodology.md").read_text(encoding="utf-8")
    for f in lib.factors:
        assert f"| `{f.id}` | {f.value:g} | {f.unit} |" in doc, f.id


def test_load_reads_a_given_path(raw: dict[str, Any], tmp_path: Path) -> None:
    raw["version"] = 2
    path = tmp_path / "factors.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    assert load(path).version == 2


def _set(factor_id: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        _factor(doc, factor_id).update(changes)

    return mutate


def _duplicate(factor_id: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["factors"].append(copy.deepcopy(_factor(doc, factor_id)) | changes)

    return mutate


def _move_province(doc: dict[str, Any]) -> None:
    doc["grid_regions"]["regions"]["east-china"]["provinces"]["guangdong"] = "广东"


def _gas_default_is_diesel(doc: dict[str, Any]) -> None:
    doc["fuel_defaults"]["natural_gas"] = "cn-guideline-diesel"


def _no_heat_default(doc: dict[str, Any]) -> None:
    del doc["fuel_defaults"]["heat"]


def _gas_inputs_off_by_one_percent(doc: dict[str, Any]) -> None:
    _factor(doc, "cn-guideline-natural-gas")["inputs"]["oxidation_fraction"] = 0.98


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_duplicate("cn-mee-nbs-2022-avg-national"), "duplicate factor id"),
        (_duplicate("cn-mee-nbs-2022-avg-national", id="x-2022-national"), "same kind, region and year"),
        (_set("cn-mee-nbs-2022-avg-national", unit="kgCO2/MWh"), "in kgCO2/kWh"),
        (_set("cn-gbt32150-purchased-heat", scope=1), "heat is scope 2"),
        (_set("cn-mee-carbon-market-2022", kind="fuel_combustion"), "does not apply"),
        (_set("cn-mee-nbs-2022-avg-national", region="atlantis"), "unknown region"),
        (_set("cn-mee-nbs-2022-avg-national", year=None), "needs its data year"),
        (_set("cn-guideline-diesel", inputs=None), "carry their inputs"),
        (_set("cn-guideline-diesel", value=2.62), "its inputs give"),  # 0.7 % off
        (_gas_inputs_off_by_one_percent, "its inputs give"),
        (_set("cn-gbt32150-purchased-heat", region="zhejiang"), "are national"),
        (_move_province, "is in"),
        (_gas_default_is_diesel, "fuel default"),
        (_no_heat_default, r"no fuel default for \['heat'\]"),
    ],
)
def test_inconsistent_libraries_are_refused(
    raw: dict[str, Any], mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    mutate(raw)
    with pytest.raises(ValidationError, match=message):
        FactorLibrary.model_validate(raw)


# --- the selection rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "year", "province", "factor_id", "provisional"),
    [
        # The province's own factor for the year.
        ("location_based", 2022, "zhejiang", "cn-mee-nbs-2022-avg-province-zhejiang", False),
        ("location_based", 2021, "guangdong", "cn-mee-nbs-2021-avg-province-guangdong", False),
        # The province's latest earlier year stands in, even where a region has the year: recomputed
        # once the province's 2023 factor is added.
        ("location_based", 2023, "zhejiang", "cn-mee-nbs-2022-avg-province-zhejiang", True),
        ("location_based", 2026, "zhejiang", "cn-mee-nbs-2022-avg-province-zhejiang", True),
        # Xizang has no provincial factor: its grid region.
        ("location_based", 2023, "xizang", "cn-mee-nbs-2023-avg-region-southwest-china", False),
        ("location_based", 2025, "xizang", "cn-mee-nbs-2023-avg-region-southwest-china", True),
        # No province: national.
        ("location_based", 2022, None, "cn-mee-nbs-2022-avg-national", False),
        ("location_based", 2024, None, "cn-mee-nbs-2023-avg-national", True),
        # The residual mix is national only.
        ("market_residual", 2023, "zhejiang", "cn-mee-nbs-2023-residual-national", False),
        ("market_residual", 2025, "guangdong", "cn-mee-nbs-2023-residual-national", True),
        # No residual mix for 2021: the grid average (GHG Protocol hierarchy).
        ("market_residual", 2021, None, "cn-mee-nbs-2021-avg-national", False),
        ("market_residual", 2021, "xizang", "cn-mee-nbs-2021-avg-region-southwest-china", False),
    ],
)
def test_electricity_selection(
    lib: FactorLibrary,
    kind: ElectricityKind,
    year: int,
    province: str | None,
    factor_id: str,
    provisional: bool,
) -> None:
    selection = lib.electricity(kind, year, province)
    assert (selection.factor_id, selection.provisional) == (factor_id, provisional)


def test_publisher_preliminary_factor_is_provisional_even_for_its_own_year(raw: dict[str, Any]) -> None:
    _factor(raw, "cn-mee-nbs-2023-avg-national")["status"] = "provisional"
    selection = FactorLibrary.model_validate(raw).electricity("location_based", 2023, None)
    assert selection.factor_id == "cn-mee-nbs-2023-avg-national" and selection.provisional


def test_selection_refuses_unknown_province_and_years_before_any_factor(lib: FactorLibrary) -> None:
    with pytest.raises(ValueError, match="unknown province 'Zhejiang'"):
        lib.electricity("location_based", 2022, "Zhejiang")
    with pytest.raises(LookupError, match="2020"):
        lib.electricity("location_based", 2020, "zhejiang")
    with pytest.raises(LookupError, match="2020"):
        lib.electricity("market_residual", 2020, None)
    with pytest.raises(KeyError):
        lib.get("no-such-factor")


# --- fuel derivations --------------------------------------------------------------------------


def test_fuel_defaults(lib: FactorLibrary) -> None:
    carriers: tuple[FuelCarrier, ...] = ("natural_gas", "diesel", "heat")
    ids = {carrier: lib.fuel(carrier).factor_id for carrier in carriers}
    assert ids == {
        "natural_gas": "cn-guideline-natural-gas",
        "diesel": "cn-guideline-diesel",
        "heat": "cn-gbt32150-purchased-heat",
    }
    assert not any(lib.fuel(carrier).provisional for carrier in carriers)


def test_fuel_inputs_reproduce_the_notes_computed_values(lib: FactorLibrary) -> None:
    gas = lib.get("cn-guideline-natural-gas").inputs
    assert isinstance(gas, GasInputs)
    # 389.31 GJ/10^4 Nm3 x 0.01532 tC/GJ x 0.99 x 44/12 = 21.65 tCO2/10^4 Nm3 = 2.165 kgCO2/Nm3
    assert round(gas.derived_value(), 3) == 2.165
    gbt = lib.get("cn-gbt32151-natural-gas").inputs
    assert isinstance(gbt, GasInputs)
    assert round(gbt.derived_value(), 3) == 2.162  # with CC 0.0153

    diesel = lib.get("cn-guideline-diesel").inputs
    assert isinstance(diesel, LiquidInputs)
    # 42.652 GJ/t x 0.0202 tC/GJ x 0.98 x 44/12 = 3.096 tCO2/t; at 0.84 kg/L about 2.60 kgCO2/L
    assert round(diesel.tco2_per_t(), 3) == 3.096
    assert round(diesel.derived_value(), 2) == 2.60
    assert diesel.density_kg_per_l == 0.84


# --- the reference calculation -----------------------------------------------------------------


def test_worked_example_zhejiang_2022(lib: FactorLibrary) -> None:
    q = EnergyQuantities(
        electricity_import_kwh=10_000,
        green_traced_kwh=4_000,
        electricity_export_kwh=2_000,
        gas_nm3=1_000,
        diesel_l=100,
        heat_gj=50,
    )
    r = emissions_kg(q, year=2022, province="zhejiang", library=lib)

    lb, mb = r.location_based, r.market_based
    assert lb.by_carrier["electricity"].co2e_kg == 5153.0  # 10,000 kWh x 0.5153
    assert mb.by_carrier["electricity"].co2e_kg == 3513.6  # (10,000 - 4,000) kWh x 0.5856
    assert lb.by_carrier["natural_gas"].co2e_kg == 2165.0  # 1,000 Nm3 x 2.165
    assert lb.by_carrier["diesel"].co2e_kg == 260.1  # 100 L x 2.601
    assert lb.by_carrier["heat"].co2e_kg == 5500.0  # 50 GJ x 110
    assert lb.by_scope[1].co2e_kg == mb.by_scope[1].co2e_kg == 2425.1
    assert (lb.by_scope[2].co2e_kg, mb.by_scope[2].co2e_kg) == (10653.0, 9013.6)
    assert (r.co2e_kg, lb.co2e_kg, mb.co2e_kg) == (13078.1, 13078.1, 11438.7)

    assert lb.by_carrier["electricity"].factor_ids == ("cn-mee-nbs-2022-avg-province-zhejiang",)
    assert mb.by_carrier["electricity"].factor_ids == ("cn-mee-nbs-2022-residual-national",)
    assert lb.by_scope[1].factor_ids == ("cn-guideline-natural-gas", "cn-guideline-diesel")
    assert mb.by_scope[2].factor_ids == ("cn-mee-nbs-2022-residual-national", "cn-gbt32150-purchased-heat")
    assert (r.green_traced_kwh_applied, r.electricity_export_kwh, r.provisional) == (4000.0, 2000.0, False)


def test_green_traced_beyond_import_clamps_market_based_to_zero(lib: FactorLibrary) -> None:
    q = EnergyQuantities(electricity_import_kwh=1_000, green_traced_kwh=5_000)
    r = emissions_kg(q, year=2023, province=None, library=lib)
    assert r.market_based.by_carrier["electricity"].co2e_kg == 0.0
    assert r.green_traced_kwh_applied == 1_000
    assert r.location_based.by_carrier["electricity"].co2e_kg == 530.6  # certificates never lower it


def test_exported_energy_is_not_credited(lib: FactorLibrary) -> None:
    base = EnergyQuantities(electricity_import_kwh=1_000)
    exporting = EnergyQuantities(electricity_import_kwh=1_000, electricity_export_kwh=800)
    a = emissions_kg(base, year=2023, province="guangdong", library=lib)
    b = emissions_kg(exporting, year=2023, province="guangdong", library=lib)
    assert b.location_based == a.location_based and b.market_based == a.market_based
    assert b.electricity_export_kwh == 800


def test_stand_in_factors_make_the_result_provisional() -> None:
    r = emissions_kg(EnergyQuantities(electricity_import_kwh=1_000), year=2025, province="xizang")
    assert r.provisional
    assert r.location_based.by_carrier["electricity"].factor_ids == (
        "cn-mee-nbs-2023-avg-region-southwest-china",
    )
    assert r.location_based.by_carrier["electricity"].co2e_kg == 247.2


def test_market_based_without_residual_mix_uses_grid_average(lib: FactorLibrary) -> None:
    q = EnergyQuantities(electricity_import_kwh=1_000, green_traced_kwh=250)
    r = emissions_kg(q, year=2021, province=None, library=lib)
    assert r.market_based.by_carrier["electricity"].factor_ids == ("cn-mee-nbs-2021-avg-national",)
    assert r.market_based.by_carrier["electricity"].co2e_kg == 417.6  # 750 kWh x 0.5568


def test_figures_are_rounded_to_grams(lib: FactorLibrary) -> None:
    r = emissions_kg(EnergyQuantities(gas_nm3=0.123456), year=2022, province=None, library=lib)
    assert r.location_based.by_carrier["natural_gas"].co2e_kg == 0.267  # 0.26728...


@pytest.mark.parametrize("field", ["electricity_import_kwh", "green_traced_kwh", "gas_nm3", "heat_gj"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_quantities_must_be_finite_and_non_negative(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        EnergyQuantities.model_validate({field: value})
