"""The vpp service: VPP flexibility capacity, continuously.

It reads ``meterflow.readings.v1`` itself (every partition, committing offsets under its own group so
a restart resumes where it stopped), keeps the latest power, SoC and self-reported flexibility of every
registered resource in numpy arrays (`processing.flex.Telemetry`), and recomputes every VPP's and
topology node's capacity with `processing.flex.capacity` after each poll that changed telemetry and at
least every `recompute_every_s` (staleness moves with the clock alone). What changed is written in one
transaction: ``vpp_capacity_now``, ``vpp_node_capacity_now``, the minute's row of ``vpp_capacity_1m``,
``vpp_stale_devices``, and ``NOTIFY vpp_capacity, '<vpp>'`` which the API's live stream listens to.

Every instance reads all partitions and computes the same figures, so a second one is a hot standby,
not a shard. At start the latest telemetry comes from the ``readings`` table (the last hour), then from
Kafka. Records it cannot decode are counted here and dead-lettered by the processor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import Counter, Gauge, Histogram

from meterflow.contract import now_ms
from meterflow.settings import Settings, VppSettings
from processing import flex
from processing.columns import ColumnBuilder, UndecodableRecord
from processing.kernels import F64, I8, I32, NO_TS
from processing.series import SeriesTable

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[tuple[object, ...]]
DeviceKey = tuple[str, str]

RECORDS = Counter("meterflow_vpp_records_total", "Kafka records read by the vpp service")
UNDECODABLE = Counter(
    "meterflow_vpp_undecodable_records_total",
    "Records the vpp service skipped (the processor dead-letters them)",
)
APPLIED = Counter("meterflow_vpp_readings_total", "Resource readings applied to the latest telemetry")
RECOMPUTE_SECONDS = Histogram(
    "meterflow_vpp_recompute_seconds",
    "Capacity kernel over all resources",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
PUBLISH_SECONDS = Histogram("meterflow_vpp_publish_seconds", "Writing changed capacity and notifying")
RESOURCES = Gauge("meterflow_vpp_resources", "Registered resources by state", ["state"])

_NOTIFY_CHANNEL = "vpp_capacity"
_MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Fleet:
    """Resource models as the kernel reads them, with the names behind the indices."""

    models: flex.Models
    keys: list[DeviceKey]
    index: dict[DeviceKey, int]
    vpps: list[str]
    nodes: list[tuple[str, str]]  # (vpp, node)
    interval_s: list[int]


_FLEET_SQL = """
    SELECT d.tenant_id, d.device_id, r.resource_class, d.vpp, coalesce(d.topology_node, ''),
           d.rated_power_kw, d.energy_capacity_kwh, d.soc_min_pct, d.soc_max_pct, d.telemetry_interval_s,
           r.charge_max_kw, r.discharge_max_kw, r.efficiency, r.curtailable, r.min_power_kw,
           r.sheddable_share, r.max_shed_min, r.reserved_soc_pct
    FROM vpp_resources r JOIN devices d USING (tenant_id, device_id)
    WHERE d.vpp IS NOT NULL
    ORDER BY d.tenant_id, d.device_id"""


def _f(value: object, default: float = 0.0) -> float:
    return default if value is None else float(value)  # type: ignore[arg-type]


async def load_fleet(conn: Conn) -> Fleet:
    cur = await conn.execute(_FLEET_SQL)
    rows = await cur.fetchall()
    await conn.commit()
    vpp_index: dict[str, int] = {}
    node_index: dict[tuple[str, str], int] = {}
    n = len(rows)
    cols = {
        name: np.zeros(n)
        for name in (
            "rated",
            "cha",
            "dis",
            "energy",
            "soc_min",
            "soc_max",
            "reserve",
            "eta",
            "min",
            "share",
            "max_shed",
        )
    }
    cls = np.zeros(n, np.int8)
    group = np.zeros(n, np.int32)
    node = np.zeros(n, np.int32)
    curtailable = np.zeros(n, np.bool_)
    interval_ms = np.zeros(n, np.int64)
    keys: list[DeviceKey] = []
    intervals: list[int] = []
    for i, row in enumerate(rows):
        tenant, device, klass, vpp, topo = (str(v) for v in row[:5])
        rated = _f(row[5])
        keys.append((tenant, device))
        cls[i] = flex.CLASS_NAMES.index(klass)
        group[i] = vpp_index.setdefault(vpp, len(vpp_index))
        node[i] = node_index.setdefault((vpp, topo), len(node_index))
        cols["rated"][i] = rated
        cols["energy"][i] = _f(row[6])
        cols["soc_min"][i] = _f(row[7])
        cols["soc_max"][i] = _f(row[8], 100.0)
        intervals.append(int(row[9]))  # type: ignore[call-overload]
        interval_ms[i] = intervals[-1] * 1000
        # Storage without separate charge/discharge limits is limited by its rated (inverter) power.
        cols["cha"][i] = _f(row[10], rated)
        cols["dis"][i] = _f(row[11], rated)
        cols["eta"][i] = _f(row[12], 1.0)
        curtailable[i] = bool(row[13])
        cols["min"][i] = _f(row[14])
        cols["share"][i] = _f(row[15])
        cols["max_shed"][i] = _f(row[16], np.inf)
        cols["reserve"][i] = _f(row[17])
    models = flex.Models(
        cls, group, node, cols["rated"], cols["cha"], cols["dis"], cols["energy"], cols["soc_min"],
        cols["soc_max"], cols["reserve"], cols["eta"], curtailable, cols["min"], cols["share"],
        cols["max_shed"], interval_ms,
    )  # fmt: skip
    return Fleet(
        models,
        keys,
        {k: i for i, k in enumerate(keys)},
        list(vpp_index),
        list(node_index),
        intervals,
    )


def derating(settings: VppSettings) -> F64:
    return np.array([getattr(settings, f"derate_{name}") for name in flex.CLASS_NAMES])


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


CapacityRow = tuple[float, float, float, float, int, int]
NodeRow = tuple[float, float, int, int]


class VppService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.vpp
        self.topic = settings.kafka.readings_topic
        self.durations = np.array(self.cfg.durations_min, np.float64)
        self.derate = derating(self.cfg)
        self._stop = asyncio.Event()
        self.series = SeriesTable()
        self.fleet = Fleet(flex.Models(*_empty_model_arrays()), [], {}, [], [], [])
        self.telemetry = flex.Telemetry.empty(0)
        self._series_resource: I32 = np.empty(0, np.int32)
        self._series_metric: I8 = np.empty(0, np.int8)
        self._published: dict[tuple[str, int], CapacityRow] = {}
        self._published_nodes: dict[tuple[str, str, int], NodeRow] = {}
        self._history_minute: dict[str, int] = {}
        self._stale_published: frozenset[int] | None = None
        self._fleet_loaded_at = -np.inf
        self._conn: Conn | None = None
        self._consumer: AIOKafkaConsumer | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def conn(self) -> Conn:
        if self._conn is None:
            raise RuntimeError("vpp service not started")
        return self._conn

    # --- resources and telemetry ------------------------------------------------------------------

    async def refresh_fleet(self) -> None:
        fleet = await load_fleet(self.conn)
        telemetry = flex.Telemetry.empty(len(fleet.keys))
        for key, i in fleet.index.items():
            old = self.fleet.index.get(key)
            if old is not None:
                telemetry.value[:, i] = self.telemetry.value[:, old]
                telemetry.ts[:, i] = self.telemetry.ts[:, old]
                telemetry.last_seen_ms[i] = self.telemetry.last_seen_ms[old]
        self.fleet, self.telemetry = fleet, telemetry
        self._series_resource = np.empty(0, np.int32)
        self._series_metric = np.empty(0, np.int8)
        self._fleet_loaded_at = time.monotonic()

    def _map_series(self) -> None:
        """Resource and metric code of every series seen (NOT_A_RESOURCE for meters' series)."""
        known = self._series_resource.size
        if known == len(self.series):
            return
        res, met = self._codes(self.series.keys[known:])
        self._series_resource = np.concatenate([self._series_resource, res])
        self._series_metric = np.concatenate([self._series_metric, met])

    def _codes(self, keys: list[tuple[str, str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Resource index (NOT_A_RESOURCE for meters) and metric code of each (tenant, device, metric)."""
        res = np.array([self.fleet.index.get((t, d), flex.NOT_A_RESOURCE) for t, d, _ in keys], np.int32)
        met = np.array(
            [flex.METRICS.index(m) if m in flex.METRICS else flex.M_OTHER for _, _, m in keys], np.int8
        )
        return res, met

    async def load_latest(self) -> None:
        """Latest telemetry of every resource from the last hour of stored readings."""
        if not self.fleet.keys:
            return
        cur = await self.conn.execute(
            """SELECT DISTINCT ON (r.tenant_id, r.device_id, r.metric)
                      r.tenant_id, r.device_id, r.metric, r.ts, r.value
               FROM readings r JOIN vpp_resources v USING (tenant_id, device_id)
               WHERE r.ts > now() - interval '1 hour'
               ORDER BY r.tenant_id, r.device_id, r.metric, r.ts DESC"""
        )
        rows = await cur.fetchall()
        await self.conn.commit()
        resource, metric = self._codes([(str(t), str(d), str(m)) for t, d, m, *_ in rows])
        ts = np.array([int(r[3].timestamp() * 1000) for r in rows], np.int64)  # type: ignore[attr-defined]
        value = np.array([float(r[4]) for r in rows], np.float64)  # type: ignore[arg-type]
        t = self.telemetry
        flex.apply_readings(resource, metric, ts, value, t.value, t.ts, t.last_seen_ms)
        log.info(
            "latest telemetry of %d resources loaded from stored readings",
            int((t.last_seen_ms != NO_TS).sum()),
        )

    def apply(self, records: list[bytes]) -> int:
        """Decode records and keep the newest values; returns how many latest values changed."""
        builder = ColumnBuilder.start(self.series)
        for raw in records:
            RECORDS.inc()
            try:
                builder.add(0, raw)
            except UndecodableRecord as exc:
                UNDECODABLE.inc()
                log.warning("skipping an undecodable record (the processor dead-letters it): %s", exc)
        columns = builder.finish()
        if columns.series.size == 0:
            return 0
        self._map_series()
        resource = self._series_resource[columns.series]
        metric = self._series_metric[columns.series]
        APPLIED.inc(int((resource >= 0).sum()))
        t = self.telemetry
        changed = flex.apply_readings(
            resource, metric, columns.ts, columns.value, t.value, t.ts, t.last_seen_ms
        )
        return int(changed)

    # --- capacity ---------------------------------------------------------------------------------

    def compute(self, at_ms: int) -> flex.Capacity:
        started = time.perf_counter()
        cap = flex.capacity(
            self.fleet.models,
            self.telemetry,
            n_groups=len(self.fleet.vpps),
            n_nodes=len(self.fleet.nodes),
            now_ms=at_ms,
            durations_min=self.durations,
            derate=self.derate,
            stale_factor=self.cfg.stale_factor,
        )
        RECOMPUTE_SECONDS.observe(time.perf_counter() - started)
        RESOURCES.labels("online").set(int(cap.online.sum()))
        RESOURCES.labels("stale").set(int(cap.stale.sum()))
        return cap

    async def publish(self, cap: flex.Capacity, at_ms: int) -> list[str]:
        """Write what changed since the last publication; returns the VPPs notified."""
        started = time.perf_counter()
        as_of = _ts(at_ms)
        minute = at_ms - at_ms % _MINUTE_MS
        fleet = self.fleet
        now_rows: list[tuple[object, ...]] = []
        history_rows: list[tuple[object, ...]] = []
        changed_vpps: list[str] = []
        for g, vpp in enumerate(fleet.vpps):
            rows = {
                int(t): (
                    round(float(cap.up_kw[g, d]), 6),
                    round(float(cap.down_kw[g, d]), 6),
                    round(float(cap.nameplate_up_kw[g, d]), 6),
                    round(float(cap.nameplate_down_kw[g, d]), 6),
                    int(cap.online[g]),
                    int(cap.stale[g]),
                )
                for d, t in enumerate(self.durations)
            }
            changed = any(self._published.get((vpp, t)) != row for t, row in rows.items())
            if changed:
                changed_vpps.append(vpp)
            new_minute = self._history_minute.get(vpp) != minute
            for t, row in rows.items():
                # as_of moves on every publication: "the figure still holds at this time".
                now_rows.append((vpp, t, *row, as_of))
                if changed or new_minute:
                    history_rows.append((vpp, t, _ts(minute), *row))
                self._published[(vpp, t)] = row
            self._history_minute[vpp] = minute
        node_rows: list[tuple[object, ...]] = []
        for nd, (vpp, node) in enumerate(fleet.nodes):
            for d, t in enumerate(self.durations):
                node_row = (
                    round(float(cap.node_up_kw[nd, d]), 6),
                    round(float(cap.node_down_kw[nd, d]), 6),
                    int(cap.node_online[nd]),
                    int(cap.node_stale[nd]),
                )
                key = (vpp, node, int(t))
                if self._published_nodes.get(key) != node_row:
                    node_rows.append((vpp, node, int(t), *node_row, as_of))
                    self._published_nodes[key] = node_row
        stale = frozenset(np.flatnonzero(cap.stale_mask).tolist())
        async with self.conn.transaction(), self.conn.cursor() as cur:
            if now_rows:
                await cur.executemany(
                    """INSERT INTO vpp_capacity_now VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (vpp, duration_min) DO UPDATE SET up_kw = EXCLUDED.up_kw,
                         down_kw = EXCLUDED.down_kw, nameplate_up_kw = EXCLUDED.nameplate_up_kw,
                         nameplate_down_kw = EXCLUDED.nameplate_down_kw, devices_online = EXCLUDED.devices_online,
                         devices_stale = EXCLUDED.devices_stale, as_of = EXCLUDED.as_of""",
                    now_rows,
                )
            if history_rows:
                await cur.executemany(
                    """INSERT INTO vpp_capacity_1m VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (vpp, duration_min, bucket) DO UPDATE SET up_kw = EXCLUDED.up_kw,
                         down_kw = EXCLUDED.down_kw, nameplate_up_kw = EXCLUDED.nameplate_up_kw,
                         nameplate_down_kw = EXCLUDED.nameplate_down_kw, devices_online = EXCLUDED.devices_online,
                         devices_stale = EXCLUDED.devices_stale""",
                    history_rows,
                )
            if node_rows:
                await cur.executemany(
                    """INSERT INTO vpp_node_capacity_now VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (vpp, node, duration_min) DO UPDATE SET up_kw = EXCLUDED.up_kw,
                         down_kw = EXCLUDED.down_kw, devices_online = EXCLUDED.devices_online,
                         devices_stale = EXCLUDED.devices_stale, as_of = EXCLUDED.as_of""",
                    node_rows,
                )
            if stale != self._stale_published:
                await cur.execute("DELETE FROM vpp_stale_devices")
                stale_rows: list[tuple[object, ...]] = []
                for r in sorted(stale):
                    seen = int(self.telemetry.last_seen_ms[r])
                    tenant, device = fleet.keys[r]
                    vpp = fleet.vpps[int(fleet.models.group[r])]
                    last_seen = None if seen == NO_TS else _ts(seen)
                    stale_rows.append((vpp, tenant, device, last_seen, fleet.interval_s[r]))
                if stale_rows:
                    await cur.executemany(
                        "INSERT INTO vpp_stale_devices VALUES (%s, %s, %s, %s, %s)", stale_rows
                    )
            for vpp in changed_vpps:
                await cur.execute("SELECT pg_notify(%s, %s)", (_NOTIFY_CHANNEL, vpp))
        self._stale_published = stale
        PUBLISH_SECONDS.observe(time.perf_counter() - started)
        return changed_vpps

    async def recompute_and_publish(self) -> list[str]:
        at = now_ms()
        return await self.publish(self.compute(at), at)

    async def _partitions(self) -> list[int]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.settings.kafka.bootstrap, request_timeout_ms=10_000
        )
        await admin.start()
        try:
            described = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        partitions = sorted(int(p["partition"]) for d in described for p in d.get("partitions") or [])
        if not partitions:
            raise RuntimeError(f"topic {self.topic} does not exist (meterflow stack up creates it)")
        return partitions

    # --- the loop -----------------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        await asyncio.to_thread(flex.warm_up)
        self._conn = await psycopg.AsyncConnection.connect(self.settings.db.conninfo())
        await self.refresh_fleet()
        await self.load_latest()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=self.cfg.group,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._consumer = consumer
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in await self._partitions()]
            # Every partition, not a share: capacity needs every resource's telemetry.
            consumer.assign(tps)
            for tp in tps:
                committed = await consumer.committed(tp)
                if committed is None:
                    await consumer.seek_to_end(tp)
                else:
                    consumer.seek(tp, committed)
            log.info(
                "vpp service reading %s (%d partitions) for %d resources in %d VPPs",
                self.topic, len(tps), len(self.fleet.keys), len(self.fleet.vpps),
            )  # fmt: skip
            await self.recompute_and_publish()
            last_compute = time.monotonic()
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=self.cfg.poll_timeout_ms, max_records=5000)
                changed = 0
                if batches:
                    changed = self.apply([rec.value or b"" for recs in batches.values() for rec in recs])
                if time.monotonic() - self._fleet_loaded_at > self.cfg.registry_refresh_s:
                    await self.refresh_fleet()
                    changed += 1
                if changed or time.monotonic() - last_compute >= self.cfg.recompute_every_s:
                    await self.recompute_and_publish()
                    last_compute = time.monotonic()
                if batches:
                    with contextlib.suppress(Exception):
                        await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
        finally:
            log.info("vpp service stopping")
            with contextlib.suppress(Exception):
                await consumer.stop()
            await self.conn.close()


def _empty_model_arrays() -> tuple[np.ndarray, ...]:
    f = np.empty(0)
    return (
        np.empty(0, np.int8), np.empty(0, np.int32), np.empty(0, np.int32), f, f, f, f, f, f, f, f,
        np.empty(0, np.bool_), f, f, f, np.empty(0, np.int64),
    )  # fmt: skip
