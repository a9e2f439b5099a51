"""TimescaleDB writes: raw readings by binary COPY, and Kafka offsets in the same transaction.

Exactly-once comes from two rules: a reading is inserted at most once (unique tenant/device/metric/ts;
a duplicate is counted, not added), and the offsets that produced a batch are committed in the same
transaction as its rows, so a restart resumes exactly after the last committed batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from meterflow.contract import DeviceReadings

_STAGE_DDL = """
CREATE TEMP TABLE IF NOT EXISTS readings_stage (
    tenant_id text, device_id text, metric text, ts timestamptz, value double precision,
    gateway_id text, received_at timestamptz
) ON COMMIT DELETE ROWS
"""

_COPY = (
    "COPY readings_stage (tenant_id, device_id, metric, ts, value, gateway_id, received_at) "
    "FROM STDIN (FORMAT BINARY)"
)
COPY_TYPES = ("text", "text", "text", "timestamptz", "float8", "text", "timestamptz")

# Within one batch the same reading may arrive twice (an MQTT redelivery); DISTINCT ON keeps one.
_MERGE = sql.SQL("""
INSERT INTO {} (tenant_id, device_id, metric, ts, value, gateway_id, received_at)
SELECT DISTINCT ON (tenant_id, device_id, metric, ts)
       tenant_id, device_id, metric, ts, value, gateway_id, received_at
FROM readings_stage
ON CONFLICT (tenant_id, device_id, metric, ts) DO NOTHING
""")

_SAVE_OFFSET = """
INSERT INTO processor_offsets (consumer_group, topic, kafka_partition, next_offset)
VALUES (%s, %s, %s, %s)
ON CONFLICT (consumer_group, topic, kafka_partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()
"""


@dataclass(frozen=True, slots=True)
class WriteResult:
    staged: int
    inserted: int

    @property
    def duplicates(self) -> int:
        return self.staged - self.inserted


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def copy_rows(batch: Iterable[DeviceReadings]) -> Iterable[tuple[object, ...]]:
    for dev in batch:
        received = _utc(dev.received_ms)
        for r in dev.readings:
            yield (dev.tenant, dev.device, r.metric, _utc(r.ts_ms), r.value, dev.gateway, received)


async def prepare(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
    await conn.execute(_STAGE_DDL)
    await conn.commit()


async def write_batch(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
    batch: Iterable[DeviceReadings],
    *,
    group: str,
    topic: str,
    next_offsets: Mapping[int, int],
    table: str = "readings",
) -> WriteResult:
    """Insert readings and record next offsets atomically; the caller's connection must be idle."""
    async with conn.transaction(), conn.cursor() as cur:
        staged = 0
        async with cur.copy(_COPY) as copy:
            copy.set_types(list(COPY_TYPES))
            for row in copy_rows(batch):
                await copy.write_row(row)
                staged += 1
        await cur.execute(_MERGE.format(sql.Identifier(table)))
        inserted = cur.rowcount
        await cur.executemany(_SAVE_OFFSET, [(group, topic, p, o) for p, o in next_offsets.items()])
    return WriteResult(staged, inserted)


async def load_offsets(
    conn: psycopg.AsyncConnection[tuple[object, ...]], *, group: str, topic: str
) -> dict[int, int]:
    cur = await conn.execute(
        "SELECT kafka_partition, next_offset FROM processor_offsets WHERE consumer_group = %s AND topic = %s",
        (group, topic),
    )
    rows = await cur.fetchall()
    await conn.commit()
    return {int(str(p)): int(str(o)) for p, o in rows}
