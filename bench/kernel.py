"""`meterflow bench kernel`: energy registers into 1-minute buckets per device, numba beside polars
(one thread) and pandas on the same arrays in the same run.

The readings are what a fleet sends: every device reads its cumulative energy register every 6 s on
a minute-aligned grid, and the devices of one instant arrive in random order, so the arrays are sorted
by time, not by device. Each engine turns them into per-(device, minute) sums and counts of the
register deltas, first all at once, then as a stream of small micro-batches:

* numba runs the processor's own path: order the reads by (device, ts), `registers_to_intervals`
  (rollover, exchange and plausibility checks), `prorate`, `reduce_by_key`.
* polars and pandas do the equivalent dataframe computation: a stable sort by device (which leaves
  time-ordered reads in (device, ts) order, the same shortcut `order_by_series` takes), the register's
  difference to the previous read of the same device, bucket of the interval's end, group by (device,
  bucket), sum and count. On these readings (no interval crosses a minute boundary, no rollover, no
  glitch) that is the same result, which the bench checks to 1e-9. In micro-batches the dataframe
  engines get each device's previous value from a numpy carry array, as numba gets its register state.

Each peer runs in a child process (``python -m bench.kernel``), so polars starts with
``POLARS_MAX_THREADS=1`` whatever the parent imported, and each engine's memory is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from processing import kernels as k

WIDTH_MS = 60_000
READ_EVERY_MS = 6_000  # divides the minute, so every interval lies inside one bucket
T0_MS = 1_767_225_600_000
INTERP_LIMIT_MS = 15 * 60_000
RESOLUTION = 0.001
ROUNDS = 3
PEERS = ("polars", "pandas")


@dataclass(frozen=True, slots=True)
class Readings:
    device: k.I32
    ts: k.I64
    value: k.F64

    def slice(self, lo: int, hi: int) -> Readings:
        return Readings(self.device[lo:hi], self.ts[lo:hi], self.value[lo:hi])


@dataclass(frozen=True, slots=True)
class Totals:
    """Per (device, bucket), sorted by key."""

    device: k.I64
    bucket_ms: k.I64
    total: k.F64
    n: k.I64

    @classmethod
    def combine(cls, device: k.I64, bucket_ms: k.I64, total: k.F64, n: k.I64) -> Totals:
        """Group partial rows (from several batches) by key."""
        order = np.lexsort((bucket_ms, device))
        device, bucket_ms = device[order], bucket_ms[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(device) != 0) | (np.diff(bucket_ms) != 0)])
        return cls(
            device[starts],
            bucket_ms[starts],
            np.add.reduceat(total[order], starts),
            np.add.reduceat(n[order], starts),
        )

    def mismatch(self, other: Totals) -> str | None:
        if not (
            np.array_equal(self.device, other.device) and np.array_equal(self.bucket_ms, other.bucket_ms)
        ):
            return "different (device, bucket) keys"
        if not np.array_equal(self.n, other.n):
            return "different counts"
        if not np.allclose(self.total, other.total, rtol=1e-9, atol=0.0):
            return f"totals differ by up to {np.abs(self.total - other.total).max():.3g}"
        return None


def make_readings(n_readings: int, n_devices: int, seed: int = 42) -> tuple[Readings, k.RegisterParams]:
    rng = np.random.default_rng(seed)
    instants = n_readings // n_devices
    rated_kw = rng.lognormal(2.0, 1.0, n_devices)
    kwh = rated_kw * rng.uniform(0.0, 1.0, (instants, n_devices)) * (READ_EVERY_MS / 3_600_000)
    registers = np.round(rng.uniform(0, 50_000, n_devices) + np.cumsum(kwh, axis=0), 3)
    del kwh
    arrival = rng.permuted(np.tile(np.arange(n_devices, dtype=np.int32), (instants, 1)), axis=1)
    readings = Readings(
        arrival.ravel(),
        np.repeat(T0_MS + np.arange(instants, dtype=np.int64) * READ_EVERY_MS, n_devices),
        np.take_along_axis(registers, arrival, axis=1).ravel(),
    )
    params = k.RegisterParams(
        np.full(n_devices, 99_999_999.999),
        np.full(n_devices, RESOLUTION),
        rated_kw * 1.2 / 3_600_000,
    )
    return readings, params


# --- numba --------------------------------------------------------------------------------------------


def numba_buckets(r: Readings, state: k.RegisterState, params: k.RegisterParams) -> k.Buckets:
    order = k.order_by_series(r.device, state.anchor_ts.size)
    intervals = k.registers_to_intervals(r.device[order], r.ts[order], r.value[order], state, params)
    parts = k.prorate(intervals, WIDTH_MS, INTERP_LIMIT_MS)
    return k.reduce_by_key(
        intervals.series[parts.interval],
        parts.bucket_ms,
        parts.qty,
        parts.quality,
        np.zeros(parts.qty.size, np.int8),
        WIDTH_MS,
    )


def numba_totals(parts: list[k.Buckets]) -> Totals:
    return Totals.combine(
        np.concatenate([b.series for b in parts]).astype(np.int64),
        np.concatenate([b.bucket_ms for b in parts]),
        np.concatenate([b.total for b in parts]),
        np.concatenate([b.n for b in parts]).astype(np.int64),
    )


def run_numba(r: Readings, params: k.RegisterParams, batch: int | None) -> tuple[float, Totals]:
    """Best of ROUNDS seconds for the whole array (batch None) or a stream of `batch`-row batches."""
    k.warm_up()
    n_devices = params.register_max.size
    numba_buckets(r.slice(0, 10_000), k.RegisterState.empty(n_devices), params)
    best, parts = float("inf"), list[k.Buckets]()
    for _ in range(ROUNDS):
        state = k.RegisterState.empty(n_devices)
        step = batch or r.device.size
        parts = []
        started = time.perf_counter()
        for lo in range(0, r.device.size, step):
            parts.append(numba_buckets(r.slice(lo, lo + step), state, params))
        best = min(best, time.perf_counter() - started)
    return best, numba_totals(parts)


# --- peers (in a child process) -----------------------------------------------------------------------


def _polars_batch(pl: ModuleType, r: Readings, prev: k.F64 | None) -> Any:
    columns = {"device": r.device, "ts": r.ts, "value": r.value}
    same_device = pl.col("device") == pl.col("device").shift(1)
    before = pl.when(same_device).then(pl.col("value").shift(1))
    if prev is not None:
        columns["prev"] = prev[r.device]
        before = before.otherwise(pl.col("prev"))
    # Eager, and a stable sort by device alone (the reads arrive in time order): both measured
    # several times faster here than a lazy sort by (device, ts).
    return (
        pl.DataFrame(columns)
        .sort("device", maintain_order=True)
        .with_columns(qty=pl.col("value") - before, bucket=(pl.col("ts") - 1) // WIDTH_MS * WIDTH_MS)
        .filter(pl.col("qty").is_not_null() & pl.col("qty").is_not_nan())
        .group_by("device", "bucket")
        .agg(sum=pl.col("qty").sum(), count=pl.len())
    )


def _pandas_batch(pd: ModuleType, r: Readings, prev: k.F64 | None) -> Any:
    frame = pd.DataFrame({"device": r.device, "ts": r.ts, "value": r.value})
    frame = frame.sort_values("device", kind="stable")
    same_device = frame["device"].eq(frame["device"].shift())
    before = frame["value"].shift().where(same_device)
    if prev is not None:
        before = before.fillna(pd.Series(prev[frame["device"].to_numpy()], index=frame.index))
    frame["qty"] = frame["value"] - before
    frame["bucket"] = (frame["ts"] - 1) // WIDTH_MS * WIDTH_MS
    grouped = frame.dropna(subset=["qty"]).groupby(["device", "bucket"], sort=False)["qty"]
    return grouped.agg(["sum", "count"]).reset_index()


def _peer_totals(engine: ModuleType, frames: list[Any]) -> Totals:
    whole = engine.concat(frames)
    device, bucket, total, n = (whole[c].to_numpy() for c in ("device", "bucket", "sum", "count"))
    return Totals.combine(device.astype(np.int64), bucket.astype(np.int64), total, n.astype(np.int64))


def _peer_main(engine: str, folder: Path, batch: int) -> None:
    """Child process: time `engine` on the arrays in `folder`, leave seconds and totals there."""
    r = Readings(*(np.load(folder / f"{name}.npy") for name in ("device", "ts", "value")))
    module: ModuleType
    step: Callable[[Readings, k.F64 | None], Any]
    if engine == "polars":
        import polars as pl

        if pl.thread_pool_size() != 1:
            raise RuntimeError("polars must run on one thread: POLARS_MAX_THREADS=1 before its import")
        module = pl
        step = lambda x, prev: _polars_batch(pl, x, prev)  # noqa: E731
    else:
        import pandas as pd

        module = pd
        step = lambda x, prev: _pandas_batch(pd, x, prev)  # noqa: E731
    n_devices = int(r.device.max()) + 1
    step(r.slice(0, 10_000), None if batch == 0 else np.full(n_devices, np.nan))
    best, frames = float("inf"), list[Any]()
    for _ in range(ROUNDS):
        frames = []
        started = time.perf_counter()
        if batch == 0:
            frames.append(step(r, None))
        else:
            prev = np.full(n_devices, np.nan)
            for lo in range(0, r.device.size, batch):
                chunk = r.slice(lo, lo + batch)
                frames.append(step(chunk, prev))
                prev[chunk.device] = chunk.value  # in time order, so each device's last read wins
        best = min(best, time.perf_counter() - started)
    totals = _peer_totals(module, frames)
    np.savez(
        folder / f"{engine}-{batch}.npz",
        device=totals.device,
        bucket_ms=totals.bucket_ms,
        total=totals.total,
        n=totals.n,
    )
    (folder / f"{engine}-{batch}.json").write_text(json.dumps({"seconds": best}))


def run_peer(engine: str, folder: Path, batch: int) -> tuple[float, Totals]:
    env = {**os.environ, "POLARS_MAX_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "bench.kernel", engine, str(folder), str(batch)], env=env, check=True
    )
    seconds = float(json.loads((folder / f"{engine}-{batch}.json").read_text())["seconds"])
    with np.load(folder / f"{engine}-{batch}.npz") as saved:
        return seconds, Totals(saved["device"], saved["bucket_ms"], saved["total"], saved["n"])


# --- the bench ----------------------------------------------------------------------------------------


def _case(
    name: str, r: Readings, params: k.RegisterParams, batch: int, tick: Callable[[str], None]
) -> dict[str, float]:
    n = r.device.size
    what = "one call" if batch == 0 else f"{n // batch:,} micro-batches of {batch:,}"
    with tempfile.TemporaryDirectory(prefix="meterflow-bench-kernel-") as tmp:
        folder = Path(tmp)
        for column in ("device", "ts", "value"):
            np.save(folder / f"{column}.npy", getattr(r, column))
        tick(f"{name}: numba on {n:,} readings, {what}, best of {ROUNDS}")
        seconds, want = run_numba(r, params, batch or None)
        rates = {"numba": n / seconds}
        for engine in PEERS:
            tick(f"{name}: {engine} (one thread) on the same readings, best of {ROUNDS}")
            seconds, got = run_peer(engine, folder, batch)
            problem = want.mismatch(got)
            if problem:
                raise RuntimeError(f"{name}: {engine} disagrees with numba: {problem}")
            rates[engine] = n / seconds
    tick(
        f"{name}: {want.n.size:,} (device, minute) buckets identical in all engines; "
        + ", ".join(f"{e} {v:,.0f}/s" for e, v in rates.items())
    )
    return rates


def run_kernel_bench(
    *, readings: int, devices: int, batch: int, batches: int, tick: Callable[[str], None]
) -> dict[str, object]:
    tick(f"generating {readings:,} register reads of {devices:,} devices every {READ_EVERY_MS // 1000} s")
    r, params = make_readings(readings, devices)
    large = _case("large", r, params, 0, tick)
    micro = _case("micro-batches", r.slice(0, batch * batches), params, batch, tick)
    return {
        "bench": "kernel",
        "metric": "readings_per_s",
        "value": round(large["numba"]),
        "unit": "readings/s",
        "peer": "polars, one thread",
        "peer_value": round(large["polars"]),
        "ratio": round(large["numba"] / large["polars"], 2),
        "pandas_value": round(large["pandas"]),
        "readings": r.device.size,
        "devices": devices,
        "target_ratio": 3,
        "micro_batch": {
            "rows": batch,
            "readings": batch * batches,
            "value": round(micro["numba"]),
            "peer_value": round(micro["polars"]),
            "pandas_value": round(micro["pandas"]),
            "ratio": round(micro["numba"] / micro["polars"], 2),
            "target_ratio": 30,
        },
    }


if __name__ == "__main__":
    _peer_main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
