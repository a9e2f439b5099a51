"""The emission-factor library (factors.yaml) and the rule that picks a factor for a carrier, year and place.

Each factor carries its provenance (sources, status, publication date), so a carbon figure can cite the
factor id it was computed with. The method behind the numbers is in docs/carbon-methodology.md.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Annotated, ClassVar, Final, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

Carrier = Literal["electricity", "natural_gas", "diesel", "heat"]
FuelCarrier = Literal["natural_gas", "diesel", "heat"]
Scope = Literal[1, 2]
Kind = Literal[
    "location_based",  # grid average (national, grid region or province)
    "market_residual",  # national average excluding market-traded non-fossil electricity
    "fossil_only",  # national fossil-only average, for reference
    "carbon_market",  # the power-sector ETS reporting factor, for reference
    "fuel_combustion",
    "purchased_heat",
]
ElectricityKind = Literal["location_based", "market_residual"]
Status = Literal["final", "provisional", "unverified"]

NATIONAL: Final = "national"

# tCO2 per tC, the ratio of the molar masses of CO2 and C in the guideline formula.
CO2_PER_C: Final = 44 / 12

# How far a fuel factor's stored value may stray from the value its inputs give (rounding of the store).
_DERIVATION_TOLERANCE: Final = 0.005

# Per carrier: the only unit its factors may use, its GHG Protocol scope and the kinds it may have.
_CARRIER_RULES: Final[dict[str, tuple[str, int, frozenset[str]]]] = {
    "electricity": (
        "kgCO2/kWh",
        2,
        frozenset({"location_based", "market_residual", "fossil_only", "carbon_market"}),
    ),
    "natural_gas": ("kgCO2/Nm3", 1, frozenset({"fuel_combustion"})),
    "diesel": ("kgCO2/L", 1, frozenset({"fuel_combustion"})),
    "heat": ("kgCO2/GJ", 2, frozenset({"purchased_heat"})),
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Source(_Frozen):
    title: str
    url: str | None  # None for third-party code the domain notes cite without an address
    evidence: Literal["official", "press", "paper", "3rd-party-code"]


class _FuelInputs(_Frozen):
    """Guideline inputs of ``EF = NCV * CC * OF * 44/12`` (GB/T 32150/32151, NDRC guidelines)."""

    ncv: float = Field(gt=0)
    carbon_content_tc_per_gj: float = Field(gt=0)
    oxidation_fraction: float = Field(gt=0, le=1)

    def _tco2_per_ncv_basis(self) -> float:
        return self.ncv * self.carbon_content_tc_per_gj * self.oxidation_fraction * CO2_PER_C


class GasInputs(_FuelInputs):
    factor_unit: ClassVar[str] = "kgCO2/Nm3"
    # The guideline tables give gas NCV per 10^4 Nm3.
    ncv_unit: Literal["GJ/10^4 Nm3"]

    def derived_value(self) -> float:
        """kgCO2 per Nm3: tCO2 per 10^4 Nm3 * 1000 kg/t / 10^4."""
        return self._tco2_per_ncv_basis() * 1000 / 10_000


class LiquidInputs(_FuelInputs):
    factor_unit: ClassVar[str] = "kgCO2/L"
    ncv_unit: Literal["GJ/t"]
    # Liquid fuel is metered in litres but the guideline tables are per tonne.
    density_kg_per_l: float = Field(gt=0)

    def tco2_per_t(self) -> float:
        return self._tco2_per_ncv_basis()

    def derived_value(self) -> float:
        """kgCO2 per litre: tCO2/t is kgCO2/kg, times kg/L."""
        return self.tco2_per_t() * self.density_kg_per_l


FuelInputs = Annotated[GasInputs | LiquidInputs, Field(discriminator="ncv_unit")]


class EmissionFactor(_Frozen):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    carrier: Carrier
    scope: Scope
    kind: Kind
    # The data year the factor describes; None for fuel and heat defaults, which describe no year.
    year: int | None
    # "national", a grid-region id or a province id (pinyin) of FactorLibrary.grid_regions.
    region: str
    value: float = Field(gt=0)
    unit: str
    # ISO date, or only year and month when the press gives no day.
    published: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}(-\d{2})?$")
    status: Status
    sources: tuple[Source, ...] = Field(min_length=1)
    inputs: FuelInputs | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EmissionFactor:
        unit, scope, kinds = _CARRIER_RULES[self.carrier]
        if self.unit != unit:
            raise ValueError(f"{self.id}: a {self.carrier} factor is in {unit}, not {self.unit}")
        if self.scope != scope:
            raise ValueError(f"{self.id}: {self.carrier} is scope {scope}, not {self.scope}")
        if self.kind not in kinds:
            raise ValueError(f"{self.id}: kind {self.kind} does not apply to {self.carrier}")
        if (self.kind == "fuel_combustion") != (self.inputs is not None):
            raise ValueError(f"{self.id}: fuel-combustion factors, and only they, carry their inputs")
        if self.inputs is not None:
            if self.inputs.factor_unit != self.unit:
                raise ValueError(f"{self.id}: inputs give {self.inputs.factor_unit}, factor is {self.unit}")
            derived = self.inputs.derived_value()
            if abs(self.value - derived) > _DERIVATION_TOLERANCE * derived:
                raise ValueError(f"{self.id}: value {self.value} but its inputs give {derived:.4f}")
        return self


class FactorSelection(_Frozen):
    """A factor chosen for a request, with what a report must say about it."""

    factor: EmissionFactor
    # True when the figure must be recomputed later: the factor is from a year before the requested
    # one (the requested year is not published yet) or the publisher marked it preliminary.
    provisional: bool

    @property
    def factor_id(self) -> str:
        return self.factor.id


class GridRegion(_Frozen):
    name_zh: str
    name_en: str
    provinces: dict[str, str]  # pinyin id -> Chinese name


class GridRegions(_Frozen):
    status: Status
    note: str
    regions: dict[str, GridRegion]


class FactorLibrary(_Frozen):
    version: int = Field(ge=1)
    sources: dict[str, Source]  # the bibliography the factors' sources are drawn from
    fuel_defaults: dict[FuelCarrier, str]
    grid_regions: GridRegions
    factors: tuple[EmissionFactor, ...]

    _by_id: dict[str, EmissionFactor] = PrivateAttr()
    _region_of: dict[str, str] = PrivateAttr()
    # (kind, region) -> data year -> factor, for the electricity selection rule.
    _electricity: dict[tuple[str, str], dict[int, EmissionFactor]] = PrivateAttr()
    _selections: dict[tuple[str, int, str | None], FactorSelection] = PrivateAttr(default_factory=dict)
    _fuel_selections: dict[str, FactorSelection] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _index(self) -> FactorLibrary:
        region_of: dict[str, str] = {}
        for region_id, region in self.grid_regions.regions.items():
            for province in region.provinces:
                if province in region_of:
                    raise ValueError(f"province {province} is in {region_of[province]} and {region_id}")
                region_of[province] = region_id
        places = {NATIONAL, *self.grid_regions.regions, *region_of}

        by_id: dict[str, EmissionFactor] = {}
        electricity: dict[tuple[str, str], dict[int, EmissionFactor]] = {}
        for f in self.factors:
            if f.id in by_id:
                raise ValueError(f"duplicate factor id {f.id}")
            by_id[f.id] = f
            if f.region not in places:
                raise ValueError(f"{f.id}: unknown region {f.region}")
            if f.carrier != "electricity":
                if f.region != NATIONAL:
                    raise ValueError(f"{f.id}: fuel and heat defaults are national")
                continue
            if f.year is None:
                raise ValueError(f"{f.id}: an electricity factor needs its data year")
            years = electricity.setdefault((f.kind, f.region), {})
            if f.year in years:
                # Two factors for one slot would make the selection rule ambiguous.
                raise ValueError(f"{f.id} and {years[f.year].id}: same kind, region and year")
            years[f.year] = f

        missing = set(get_args(FuelCarrier)) - set(self.fuel_defaults)
        if missing:
            raise ValueError(f"no fuel default for {sorted(missing)}")
        for carrier, factor_id in self.fuel_defaults.items():
            default = by_id.get(factor_id)
            if default is None or default.carrier != carrier:
                raise ValueError(f"fuel default for {carrier} must be a {carrier} factor, not {factor_id}")

        self._by_id = by_id
        self._region_of = region_of
        self._electricity = electricity
        return self

    def get(self, factor_id: str) -> EmissionFactor:
        """The factor with this id; KeyError when there is none."""
        return self._by_id[factor_id]

    def region_of(self, province: str) -> str:
        """The grid region of a province; ValueError for an unknown province."""
        try:
            return self._region_of[province]
        except KeyError:
            raise ValueError(f"unknown province {province!r}; known: {sorted(self._region_of)}") from None

    def electricity(self, kind: ElectricityKind, year: int, province: str | None) -> FactorSelection:
        """See `_electricity_selection`; memoised per library, since carbon is computed per site and day."""
        key = (kind, year, province)
        selection = self._selections.get(key)
        if selection is None:
            selection = self._selections[key] = self._electricity_selection(kind, year, province)
        return selection

    def _electricity_selection(
        self, kind: ElectricityKind, year: int, province: str | None
    ) -> FactorSelection:
        """The electricity factor meterflow uses for consumption in ``year`` in ``province``.

        Places are tried from the most specific: the province, its grid region, then national. The first
        place that has a factor for ``year`` or earlier wins; there the factor for ``year`` is taken if
        published, otherwise the latest earlier year, flagged provisional (MEE publishes a year's factors
        one to two years later; real-time accounting uses the latest published year and recomputes).
        A residual factor that does not exist for ``year`` or earlier falls back to the grid average
        (GHG Protocol Scope 2 Guidance table 6.3: the grid average when no residual mix exists).
        """
        places = [NATIONAL] if province is None else [province, self.region_of(province), NATIONAL]
        for place in places:
            by_year = self._electricity.get((kind, place), {})
            published = [y for y in by_year if y <= year]
            if published:
                factor = by_year[max(published)]
                stand_in = max(published) < year
                return FactorSelection(factor=factor, provisional=stand_in or factor.status == "provisional")
        if kind == "market_residual":
            return self._electricity_selection("location_based", year, province)
        raise LookupError(f"no {kind} electricity factor for {year} or earlier")

    def fuel(self, carrier: FuelCarrier) -> FactorSelection:
        """The default factor for natural gas, diesel or purchased heat (not tied to a data year)."""
        selection = self._fuel_selections.get(carrier)
        if selection is None:
            factor = self.get(self.fuel_defaults[carrier])
            selection = FactorSelection(factor=factor, provisional=factor.status == "provisional")
            self._fuel_selections[carrier] = selection
        return selection


def load(path: Path | None = None) -> FactorLibrary:
    """Read and validate a factor library; by default the one packaged with meterflow."""
    if path is None:
        text = importlib.resources.files("meterflow.carbon").joinpath("factors.yaml").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return FactorLibrary.model_validate(yaml.safe_load(text))
