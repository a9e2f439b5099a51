"""A seeded fleet of electricity meters whose registers integrate their power exactly.

Pure: no I/O. Power is piecewise constant over each step, so the register advance over a step is
exactly ``power_kw * step_s / 3600`` and the ground truth of any interval is a plain sum.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from meterflow.contract import Reading


@dataclass(slots=True)
class Meter:
    device: str
    base_kw: float
    register_kwh: float
    phase: float


@dataclass(slots=True)
class Fleet:
    tenant: str
    gateway: str
    site: str
    meters: list[Meter]
    rng: random.Random = field(repr=False)

    @classmethod
    def create(cls, *, tenant: str, gateway: str, site: str, n_devices: int, seed: int) -> Fleet:
        rng = random.Random(seed)
        meters = [
            Meter(
                device=f"m-{i:04d}",
                base_kw=rng.uniform(20.0, 400.0),
                register_kwh=round(rng.uniform(1_000.0, 900_000.0), 3),
                phase=rng.uniform(0.0, 2 * math.pi),
            )
            for i in range(n_devices)
        ]
        return cls(tenant=tenant, gateway=gateway, site=site, meters=meters, rng=rng)

    def power_kw(self, meter: Meter, ts_ms: int) -> float:
        day_fraction = (ts_ms / 86_400_000.0) % 1.0
        daily = 1.0 + 0.35 * math.sin(2 * math.pi * day_fraction + meter.phase)
        return round(meter.base_kw * daily * self.rng.uniform(0.95, 1.05), 3)

    def step(self, ts_ms: int, step_s: float) -> dict[str, list[Reading]]:
        """Readings at ts_ms: the register as it stands, and the power held until the next step."""
        out: dict[str, list[Reading]] = {}
        for meter in self.meters:
            power = self.power_kw(meter, ts_ms)
            out[meter.device] = [
                Reading(ts_ms, "energy_import_kwh", round(meter.register_kwh, 6)),
                Reading(ts_ms, "power_kw", power),
            ]
            meter.register_kwh += power * step_s / 3600.0
        return out


def gateway_batch(readings: dict[str, list[Reading]]) -> dict[str, list[dict[str, object]]]:
    """Contract form 1: ``{device: [{"ts": ..., "values": {...}}]}``."""
    batch: dict[str, list[dict[str, object]]] = {}
    for device, rs in readings.items():
        by_ts: dict[int, dict[str, float]] = {}
        for r in rs:
            by_ts.setdefault(r.ts_ms, {})[r.metric] = r.value
        batch[device] = [{"ts": ts, "values": values} for ts, values in sorted(by_ts.items())]
    return batch
