"""Carbon accounting shared by every stage: the emission-factor library and the reference calculation.

Methodology: docs/carbon-methodology.md. Nothing here does I/O except ``load()``.
"""

from meterflow.carbon.emissions import (
    Accounting,
    EmissionsResult,
    EnergyQuantities,
    Figure,
    emissions_kg,
)
from meterflow.carbon.factors import (
    NATIONAL,
    Carrier,
    ElectricityKind,
    EmissionFactor,
    FactorLibrary,
    FactorSelection,
    FuelCarrier,
    Kind,
    Scope,
    Source,
    Status,
    load,
)

__all__ = [
    "NATIONAL",
    "Accounting",
    "Carrier",
    "ElectricityKind",
    "EmissionFactor",
    "EmissionsResult",
    "EnergyQuantities",
    "FactorLibrary",
    "FactorSelection",
    "Figure",
    "FuelCarrier",
    "Kind",
    "Scope",
    "Source",
    "Status",
    "emissions_kg",
    "load",
]
