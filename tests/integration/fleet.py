"""What integration tests read back from the database after running a simulated fleet."""

from __future__ import annotations

import time

import psycopg

from tests.integration.conftest import Pipeline
from tests.truthcheck import REGISTER_METRICS


def wait_for_readings(p: Pipeline, tenants: list[str], count: int) -> dict[tuple[str, str, str, int], float]:
    deadline = time.monotonic() + 120
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        while True:
            rows = conn.execute(
                "SELECT tenant_id, device_id, metric, (extract(epoch FROM ts) * 1000)::bigint, value "
                "FROM readings WHERE tenant_id = ANY(%s)",
                (tenants,),
            ).fetchall()
            if len(rows) >= count or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert len(rows) == count, f"{len(rows)} readings stored, expected {count}"
    return {(t, d, m, ts): v for t, d, m, ts, v in rows}


def device_aggregates(p: Pipeline, tenants: list[str], table: str) -> dict[tuple[str, str, str, int], float]:
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        rows = conn.execute(
            f"SELECT tenant_id, entity_id, metric, (extract(epoch FROM bucket) * 1000)::bigint, total "
            f"FROM {table} WHERE scope = 'device' AND tenant_id = ANY(%s) AND metric = ANY(%s)",
            (tenants, list(REGISTER_METRICS)),
        ).fetchall()
    return {(t, d, m, b): v for t, d, m, b, v in rows}
