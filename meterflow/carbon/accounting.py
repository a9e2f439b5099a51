"""An enterprise's emissions for one local day from its boundary (grid) meters' quantities per site:
Scope 1 from fuels, Scope 2 location-based (site province grid factor) and market-based (green
certificates retired day by day, residual factor for the rest). Used by the processor's carbon figures
and by the simulator's ground truth alike, so a mismatch between them is a quantity error, never a
difference of method. Methodology: docs/carbon-methodology.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from meterflow.carbon.emissions import EnergyQuantities, emissions_kg
from meterflow.carbon.factors import FactorLibrary

GEC_KWH = 1000

# Canonical register metric -> EnergyQuantities field.
QUANTITY_OF_METRIC = {
    "energy_import_kwh": "electricity_import_kwh",
    "energy_export_kwh": "electricity_export_kwh",
    "gas_nm3": "gas_nm3",
    "heat_gj": "heat_gj",
    "fuel_l": "diesel_l",
}

QUANTITY_FIELDS = ("electricity_import_kwh", "electricity_export_kwh", "gas_nm3", "heat_gj", "diesel_l")
EMISSION_FIELDS = (
    "scope1_kg",
    "scope2_location_kg",
    "scope2_market_kg",
    "co2e_location_kg",
    "co2e_market_kg",
)
# Per carrier; electricity under both Scope 2 methods, the other carriers are the same under both.
CARRIER_FIELDS = (
    "electricity_location_kg",
    "electricity_market_kg",
    "natural_gas_kg",
    "diesel_kg",
    "heat_kg",
)


@dataclass(frozen=True, slots=True)
class CertificateBlock:
    start: date
    end: date
    certificates: int


@dataclass(slots=True)
class _Remaining:
    start: date
    end: date
    left_kwh: float


class CertificateBalance:
    """An enterprise's green certificates (1 GEC = 1,000 kWh), retired against consumption day by day
    in time order within each block's validity, the block that expires first used first."""

    def __init__(self, blocks: list[CertificateBlock]) -> None:
        self._blocks = sorted(
            (_Remaining(b.start, b.end, float(b.certificates * GEC_KWH)) for b in blocks),
            key=lambda block: (block.end, block.start),
        )

    def retire(self, day: date, consumption_kwh: float) -> float:
        """kWh of `day`'s consumption covered by certificates (clamped to the consumption)."""
        wanted = consumption_kwh
        for block in self._blocks:
            if wanted <= 0:
                break
            if block.start <= day < block.end and block.left_kwh > 0:
                used = min(block.left_kwh, wanted)
                block.left_kwh -= used
                wanted -= used
        return consumption_kwh - wanted


def day_emissions(
    tenant: str,
    day: date,
    site_quantities: dict[str, dict[str, float]],
    provinces: dict[str, str | None],
    certificates: CertificateBalance,
    library: FactorLibrary | None = None,
) -> dict[str, Any]:
    """One row: quantities, green-traced kWh, emissions by scope, method and carrier, factor ids.
    Certificates are shared across sites in proportion to their imported electricity. `library`
    defaults to the packaged factor library."""
    day_import = sum(q.get("electricity_import_kwh", 0.0) for q in site_quantities.values())
    green = certificates.retire(day, day_import)
    totals: dict[str, float] = {}
    factor_ids: set[str] = set()
    ids_by_figure: dict[str, set[str]] = {}
    provisional = False
    for site, quantities in site_quantities.items():
        share = quantities.get("electricity_import_kwh", 0.0) / day_import if day_import else 0.0
        result = emissions_kg(
            EnergyQuantities(green_traced_kwh=green * share, **quantities),
            year=day.year,
            province=provinces.get(site),
            library=library,
        )
        provisional |= result.provisional
        location, market = result.location_based, result.market_based
        figures = {
            "scope1_kg": location.by_scope[1],
            "scope2_location_kg": location.by_scope[2],
            "scope2_market_kg": market.by_scope[2],
        }
        by_carrier = {
            "electricity_location_kg": location.by_carrier["electricity"].co2e_kg,
            "electricity_market_kg": market.by_carrier["electricity"].co2e_kg,
            "natural_gas_kg": location.by_carrier["natural_gas"].co2e_kg,
            "diesel_kg": location.by_carrier["diesel"].co2e_kg,
            "heat_kg": location.by_carrier["heat"].co2e_kg,
        }
        for name, kg in by_carrier.items():
            totals[name] = totals.get(name, 0.0) + kg
        for name, figure in figures.items():
            totals[name] = totals.get(name, 0.0) + figure.co2e_kg
            factor_ids.update(figure.factor_ids)
            ids_by_figure.setdefault(name, set()).update(figure.factor_ids)
        totals["co2e_location_kg"] = totals.get("co2e_location_kg", 0.0) + location.co2e_kg
        totals["co2e_market_kg"] = totals.get("co2e_market_kg", 0.0) + market.co2e_kg
        for name, quantity in quantities.items():
            totals[name] = totals.get(name, 0.0) + quantity
    row: dict[str, Any] = {"tenant": tenant, "day": day}
    for name in QUANTITY_FIELDS:
        row[name] = round(totals.get(name, 0.0), 6)
    row["green_traced_kwh"] = round(green, 6)
    for name in (*EMISSION_FIELDS, *CARRIER_FIELDS):
        row[name] = round(totals.get(name, 0.0), 3)
    row["provisional"] = provisional
    row["factor_ids"] = ",".join(sorted(factor_ids))
    for name in ("scope1_kg", "scope2_location_kg", "scope2_market_kg"):
        row[name.removesuffix("_kg") + "_factor_ids"] = ",".join(sorted(ids_by_figure.get(name, ())))
    return row
