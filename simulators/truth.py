"""Ground truth: the exact interval quantities meterflow must compute, written as Parquet.

Layout of a truth directory:

- ``energy_1m/part-*.parquet``: one row per register per 1-minute bucket: tenant, site, device,
  metric, ``bucket_start`` (UTC), ``counts`` (whole units of the register's resolution) and
  ``quantity`` (counts x resolution, in the metric's unit). A bucket is listed once the reading on
  its closing boundary exists.
- ``energy_15m.parquet``: the same for complete 15-minute buckets.
- ``emissions_daily.parquet``: per enterprise and local calendar day, the grid-boundary quantities and
  their kgCO2e under both Scope 2 methods (see docs/carbon-methodology.md), with the factor ids.
- ``dr_shed_15m.parquet``: per building load and 15-minute bucket, the energy it shed in DR events
  (``shed_kwh``; delivered kW = shed_kwh / 0.25 h).
- ``faults.jsonl``: every injected reading fault and register event (spikes, glitches, frozen runs,
  meter exchanges, armed rollovers).
- ``manifest.json``: the run (seed, window, fleet size), the fault rates and the expected outcome
  counts: dead letters by reason, broker refusals, duplicates.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from meterflow.carbon.accounting import (
    QUANTITY_OF_METRIC,
    CertificateBalance,
    CertificateBlock,
    day_emissions,
)
from simulators.engine import I64, MINUTE_MS, FaultLog, Simulation
from simulators.faults import Expected, FaultConfig

log = logging.getLogger(__name__)

FLUSH_MINUTES = 360


class TruthRecorder:
    """Collects register snapshots at minute boundaries and writes the truth files."""

    def __init__(self, sim: Simulation, out_dir: Path) -> None:
        self.sim = sim
        self.out_dir = out_dir
        (out_dir / "energy_1m").mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / "energy_1m").glob("part-*.parquet"):
            stale.unlink()
        regs = sim.registers
        spec_rows = list(sim.spec.devices())
        self.registers = pl.DataFrame(
            {
                "register": np.arange(len(regs), dtype=np.int32),
                "tenant": [spec_rows[r.device][0].tenant for r in regs],
                "site": [spec_rows[r.device][1].site for r in regs],
                "device": [sim.device_names[r.device] for r in regs],
                "metric": [r.metric for r in regs],
                "role": [spec_rows[r.device][3].role for r in regs],
                "resolution": [r.resolution for r in regs],
                "decimals": [r.decimals for r in regs],
            }
        )
        self._prev: tuple[int, I64] | None = None
        self._pending: list[tuple[int, I64]] = []
        self._part = 0
        self.first_bucket: int | None = None
        self.last_bucket_end: int | None = None

    def snapshot(self, ts_ms: int, counts: I64) -> None:
        if self._prev is not None:
            prev_ts, prev = self._prev
            if ts_ms - prev_ts != MINUTE_MS:
                raise ValueError(f"snapshots must be one minute apart, got {prev_ts} -> {ts_ms}")
            self._pending.append((prev_ts, counts - prev))
            if self.first_bucket is None:
                self.first_bucket = prev_ts
            self.last_bucket_end = ts_ms
            if len(self._pending) >= FLUSH_MINUTES:
                self._flush()
        self._prev = (ts_ms, counts)

    def _flush(self) -> None:
        if not self._pending:
            return
        n_regs = len(self.sim.registers)
        starts = np.repeat(np.array([ts for ts, _ in self._pending], dtype=np.int64), n_regs)
        deltas = np.concatenate([d for _, d in self._pending])
        frame = pl.DataFrame(
            {
                "register": np.tile(np.arange(n_regs, dtype=np.int32), len(self._pending)),
                "bucket_start": pl.Series(starts).cast(pl.Datetime("ms", "UTC")),
                "counts": deltas,
            }
        )
        frame.join(self.registers, on="register").select(_COLUMNS).with_columns(_QUANTITY).write_parquet(
            self.out_dir / "energy_1m" / f"part-{self._part:05d}.parquet"
        )
        self._part += 1
        self._pending.clear()

    def finish(
        self,
        *,
        faults: FaultConfig,
        expected: Expected,
        fault_log: FaultLog,
        armed_rollovers: list[tuple[str, str]],
        published: dict[str, int],
    ) -> dict[str, Any]:
        """Write everything not yet on disk; returns the manifest."""
        self._flush()
        energy_1m = pl.scan_parquet(self.out_dir / "energy_1m" / "*.parquet") if self._part else None
        if energy_1m is not None:
            self._energy_15m(energy_1m).write_parquet(self.out_dir / "energy_15m.parquet")
            self._emissions_daily(energy_1m).write_parquet(self.out_dir / "emissions_daily.parquet")
        self._write_faults(fault_log, armed_rollovers)
        self._dr_shed().write_parquet(self.out_dir / "dr_shed_15m.parquet")
        manifest: dict[str, Any] = {
            "seed": self.sim.spec.seed,
            "start": _iso(self.first_bucket),
            "end": _iso(self.last_bucket_end),
            "tick_ms": self.sim.tick_ms,
            "devices": len(self.sim.devices),
            "registers": len(self.sim.registers),
            "faults": faults.model_dump(),
            "expected": asdict(expected),
            "flags": {
                "spike": len(fault_log.spikes),
                "glitch": len(fault_log.glitches),
                "frozen_runs": len(fault_log.frozen),
                "meter_exchanges": len(fault_log.exchanges),
                "rollovers_armed": len(armed_rollovers),
            },
            "published": published,
        }
        (self.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return manifest

    def _dr_shed(self) -> pl.DataFrame:
        """Load shed in DR events per building and 15-minute bucket: the delivery meterflow must measure."""
        spec_rows = list(self.sim.spec.devices())
        rows = [
            (spec_rows[i][0].tenant, self.sim.device_names[i], spec_rows[i][3].vpp, bucket, float(kwh[i]))
            for bucket, kwh in sorted(self.sim.shed_kwh.items())
            for i in np.flatnonzero(kwh > 0).tolist()
        ]
        return pl.DataFrame(
            rows,
            schema={
                "tenant": pl.String,
                "device": pl.String,
                "vpp": pl.String,
                "bucket_start_ms": pl.Int64,
                "shed_kwh": pl.Float64,
            },
            orient="row",
        ).with_columns(
            bucket_start=pl.from_epoch("bucket_start_ms", time_unit="ms").dt.replace_time_zone("UTC")
        )

    def _energy_15m(self, energy_1m: pl.LazyFrame) -> pl.DataFrame:
        return (
            energy_1m.with_columns(bucket_start=pl.col("bucket_start").dt.truncate("15m"))
            .group_by("tenant", "site", "device", "role", "metric", "bucket_start")
            .agg(pl.col("counts").sum(), pl.len().alias("minutes"))
            .filter(pl.col("minutes") == 15)
            .drop("minutes")
            .join(
                self.registers.lazy().select("tenant", "device", "metric", "decimals"),
                on=["tenant", "device", "metric"],
            )
            .with_columns(_QUANTITY)
            .sort("tenant", "device", "metric", "bucket_start")
            .collect()
        )

    def _emissions_daily(self, energy_1m: pl.LazyFrame) -> pl.DataFrame:
        """Grid-boundary quantities per site and local day, then kgCO2e per enterprise and day."""
        spec = self.sim.spec
        provinces = {(e.tenant, s.site): s.province for e in spec.enterprises for s in e.sites}
        boundary = energy_1m.filter(pl.col("role") == "grid").collect()
        rows: list[dict[str, Any]] = []
        for enterprise in spec.enterprises:
            frame = boundary.filter(pl.col("tenant") == enterprise.tenant)
            if frame.is_empty():
                continue
            per_site = (
                frame.with_columns(
                    day=pl.col("bucket_start").dt.convert_time_zone(enterprise.timezone).dt.date()
                )
                .group_by("site", "day", "metric")
                .agg(pl.col("counts").sum(), pl.col("decimals").first(), pl.len().alias("minutes"))
                .sort("day", "site", "metric")
            )
            certificates = CertificateBalance(
                [
                    CertificateBlock(c.period_start, c.period_end, c.certificates)
                    for c in enterprise.green_certificates
                ]
            )
            site_provinces: dict[str, str | None] = {
                site: province
                for (tenant, site), province in provinces.items()
                if tenant == enterprise.tenant
            }
            for (day,), day_frame in per_site.group_by("day", maintain_order=True):
                quantities: dict[str, dict[str, float]] = {}
                minutes = 0
                for site, metric, counts, decimals, n in day_frame.select(
                    "site", "metric", "counts", "decimals", "minutes"
                ).iter_rows():
                    quantities.setdefault(site, {})[QUANTITY_OF_METRIC[metric]] = counts / 10**decimals
                    minutes = max(minutes, n)
                row = day_emissions(enterprise.tenant, day, quantities, site_provinces, certificates)
                rows.append({**row, "complete": minutes == 1440})
        return pl.DataFrame(rows)

    def _write_faults(self, fault_log: FaultLog, armed: list[tuple[str, str]]) -> None:
        with (self.out_dir / "faults.jsonl").open("w", encoding="utf-8") as out:
            for logged in (*fault_log.spikes, *fault_log.glitches, *fault_log.frozen):
                out.write(json.dumps(asdict(logged)) + "\n")
            for ex in fault_log.exchanges:
                out.write(json.dumps({"fault": "meter_exchange", **asdict(ex)}) + "\n")
            for tenant, device in armed:
                out.write(json.dumps({"fault": "rollover_armed", "tenant": tenant, "device": device}) + "\n")


_COLUMNS = ["tenant", "site", "device", "role", "metric", "bucket_start", "counts", "decimals"]
_QUANTITY = (pl.col("counts") / pl.lit(10.0).pow(pl.col("decimals"))).alias("quantity")


def _iso(ts_ms: int | None) -> str | None:
    return (
        None
        if ts_ms is None
        else datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat().replace("+00:00", "Z")
    )
