"""Time-varying grid carbon intensity: estimates from a generation mix, and intensity per interval.

These figures are estimates for load shifting and comparison. Compliance totals use the annual grid
factors of `meterflow.carbon.factors`; nothing here feeds them (docs/carbon-methodology.md, "Estimated
carbon from time-varying grid intensity").

A zone's points form a step function: a point's value holds from its ``ts`` for ``duration_s`` or until
the next point starts, whichever is first. Time not covered by any point has no intensity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from meterflow.contract import EmissionBasis

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

# Emission factors per generation mode, g CO2e/kWh: Electricity Maps' defaults (IPCC 2014 AR5 lifecycle
# medians; direct = combustion only), electricitymaps-contrib config/defaults.yaml, as quoted in
# ../shared/reference/domain-carbon-vpp.md §2.1. The direct set lists coal, gas, oil and unknown; every
# other mode is 0 there (renewables, nuclear; biomass CO2 is biogenic and reported outside the scopes).
MODE_FACTORS_G_PER_KWH: Final[dict[EmissionBasis, dict[str, float]]] = {
    EmissionBasis.LIFECYCLE: {
        "coal": 820.0,
        "gas": 490.0,
        "oil": 650.0,
        "biomass": 230.0,
        "solar": 45.0,
        "hydro": 24.0,
        "wind": 11.0,
        "nuclear": 12.0,
        "geothermal": 38.0,
        "unknown": 700.0,
    },
    EmissionBasis.DIRECT: {
        "coal": 760.0,
        "gas": 370.0,
        "oil": 406.0,
        "biomass": 0.0,
        "solar": 0.0,
        "hydro": 0.0,
        "wind": 0.0,
        "nuclear": 0.0,
        "geothermal": 0.0,
        "unknown": 575.0,
    },
}
MODES: Final = tuple(MODE_FACTORS_G_PER_KWH[EmissionBasis.LIFECYCLE])


def mix_intensity(generation_mwh: Mapping[str, float], basis: EmissionBasis) -> float:
    """Generation-weighted mean of the mode factors, g/kWh. Storage is not a mode: what it discharges
    was generated (and counted) when it charged."""
    factors = MODE_FACTORS_G_PER_KWH[basis]
    unknown = sorted(set(generation_mwh) - set(factors))
    if unknown:
        raise ValueError(f"unknown generation modes {unknown}; known: {', '.join(MODES)}")
    if any(not np.isfinite(v) or v < 0 for v in generation_mwh.values()):
        raise ValueError("generation must be finite and non-negative")
    total = sum(generation_mwh.values())
    if total <= 0:
        raise ValueError("no generation in the mix")
    return sum(mwh * factors[mode] for mode, mwh in generation_mwh.items()) / total


@dataclass(frozen=True, slots=True)
class Steps:
    """A zone's points as a step function, sorted by start: ``value[i]`` holds over ``[start[i], end[i])``;
    ``forecast[i]`` says whether that value is a forecast."""

    start: I64
    end: I64
    value: F64
    forecast: B = field(default_factory=lambda: np.zeros(0, np.bool_))

    @classmethod
    def of(cls, start_ms: I64, duration_ms: I64, value: F64, forecast: B | None = None) -> Steps:
        """From points sorted by start (unique starts). A forecast that starts inside a value that is not
        a forecast is dropped (what happened prevails over what was expected); then each point ends at
        its duration or at the next start."""
        is_forecast = np.zeros(start_ms.size, np.bool_) if forecast is None else forecast
        actual = ~is_forecast
        if is_forecast.any() and actual.any():
            actual_start = start_ms[actual]
            actual_end = _truncated(actual_start, actual_start + duration_ms[actual])
            last = np.searchsorted(actual_start, start_ms, side="right") - 1
            covered = (last >= 0) & (start_ms < actual_end[np.maximum(last, 0)])
            keep = actual | ~covered
            start_ms, duration_ms, value, is_forecast = (
                start_ms[keep], duration_ms[keep], value[keep], is_forecast[keep],
            )  # fmt: skip
        return cls(start_ms, _truncated(start_ms, start_ms + duration_ms), value, is_forecast)

    def integral(self, lo_ms: int, hi_ms: int) -> tuple[float, float]:
        """(integral of the value in g/kWh x ms, covered milliseconds) over ``[lo_ms, hi_ms)``."""
        if self.start.size == 0 or hi_ms <= lo_ms:
            return 0.0, 0.0
        area, covered = self._cumulative(np.array([lo_ms, hi_ms], np.int64))
        return float(area[1] - area[0]), float(covered[1] - covered[0])

    def forecast_share(self, lo: I64, hi: I64) -> F64:
        """The share of each fully covered ``[lo[j], hi[j])`` valued with forecasts (NaN where not covered)."""
        return Steps(self.start, self.end, self.forecast.astype(np.float64), self.forecast).mean_over(lo, hi)

    def _cumulative(self, t: I64) -> tuple[F64, F64]:
        """(integral of the value, covered milliseconds) from the first start to each ``t``."""
        span = self.end - self.start
        area_before = np.concatenate([[0.0], np.cumsum(span * self.value)])
        covered_before = np.concatenate([[0.0], np.cumsum(span).astype(np.float64)])
        last = np.searchsorted(self.start, t, side="right") - 1  # the last step starting at or before t
        started = last >= 0
        k = np.maximum(last, 0)
        inside = np.where(started, np.clip(t - self.start[k], 0, span[k]), 0).astype(np.float64)
        area = np.where(started, area_before[k] + inside * self.value[k], 0.0)
        covered = np.where(started, covered_before[k] + inside, 0.0)
        return area, covered

    def mean_over(self, lo: I64, hi: I64) -> F64:
        """Time-weighted mean value over each ``[lo[j], hi[j])``; NaN where the points do not cover all of it."""
        if self.start.size == 0:
            return np.full(lo.size, np.nan)
        area_lo, covered_lo = self._cumulative(lo)
        area_hi, covered_hi = self._cumulative(hi)
        covered = covered_hi - covered_lo
        full = covered >= (hi - lo).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(full & (hi > lo), (area_hi - area_lo) / covered, np.nan)


def _truncated(start: I64, end: I64) -> I64:
    """Ends cut at the next start, so that the steps never overlap."""
    out = end.copy()
    if start.size > 1:
        out[:-1] = np.minimum(out[:-1], start[1:])
    return out


def best_window(
    steps: Steps, lo_ms: int, hi_ms: int, window_ms: int, step_ms: int
) -> tuple[int, float] | None:
    """The fully covered window of ``window_ms`` starting on the ``step_ms`` grid in ``[lo_ms, hi_ms)``
    with the lowest mean intensity (earliest on ties): (start, mean), or None when none is covered."""
    first = -(-lo_ms // step_ms) * step_ms
    starts = np.arange(first, hi_ms - window_ms + 1, step_ms, dtype=np.int64)
    if starts.size == 0:
        return None
    means = steps.mean_over(starts, starts + window_ms)
    if np.isnan(means).all():
        return None
    best = int(np.nanargmin(means))
    return int(starts[best]), float(means[best])
