"""Carbon-efficiency grading schemes as data, and grading an enterprise against its industry.

Zhejiang-style (domain notes §3.1): L = tCO2 / 10,000 CNY of value added; the level is L's band across
all industry, the grade is the band of K = L / L_industry_average. The industry average is the peers'
total emissions over their total value added (a ratio of sums: averaging the peers' ratios would let a
small enterprise weigh as much as a large one). No I/O except `load_schemes`.
"""

from __future__ import annotations

import importlib.resources
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.models import Grade


class _Band(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    upto: float | None


class LevelBand(_Band):
    label: str


class GradeBand(_Band):
    grade: int


def _ordered(bands: list[LevelBand] | list[GradeBand]) -> None:
    limits = [b.upto for b in bands]
    if limits[-1] is not None or any(u is None for u in limits[:-1]):
        raise ValueError("only the last band is open (upto: null)")
    bounded = [u for u in limits if u is not None]
    if bounded != sorted(set(bounded)):
        raise ValueError("band limits must increase")


class Scheme(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    source: str
    metric: Literal["tco2_per_10k_cny_value_added"]
    levels: list[LevelBand] = Field(min_length=1)
    grades: list[GradeBand] = Field(min_length=1)

    @model_validator(mode="after")
    def _bands(self) -> Scheme:
        _ordered(self.levels)
        _ordered(self.grades)
        return self


class Schemes(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schemes: dict[str, Scheme] = Field(min_length=1)


def load_schemes(path: Path | None = None) -> Schemes:
    if path is None:
        text = importlib.resources.files("api").joinpath("data/grading.yaml").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return Schemes.model_validate(yaml.safe_load(text))


B = TypeVar("B", LevelBand, GradeBand)


def _band(bands: list[B], x: float) -> B:
    for band in bands:
        if band.upto is None or x <= band.upto:
            return band
    raise AssertionError("the last band is open")


@dataclass(frozen=True, slots=True)
class Peer:
    tenant: str
    co2e_kg: float
    value_added_cny: float


def intensity(co2e_kg: float, value_added_cny: float) -> float | None:
    """tCO2 per 10,000 CNY; None when there is no finite figure: no positive value added (a subnormal one
    stored before the API bounded it divides to 0 or inf), or emissions that are not finite."""
    if not (math.isfinite(co2e_kg) and math.isfinite(value_added_cny)) or value_added_cny / 10_000 <= 0:
        return None
    result = (co2e_kg / 1000) / (value_added_cny / 10_000)
    return result if math.isfinite(result) else None


def grade(
    scheme_id: str,
    scheme: Scheme,
    l_value: float,
    industry: str | None,
    peers: list[Peer],
    min_peers: int,
) -> Grade:
    """Level from L; grade from K unless the peer set (the enterprise included) is too small."""
    level = _band(scheme.levels, l_value).label
    formula = "L = (scope 1 + scope 2 location-based, t) / (value added / 10,000 CNY); K = L / L_industry"
    refused: str | None = None
    average: float | None = None
    if industry is None:
        refused = "the enterprise has no industry code"
    elif len(peers) < min_peers:
        refused = f"{len(peers)} enterprises of industry {industry} reported value added; at least {min_peers} needed"
    else:
        total_va = sum(p.value_added_cny for p in peers)
        average = intensity(sum(p.co2e_kg for p in peers), total_va)
        if average is None:
            refused = "the industry's figures give no finite average"
    k = l_value / average if refused is None and average is not None and average > 0 else math.nan
    if not math.isfinite(k):
        return Grade(
            scheme=scheme_id,
            scheme_name=scheme.name,
            metric=scheme.metric,
            intensity=l_value,
            level=level,
            label=None,
            grade=None,
            k=None,
            industry=industry,
            industry_average=average,
            peers=len(peers),
            min_peers=min_peers,
            refused=refused or "the industry average is zero",
            formula=formula,
        )
    band = _band(scheme.grades, k)
    return Grade(
        scheme=scheme_id,
        scheme_name=scheme.name,
        metric=scheme.metric,
        intensity=l_value,
        level=level,
        label=f"grade {band.grade}",
        grade=band.grade,
        k=k,
        industry=industry,
        industry_average=average,
        peers=len(peers),
        min_peers=min_peers,
        refused=None,
        formula=formula,
    )
