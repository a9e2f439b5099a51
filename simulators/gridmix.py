"""A simulated hourly generation mix for a coal-heavy eastern Chinese province, for demos and tests of the
estimated grid intensity (`meterflow intensity estimate`). China publishes no real-time mix, so this
is a plausible shape, not data: a fixed must-run base (nuclear, hydro), wind that varies by hour, solar
following the sun, gas for the evening peak and coal filling the rest of demand. Deterministic per seed and hour.
"""

from __future__ import annotations

import csv
import io
import math
import random
from datetime import UTC, datetime, timedelta

from meterflow.carbon.intensity import MODES

_HOUR = timedelta(hours=1)


def _demand_mw(hour_local: int) -> float:
    # Two daytime humps (industry and evening residential) over a night valley.
    return (
        60_000
        + 12_000 * math.sin(math.pi * max(0, hour_local - 6) / 16)
        + (6_000 if 18 <= hour_local <= 21 else 0)
    )


def mix_rows(
    start: datetime, hours: int, *, utc_offset_h: int = 8, seed: int = 7
) -> list[dict[str, float | int]]:
    """One row per hour from `start` (UTC, whole hour): ``ts`` (epoch ms), ``duration_s`` and MWh per
    generation mode."""
    if start.tzinfo is None or start.minute or start.second or start.microsecond:
        raise ValueError("start must be a whole hour with a time zone")
    rows: list[dict[str, float | int]] = []
    for h in range(hours):
        at = start.astimezone(UTC) + h * _HOUR
        local_hour = (at.hour + utc_offset_h) % 24
        demand = _demand_mw(local_hour)
        solar = max(0.0, 14_000 * math.sin(math.pi * (local_hour - 6) / 12)) if 6 <= local_hour <= 18 else 0.0
        # Noise drawn per absolute hour, so that an hour has the same mix whichever run produced it.
        hour_number = int(at.timestamp()) // 3600
        wind = 5_000 + 3_000 * math.sin(
            2 * math.pi * (hour_number + random.Random(seed * 1_000_003 + hour_number).random()) / 30
        )
        base = {"nuclear": 6_000.0, "hydro": 2_500.0, "biomass": 800.0}
        gas = 4_000.0 if 17 <= local_hour <= 22 else 1_500.0
        coal = max(0.0, demand - solar - wind - gas - sum(base.values()))
        row: dict[str, float | int] = {"ts": int(at.timestamp() * 1000), "duration_s": 3600}
        generation = {**base, "solar": solar, "wind": wind, "gas": gas, "coal": coal}
        row.update({mode: round(generation.get(mode, 0.0), 1) for mode in MODES if mode in generation})
        rows.append(row)
    return rows


def mix_csv(rows: list[dict[str, float | int]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["ts", "duration_s"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
