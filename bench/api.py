"""`meterflow bench api`: latency and throughput of the query API's main routes under concurrent load,
beside the framework's ceiling (/healthz) and the route's own SQL run directly with psycopg.

Data: 30 days of 1-minute aggregates for 1,000 meters in 10 sites of a dedicated tenant (`bench-api`,
October 2026), as the processor would have written them: device rows at 1 minute, 15 minutes and 1 hour
and the site roll-ups at each, bulk-copied (CSV COPY) one day per transaction. A day whose last row is
there is skipped, so the load is idempotent and resumes after an interruption.

The API runs under uvicorn in a subprocess (uvloop, httptools, `--workers`), with the rate limit lifted.
Load comes from `wrk` when it is installed (C, so the load generator takes little of the machine's CPU
from the server), otherwise from httpx in this process. Each route is driven for `--seconds` at
`--connections` concurrent connections; p50, p99 and requests/s are what wrk reports.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import polars as pl
import psycopg

from meterflow.settings import Settings

TENANT = "bench-api"
ZONE = ZoneInfo("Asia/Shanghai")
FIRST_DAY = datetime(2026, 10, 1, tzinfo=ZONE)
SITES = 10
COLUMNS = "agg_key_id, bucket, total, n, max_value, n_measured"
TARGET_P99_MS = 50.0
TARGET_RPS = 500.0


def _site(s: int) -> str:
    return f"bench-site-{s:02d}"


def _device(d: int) -> str:
    return f"bench-m{d:04d}"


def _register(conn: psycopg.Connection[Any], devices: int) -> None:
    conn.execute(
        "INSERT INTO tenants (tenant_id, name, industry_code) VALUES (%s, 'bench api', 'BENCH') "
        "ON CONFLICT DO NOTHING",
        (TENANT,),
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO sites (tenant_id, site_id, name, floor_area_m2, province) "
            "VALUES (%s, %s, %s, 20000, 'zhejiang') ON CONFLICT DO NOTHING",
            [(TENANT, _site(s), _site(s)) for s in range(SITES)],
        )
        cur.executemany(
            "INSERT INTO devices (tenant_id, device_id, site_id, role, rated_power_kw) "
            "VALUES (%s, %s, %s, 'grid', 100) ON CONFLICT DO NOTHING",
            [(TENANT, _device(d), _site(d % SITES)) for d in range(devices)],
        )


def _day_energy(day: int, devices: int) -> np.ndarray:
    """kWh per (minute, device): a daily shape times each meter's size, with noise."""
    rng = np.random.default_rng(day)
    minute = np.arange(1440)
    shape = 0.55 + 0.45 * np.clip(np.sin((minute - 360) / 1440 * 2 * np.pi), 0, None)
    size_kw = np.random.default_rng(7).uniform(5, 60, devices)
    noise = rng.uniform(0.9, 1.1, (1440, devices))
    energy: np.ndarray = (shape[:, None] * size_kw[None, :] * noise / 60).round(4)
    return energy


def _key_ids(conn: psycopg.Connection[Any], scope: str, entities: list[str]) -> list[int]:
    """The aggregate key of each entity (migration 0007), created when missing."""
    rows = conn.execute(
        "SELECT agg_key_of(%s, %s, e, 'energy_import_kwh') FROM unnest(%s::text[]) WITH ORDINALITY AS u(e, i) "
        "ORDER BY i",
        (scope, TENANT, entities),
    ).fetchall()
    return [int(r[0]) for r in rows]


def _frame(key_ids: list[int], buckets: list[datetime], values: np.ndarray, n: int) -> pl.DataFrame:
    """Rows (bucket-major) for one table: values is (buckets, entities)."""
    rows, cols = values.shape
    return pl.DataFrame(
        {
            "agg_key_id": np.tile(np.array(key_ids, np.int32), rows),
            "bucket": np.repeat(np.array([b.isoformat() for b in buckets]), cols),
            "total": values.reshape(-1),
            "n": np.full(rows * cols, n, dtype=np.int32),
            "max_value": values.reshape(-1) / n,
            "n_measured": np.full(rows * cols, n, dtype=np.int32),
        }
    )


def _copy(cur: psycopg.Cursor[Any], table: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.write_csv(buffer, include_header=False)
    # Straight into the value table: the compatibility view's trigger would take a row at a time.
    with cur.copy(f"COPY {table}_values ({COLUMNS}) FROM STDIN (FORMAT csv)") as copy:
        view = buffer.getbuffer()
        for lo in range(0, len(view), 8 << 20):
            copy.write(view[lo : lo + (8 << 20)])


def ensure_data(settings: Settings, devices: int, days: int, tick: Callable[[str], None]) -> int:
    """Load the days not loaded yet; returns the rows written."""
    written = 0
    # Autocommit, so that each day's `transaction()` commits on its own (a resumable load).
    with psycopg.connect(settings.db.conninfo(), autocommit=True) as conn:
        _register(conn, devices)
        device_ids = [_device(d) for d in range(devices)]
        site_of = np.arange(devices) % SITES
        site_ids = [_site(s) for s in range(SITES)]
        device_keys, site_keys = _key_ids(conn, "device", device_ids), _key_ids(conn, "site", site_ids)
        for day in range(days):
            start = FIRST_DAY + timedelta(days=day)
            last_hour = start + timedelta(hours=23)
            done = conn.execute(
                "SELECT 1 FROM agg_1h WHERE scope = 'site' AND tenant_id = %s AND entity_id = %s "
                "AND metric = 'energy_import_kwh' AND bucket = %s",
                (TENANT, site_ids[-1], last_hour),
            ).fetchone()
            if done:
                continue
            t0 = time.perf_counter()
            minute = _day_energy(day, devices)
            sites_minute = np.stack([minute[:, site_of == s].sum(axis=1) for s in range(SITES)], axis=1)
            minutes = [start + timedelta(minutes=m) for m in range(1440)]
            quarters, hours = minutes[::15], minutes[::60]
            with conn.transaction(), conn.cursor() as cur:
                for table, width, stamps in (
                    ("agg_1m", 1, minutes),
                    ("agg_15m", 15, quarters),
                    ("agg_1h", 60, hours),
                ):
                    per_device = minute.reshape(1440 // width, width, devices).sum(axis=1)
                    per_site = sites_minute.reshape(1440 // width, width, SITES).sum(axis=1)
                    _copy(cur, table, _frame(device_keys, stamps, per_device, width))
                    # The site rows last: the 1-hour site table's last row marks the day done.
                    _copy(cur, table, _frame(site_keys, stamps, per_site, width * devices // SITES))
                    written += per_device.size + per_site.size
            tick(f"day {day + 1}/{days} loaded ({time.perf_counter() - t0:.1f} s)")
        if written:
            for table in ("agg_1m", "agg_15m", "agg_1h"):
                conn.execute(f"ANALYZE {table}_values")
    return written


def _bench_key(settings: Settings) -> str:
    """A fresh enterprise key of the bench tenant (the previous one is replaced)."""
    from api.auth import hash_key

    key = f"mf_bench_{secrets.token_urlsafe(24)}"
    with psycopg.connect(settings.db.conninfo()) as conn:
        conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, tenant_id, role, label) VALUES ('bench-api', %s, %s, "
            "'enterprise', 'meterflow bench api') ON CONFLICT (key_id) DO UPDATE SET key_hash = EXCLUDED.key_hash, "
            "revoked_at = NULL",
            (hash_key(key), TENANT),
        )
    return key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(workers: int, pool_max: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {
        **os.environ,
        "METERFLOW_API__RATE_LIMIT_PER_S": "1000000000",
        "METERFLOW_API__RATE_LIMIT_BURST": "1000000000",
        "METERFLOW_DB__POOL_MAX": str(pool_max),
        "METERFLOW_LOG_LEVEL": "WARNING",
    }
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "api.app:app_factory",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(argv, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the API did not become ready within 60 s")


@dataclass(frozen=True, slots=True)
class Figures:
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int

    def row(self) -> dict[str, float | int]:
        return {
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "rps": self.rps,
            "requests": self.requests,
            "errors": self.errors,
        }


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk(url: str, key: str, connections: int, seconds: float) -> Figures:
    # One thread is plenty for wrk at these rates and leaves the second core to the server; slow
    # routes must not hit wrk's 2 s default timeout, which would count them as socket errors.
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "30s", "--latency"]
    out = subprocess.run(
        [*argv, "-H", f"Authorization: Bearer {key}", url], capture_output=True, text=True, check=True
    ).stdout

    def latency(pct: str) -> float:
        found = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"no {pct}% latency in wrk output:\n{out}")
        return float(found[1]) * _UNIT_MS[found[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    n_errors = (int(bad[1]) if bad else 0) + (sum(int(g) for g in errors.groups()) if errors else 0)
    return Figures(latency("50"), latency("99"), float(rps[1]), int(total[1]), n_errors)


async def _httpx_load(url: str, key: str, connections: int, seconds: float) -> Figures:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=30
    ) as client:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.get(url)
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code >= 300

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return Figures(
        float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms) / elapsed, len(ms), errors
    )


async def _psycopg_load(
    settings: Settings, sql: str, params: dict[str, Any], connections: int, seconds: float
) -> Figures:
    """The route's own query, straight from a psycopg pool at the same concurrency: the database's share."""
    from psycopg_pool import AsyncConnectionPool

    latencies: list[float] = []
    async with AsyncConnectionPool(
        settings.db.conninfo(), min_size=connections, max_size=connections
    ) as pool:
        await pool.wait()
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                async with pool.connection() as conn:
                    cur = await conn.execute(sql, params)
                    await cur.fetchall()  # the points as JSON text, as the route receives them
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return Figures(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms) / elapsed, len(ms), 0)


def run_api_bench(
    settings: Settings,
    *,
    devices: int,
    days: int,
    workers: int,
    pool_max: int,
    connections: int,
    seconds: float,
    tick: Callable[[str], None],
) -> dict[str, object]:
    from api.routes.load import POINTS_SQL

    tick(f"loading {days} days of 1-minute aggregates for {devices:,} meters (skipping days already there)")
    t0 = time.perf_counter()
    written = ensure_data(settings, devices, days, tick)
    load_s = time.perf_counter() - t0
    key = _bench_key(settings)
    day = FIRST_DAY + timedelta(days=min(days, 15) - 1)
    month_end = FIRST_DAY + timedelta(days=days)
    site = _site(3)
    routes = {
        "load_15m_one_day": f"/v1/sites/{site}/load?start={_q(day)}&end={_q(day + timedelta(days=1))}&interval=15m",
        "load_1h_30_days": f"/v1/sites/{site}/load?start={_q(FIRST_DAY)}&end={_q(month_end)}&interval=1h",
        "load_1d_30_days": f"/v1/sites/{site}/load?start={_q(FIRST_DAY)}&end={_q(month_end)}&interval=1d",
        "carbon_1d_30_days": f"/v1/enterprises/{TENANT}/carbon?start={_q(FIRST_DAY)}&end={_q(month_end)}&interval=1d",
        "healthz": "/healthz",
    }
    tool = "wrk" if shutil.which("wrk") else "httpx"
    tick(f"starting the API ({workers} uvicorn workers, pool {pool_max} each); load from {tool}")
    proc, url = _start_server(workers, pool_max)
    results: dict[str, Figures] = {}
    try:
        for name, path in routes.items():
            check = httpx.get(url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            if check.status_code != 200:
                raise RuntimeError(f"{name}: {check.status_code} {check.text[:300]}")
            # Warm-up: connections opened, caches filled, code paths run once per worker.
            _drive(tool, url + path, key, connections, 1.0)
            tick(f"{name}: {connections} connections for {seconds:g} s")
            results[name] = _drive(tool, url + path, key, connections, seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tick("the same 15-minute query straight from psycopg")
    direct = asyncio.run(
        _psycopg_load(
            settings,
            POINTS_SQL["15m"],
            {"tenant": TENANT, "site": site, "start": day, "end": day + timedelta(days=1), "tz": ZONE.key},
            connections,
            seconds,
        )
    )
    main, ceiling = results["load_15m_one_day"], results["healthz"]
    return {
        "bench": "api",
        "metric": "load_15m_one_day_requests_per_s",
        "value": round(main.rps, 1),
        "unit": "requests/s",
        "peer": "healthz",
        "peer_value": round(ceiling.rps, 1),
        "ratio": round(main.rps / ceiling.rps, 3),
        "p50_ms": round(main.p50_ms, 2),
        "p99_ms": round(main.p99_ms, 2),
        "targets_met": main.p99_ms <= TARGET_P99_MS and main.rps >= TARGET_RPS and main.errors == 0,
        "routes": {name: f.row() for name, f in {**results, "psycopg_15m_one_day": direct}.items()},
        "load_tool": tool,
        "workers": workers,
        "pool_max": pool_max,
        "connections": connections,
        "seconds": seconds,
        "rows_loaded": written,
        "load_s": round(load_s, 1),
    }


def _q(ts: datetime) -> str:
    return ts.isoformat().replace("+", "%2B")


def _drive(tool: str, url: str, key: str, connections: int, seconds: float) -> Figures:
    if tool == "wrk":
        return _wrk(url, key, connections, seconds)
    return asyncio.run(_httpx_load(url, key, connections, seconds))
