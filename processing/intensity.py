"""The intensity service: grid carbon intensity points from ``meterflow.grid-intensity.v1`` into
``grid_intensity`` (migration 0008).

Writes are idempotent upserts keyed by (zone, signal type, basis, start), and one zone's points share a
partition (the record key is the zone), so Kafka offsets are committed after the database commit: a
crash in between replays records in their order and leaves the same rows. A forecast never replaces a
value that is not a forecast, in the database or within a poll. Records that are not intensity points go
to the dead-letter topic with a reason and are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from prometheus_client import Counter, Gauge
from pydantic import ValidationError

from meterflow.contract import (
    DeadLetterReason,
    GridIntensityPoint,
    encode_dead_letter,
    now_ms,
    validation_summary,
)
from meterflow.settings import Settings

log = logging.getLogger(__name__)

POINTS = Counter("meterflow_intensity_points_total", "Grid intensity points applied (inserted or updated)")
IGNORED = Counter(
    "meterflow_intensity_forecasts_ignored_total",
    "Forecast points not applied because a value that is not a forecast exists for their slot",
)
REJECTED = Counter(
    "meterflow_intensity_rejected_total", "Intensity topic records sent to the DLQ", ["reason"]
)
LATEST = Gauge(
    "meterflow_intensity_latest_actual_seconds",
    "Start of the newest point that is not a forecast (epoch seconds): alert when a feed stops",
    ["zone", "signal_type", "basis"],
)

Slot = tuple[str, str, str, int]  # zone, signal type, basis, start ms

_UPSERT = """
    INSERT INTO grid_intensity (zone, signal_type, basis, ts, duration_s, g_co2e_per_kwh, is_estimated,
                                is_forecast, source, model_version, kafka_partition, kafka_offset)
    VALUES (%s, %s, %s, to_timestamp(%s / 1000.0), %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (zone, signal_type, basis, ts) DO UPDATE SET
        duration_s = EXCLUDED.duration_s, g_co2e_per_kwh = EXCLUDED.g_co2e_per_kwh,
        is_estimated = EXCLUDED.is_estimated, is_forecast = EXCLUDED.is_forecast,
        source = EXCLUDED.source, model_version = EXCLUDED.model_version,
        kafka_partition = EXCLUDED.kafka_partition, kafka_offset = EXCLUDED.kafka_offset,
        received_at = now()
    WHERE grid_intensity.is_forecast OR NOT EXCLUDED.is_forecast
    RETURNING 1"""


@dataclass(frozen=True, slots=True)
class Located:
    point: GridIntensityPoint
    partition: int
    offset: int

    @property
    def slot(self) -> Slot:
        p = self.point
        return p.zone, p.signal_type.value, p.basis.value, p.ts

    def row(self) -> tuple[object, ...]:
        """The `_UPSERT` parameters."""
        p = self.point
        return (
            *self.slot, p.duration_s, p.g_co2e_per_kwh, p.is_estimated, p.is_forecast, p.source,
            p.model_version, self.partition, self.offset,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rejection:
    record: ConsumerRecord[bytes, bytes]
    reason: DeadLetterReason
    detail: str


def classify(record: ConsumerRecord[bytes, bytes]) -> Located | Rejection:
    try:
        point = GridIntensityPoint.model_validate_json(record.value or b"")
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        if "json_invalid" in kinds:
            reason = DeadLetterReason.INVALID_JSON
        elif "finite_number" in kinds:
            reason = DeadLetterReason.NON_FINITE
        else:
            reason = DeadLetterReason.SCHEMA
        return Rejection(record, reason, validation_summary(exc))
    return Located(point, record.partition, record.offset)


def latest_per_slot(points: Iterable[Located]) -> list[Located]:
    """The point each slot ends with after applying `points` in order: later replaces earlier, except
    that a forecast does not replace a value that is not one."""
    kept: dict[Slot, Located] = {}
    for located in points:
        before = kept.get(located.slot)
        if before is not None and located.point.is_forecast and not before.point.is_forecast:
            IGNORED.inc()
            continue
        kept[located.slot] = located
    return list(kept.values())


class IntensityService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.intensity
        self.topic = settings.kafka.intensity_topic
        self._stop = asyncio.Event()
        self._newest_ms: dict[tuple[str, str, str], int] = {}

    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        conn = await psycopg.AsyncConnection.connect(self.settings.db.conninfo())
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.settings.kafka.bootstrap,
            group_id=self.cfg.group,
            enable_auto_commit=False,
            # A new group reads the whole topic: points published before the service first ran count.
            auto_offset_reset="earliest",
        )
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka.bootstrap, acks="all")
        await producer.start()
        await consumer.start()
        log.info("intensity service reading %s (group %s)", self.topic, self.cfg.group)
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(
                    timeout_ms=self.cfg.poll_timeout_ms, max_records=self.cfg.max_batch_records
                )
                if not batches:
                    continue
                records = [r for tp in sorted(batches, key=lambda t: t.partition) for r in batches[tp]]
                await self.handle(conn, producer, records)
                # After the database commit: a replay rewrites the same rows (see the module docstring).
                await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batches.items()})
        finally:
            # Stop intake first; what was written is committed above, what was not is read again.
            log.info("intensity service stopping")
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await producer.stop()
            await conn.close()
            log.info("intensity service stopped")

    async def handle(
        self,
        conn: psycopg.AsyncConnection[Any],
        producer: AIOKafkaProducer,
        records: list[ConsumerRecord[bytes, bytes]],
    ) -> int:
        """Write one poll's points (one transaction), then dead-letter the rest; the points applied."""
        located: list[Located] = []
        rejected: list[Rejection] = []
        for record in records:
            outcome = classify(record)
            if isinstance(outcome, Located):
                located.append(outcome)
            else:
                rejected.append(outcome)
        kept = latest_per_slot(located)
        applied = 0
        if kept:
            async with conn.cursor() as cur:
                await cur.executemany(_UPSERT, [lp.row() for lp in kept], returning=True)
                while True:
                    applied += len(await cur.fetchall())
                    if not cur.nextset():
                        break
            await conn.commit()
            POINTS.inc(applied)
            IGNORED.inc(len(kept) - applied)
            for lp in kept:
                if not lp.point.is_forecast:
                    key = lp.slot[:3]
                    self._newest_ms[key] = max(self._newest_ms.get(key, lp.point.ts), lp.point.ts)
                    LATEST.labels(*key).set(self._newest_ms[key] / 1000)
        # After the commit, as the processor does: a poll that fails to write sends no dead letters.
        for rejection in rejected:
            await self._dead_letter(producer, rejection)
        return applied

    async def _dead_letter(self, producer: AIOKafkaProducer, rejection: Rejection) -> None:
        REJECTED.labels(rejection.reason.value).inc()
        cap = self.settings.ingest.dlq_payload_cap_bytes
        letter = encode_dead_letter(
            reason=rejection.reason.value,
            detail=rejection.detail,
            payload=rejection.record.value or b"",
            cap=cap,
            received_ms=now_ms(),
            topic=rejection.record.topic,
            partition=rejection.record.partition,
            offset=rejection.record.offset,
        )
        await producer.send_and_wait(self.settings.kafka.dlq_topic, letter)
        log.warning(
            "intensity record %s[%d]@%d sent to DLQ (%s): %s",
            rejection.record.topic, rejection.record.partition, rejection.record.offset,
            rejection.reason.value, rejection.detail,
        )  # fmt: skip
