"""`meterflow bench processor`: readings/s from Kafka to committed rows in TimescaleDB, beside a bare
binary COPY of the same raw rows into a hypertable shaped like the processor's, in the same run.

A fleet of registered meters (an energy register and active power every minute, a grid meter per site
so site and enterprise roll-ups are written too) is produced to a topic of its own as the collector
produces it (v2 records). `--processors` `meterflow processor` processes (default 2, one per core
here) consume it in one consumer group with their real write path: raw readings, 1-minute / 15-minute
/ 1-hour aggregates per device, site and enterprise, audit entries and offsets per transaction. The
rate is measured once the group has settled (every process holds its share of the partitions), to the
last commit, over the readings the database gained in between; process start-up and the first
rebalances are left out. The peer then copies the same raw rows, in transactions as large as a full
poll, with nothing else, from one connection: the ceiling of the raw write alone.

Readings are dated in 2001 under a tenant of their own (`bench-<id>`), so they never mix with live data;
raw readings are append-only, so they stay until retention removes 2001.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from psycopg import sql

from ingest.records import Partitioner, RecordBatch
from meterflow.contract import DeviceReadings, Reading
from meterflow.settings import Settings
from processing import pgcopy, store

T0_MS = int(datetime(2001, 6, 1, tzinfo=UTC).timestamp() * 1000)
METERS_PER_SITE = 50
DEVICES_PER_GATEWAY = 200


def fleet_readings(n_readings: int, n_devices: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-minute ticks of (energy register, power) for every device: (ticks, registers, powers)."""
    ticks = max(2, n_readings // (2 * n_devices))
    rng = np.random.default_rng(42)
    power = rng.uniform(5.0, 80.0, (ticks, n_devices)).round(1)
    registers = (1000.0 + np.cumsum(power / 60.0, axis=0)).round(2)
    return ticks, registers, power


async def _register(conn: psycopg.AsyncConnection[tuple[object, ...]], tenant: str, n_devices: int) -> None:
    await conn.execute("INSERT INTO tenants (tenant_id, name) VALUES (%s, %s)", (tenant, f"bench {tenant}"))
    sites = [
        (tenant, f"site-{s:03d}", f"site {s}")
        for s in range((n_devices + METERS_PER_SITE - 1) // METERS_PER_SITE)
    ]
    async with conn.cursor() as cur:
        await cur.executemany("INSERT INTO sites (tenant_id, site_id, name) VALUES (%s, %s, %s)", sites)
        await cur.executemany(
            "INSERT INTO devices (tenant_id, device_id, site_id, role, rated_power_kw, register_max) "
            "VALUES (%s, %s, %s, %s, 200, 99999999.99)",
            [
                (
                    tenant,
                    f"m-{d:05d}",
                    f"site-{d // METERS_PER_SITE:03d}",
                    "grid" if d % METERS_PER_SITE == 0 else "submeter",
                )
                for d in range(n_devices)
            ],
        )
    await conn.commit()


async def _produce(
    settings: Settings, topic: str, tenant: str, registers: np.ndarray, power: np.ndarray
) -> int:
    k = settings.kafka
    admin = AIOKafkaAdminClient(bootstrap_servers=k.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=k.partitions, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=k.bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    partitioner = Partitioner()
    partitions = sorted(await producer.partitions_for(topic))
    records = 0
    try:
        ticks, n_devices = registers.shape
        pending = []
        for tick in range(ticks):
            ts = T0_MS + tick * 60_000
            for first in range(0, n_devices, DEVICES_PER_GATEWAY):
                batch = RecordBatch(ts + 500, partitions, partitioner)
                for d in range(first, min(first + DEVICES_PER_GATEWAY, n_devices)):
                    batch.add(
                        DeviceReadings(
                            tenant, f"gw-{first // DEVICES_PER_GATEWAY:03d}", f"m-{d:05d}", ts + 500,
                            (Reading(ts, "energy_import_kwh", float(registers[tick, d])),
                             Reading(ts, "power_kw", float(power[tick, d]))),
                        )
                    )  # fmt: skip
                for partition, record in batch.records():
                    pending.append(
                        await producer.send(
                            topic, record.encode(), key=record.kafka_key(), partition=partition
                        )
                    )
                    records += 1
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return records


async def _bare_copy(
    settings: Settings, tenant: str, registers: np.ndarray, power: np.ndarray, per_poll: int
) -> float:
    """Seconds to COPY the same raw rows into a fresh hypertable shaped like ``reading_values``, in
    binary streams the processor's own encoder builds (encoding is timed too, as in the processor)."""
    table = f"bench_copy_{tenant.replace('-', '_')}"
    ticks, n_devices = registers.shape
    # The owner role: the services' role may not create tables (docs/processing.md#roles).
    async with await psycopg.AsyncConnection.connect(settings.db.owner_conninfo()) as conn:
        await conn.execute(
            sql.SQL("CREATE TABLE {} (LIKE reading_values INCLUDING ALL)").format(sql.Identifier(table))
        )
        await conn.execute(
            "SELECT create_hypertable(%s, by_range('ts', INTERVAL '1 day'), create_default_indexes => false)",
            (table,),
        )
        await conn.commit()
        # Row order as produced: per tick, per device, energy then power; series ids as the processor's.
        device = np.tile(np.repeat(np.arange(n_devices, dtype=np.int32), 2), ticks)
        series_id = device * 2 + np.tile(np.array([0, 1], np.int32), n_devices * ticks)
        ts = T0_MS + np.repeat(np.arange(ticks, dtype=np.int64), 2 * n_devices) * 60_000
        value = np.stack([registers, power], axis=2).reshape(-1)
        gateways = pgcopy.TextTable(
            [f"gw-{g:03d}" for g in range((n_devices - 1) // DEVICES_PER_GATEWAY + 1)]
        )
        gateway = device // DEVICES_PER_GATEWAY
        audit = np.zeros(ts.size, np.int64)
        try:
            started = time.perf_counter()
            for first in range(0, ts.size, per_poll):
                rows = slice(first, first + per_poll)
                stream = pgcopy.encode_readings(
                    series_id[rows],
                    ts[rows],
                    value[rows],
                    gateway[rows],
                    gateways,
                    ts[rows] + 500,
                    audit[rows],
                )
                async with conn.transaction(), conn.cursor() as cur:
                    await store.copy_readings(cur, stream, table)
            return time.perf_counter() - started
        finally:
            await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            await conn.commit()


def _start_processors(env: dict[str, str], logs: Path, n: int) -> list[subprocess.Popen[bytes]]:
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(n):
        with (logs / f"bench-processor-{i}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "meterflow", "processor"], env=env, stdout=log, stderr=log
                )
            )
    return procs


_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")


def _settled(logs: Path, processes: int, partitions: int) -> bool:
    """Every processor's latest assignment is in, and together they cover each partition once."""
    latest = []
    for i in range(processes):
        found = _ASSIGNED.findall((logs / f"bench-processor-{i}.log").read_text(errors="replace"))
        if not found:
            return False
        latest.append([int(p) for p in found[-1].split(",") if p.strip()])
    owned = sorted(p for parts in latest for p in parts)
    return owned == list(range(partitions))


def _stop_processors(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=60)


async def _consume(
    settings: Settings, topic: str, group: str, tenant: str, processes: int, records: int, total: int
) -> float:
    """Run `meterflow processor` processes on the topic until the offsets they committed cover every
    record. The rate runs from the moment the group has settled (every process assigned its share of
    the partitions; start-up and the first rebalances left out) to the last commit, over the readings
    committed in between, as the database counts them."""
    env = {
        **os.environ,
        "METERFLOW_KAFKA__READINGS_TOPIC": topic,
        "METERFLOW_KAFKA__PROCESSOR_GROUP": group,
        "METERFLOW_PROCESSING__METRICS_PORT": "0",
    }
    logs = settings.state_path / "app"
    procs = await asyncio.to_thread(_start_processors, env, logs, processes)
    stored = "SELECT count(*) FROM reading_values WHERE series_id IN (SELECT series_id FROM series WHERE tenant_id = %s)"
    first_at: float | None = None
    first_count = 0
    try:
        async with await psycopg.AsyncConnection.connect(settings.db.conninfo(), autocommit=True) as conn:
            while True:
                await asyncio.sleep(0.05)
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"a processor stopped early; see {logs}/bench-processor-*.log")
                cur = await conn.execute(
                    "SELECT count(*), coalesce(sum(next_offset), 0) FROM processor_offsets "
                    "WHERE consumer_group = %s AND topic = %s",
                    (group, topic),
                )
                row = await cur.fetchone()
                done = int(row[1]) if row else 0
                if first_at is None and _settled(logs, processes, settings.kafka.partitions):
                    first_at = time.perf_counter()
                    first_count = int((await (await conn.execute(stored, (tenant,))).fetchone() or (0,))[0])
                if done >= records:
                    finished_at = time.perf_counter()
                    break
    finally:
        await asyncio.to_thread(_stop_processors, procs)
    if first_at is None:
        raise RuntimeError("no poll was committed")
    return (total - first_count) / max(finished_at - first_at, 1e-9)


async def _run(
    settings: Settings, n_readings: int, n_devices: int, processes: int, tick: Callable[[str], None]
) -> dict[str, object]:
    suffix = uuid.uuid4().hex[:8]
    tenant, topic, group = f"bench-{suffix}", f"bench.processor.{suffix}", f"bench-processor-{suffix}"
    ticks, registers, power = fleet_readings(n_readings, n_devices)
    total = 2 * registers.size
    tick(f"registering {n_devices:,} meters; producing {total:,} readings ({ticks} minutes) to {topic}")
    async with await psycopg.AsyncConnection.connect(settings.db.conninfo()) as conn:
        await _register(conn, tenant, n_devices)
    records = await _produce(settings, topic, tenant, registers, power)

    tick(f"{processes} processor process(es) in one consumer group consuming {records:,} records")
    value = await _consume(settings, topic, group, tenant, processes, records, total)
    # The peer's transactions are as large as a full poll (the most records a poll takes).
    per_poll = max(1, settings.processing.max_batch_records * total // records)
    tick(f"bare binary COPY of the same {total:,} rows, {per_poll:,} per transaction")
    peer_value = total / await _bare_copy(settings, tenant, registers, power, per_poll)
    return {
        "bench": "processor",
        "metric": "readings_per_s",
        "value": round(value),
        "unit": "readings/s",
        "peer": "bare binary COPY of the same rows into the same hypertable",
        "peer_value": round(peer_value),
        "ratio": round(value / peer_value, 3),
        "readings": total,
        "readings_per_poll": per_poll,
        "processors": processes,
    }


def run_processor_bench(
    settings: Settings, *, n_readings: int, n_devices: int, processes: int, tick: Callable[[str], None]
) -> dict[str, object]:
    return asyncio.run(_run(settings, n_readings, n_devices, processes, tick))
