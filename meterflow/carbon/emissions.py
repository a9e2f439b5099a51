"""The reference carbon calculation: energy quantities of one period -> CO2 by scope, carrier and method.

This is the function the simulator's ground truth and the processing tests compare against, so it is
written for obviousness, not speed: plain float arithmetic, one multiplication per carrier.

Rounding: every reported ``co2e_kg`` is rounded to 3 decimals (grams) once, at the end; totals are
rounded from the unrounded parts, so a total can differ from the sum of its rounded parts by at most
0.0005 kg per part.
"""

from __future__ import annotations

import functools
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field

from meterflow.carbon.factors import Carrier, FactorLibrary, FactorSelection, Scope, load

_KG_DECIMALS: Final = 3
_SCOPES: Final[tuple[Scope, ...]] = (1, 2)

Quantity = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EnergyQuantities(_Frozen):
    """Energy use of one site or enterprise over one period, in the wire contract's units."""

    electricity_import_kwh: Quantity = 0.0  # energy_import_kwh
    # Green certificates (GEC, 1 certificate = 1,000 kWh) or green-power trading retired against this
    # period, in kWh.
    green_traced_kwh: Quantity = 0.0
    # energy_export_kwh: reported alongside, never netted against the import (GHG Protocol Scope 2 is
    # gross purchased electricity; surplus exported to the grid is not credited).
    electricity_export_kwh: Quantity = 0.0
    gas_nm3: Quantity = 0.0  # gas_nm3
    diesel_l: Quantity = 0.0  # fuel_l
    heat_gj: Quantity = 0.0  # heat_gj


class Figure(_Frozen):
    """An amount of CO2 and the ids of the factors it was computed with, for citation."""

    co2e_kg: float
    factor_ids: tuple[str, ...]


class Accounting(_Frozen):
    """The whole inventory under one Scope 2 method; Scope 1 is the same under both."""

    co2e_kg: float
    by_scope: dict[Scope, Figure]
    by_carrier: dict[Carrier, Figure]


class EmissionsResult(_Frozen):
    year: int
    province: str | None
    # Scope 1 + location-based Scope 2: the figure every company reports (GHG Protocol dual reporting)
    # and the one the Chinese guidelines compute with grid averages.
    co2e_kg: float
    location_based: Accounting
    market_based: Accounting
    green_traced_kwh_applied: float  # the green kWh after clamping to the import
    electricity_export_kwh: float  # reported separately, not credited
    # Some factor stands in for a year not yet published (or is preliminary): recompute later.
    provisional: bool


@functools.cache
def _packaged_library() -> FactorLibrary:
    # Parsed once per process: callers compute per interval.
    return load()


def _kg(value: float) -> float:
    return round(value, _KG_DECIMALS)


def _accounting(lines: dict[Carrier, tuple[float, FactorSelection]]) -> Accounting:
    """Multiply each carrier's quantity by its factor, then sum by scope and in total."""
    kg = {carrier: quantity * sel.factor.value for carrier, (quantity, sel) in lines.items()}

    # model_construct: every value here is computed from validated inputs, and validating them again
    # was most of the cost of a query-time carbon figure.
    def figure(carriers: list[Carrier]) -> Figure:
        return Figure.model_construct(
            co2e_kg=_kg(sum(kg[c] for c in carriers)),
            factor_ids=tuple(lines[c][1].factor_id for c in carriers),
        )

    return Accounting.model_construct(
        co2e_kg=_kg(sum(kg.values())),
        by_scope={
            scope: figure([c for c in lines if lines[c][1].factor.scope == scope]) for scope in _SCOPES
        },
        by_carrier={c: figure([c]) for c in lines},
    )


def emissions_kg(
    quantities: EnergyQuantities,
    *,
    year: int,
    province: str | None,
    library: FactorLibrary | None = None,
) -> EmissionsResult:
    """CO2 of one period's energy use under both Scope 2 methods, with the factor ids used.

    ``year`` is the data year of the period and ``province`` (pinyin id, None for national factors)
    where the electricity is consumed; factors are chosen by ``FactorLibrary.electricity`` and
    ``FactorLibrary.fuel``. ``library`` defaults to the packaged one.
    """
    lib = library if library is not None else _packaged_library()
    location = lib.electricity("location_based", year, province)
    residual = lib.electricity("market_residual", year, province)
    fuels: dict[Carrier, tuple[float, FactorSelection]] = {
        "natural_gas": (quantities.gas_nm3, lib.fuel("natural_gas")),
        "diesel": (quantities.diesel_l, lib.fuel("diesel")),
        "heat": (quantities.heat_gj, lib.fuel("heat")),
    }

    imported = quantities.electricity_import_kwh
    # Green kWh count at zero emissions, but never more of them than were consumed: the market-based
    # figure cannot go negative (domain notes §1.5).
    green = min(quantities.green_traced_kwh, imported)
    location_based = _accounting({"electricity": (imported, location), **fuels})
    market_based = _accounting({"electricity": (imported - green, residual), **fuels})

    selections = [location, residual, *(sel for _, sel in fuels.values())]
    return EmissionsResult.model_construct(
        year=year,
        province=province,
        co2e_kg=location_based.co2e_kg,
        location_based=location_based,
        market_based=market_based,
        green_traced_kwh_applied=green,
        electricity_export_kwh=quantities.electricity_export_kwh,
        provisional=any(sel.provisional for sel in selections),
    )
