"""Kafka -> TimescaleDB processor.

Consumes ``meterflow.readings.v1`` in a consumer group, writes each poll's readings and the next offsets
of its partitions in one database transaction, and on every partition assignment seeks to the offsets
stored in the database. Kafka's own committed offsets are updated too, for lag monitoring only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from prometheus_client import Counter, Gauge

from meterflow.contract import DeviceReadings, RecordError, decode_record, now_ms
from meterflow.settings import Settings
from processing import store

log = logging.getLogger(__name__)

RECORDS = Counter("meterflow_processor_records_total", "Kafka records consumed")
ROWS_WRITTEN = Counter("meterflow_processor_readings_written_total", "Raw readings inserted")
DUPLICATES = Counter(
    "meterflow_processor_duplicate_readings_total", "Readings already stored, not added again"
)
BAD_RECORDS = Counter("meterflow_processor_bad_records_total", "Records sent to the DLQ", ["reason"])
LAG = Gauge("meterflow_processor_lag_records", "Records behind the partition end", ["partition"])


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        return None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.processor.seek_to_stored(assigned)


class Processor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.kafka.processor_group
        self.topic = settings.kafka.readings_topic
        self._stop = asyncio.Event()
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def conn(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None:
            raise RuntimeError("processor not started")
        return self._conn

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("processor not started")
        return self._consumer

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("processor not started")
        return self._producer

    async def seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        stored = await store.load_offsets(self.conn, group=self.group, topic=self.topic)
        for tp in assigned:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:
                await self.consumer.seek_to_beginning(tp)
        log.info(
            "assigned partitions %s; resuming from stored offsets %s",
            sorted(t.partition for t in assigned),
            {p: stored.get(p) for p in sorted(t.partition for t in assigned)},
        )

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop.set)
        k = self.settings.kafka
        self._conn = await psycopg.AsyncConnection.connect(self.settings.db.conninfo())
        await store.prepare(self._conn)
        self._producer = AIOKafkaProducer(bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        self._consumer.subscribe([self.topic], listener=_SeekToStoredOffsets(self))
        await self._producer.start()
        await self._consumer.start()
        log.info("processor consuming %s as group %s", self.topic, self.group)
        try:
            while not self._stop.is_set():
                await self._step()
        finally:
            await self._shutdown()

    async def _step(self) -> None:
        p = self.settings.processing
        batches = await self.consumer.getmany(timeout_ms=p.poll_timeout_ms, max_records=p.max_batch_records)
        if not batches:
            return
        decoded: list[DeviceReadings] = []
        next_offsets: dict[int, int] = {}
        for tp, records in batches.items():
            for rec in records:
                RECORDS.inc()
                try:
                    decoded.append(decode_record(rec.value or b""))
                except RecordError as exc:
                    await self._dead_letter(tp, rec.offset, rec.value or b"", str(exc))
            next_offsets[tp.partition] = records[-1].offset + 1
        result = await store.write_batch(
            self.conn, decoded, group=self.group, topic=self.topic, next_offsets=next_offsets
        )
        ROWS_WRITTEN.inc(result.inserted)
        DUPLICATES.inc(result.duplicates)
        with contextlib.suppress(Exception):
            await self.consumer.commit({tp: next_offsets[tp.partition] for tp in batches})
        for tp in batches:
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                LAG.labels(str(tp.partition)).set(max(0, highwater - next_offsets[tp.partition]))

    async def _dead_letter(self, tp: TopicPartition, offset: int, value: bytes, detail: str) -> None:
        BAD_RECORDS.labels("undecodable_record").inc()
        cap = self.settings.ingest.dlq_payload_cap_bytes
        record = orjson.dumps(
            {
                "v": 1,
                "reason": "undecodable_record",
                "detail": detail,
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": offset,
                "received_ms": now_ms(),
                "payload": value[:cap].decode("utf-8", errors="replace"),
                "payload_bytes": len(value),
                "payload_truncated": len(value) > cap,
            }
        )
        await self.producer.send_and_wait(self.settings.kafka.dlq_topic, record)
        log.warning("record %s[%d]@%d sent to DLQ: %s", tp.topic, tp.partition, offset, detail)

    async def _shutdown(self) -> None:
        log.info("processor stopping")
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        if self._conn is not None:
            await self._conn.close()
        log.info("processor stopped")
