"""Check meterflow-style numbers against the simulator's ground truth: shared by unit and integration
tests. Registers become per-minute counts the way a correct pipeline must do it: glitch reads left out,
rollover wrapped at the register's maximum, meter exchanges honoured."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import polars as pl

from simulators.spec import DeviceSpec, FleetSpec

ReadingKey = tuple[str, str, str, int]
REGISTER_METRICS = ("energy_import_kwh", "energy_export_kwh", "gas_nm3", "heat_gj", "fuel_l")


def fleet_devices(spec: FleetSpec) -> dict[tuple[str, str], DeviceSpec]:
    return {(e.tenant, d.device): d for e, _, _, d in spec.devices()}


def register_minute_counts(
    readings: dict[ReadingKey, float], devices: dict[tuple[str, str], DeviceSpec], truth_dir: Path
) -> dict[ReadingKey, int]:
    faults = [json.loads(line) for line in (truth_dir / "faults.jsonl").read_text().splitlines()]
    glitches = {(f["tenant"], f["device"], f["metric"], f["ts"]) for f in faults if f["fault"] == "glitch"}
    exchanges = {
        (f["tenant"], f["device"], f["metric"], f["ts"]): f for f in faults if f["fault"] == "meter_exchange"
    }
    series: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for (tenant, device, metric, ts), value in readings.items():
        if metric in REGISTER_METRICS and (tenant, device, metric, ts) not in glitches:
            series[(tenant, device, metric)].append((ts, value))
    out: dict[ReadingKey, int] = defaultdict(int)
    for (tenant, device, metric), points in series.items():
        spec = devices[(tenant, device)]
        res = spec.register_resolution
        modulus = round(spec.register_max / res) + 1
        for (t0, v0), (_, v1) in itertools.pairwise(sorted(points)):
            c0, c1 = round(v0 / res), round(v1 / res)
            exchange = exchanges.get((tenant, device, metric, t0))
            if exchange is not None:
                c0 = round(exchange["new_initial"] / res)
            out[(tenant, device, metric, t0 - t0 % 60_000)] += (c1 - c0) % modulus
    return out


def truth_minute_counts(truth_dir: Path) -> dict[ReadingKey, int]:
    frame = pl.read_parquet(truth_dir / "energy_1m" / "*.parquet")
    return {
        (t, d, m, int(b.timestamp() * 1000)): c
        for t, d, m, b, c in frame.select("tenant", "device", "metric", "bucket_start", "counts").iter_rows()
    }


def assert_counts_match(truth: dict[ReadingKey, int], got: dict[ReadingKey, int]) -> None:
    assert truth, "no ground truth written"
    missing, extra = set(truth) - set(got), set(got) - set(truth)
    assert not missing and not extra, f"missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
    mismatches = {k: (truth[k], got[k]) for k in truth if truth[k] != got[k]}
    assert not mismatches, f"{len(mismatches)} buckets differ, e.g. {list(mismatches.items())[:3]}"


def truth_quantities(truth_dir: Path, width: str) -> dict[ReadingKey, float]:
    """Expected quantity per (tenant, device, metric, bucket) for 1-minute or complete 15-minute buckets."""
    path = truth_dir / "energy_1m" / "*.parquet" if width == "1m" else truth_dir / "energy_15m.parquet"
    frame = pl.read_parquet(path)
    return {
        (t, d, m, int(b.timestamp() * 1000)): q
        for t, d, m, b, q in frame.select(
            "tenant", "device", "metric", "bucket_start", "quantity"
        ).iter_rows()
    }


def assert_quantities_match(
    truth: dict[ReadingKey, float],
    got: dict[ReadingKey, float],
    *,
    complete: bool = True,
    tolerance: float = 1e-6,
) -> None:
    """Every true bucket has the same quantity (to `tolerance`); when the truth is `complete`, buckets
    outside it hold nothing."""
    assert truth, "no ground truth written"
    wrong = {k: (q, got.get(k, 0.0)) for k, q in truth.items() if abs(got.get(k, 0.0) - q) > tolerance}
    assert not wrong, (
        f"{len(wrong)} of {len(truth)} buckets differ (truth, got), e.g. {sorted(wrong.items())[:4]}"
    )
    extra = {k: v for k, v in got.items() if complete and k not in truth and abs(v) > tolerance}
    assert not extra, f"{len(extra)} buckets booked outside the truth, e.g. {sorted(extra.items())[:4]}"
