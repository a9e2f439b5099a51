"""TimescaleDB I/O of the processor. Everything a batch writes (raw readings, reading flags, aggregate
deltas, the audit entry and the Kafka offsets) goes through one transaction the caller holds.

Timestamps cross the wire as PostgreSQL's binary timestamptz, which is a big-endian int64 of
microseconds since 2000-01-01 UTC: identical on the wire to an int8, so epoch milliseconds become a
COPY value with one integer operation instead of a datetime per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg

from processing.registry import SeriesKey

PG_EPOCH_MS = 946_684_800_000

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Cur = psycopg.AsyncCursor[tuple[Any, ...]]


def pg_us(ms: int) -> int:
    return (ms - PG_EPOCH_MS) * 1000


_STAGE_DDL = (
    """CREATE TEMP TABLE IF NOT EXISTS readings_stage (
        tenant_id text, device_id text, metric text, ts timestamptz, value double precision,
        gateway_id text, received_at timestamptz, audit_batch bigint
    ) ON COMMIT DELETE ROWS""",
    """CREATE TEMP TABLE IF NOT EXISTS agg_stage (
        scope text, tenant_id text, entity_id text, metric text, bucket timestamptz,
        total double precision, n integer, max_value double precision, n_measured integer,
        n_estimated integer, n_substituted integer, n_flagged integer, n_uncalibrated integer,
        late_corrections integer
    ) ON COMMIT DELETE ROWS""",
)

READING_COLUMNS = "tenant_id, device_id, metric, ts, value, gateway_id, received_at, audit_batch"
READING_TYPES = ("text", "text", "text", "int8", "float8", "text", "int8", "int8")
AGG_COLUMNS = (
    "scope, tenant_id, entity_id, metric, bucket, total, n, max_value, n_measured, n_estimated, "
    "n_substituted, n_flagged, n_uncalibrated, late_corrections"
)
AGG_TYPES = ("text", "text", "text", "text", "int8", "float8", "int4", "float8") + ("int4",) * 6

ReadingRow = tuple[str, str, str, int, float, str, int, int]
AggRow = tuple[str, str, str, str, int, float, int, float | None, int, int, int, int, int, int]


async def prepare(conn: Conn) -> None:
    for ddl in _STAGE_DDL:
        await conn.execute(ddl)
    await conn.commit()


async def copy_readings(cur: Cur, rows: Iterable[ReadingRow], table: str = "readings") -> int:
    """Readings known to be new (newer than anything stored for their series) go straight in; a
    unique violation means that knowledge was wrong and aborts the batch."""
    n = 0
    async with cur.copy(f"COPY {table} ({READING_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(list(READING_TYPES))
        for row in rows:
            await copy.write_row(row)
            n += 1
    return n


async def insert_unless_stored(cur: Cur, rows: Sequence[ReadingRow]) -> list[tuple[str, str, str, int]]:
    """Readings that may already be stored: insert the new ones, return their keys (tenant, device,
    metric, ts_ms); the rest are duplicates."""
    if not rows:
        return []
    await copy_readings(cur, rows, "readings_stage")
    await cur.execute(f"""
        INSERT INTO readings ({READING_COLUMNS})
        SELECT {READING_COLUMNS} FROM readings_stage
        ON CONFLICT (tenant_id, device_id, metric, ts) DO NOTHING
        RETURNING tenant_id, device_id, metric, (extract(epoch FROM ts) * 1000)::bigint""")
    inserted = await cur.fetchall()
    await cur.execute("TRUNCATE readings_stage")
    return [(str(t), str(d), str(m), int(ts)) for t, d, m, ts in inserted]


async def load_series_state(
    conn: Conn, keys: Sequence[SeriesKey]
) -> list[tuple[int | None, int | None, float | None]]:
    """Per series: the newest stored reading's ts, and the newest reading VEE did not flag (the
    register's anchor) with its value."""
    if not keys:
        return []
    cur = await conn.execute(
        """
        SELECT k.i, (extract(epoch FROM newest.ts) * 1000)::bigint,
               (extract(epoch FROM anchor.ts) * 1000)::bigint, anchor.value
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[]) AS k(tenant, device, metric, i)
        LEFT JOIN LATERAL (
            SELECT r.ts FROM readings r
            WHERE r.tenant_id = k.tenant AND r.device_id = k.device AND r.metric = k.metric
            ORDER BY r.ts DESC LIMIT 1) newest ON true
        LEFT JOIN LATERAL (
            SELECT r.ts, r.value FROM readings r
            WHERE r.tenant_id = k.tenant AND r.device_id = k.device AND r.metric = k.metric
              AND NOT EXISTS (SELECT 1 FROM reading_flags f
                              WHERE f.tenant_id = r.tenant_id AND f.device_id = r.device_id
                                AND f.metric = r.metric AND f.ts = r.ts)
            ORDER BY r.ts DESC LIMIT 1) anchor ON true
        ORDER BY k.i""",
        (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            list(range(len(keys))),
        ),
    )
    rows = await cur.fetchall()
    await conn.commit()
    return [(newest, anchor_ts, anchor_value) for _, newest, anchor_ts, anchor_value in rows]


async def register_window(cur: Cur, key: SeriesKey, first_ms: int, last_ms: int) -> list[tuple[int, float]]:
    """The reads of one register a late read can change: from the last unflagged read before `first_ms`
    (an anchor the register was booked from) to `last_ms`, flagged reads included, since the late read
    may clear them (or flag others)."""
    await cur.execute(
        """
        (SELECT r.ts, r.value FROM readings r
         WHERE r.tenant_id = %(t)s AND r.device_id = %(d)s AND r.metric = %(m)s
           AND r.ts < to_timestamp(%(a)s / 1000.0)
           AND NOT EXISTS (SELECT 1 FROM reading_flags f
                           WHERE f.tenant_id = r.tenant_id AND f.device_id = r.device_id
                             AND f.metric = r.metric AND f.ts = r.ts)
         ORDER BY r.ts DESC LIMIT 1)
        UNION ALL
        (SELECT ts, value FROM readings
         WHERE tenant_id = %(t)s AND device_id = %(d)s AND metric = %(m)s
           AND ts >= to_timestamp(%(a)s / 1000.0) AND ts <= to_timestamp(%(b)s / 1000.0))
        """,
        {"t": key[0], "d": key[1], "m": key[2], "a": first_ms, "b": last_ms},
    )
    rows = await cur.fetchall()
    return sorted((round(ts.timestamp() * 1000), float(value)) for ts, value in rows)


async def clear_flags(cur: Cur, rows: Sequence[tuple[str, str, str, int]]) -> None:
    if rows:
        await cur.executemany(
            "DELETE FROM reading_flags WHERE tenant_id = %s AND device_id = %s AND metric = %s "
            "AND ts = to_timestamp(%s / 1000.0)",
            rows,
        )


async def insert_flags(cur: Cur, rows: Sequence[tuple[str, str, str, int, str]]) -> None:
    if rows:
        await cur.executemany(
            "INSERT INTO reading_flags (tenant_id, device_id, metric, ts, flag) "
            "VALUES (%s, %s, %s, to_timestamp(%s / 1000.0), %s) ON CONFLICT DO NOTHING",
            rows,
        )


async def next_audit_batch(cur: Cur) -> int:
    await cur.execute("SELECT nextval('audit_batch_seq')")
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("nextval returned no row")
    return int(row[0])


async def upsert_aggregates(cur: Cur, table: str, rows: Iterable[AggRow]) -> int:
    """Add deltas to the aggregate rows: every column is a sum or a count (the maximum only grows), so a
    batch and a late correction are the same operation."""
    n = 0
    async with cur.copy(f"COPY agg_stage ({AGG_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(list(AGG_TYPES))
        for row in rows:
            await copy.write_row(row)
            n += 1
    if n:
        await cur.execute(f"""
            INSERT INTO {table} AS a ({AGG_COLUMNS}, corrected_at)
            SELECT {AGG_COLUMNS}, CASE WHEN late_corrections > 0 THEN now() END FROM agg_stage
            ON CONFLICT (scope, tenant_id, entity_id, metric, bucket) DO UPDATE SET
                total = a.total + EXCLUDED.total,
                n = a.n + EXCLUDED.n,
                max_value = GREATEST(a.max_value, EXCLUDED.max_value),
                n_measured = a.n_measured + EXCLUDED.n_measured,
                n_estimated = a.n_estimated + EXCLUDED.n_estimated,
                n_substituted = a.n_substituted + EXCLUDED.n_substituted,
                n_flagged = a.n_flagged + EXCLUDED.n_flagged,
                n_uncalibrated = a.n_uncalibrated + EXCLUDED.n_uncalibrated,
                late_corrections = a.late_corrections + EXCLUDED.late_corrections,
                corrected_at = COALESCE(EXCLUDED.corrected_at, a.corrected_at),
                updated_at = now()""")
        await cur.execute("TRUNCATE agg_stage")
    return n


async def save_offsets(cur: Cur, *, group: str, topic: str, next_offsets: Mapping[int, int]) -> None:
    await cur.executemany(
        """INSERT INTO processor_offsets (consumer_group, topic, kafka_partition, next_offset)
        VALUES (%s, %s, %s, %s)
        ON CONFLICT (consumer_group, topic, kafka_partition)
        DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()""",
        [(group, topic, p, o) for p, o in next_offsets.items()],
    )


async def load_offsets(conn: Conn, *, group: str, topic: str) -> dict[int, int]:
    cur = await conn.execute(
        "SELECT kafka_partition, next_offset FROM processor_offsets WHERE consumer_group = %s AND topic = %s",
        (group, topic),
    )
    rows = await cur.fetchall()
    await conn.commit()
    return {int(p): int(o) for p, o in rows}
