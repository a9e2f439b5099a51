"""Shared by the API tests (no tests here): known aggregates written straight into the tables the processor
fills, and the API served in-process by uvicorn (lifespan included) on a free port."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import psycopg
import uvicorn
from pydantic import SecretStr

from deploy.local import stack
from meterflow.settings import ApiSettings, Settings

SHANGHAI = ZoneInfo("Asia/Shanghai")
QUARTER = timedelta(minutes=15)
# Two local days in different months of 2025; March has no certificates, April is fully covered.
DAY_MARCH = date(2025, 3, 10)
DAY_APRIL = date(2025, 4, 2)
PEAK_QUARTER = 40  # 10:00-10:15 local: a peak slot in the Zhejiang calendar
IMPORT_KWH = 10.0
PEAK_IMPORT_KWH = 30.0
EXPORT_KWH = 2.0  # in quarter 0 only
GAS_NM3 = 5.0  # in quarter 50 only
PV_KWH = 1.5  # per quarter, 40 quarters a day
DAY_IMPORT = 95 * IMPORT_KWH + PEAK_IMPORT_KWH
DAY_NET = DAY_IMPORT - EXPORT_KWH


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    url: str
    admin_key: str
    settings: Settings

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key or self.admin_key}"}, timeout=60
        )


def serve(base: Settings, **api: object) -> Iterator[ApiServer]:
    """Uvicorn in a thread with generous rate limits unless `api` says otherwise."""
    from api.app import create_app

    admin_key = stack.admin_key(base)
    options: dict[str, object] = {"rate_limit_per_s": 100_000.0, "rate_limit_burst": 100_000, **api}
    settings = Settings(
        bootstrap_admin_key=SecretStr(admin_key),
        api=ApiSettings(**options),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    try:
        yield ApiServer(url, admin_key, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Fleet:
    run: str
    tenant: str  # the enterprise with data
    site: str
    industry: str
    peers: list[str]  # same industry, value added submitted (the tenant included)
    other: str  # another enterprise with data, for cross-tenant checks
    other_site: str
    other_device: str


def quarter_rows(tenant: str, site: str, day: date) -> list[tuple[object, ...]]:
    start = datetime.combine(day, datetime.min.time(), SHANGHAI).astimezone(UTC)
    rows: list[tuple[object, ...]] = []
    for q in range(96):
        bucket = start + q * QUARTER
        imp = PEAK_IMPORT_KWH if q == PEAK_QUARTER else IMPORT_KWH
        estimated = 1 if q == 7 else 0
        late = 1 if q == 8 else 0
        rows.append(
            ("site", tenant, site, "energy_import_kwh", bucket, imp, 15, 15 - estimated, estimated, late)
        )
        if q == 0:
            rows.append(("site", tenant, site, "energy_export_kwh", bucket, EXPORT_KWH, 15, 15, 0, 0))
        if q == 50:
            rows.append(("site", tenant, site, "gas_nm3", bucket, GAS_NM3, 15, 15, 0, 0))
        if 30 <= q < 70:
            rows.append(("device", tenant, f"{site}-pv", "energy_export_kwh", bucket, PV_KWH, 15, 15, 0, 0))
    return rows


def hour_rows(quarters: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    hours: dict[tuple[object, ...], list[object]] = {}
    for scope, tenant, entity, metric, bucket, total, n, nm, ne, late in quarters:
        assert isinstance(bucket, datetime)
        key = (scope, tenant, entity, metric, bucket.replace(minute=0))
        acc = hours.setdefault(key, [0.0, 0, 0, 0, 0])
        for i, v in enumerate((total, n, nm, ne, late)):
            acc[i] += v  # type: ignore[operator]
    return [(*k, *v) for k, v in hours.items()]


def load_fleet(settings: Settings) -> Fleet:
    run = uuid.uuid4().hex[:8]
    tenant, other = f"api{run}-a", f"api{run}-b"
    industry = f"T{run}"
    peers = [tenant, f"api{run}-p1", f"api{run}-p2"]
    with psycopg.connect(settings.db.conninfo()) as conn:
        for t in [*peers, other]:
            conn.execute(
                "INSERT INTO tenants (tenant_id, name, industry_code) VALUES (%s, %s, %s)",
                (t, t, industry if t in peers else None),
            )
            site = f"{t}-s1"
            conn.execute(
                "INSERT INTO sites (tenant_id, site_id, name, floor_area_m2, province) VALUES (%s, %s, %s, 1000, 'zhejiang')",
                (t, site, site),
            )
            conn.execute(
                "INSERT INTO devices (tenant_id, device_id, site_id, role) VALUES (%s, %s, %s, 'grid')",
                (t, f"{site}-grid", site),
            )
            conn.execute(
                "INSERT INTO devices (tenant_id, device_id, site_id, role, device_type) VALUES (%s, %s, %s, 'resource', 'pv')",
                (t, f"{site}-pv", site),
            )
        quarters: list[tuple[object, ...]] = []
        for t in [*peers, other]:
            quarters += quarter_rows(t, f"{t}-s1", DAY_MARCH)
        quarters += quarter_rows(tenant, f"{tenant}-s1", DAY_APRIL)
        cols = (
            "scope, tenant_id, entity_id, metric, bucket, total, n, n_measured, n_estimated, late_corrections"
        )
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO agg_15m ({cols}, corrected_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                "CASE WHEN %s > 0 THEN now() END)",
                [(*r, r[-1]) for r in quarters],
            )
            cur.executemany(
                f"INSERT INTO agg_1h ({cols}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                hour_rows(quarters),
            )
            # Three minutes of the March day at 1-minute resolution.
            start = datetime.combine(DAY_MARCH, datetime.min.time(), SHANGHAI)
            cur.executemany(
                f"INSERT INTO agg_1m ({cols}) VALUES ('site', %s, %s, 'energy_import_kwh', %s, %s, 1, 1, 0, 0)",
                [(tenant, f"{tenant}-s1", start + timedelta(minutes=m), 0.5 + m) for m in range(3)],
            )
        conn.execute(
            "INSERT INTO green_certificates (tenant_id, certificate_id, period_start, period_end, certificates) "
            "VALUES (%s, 'gec-1', '2025-04-01', '2025-05-01', 1)",
            (tenant,),
        )
    return Fleet(
        run=run,
        tenant=tenant,
        site=f"{tenant}-s1",
        industry=industry,
        peers=peers,
        other=other,
        other_site=f"{other}-s1",
        other_device=f"{other}-s1-grid",
    )
