"""TimescaleDB I/O of the processor. Everything a batch writes (raw readings, reading flags, aggregate
deltas, the audit entry and the Kafka offsets) goes through one transaction the caller holds.

Bulk rows arrive as complete binary COPY streams (`processing.pgcopy`); the processor writes the value
tables under integer keys (migration 0007) and never the compatibility views.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
Cur = psycopg.AsyncCursor[tuple[Any, ...]]

AGG_TABLES = ("agg_1m", "agg_15m", "agg_1h")

# One stage per use in a poll, emptied by the commit: no TRUNCATE (a new file per call) between uses.
_STAGE_DDL = (
    """CREATE TEMP TABLE IF NOT EXISTS readings_stage (
        series_id integer, ts timestamptz, value double precision, gateway_id text,
        received_at timestamptz, audit_batch bigint
    ) ON COMMIT DELETE ROWS""",
    *(
        f"""CREATE TEMP TABLE IF NOT EXISTS {table}_stage (
            agg_key_id integer, bucket timestamptz, total double precision, n integer,
            max_value double precision, n_measured integer, n_estimated integer, n_substituted integer,
            n_flagged integer, n_uncalibrated integer, late_corrections integer
        ) ON COMMIT DELETE ROWS"""
        for table in AGG_TABLES
    ),
)

# The column order pgcopy's encoders write.
READING_COLUMNS = "series_id, ts, value, gateway_id, received_at, audit_batch"
AGG_COLUMNS = (
    "agg_key_id, bucket, total, n, max_value, n_measured, n_estimated, n_substituted, n_flagged, "
    "n_uncalibrated, late_corrections"
)


async def prepare(conn: Conn) -> None:
    for ddl in _STAGE_DDL:
        await conn.execute(ddl)
    await conn.commit()


async def _copy(cur: Cur, table: str, columns: str, stream: bytes) -> None:
    async with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        await copy.write(stream)


async def copy_readings(cur: Cur, stream: bytes, table: str = "reading_values") -> None:
    """Readings known to be new (newer than anything stored for their series) go straight in; a
    unique violation means that knowledge was wrong and aborts the batch."""
    await _copy(cur, table, READING_COLUMNS, stream)


async def insert_unless_stored(
    cur: Cur, stream: bytes
) -> tuple[list[tuple[int, int]], list[tuple[int, int, float]]]:
    """Readings that may already be stored: insert the new ones and return their (series_id, ts_ms); the
    rest are duplicates, of which those whose stored value differs are returned as conflicts (series_id,
    ts_ms, stored value). Once per poll (the stage empties at commit)."""
    await _copy(cur, "readings_stage", READING_COLUMNS, stream)
    # The statement's scan of reading_values does not see the rows its own INSERT adds: the join finds
    # exactly the readings that were stored before.
    await cur.execute(f"""
        WITH inserted AS (
            INSERT INTO reading_values ({READING_COLUMNS})
            SELECT {READING_COLUMNS} FROM readings_stage
            ON CONFLICT (series_id, ts) DO NOTHING
            RETURNING series_id, ts)
        SELECT series_id, (extract(epoch FROM ts) * 1000)::bigint, NULL::float8 FROM inserted
        UNION ALL
        SELECT r.series_id, (extract(epoch FROM r.ts) * 1000)::bigint, r.value
        FROM readings_stage s JOIN reading_values r ON r.series_id = s.series_id AND r.ts = s.ts
        WHERE r.value <> s.value""")
    inserted: list[tuple[int, int]] = []
    conflicts: list[tuple[int, int, float]] = []
    for series, ts, stored in await cur.fetchall():
        if stored is None:
            inserted.append((int(series), int(ts)))
        else:
            conflicts.append((int(series), int(ts), float(stored)))
    return inserted, conflicts


async def load_series_state(
    conn: Conn, series_ids: Sequence[int]
) -> list[tuple[int | None, int | None, float | None]]:
    """Per series: the newest stored reading's ts, and the newest reading VEE did not flag (the
    register's anchor) with its value."""
    if not series_ids:
        return []
    cur = await conn.execute(
        """
        SELECT k.i, (extract(epoch FROM newest.ts) * 1000)::bigint,
               (extract(epoch FROM anchor.ts) * 1000)::bigint, anchor.value
        FROM unnest(%s::int[], %s::int[]) AS k(series_id, i)
        JOIN series s USING (series_id)
        LEFT JOIN LATERAL (
            SELECT r.ts FROM reading_values r WHERE r.series_id = k.series_id
            ORDER BY r.ts DESC LIMIT 1) newest ON true
        LEFT JOIN LATERAL (
            SELECT r.ts, r.value FROM reading_values r
            WHERE r.series_id = k.series_id
              AND NOT EXISTS (SELECT 1 FROM reading_flags f
                              WHERE f.tenant_id = s.tenant_id AND f.device_id = s.device_id
                                AND f.metric = s.metric AND f.ts = r.ts)
            ORDER BY r.ts DESC LIMIT 1) anchor ON true
        ORDER BY k.i""",
        (list(series_ids), list(range(len(series_ids)))),
    )
    rows = await cur.fetchall()
    await conn.commit()
    return [(newest, anchor_ts, anchor_value) for _, newest, anchor_ts, anchor_value in rows]


async def register_window(cur: Cur, series_id: int, first_ms: int, last_ms: int) -> list[tuple[int, float]]:
    """The reads of one register a late read can change: from the last unflagged read before `first_ms`
    (an anchor the register was booked from) to `last_ms`, flagged reads included, since the late read
    may clear them (or flag others)."""
    await cur.execute(
        """
        (SELECT r.ts, r.value FROM reading_values r JOIN series s USING (series_id)
         WHERE r.series_id = %(s)s AND r.ts < to_timestamp(%(a)s / 1000.0)
           AND NOT EXISTS (SELECT 1 FROM reading_flags f
                           WHERE f.tenant_id = s.tenant_id AND f.device_id = s.device_id
                             AND f.metric = s.metric AND f.ts = r.ts)
         ORDER BY r.ts DESC LIMIT 1)
        UNION ALL
        (SELECT ts, value FROM reading_values
         WHERE series_id = %(s)s AND ts >= to_timestamp(%(a)s / 1000.0) AND ts <= to_timestamp(%(b)s / 1000.0))
        """,
        {"s": series_id, "a": first_ms, "b": last_ms},
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


async def next_audit_batches(cur: Cur, n: int) -> list[int]:
    await cur.execute("SELECT nextval('audit_batch_seq') FROM generate_series(1, %s)", (n,))
    return [int(row[0]) for row in await cur.fetchall()]


async def copy_aggregates(cur: Cur, table: str, stream: bytes) -> None:
    """Aggregate rows known not to exist yet (buckets after anything stored for their series)."""
    await _copy(cur, f"{table}_values", AGG_COLUMNS, stream)


async def upsert_aggregates(cur: Cur, table: str, streams: Sequence[bytes]) -> None:
    """Add deltas to the aggregate rows: every column is a sum or a count (the maximum only grows), so a
    batch and a late correction are the same operation. Once per table and poll; the streams' keys must
    not repeat (one upsert may touch a row only once)."""
    for stream in streams:
        await _copy(cur, f"{table}_stage", AGG_COLUMNS, stream)
    await cur.execute(f"""
        INSERT INTO {table}_values AS a ({AGG_COLUMNS}, corrected_at)
        SELECT {AGG_COLUMNS}, CASE WHEN late_corrections > 0 THEN now() END FROM {table}_stage
        ON CONFLICT (agg_key_id, bucket) DO UPDATE SET
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
