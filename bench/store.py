"""`meterflow bench store`: the processor's write path against a bare binary COPY of the same rows.

Both sides write the same readings into fresh copies of the ``readings`` hypertable in the same run:
the write path stages by COPY, de-duplicates into the hypertable and records offsets in one
transaction; the peer is a bare ``COPY ... FROM STDIN (FORMAT BINARY)`` into the hypertable.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import psycopg
from psycopg import sql

from meterflow.contract import DeviceReadings, Reading
from meterflow.settings import Settings
from processing import store


def make_batches(n_readings: int, n_devices: int, per_batch: int) -> list[list[DeviceReadings]]:
    per_device = max(1, n_readings // n_devices)
    t0 = 1_763_712_000_000
    devices = [
        DeviceReadings(
            "bench",
            "gw-bench",
            f"m-{d:05d}",
            t0,
            tuple(
                Reading(t0 + i * 60_000, "energy_import_kwh", 1000.0 + d + i * 0.5) for i in range(per_device)
            ),
        )
        for d in range(n_devices)
    ]
    batches: list[list[DeviceReadings]] = []
    current: list[DeviceReadings] = []
    count = 0
    for dev in devices:
        current.append(dev)
        count += len(dev.readings)
        if count >= per_batch:
            batches.append(current)
            current, count = [], 0
    if current:
        batches.append(current)
    return batches


async def _fresh_table(conn: psycopg.AsyncConnection[tuple[object, ...]], name: str) -> None:
    await conn.execute(sql.SQL("CREATE TABLE {} (LIKE readings INCLUDING ALL)").format(sql.Identifier(name)))
    await conn.execute(
        "SELECT create_hypertable(%s, by_range('ts', INTERVAL '1 day'), create_default_indexes => false)",
        (name,),
    )
    await conn.commit()


async def _run(
    settings: Settings, n_readings: int, n_devices: int, per_batch: int, tick: Callable[[str], None]
) -> dict[str, object]:
    batches = make_batches(n_readings, n_devices, per_batch)
    total = sum(len(d.readings) for b in batches for d in b)
    suffix = uuid.uuid4().hex[:8]
    async with await psycopg.AsyncConnection.connect(settings.db.conninfo()) as conn:
        peer_table, path_table = f"bench_copy_{suffix}", f"bench_path_{suffix}"
        await _fresh_table(conn, peer_table)
        await _fresh_table(conn, path_table)
        try:
            tick(f"bare binary COPY of {total:,} readings in {len(batches)} transactions")
            started = time.perf_counter()
            for batch in batches:
                async with conn.transaction(), conn.cursor() as cur:
                    copy_sql = sql.SQL(
                        "COPY {} (tenant_id, device_id, metric, ts, value, gateway_id, received_at) "
                        "FROM STDIN (FORMAT BINARY)"
                    ).format(sql.Identifier(peer_table))
                    async with cur.copy(copy_sql) as copy:
                        copy.set_types(list(store.COPY_TYPES))
                        for row in store.copy_rows(batch):
                            await copy.write_row(row)
            peer_s = time.perf_counter() - started

            tick("processor write path (stage, de-duplicate, offsets) of the same readings")
            await store.prepare(conn)
            started = time.perf_counter()
            for i, batch in enumerate(batches):
                await store.write_batch(
                    conn,
                    batch,
                    group=f"bench-{suffix}",
                    topic="bench",
                    next_offsets={0: i + 1},
                    table=path_table,
                )
            path_s = time.perf_counter() - started
        finally:
            for table in (peer_table, path_table):
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            await conn.execute(
                "DELETE FROM processor_offsets WHERE consumer_group = %s", (f"bench-{suffix}",)
            )
            await conn.commit()
    value, peer_value = total / path_s, total / peer_s
    return {
        "bench": "store",
        "metric": "readings_per_s",
        "value": round(value),
        "unit": "readings/s",
        "peer": "bare binary COPY into the same hypertable",
        "peer_value": round(peer_value),
        "ratio": round(value / peer_value, 3),
    }


def run_store_bench(
    settings: Settings, *, n_readings: int, n_devices: int, per_batch: int, tick: Callable[[str], None]
) -> dict[str, object]:
    return asyncio.run(_run(settings, n_readings, n_devices, per_batch, tick))
