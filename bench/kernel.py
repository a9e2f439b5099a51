"""`meterflow bench kernel`: energy registers into 1-minute buckets per device, numba beside polars
(one thread) and pandas on the same arrays in the same run.

The readings are what a fleet sends: every device reads its cumulative energy register every 6 s on
a minute-aligned grid, and the devices of one instant arrive in random order, so the arrays are sorted
by time, not by device. Each engine turns them into per-(device, minute) sums, counts and maxima of the
register deltas, first all at once, then as a stream of small micro-batches:

* numba runs the processor's path, `kernels.RegisterBucketer`: one fused kernel per batch that keeps
  each device's register state, so it takes the reads in arrival order (rollover, exchange and
  plausibility checks, pro-rating, reduction), with buffers reused from batch to batch. Its results are
  views of those buffers, valid until its next call, as the processor's writer uses them; the check
  below is made on an untimed pass of the same calls that copies them out, which every timed round
  must reproduce to the bit (`run_numba`).
* polars and pandas do the equivalent dataframe computation: the register's difference to the previous
  read of the same device (after a stable sort by device, which leaves time-ordered reads in (device,
  ts) order, or as a group-wise difference), the bucket of the interval's end, group by (device,
  bucket), sum, count and max. Each engine tries every formulation listed for it and keeps its fastest.
  On these readings (no interval crosses a minute boundary, no rollover, no glitch) that is the same
  result, which the bench checks (keys and counts equal, sums and maxima to 1e-9) before it prints a
  ratio. In micro-batches the dataframe engines get each device's previous value from a numpy carry
  array, as numba gets its register state.

Each peer runs in a child process (``python -m bench.kernel``), so polars starts with
``POLARS_MAX_THREADS=1`` whatever the parent imported, and each engine's memory is its own. Every figure
is the best of ROUNDS, timed in the CPU time of the engine's process.
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

# Every engine runs on one thread, and other work shares this machine's cores: the CPU time a process
# used measures the engine, where wall time would also measure whoever else was running.
cpu_seconds = time.process_time
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
    max_value: k.F64

    @classmethod
    def combine(cls, device: k.I64, bucket_ms: k.I64, total: k.F64, n: k.I64, max_value: k.F64) -> Totals:
        """Group partial rows (from several batches) by key."""
        order = np.lexsort((bucket_ms, device))
        device, bucket_ms = device[order], bucket_ms[order]
        starts = np.flatnonzero(np.r_[True, (np.diff(device) != 0) | (np.diff(bucket_ms) != 0)])
        return cls(
            device[starts],
            bucket_ms[starts],
            np.add.reduceat(total[order], starts),
            np.add.reduceat(n[order], starts),
            np.maximum.reduceat(max_value[order], starts),
        )

    def mismatch(self, other: Totals) -> str | None:
        if not (
            np.array_equal(self.device, other.device) and np.array_equal(self.bucket_ms, other.bucket_ms)
        ):
            return "different (device, bucket) keys"
        if not np.array_equal(self.n, other.n):
            return "different counts"
        for name, mine, theirs in (
            ("totals", self.total, other.total),
            ("maxima", self.max_value, other.max_value),
        ):
            if not np.allclose(mine, theirs, rtol=1e-9, atol=0.0):
                return f"{name} differ by up to {np.abs(mine - theirs).max():.3g}"
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


def numba_totals(parts: list[k.Buckets]) -> Totals:
    return Totals.combine(
        np.concatenate([b.series for b in parts]).astype(np.int64),
        np.concatenate([b.bucket_ms for b in parts]),
        np.concatenate([b.total for b in parts]),
        np.concatenate([b.n for b in parts]).astype(np.int64),
        np.concatenate([b.max_value for b in parts]),
    )


def _bits(buckets: k.Buckets) -> list[bytes]:
    return [np.asarray(column).tobytes() for column in buckets]


def run_numba(r: Readings, params: k.RegisterParams, batch: int | None) -> tuple[float, Totals]:
    """Best of ROUNDS seconds for the whole array (batch None) or a stream of `batch`-row batches, each
    round with fresh register state, and the totals the engines are checked on.

    The bucketer lives as long as the run, as it lives as long as the processor. Its results are views
    of its buffers that its next call overwrites, and the processor's writer uses each one up within
    its poll; the bench has no use for them until the end. So a first, untimed pass copies every
    batch's buckets out for the check (and grows the buffers); the timed rounds make the same calls on
    the same reads, leave each result to the next call as the processor does, and must end with the
    first pass's register state and last buckets, to the bit."""
    k.warm_up()
    n_devices = params.register_max.size
    step = batch or r.device.size
    state = k.RegisterState.empty(n_devices)
    bucketer = k.RegisterBucketer((WIDTH_MS,), INTERP_LIMIT_MS)
    parts = []
    for lo in range(0, r.device.size, step):
        hi = lo + step
        buckets = bucketer(r.device[lo:hi], r.ts[lo:hi], r.value[lo:hi], state, params).buckets[0]
        parts.append(k.Buckets._make(np.copy(column) for column in buckets))
    checked = state.packed.tobytes()
    best = float("inf")
    for _ in range(ROUNDS):
        state = k.RegisterState.empty(n_devices)
        started = cpu_seconds()
        for lo in range(0, r.device.size, step):
            hi = lo + step
            result = bucketer(r.device[lo:hi], r.ts[lo:hi], r.value[lo:hi], state, params)
        best = min(best, cpu_seconds() - started)
        if state.packed.tobytes() != checked or _bits(result.buckets[0]) != _bits(parts[-1]):
            raise RuntimeError("numba: a timed round differs from the checked pass")
    return best, numba_totals(parts)


# --- peers (in a child process) -----------------------------------------------------------------------

# A batch's reads (device, ts, value, and with a carry array each read's device's previous value in
# "prev") -> one row per (device, bucket) with sum, count and max of the register deltas.
Way = Callable[[ModuleType, Readings, "k.F64 | None"], Any]


def _polars_frame(pl: ModuleType, r: Readings, prev: k.F64 | None, *, lazy: bool) -> Any:
    columns = {"device": r.device, "ts": r.ts, "value": r.value}
    if prev is not None:
        columns["prev"] = prev[r.device]
    return pl.LazyFrame(columns) if lazy else pl.DataFrame(columns)


def _polars_agg(pl: ModuleType, frame: Any) -> Any:
    return (
        frame.filter(pl.col("qty").is_not_null() & pl.col("qty").is_not_nan())
        .group_by("device", "bucket")
        .agg(sum=pl.col("qty").sum(), count=pl.len(), max=pl.col("qty").max())
    )


def _polars_sorted(pl: ModuleType, r: Readings, prev: k.F64 | None, *, lazy: bool) -> Any:
    same_device = pl.col("device") == pl.col("device").shift(1)
    before = pl.when(same_device).then(pl.col("value").shift(1))
    if prev is not None:
        before = before.otherwise(pl.col("prev"))
    frame = (
        _polars_frame(pl, r, prev, lazy=lazy)
        .sort("device", maintain_order=True)
        .with_columns(qty=pl.col("value") - before, bucket=(pl.col("ts") - 1) // WIDTH_MS * WIDTH_MS)
    )
    out = _polars_agg(pl, frame)
    return out.collect() if lazy else out


def _polars_grouped(pl: ModuleType, r: Readings, prev: k.F64 | None) -> Any:
    delta = pl.col("value").diff()
    if prev is not None:
        delta = delta.fill_null(pl.col("value").first() - pl.col("prev").first())
    frame = (
        _polars_frame(pl, r, prev, lazy=False)
        .group_by("device")
        .agg(qty=delta, bucket=(pl.col("ts") - 1) // WIDTH_MS * WIDTH_MS)
        .explode("qty", "bucket")
    )
    return _polars_agg(pl, frame)


def _pandas_sorted(pd: ModuleType, r: Readings, prev: k.F64 | None) -> Any:
    frame = pd.DataFrame({"device": r.device, "ts": r.ts, "value": r.value})
    frame = frame.sort_values("device", kind="stable")
    same_device = frame["device"].eq(frame["device"].shift())
    before = frame["value"].shift().where(same_device)
    if prev is not None:
        before = before.fillna(pd.Series(prev[frame["device"].to_numpy()], index=frame.index))
    return _pandas_agg(frame, frame["value"] - before)


def _pandas_grouped(pd: ModuleType, r: Readings, prev: k.F64 | None) -> Any:
    frame = pd.DataFrame({"device": r.device, "ts": r.ts, "value": r.value})
    qty = frame.groupby("device", sort=False)["value"].diff()
    if prev is not None:
        qty = qty.fillna(frame["value"] - prev[r.device])
    return _pandas_agg(frame, qty)


def _pandas_agg(frame: Any, qty: Any) -> Any:
    frame = frame.assign(qty=qty, bucket=(frame["ts"] - 1) // WIDTH_MS * WIDTH_MS)
    grouped = frame.dropna(subset=["qty"]).groupby(["device", "bucket"], sort=False)["qty"]
    return grouped.agg(["sum", "count", "max"]).reset_index()


# Formulations per engine and case ("large" or "micro"). The group-wise difference exploded per device
# is polars' fastest on the large case but measured 4x slower than sorting on 1,000-row batches.
WAYS: dict[str, dict[str, tuple[str, ...]]] = {
    "polars": {
        "large": ("sorted, eager", "sorted, lazy", "group-wise diff"),
        "micro": ("sorted, eager", "sorted, lazy"),
    },
    "pandas": {"large": ("sorted", "group-wise diff"), "micro": ("sorted", "group-wise diff")},
}


def _way(engine: str, name: str) -> tuple[ModuleType, Way]:
    if engine == "polars":
        import polars as pl

        if pl.thread_pool_size() != 1:
            raise RuntimeError("polars must run on one thread: POLARS_MAX_THREADS=1 before its import")
        return pl, {
            "sorted, eager": lambda m, r, prev: _polars_sorted(m, r, prev, lazy=False),
            "sorted, lazy": lambda m, r, prev: _polars_sorted(m, r, prev, lazy=True),
            "group-wise diff": _polars_grouped,
        }[name]
    import pandas as pd

    return pd, {"sorted": _pandas_sorted, "group-wise diff": _pandas_grouped}[name]


def _peer_totals(engine: ModuleType, frames: list[Any]) -> Totals:
    whole = engine.concat(frames)
    device, bucket, total, n, top = (whole[c].to_numpy() for c in ("device", "bucket", "sum", "count", "max"))
    return Totals.combine(device.astype(np.int64), bucket.astype(np.int64), total, n.astype(np.int64), top)


def _time_way(module: ModuleType, way: Way, r: Readings, batch: int) -> tuple[float, list[Any]]:
    n_devices = int(r.device.max()) + 1
    way(module, r.slice(0, 10_000), None if batch == 0 else np.full(n_devices, np.nan))
    best, frames = float("inf"), list[Any]()
    for _ in range(ROUNDS):
        frames = []
        started = cpu_seconds()
        if batch == 0:
            frames.append(way(module, r, None))
        else:
            prev = np.full(n_devices, np.nan)
            for lo in range(0, r.device.size, batch):
                chunk = r.slice(lo, lo + batch)
                frames.append(way(module, chunk, prev))
                prev[chunk.device] = chunk.value  # in time order, so each device's last read wins
        best = min(best, cpu_seconds() - started)
    return best, frames


def _peer_main(engine: str, folder: Path, batch: int) -> None:
    """Child process: time each of `engine`'s ways on the arrays in `folder`, leave the fastest's
    seconds, name and totals there."""
    r = Readings(*(np.load(folder / f"{name}.npy") for name in ("device", "ts", "value")))
    timed = []
    for name in WAYS[engine]["micro" if batch else "large"]:
        module, way = _way(engine, name)
        seconds, frames = _time_way(module, way, r, batch)
        timed.append((seconds, name, module, frames))
    seconds, name, module, frames = min(timed, key=lambda t: t[0])
    totals = _peer_totals(module, frames)
    np.savez(
        folder / f"{engine}-{batch}.npz",
        device=totals.device,
        bucket_ms=totals.bucket_ms,
        total=totals.total,
        n=totals.n,
        max_value=totals.max_value,
    )
    (folder / f"{engine}-{batch}.json").write_text(json.dumps({"seconds": seconds, "way": name}))


def run_peer(engine: str, folder: Path, batch: int) -> tuple[float, str, Totals]:
    env = {**os.environ, "POLARS_MAX_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "bench.kernel", engine, str(folder), str(batch)], env=env, check=True
    )
    result = json.loads((folder / f"{engine}-{batch}.json").read_text())
    with np.load(folder / f"{engine}-{batch}.npz") as saved:
        totals = Totals(saved["device"], saved["bucket_ms"], saved["total"], saved["n"], saved["max_value"])
    return float(result["seconds"]), str(result["way"]), totals


# --- the bench ----------------------------------------------------------------------------------------


def _case(
    name: str, r: Readings, params: k.RegisterParams, batch: int, tick: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, str]]:
    """Readings per second of each engine, and each peer's fastest formulation."""
    n = r.device.size
    what = "one call" if batch == 0 else f"{n // batch:,} micro-batches of {batch:,}"
    ways: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="meterflow-bench-kernel-") as tmp:
        folder = Path(tmp)
        for column in ("device", "ts", "value"):
            np.save(folder / f"{column}.npy", getattr(r, column))
        tick(f"{name}: numba on {n:,} readings, {what}, best of {ROUNDS}")
        seconds, want = run_numba(r, params, batch or None)
        rates = {"numba": n / seconds}
        for engine in PEERS:
            tried = ", ".join(WAYS[engine]["micro" if batch else "large"])
            tick(f"{name}: {engine} (one thread) on the same readings ({tried}), best of {ROUNDS} each")
            seconds, ways[engine], got = run_peer(engine, folder, batch)
            problem = want.mismatch(got)
            if problem:
                raise RuntimeError(f"{name}: {engine} ({ways[engine]}) disagrees with numba: {problem}")
            rates[engine] = n / seconds
    tick(
        f"{name}: {want.n.size:,} (device, minute) buckets identical in all engines; "
        + ", ".join(f"{e} {v:,.0f}/s" + (f" ({ways[e]})" if e in ways else "") for e, v in rates.items())
    )
    return rates, ways


def run_kernel_bench(
    *, readings: int, devices: int, batch: int, batches: int, tick: Callable[[str], None]
) -> dict[str, object]:
    tick(f"generating {readings:,} register reads of {devices:,} devices every {READ_EVERY_MS // 1000} s")
    r, params = make_readings(readings, devices)
    large, large_ways = _case("large", r, params, 0, tick)
    micro, micro_ways = _case("micro-batches", r.slice(0, batch * batches), params, batch, tick)
    return {
        "bench": "kernel",
        "metric": "readings_per_s",
        "value": round(large["numba"]),
        "unit": "readings/s",
        "peer": "polars, one thread",
        "peer_value": round(large["polars"]),
        "ratio": round(large["numba"] / large["polars"], 2),
        "pandas_value": round(large["pandas"]),
        "peer_ways": large_ways,
        "clock": f"process CPU time, best of {ROUNDS}",
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
            "peer_ways": micro_ways,
            "target_ratio": 30,
        },
    }


if __name__ == "__main__":
    _peer_main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
