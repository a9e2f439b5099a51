"""Audit chain against the real database: append, verify, tampering caught, retention retires entries.

Readings are append-only (migration 0004), and the ``meterflow`` role may neither disable a trigger
on a hypertable (TimescaleDB refuses) nor set ``session_replication_role`` (superuser only). Tampering
therefore drops the trigger and recreates it from its own definition in one transaction, as an
attacker owning the table could; the cleanup does the same to remove the test's rows.

Time ranges are this file's own: the audit tests write a random day in 2003-2012, the retention test
January 2001, and retention is applied with a cutoff of 1 February 2001, so no other test's chunks
(nor any recent one) can be dropped.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest
from prometheus_client import REGISTRY

from meterflow.settings import Settings
from processing.audit import AuditError, AuditLog, Key, Problem, verify
from processing.privileges import retention_floor_days
from processing.retention import apply_retention

HOUR_MS = 3_600_000


@pytest.fixture
async def conn(base_settings: Settings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    # The owner role: tampering (dropping the trigger) and clean-up are beyond the services' role.
    async with await psycopg.AsyncConnection.connect(base_settings.db.owner_conninfo()) as c:
        yield c


def _ms(day: date, hour: float = 0) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000 + hour * HOUR_MS)


class Writer:
    """Writes batches the way the processor does: rows and their audit entries in one transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], tenant: str, topic: str) -> None:
        self.conn = conn
        self.tenant = tenant
        self.log = AuditLog(topic)
        self.keys: list[Key] = [
            (tenant, f"m-{d}", metric) for d in range(3) for metric in ("energy_import_kwh", "power_kw")
        ]
        self.rng = np.random.default_rng(11)

    def rows(self, start_ms: int, hours: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        steps = int(hours * 4)  # every 15 minutes
        series = np.repeat(np.arange(len(self.keys), dtype=np.int32), steps)
        ts = np.tile(start_ms + np.arange(steps, dtype=np.int64) * 900_000, len(self.keys))
        values = np.round(self.rng.uniform(0, 500, len(series)), 3) + self.rng.uniform(0, 1e-9, len(series))
        return series, ts, values

    async def write(self, partition: int, start_ms: int, hours: float) -> int:
        series, ts, values = self.rows(start_ms, hours)
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.execute("SELECT nextval('audit_batch_seq')")
            row = await cur.fetchone()
            assert row is not None
            batch = int(row[0])
            await self.insert(cur, batch, series, ts, values)
            await self.log.append(
                cur,
                partition=partition,
                audit_batch=batch,
                keys=self.keys,
                series=series,
                ts_ms=ts,
                values=values,
            )
        return batch

    async def insert(
        self,
        cur: psycopg.AsyncCursor[Any],
        batch: int | None,
        series: np.ndarray,
        ts: np.ndarray,
        values: np.ndarray,
    ) -> None:
        async with cur.copy(
            "COPY readings (tenant_id, device_id, metric, ts, value, gateway_id, received_at, audit_batch) "
            "FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "text", "text", "timestamptz", "float8", "text", "timestamptz", "int8"])
            now = datetime.now(UTC)
            for s, t, v in zip(series.tolist(), ts.tolist(), values.tolist(), strict=True):
                tenant, device, metric = self.keys[s]
                stamp = datetime.fromtimestamp(t / 1000, UTC)
                await copy.write_row((tenant, device, metric, stamp, v, "gw-audit", now, batch))


M0_POWER = "SELECT series_id FROM series WHERE tenant_id = %s AND device_id = 'm-0' AND metric = 'power_kw'"


async def _bypassing_append_only(
    conn: psycopg.AsyncConnection[Any], *statements: tuple[str, tuple[Any, ...]]
) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger "
            "WHERE tgrelid = 'reading_values'::regclass AND tgname = 'readings_append_only'"
        )
        row = await cur.fetchone()
        assert row is not None, "migration 0004 not applied"
        await cur.execute("DROP TRIGGER readings_append_only ON reading_values")
        for query, params in statements:
            await cur.execute(query, params)
        await cur.execute(row[0])


async def _clean_up(conn: psycopg.AsyncConnection[Any], tenant: str, topic: str, day: date) -> None:
    """Remove the test's rows and entries, and the chunks of its days (empty by then)."""
    await _bypassing_append_only(
        conn,
        (
            "DELETE FROM reading_values WHERE series_id IN (SELECT series_id FROM series WHERE tenant_id = %s)",
            (tenant,),
        ),
    )
    await conn.execute("DELETE FROM audit_chain WHERE topic = %s", (topic,))
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    await conn.execute(
        "SELECT drop_chunks('reading_values', newer_than => %s, older_than => %s)",
        (start, start + timedelta(days=2)),
    )
    await conn.commit()


async def test_verify_catches_changed_deleted_and_forged_rows(conn: psycopg.AsyncConnection[Any]) -> None:
    run = uuid.uuid4().hex[:8]
    tenant, topic = f"audit-{run}", f"test-audit-{run}"
    day = date(2003, 1, 1) + timedelta(days=random.randrange(3650))
    next_day = day + timedelta(days=1)
    w = Writer(conn, tenant, topic)
    try:
        # Batch a crosses midnight: one entry on each day. b and c follow on the next day.
        batch_a = await w.write(0, _ms(day, 22), 4)
        batch_b = await w.write(1, _ms(next_day, 3), 2)
        batch_c = await w.write(0, _ms(next_day, 6), 2)
        n_rows = len(w.keys) * 4 * 8

        report = await verify(conn, topic=topic)
        assert report.ok, report.as_dict()
        assert (report.entries_checked, report.rows_checked) == (4, n_rows)
        one_chain = await verify(conn, topic=topic, day=next_day, partition=0)
        assert one_chain.ok and one_chain.entries_checked == 2

        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute(
                "UPDATE reading_values SET value = value + 1 WHERE series_id IN "
                "(SELECT series_id FROM series WHERE tenant_id = %s)",
                (tenant,),
            )
        await conn.rollback()

        def broken(r: Any) -> dict[int, tuple[Problem, ...]]:
            return {b.audit_batch: b.problems for b in r.broken}

        # A value changed by one part in a billion.
        await _bypassing_append_only(
            conn,
            (
                f"UPDATE reading_values SET value = value * (1 + 1e-9) WHERE series_id = ({M0_POWER}) "
                "AND audit_batch = %s AND ts = (SELECT min(ts) FROM readings WHERE tenant_id = %s AND audit_batch = %s)",
                (tenant, batch_c, tenant, batch_c),
            ),
        )
        report = await verify(conn, topic=topic)
        assert not report.ok
        assert broken(report) == {batch_c: (Problem.ROWS_CHANGED,)}

        await _bypassing_append_only(
            conn,
            (
                f"DELETE FROM reading_values WHERE series_id = ({M0_POWER}) "
                "AND audit_batch = %s AND ts = (SELECT max(ts) FROM readings WHERE tenant_id = %s AND audit_batch = %s)",
                (tenant, batch_b, tenant, batch_b),
            ),
        )
        report = await verify(conn, topic=topic)
        assert broken(report) == {batch_c: (Problem.ROWS_CHANGED,), batch_b: (Problem.ROWS_DELETED,)}
        deleted = next(b for b in report.broken if b.audit_batch == batch_b)
        assert (deleted.row_count, deleted.rows_found) == (len(w.keys) * 8, len(w.keys) * 8 - 1)

        # A forged row claiming batch a (inserting needs no bypass), and one claiming no batch.
        async with conn.transaction(), conn.cursor() as cur:
            one = np.array([0], np.int32)
            await w.insert(cur, batch_a, one, np.array([_ms(day, 23.1)]), np.array([1.0]))
            await w.insert(cur, None, one, np.array([_ms(day, 23.2)]), np.array([2.0]))
        report = await verify(conn, topic=topic)
        assert broken(report)[batch_a] == (Problem.ROWS_ADDED,)
        assert [(b.day, b.rows_found - b.row_count) for b in report.broken if b.audit_batch == batch_a] == [
            (day, 1)
        ]
        assert report.unaudited_rows == {day: 1}
        assert report.unchained_rows == {}

        # The chain itself: an entry whose recorded digest is rewritten no longer links.
        async with conn.transaction():
            await conn.execute(
                "UPDATE audit_chain SET rows_sha256 = sha256(rows_sha256) "
                "WHERE topic = %s AND kafka_partition = 0 AND day = %s AND seq = 1",
                (topic, next_day),
            )
        report = await verify(conn, topic=topic, day=next_day)
        assert broken(report)[batch_a] == (Problem.CHAIN_BROKEN, Problem.ROWS_CHANGED)
    finally:
        await conn.rollback()
        await _clean_up(conn, tenant, topic, day)


async def test_append_refuses_a_reused_batch_and_a_stale_head(conn: psycopg.AsyncConnection[Any]) -> None:
    run = uuid.uuid4().hex[:8]
    tenant, topic = f"audit-{run}", f"test-audit-{run}"
    day = date(2003, 1, 1) + timedelta(days=random.randrange(3650))
    w = Writer(conn, tenant, topic)
    try:
        batch = await w.write(0, _ms(day, 1), 1)
        series, ts, values = w.rows(_ms(day, 5), 1)
        args: dict[str, Any] = {"keys": w.keys, "series": series, "ts_ms": ts, "values": values}
        with pytest.raises(AuditError, match="already has an entry"):
            async with conn.transaction(), conn.cursor() as cur:
                await w.log.append(cur, partition=1, audit_batch=batch, **args)
        w.log.forget()

        # A transaction that rolls back after appending leaves the cached head ahead of the table.
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction(), conn.cursor() as cur:
                await w.log.append(cur, partition=0, audit_batch=10**15 + batch, **args)
                _ = 1 / 0
        with pytest.raises(AuditError, match="stale"):
            async with conn.transaction(), conn.cursor() as cur:
                await w.log.append(cur, partition=0, audit_batch=10**15 + batch + 1, **args)
        w.log.forget([0])
        assert await w.write(0, _ms(day, 5), 1) > batch
        report = await verify(conn, topic=topic)
        assert report.ok and report.entries_checked == 2, report.as_dict()
    finally:
        await conn.rollback()
        await _clean_up(conn, tenant, topic, day)


async def test_retention_drops_old_chunks_and_retires_their_entries(
    conn: psycopg.AsyncConnection[Any], base_settings: Settings
) -> None:
    run = uuid.uuid4().hex[:8]
    tenant, topic = f"audit-{run}", f"test-audit-{run}"
    w = Writer(conn, tenant, topic)
    old_days = [date(2001, 1, 10), date(2001, 1, 11)]
    for d in old_days:
        await w.write(0, _ms(d, 12), 2)
    assert (await verify(conn, topic=topic)).ok

    async def chunks_ending(after: datetime) -> list[datetime]:
        cur = await conn.execute(
            "SELECT range_end FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'reading_values' AND range_end > %s",
            (after,),
        )
        rows = [r[0] for r in await cur.fetchall()]
        await conn.commit()
        return rows

    cutoff_day = date(2001, 2, 1)
    keep = base_settings.model_copy(
        update={"processing": base_settings.processing.model_copy(update={"raw_retention_days": None})}
    )
    assert (await apply_retention(conn, keep)).mode == "keep"

    now = datetime.now(UTC)
    days = (now.date() - cutoff_day).days
    settings = base_settings.model_copy(
        update={"processing": base_settings.processing.model_copy(update={"raw_retention_days": days})}
    )
    cutoff = datetime(2001, 2, 1, tzinfo=UTC)
    later_chunks = await chunks_ending(cutoff)
    result = await apply_retention(conn, settings, now=now)
    assert result.mode == "drop_chunks"  # the Apache-2 edition has no retention policy API
    assert result.cutoff == cutoff
    assert len(result.dropped_chunks) >= len(old_days)
    assert result.retired_entries >= len(old_days)
    assert set(later_chunks) <= set(await chunks_ending(cutoff)), "a chunk after the cutoff was dropped"
    cur = await conn.execute("SELECT count(*) FROM readings WHERE tenant_id = %s", (tenant,))
    assert await cur.fetchone() == (0,)
    cur = await conn.execute("SELECT bool_and(retired), count(*) FROM audit_chain WHERE topic = %s", (topic,))
    assert await cur.fetchone() == (True, len(old_days))
    await conn.commit()

    report = await verify(conn, topic=topic)
    assert report.ok, report.as_dict()
    assert (report.entries_checked, report.retired_skipped) == (0, len(old_days))
    await conn.execute("DELETE FROM audit_chain WHERE topic = %s", (topic,))
    await conn.commit()


async def test_the_processor_applies_retention_between_polls(
    conn: psycopg.AsyncConnection[Any], base_settings: Settings
) -> None:
    """An idle processor with retention configured drops readings past it on its own."""
    from deploy.local.services import ensure_topics
    from processing.processor import Processor

    run = uuid.uuid4().hex[:8]
    tenant, topic = f"keep-{run}", f"test-retention-{run}"
    w = Writer(conn, tenant, topic)
    await w.write(0, _ms(date(2001, 1, 12), 12), 1)
    days = (datetime.now(UTC).date() - date(2001, 2, 1)).days
    settings = base_settings.model_copy(
        update={
            "processing": base_settings.processing.model_copy(
                update={"raw_retention_days": days, "retention_every_s": 0.5}
            ),
            "kafka": base_settings.kafka.model_copy(
                update={"readings_topic": topic, "processor_group": f"test-retention-{run}"}
            ),
        }
    )
    await ensure_topics(settings)
    processor = Processor(settings)
    task = asyncio.create_task(processor.run(install_signal_handlers=False))
    try:
        deadline = time.monotonic() + 60
        while True:
            cur = await conn.execute("SELECT count(*) FROM readings WHERE tenant_id = %s", (tenant,))
            left = (await cur.fetchone() or (None,))[0]
            await conn.commit()
            if left == 0:
                break
            assert not task.done(), "the processor stopped"
            assert time.monotonic() < deadline, f"{left} readings from 2001-01-12 still stored"
            await asyncio.sleep(0.5)
        cur = await conn.execute("SELECT bool_and(retired) FROM audit_chain WHERE topic = %s", (topic,))
        assert await cur.fetchone() == (True,)
    finally:
        processor.stop()
        await task
        await conn.execute("DELETE FROM audit_chain WHERE topic = %s", (topic,))
        await conn.commit()


async def test_verify_fails_a_retired_entry_whose_rows_are_still_stored(
    conn: psycopg.AsyncConnection[Any], base_settings: Settings
) -> None:
    """Retiring a day hides it from recomputation; with its rows still there that is tampering, not retention."""
    run = uuid.uuid4().hex[:8]
    tenant, topic = f"audit-{run}", f"test-audit-{run}"
    day = date(2003, 1, 1) + timedelta(days=random.randrange(3650))
    w = Writer(conn, tenant, topic)
    try:
        batch = await w.write(0, _ms(day, 12), 2)
        # The services' role may retire only days retention dropped: this one still has its chunk.
        async with await psycopg.AsyncConnection.connect(base_settings.db.conninfo()) as service:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await service.execute("UPDATE audit_chain SET retired = true WHERE topic = %s", (topic,))
            await service.rollback()
            await service.execute("SELECT retire_dropped_audit_days()")
            await service.commit()
        cur = await conn.execute("SELECT bool_or(retired) FROM audit_chain WHERE topic = %s", (topic,))
        assert await cur.fetchone() == (False,)
        await conn.commit()

        # The owner (or a bug) retires it anyway: verify reports it, as every entry, not as skipped.
        await conn.execute("UPDATE audit_chain SET retired = true WHERE topic = %s", (topic,))
        await conn.commit()
        for report in (await verify(conn, topic=topic), await verify(conn, day=day)):
            assert not report.ok, report.as_dict()
            assert [(b.audit_batch, b.rows_found, b.problems) for b in report.broken] == [
                (batch, len(w.keys) * 8, (Problem.RETIRED_ROWS_PRESENT,))
            ]
            assert report.as_dict()["broken"][0]["problems"] == ["retired_rows_present"]  # type: ignore[index]
            assert report.unchained_rows == {}
    finally:
        await conn.rollback()
        await _clean_up(conn, tenant, topic, day)


async def test_a_service_configured_below_the_floor_is_refused_and_counted(base_settings: Settings) -> None:
    """A service whose settings ask for less than the owner's floor cannot drop what the floor keeps."""
    floor = retention_floor_days(base_settings)
    short = base_settings.model_copy(
        update={"processing": base_settings.processing.model_copy(update={"raw_retention_days": floor - 1})}
    )

    def refused() -> float:
        return REGISTRY.get_sample_value("meterflow_retention_refused_total") or 0.0

    before = refused()
    async with await psycopg.AsyncConnection.connect(base_settings.db.conninfo()) as service:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"at least {floor} days"):
            await apply_retention(service, short)
        cur = await service.execute("SELECT raw_days FROM retention_floor")
        assert await cur.fetchone() == (floor,)
    assert refused() == before + 1
