"""Kafka -> TimescaleDB processor.

Consumes ``meterflow.readings.v1`` in a consumer group. Each poll is decoded into columns and written by
`processing.writer.BatchWriter` in one database transaction together with the next offsets of its
partitions; on every partition assignment the consumer seeks to the offsets stored in the database, so
a crash or a replay never double counts. Kafka's own committed offsets are updated too, for lag
monitoring only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import psycopg
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.errors import IllegalStateError
from prometheus_client import Counter, Gauge, Histogram

from ingest.budget import DeadLetterBudget
from meterflow.contract import DeadLetterEntry, DeadLetterReason, encode_dead_letter, now_ms
from meterflow.settings import Settings
from processing import kernels, pgcopy, store
from processing.audit import AuditError, AuditLog
from processing.columns import ColumnBuilder, Columns, UndecodableRecord
from processing.keys import KeyIds
from processing.registry import RegistryView
from processing.retention import apply_retention
from processing.series import SeriesTable
from processing.writer import BatchOutcome, BatchWriter, Conflict

log = logging.getLogger(__name__)

# aiokafka refuses a request above 1 MiB (max_request_size). A letter beyond this one, about a record near
# the readings topic's size limit, is sent without its payload and with a short list: sending it whole
# would fail the poll on every attempt and stall the partition.
MAX_LETTER_BYTES: Final = 1_000_000

RECORDS = Counter("meterflow_processor_records_total", "Kafka records consumed")
READINGS = Counter("meterflow_processor_readings_total", "Readings decoded from Kafka records")
ROWS_WRITTEN = Counter("meterflow_processor_readings_written_total", "Raw readings inserted")
DUPLICATES = Counter(
    "meterflow_processor_duplicate_readings_total", "Readings already stored, not added again"
)
LATE = Counter(
    "meterflow_processor_late_readings_total", "Readings older than their series' newest stored reading"
)
FLAGS = Counter("meterflow_processor_quality_flags_total", "Readings flagged by VEE, by kind", ["kind"])
AGG_ROWS = Counter("meterflow_processor_aggregate_rows_total", "Aggregate rows added to or corrected")
BAD_RECORDS = Counter(
    "meterflow_processor_bad_records_total",
    "Records dead-lettered, by reason (written, or only counted when over the dead-letter budget)",
    ["reason"],
)
DLQ_BUDGET_EXCEEDED = Counter(
    "meterflow_processor_dlq_budget_exceeded_total",
    "Dead letters not written: their gateway had spent its dead-letter budget",
    ["reason"],
)
REFUSED = Counter(
    "meterflow_processor_refused_readings_total",
    "Readings left out of a record and dead-lettered: non-finite, out of range, or at a time not stored",
    ["reason"],
)
CONFLICTS = Counter(
    "meterflow_processor_conflicting_duplicates_total",
    "Duplicates of a stored (or earlier) reading with another value: the first is kept, this dead-lettered",
)
LAG = Gauge("meterflow_processor_lag_records", "Records behind the partition end", ["partition"])
BATCH_SECONDS = Histogram(
    "meterflow_processor_batch_seconds",
    "Decode, compute and commit of one poll",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class _SeekToStoredOffsets(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, processor: Processor) -> None:
        self.processor = processor

    # A rebalance can run while a poll is being written: both callbacks wait for that transaction, so
    # the offsets they read are committed ones and the connection is idle.

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.processor.rebalances += 1
        async with self.processor.write_lock:
            # Another processor may write these partitions next: forget what we cached about them.
            self.processor.audit.forget(tp.partition for tp in revoked)
            self.processor.series.forget_all()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.processor.rebalances += 1
        async with self.processor.write_lock:
            await self.processor.seek_to_stored(assigned)
            # Again once the positions are the stored offsets: a poll that getmany returned while the
            # seek was awaited was read from the positions before it, and is dropped (else it would be
            # written and then read again from the stored offsets, its dead letters sent twice).
            self.processor.rebalances += 1


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel of the write path before the first poll."""
    kernels.warm_up()
    pgcopy.warm_up()


@dataclass(slots=True)
class _Poll:
    """Records of one poll, decoded; `rebalances` is the processor's count when getmany returned them
    (the positions they leave the consumer at belong to that assignment)."""

    batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
    builder: ColumnBuilder
    next_offsets: dict[int, int]
    undecodable: list[tuple[TopicPartition, int, bytes, str]]
    rebalances: int
    fetched_at: float


class Processor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.kafka.processor_group
        self.topic = settings.kafka.readings_topic
        self._stop = asyncio.Event()
        self.write_lock = asyncio.Lock()
        self.readings_done = 0  # readings in committed polls (benchmarks watch it)
        self.rebalances = 0
        self.polls = 0
        self.series = SeriesTable(
            metric_ranges=settings.ingest.metric_ranges,
            min_ts_ms=(settings.ingest.min_ts - datetime(1970, 1, 1, tzinfo=UTC))
            // timedelta(milliseconds=1),
        )
        # The collector's budget, on the collector's setting: a gateway's refused and conflicting
        # readings cost at most that many letter bytes a minute here as well.
        self._dlq_budget = DeadLetterBudget(settings.ingest.dlq_budget_bytes_per_min)
        self.registry = RegistryView()
        self.audit = AuditLog(self.topic)
        self.key_ids = KeyIds(settings.db.conninfo())
        self.writer = BatchWriter(
            settings, self.series, self.registry, self.audit, self.key_ids, group=self.group, topic=self.topic
        )
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
            # A rebalance may have taken the partition away meanwhile: its next owner (or this
            # processor, when it gets it back) starts from the stored offset too.
            try:
                if tp.partition in stored:
                    self.consumer.seek(tp, stored[tp.partition])
                else:
                    await self.consumer.seek_to_beginning(tp)
            except IllegalStateError:
                log.info("partition %d no longer assigned; not seeking it", tp.partition)
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
        started = time.monotonic()
        await asyncio.to_thread(warm_up)
        log.info("kernels ready in %.1f s", time.monotonic() - started)
        self._conn = await psycopg.AsyncConnection.connect(self.settings.db.conninfo())
        await self.key_ids.open()
        await store.prepare(self._conn)
        await self.registry.refresh(self._conn, refresh_s=self.settings.ingest.registry_refresh_s)
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
        retention_due = time.monotonic()
        # The next poll is fetched and decoded while the current one is written (decoding runs
        # whenever the write waits for the database).
        pending: asyncio.Task[_Poll | None] | None = None
        try:
            while not self._stop.is_set():
                poll = await (pending or self._fetch())
                pending = None
                if poll is not None and poll.rebalances != self.rebalances:
                    # Fetched under an assignment that has changed since: drop it, and take every
                    # assigned partition back to its stored offset so its records come again.
                    async with self.write_lock:
                        await self.seek_to_stored(self.consumer.assignment())
                elif poll is not None:
                    columns = poll.builder.finish()
                    pending = asyncio.create_task(self._fetch())
                    await self._write_poll(poll, columns)
                if self.settings.processing.raw_retention_days and time.monotonic() >= retention_due:
                    await self._apply_retention()
                    retention_due = time.monotonic() + self.settings.processing.retention_every_s
        finally:
            if pending is not None:
                # Fetched, not written: the stored offsets bring these records back next time.
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
            await self._shutdown()

    async def _apply_retention(self) -> None:
        async with self.write_lock:
            try:
                await apply_retention(self.conn, self.settings)
            except psycopg.Error as exc:
                # Retention is housekeeping: a failed round is retried at the next one, polls go on.
                await self.conn.rollback()
                log.error(
                    "retention failed, retrying in %.0f s: %s",
                    self.settings.processing.retention_every_s,
                    exc,
                )

    async def _fetch(self) -> _Poll | None:
        p = self.settings.processing
        batches = await self.consumer.getmany(timeout_ms=p.poll_timeout_ms, max_records=p.max_batch_records)
        # Read right after getmany: a rebalance during it already moved the positions past these
        # records, and nothing below awaits.
        rebalances = self.rebalances
        if not batches:
            return None
        fetched_at = time.perf_counter()
        builder = ColumnBuilder.start(self.series)
        next_offsets: dict[int, int] = {}
        undecodable: list[tuple[TopicPartition, int, bytes, str]] = []
        for tp, records in batches.items():
            for rec in records:
                RECORDS.inc()
                try:
                    builder.add(tp.partition, rec.value or b"", rec.offset)
                except UndecodableRecord as exc:
                    undecodable.append((tp, rec.offset, rec.value or b"", str(exc)))
            next_offsets[tp.partition] = records[-1].offset + 1
        return _Poll(batches, builder, next_offsets, undecodable, rebalances, fetched_at)

    async def _write_poll(self, poll: _Poll, columns: Columns) -> None:
        async with self.write_lock:
            if poll.rebalances != self.rebalances:
                # An assignment came in while this poll waited (its seek moved the positions after the
                # poll was read): drop it, its records come again from the stored offsets.
                await self.seek_to_stored(self.consumer.assignment())
                return
            # Dead letters go out only for polls that are written, so a dropped poll sends none twice,
            # and before the commit, so a crash in between sends them again rather than never.
            letters = [
                self._dead_letter(tp, offset, value, detail) for tp, offset, value, detail in poll.undecodable
            ]
            for refusal in poll.builder.refused:
                for reason, count in refusal.reasons.items():
                    REFUSED.labels(reason.value).inc(count)
                first = refusal.rejected[0]
                letters.append(self._dead_letter(
                    TopicPartition(self.topic, refusal.partition), refusal.offset, refusal.raw, first["detail"],
                    reason=first["reason"], rejected=refusal.rejected, tenant=refusal.tenant,
                    gateway=refusal.gateway,
                ))  # fmt: skip
            await self._send_letters(letters)
            outcome = await self._write(columns, poll.next_offsets)
        if outcome.conflicts:
            await self._send_letters(self._conflict_letters(columns, outcome.conflicts))
        self.readings_done += outcome.readings
        self.polls += 1
        READINGS.inc(outcome.readings)
        ROWS_WRITTEN.inc(outcome.inserted)
        DUPLICATES.inc(outcome.duplicates)
        LATE.inc(outcome.late)
        AGG_ROWS.inc(outcome.aggregate_rows)
        for kind, count in outcome.flags.items():
            FLAGS.labels(kind).inc(count)
        BATCH_SECONDS.observe(time.perf_counter() - poll.fetched_at)
        with contextlib.suppress(Exception):
            await self.consumer.commit({tp: poll.next_offsets[tp.partition] for tp in poll.batches})
        for tp in poll.batches:
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                LAG.labels(str(tp.partition)).set(max(0, highwater - poll.next_offsets[tp.partition]))

    async def _write(self, columns: Columns, next_offsets: dict[int, int]) -> BatchOutcome:
        await self.registry.refresh(self.conn, refresh_s=self.settings.ingest.registry_refresh_s)
        try:
            return await self.writer.write(self.conn, columns, next_offsets)
        except (psycopg.errors.UniqueViolation, AuditError) as exc:
            # What we knew of some series or audit chains was stale (another processor wrote them
            # during a rebalance): forget it, reload from the database and write the poll again.
            log.warning("stale state (%s); reloading it and writing the poll again", exc)
            self.audit.forget()
            self.series.forget_all()
            return await self.writer.write(self.conn, columns, next_offsets)
        except BaseException:
            self.audit.forget()
            raise

    def _conflict_letters(self, columns: Columns, conflicts: list[Conflict]) -> list[bytes | None]:
        """One dead letter per record, listing its conflicting readings with the kept and the sent value."""
        CONFLICTS.inc(len(conflicts))
        by_record: dict[int, list[DeadLetterEntry]] = {}
        tenants: dict[int, str] = {}
        for c in conflicts:
            tenants[c.record] = c.key[0]
            by_record.setdefault(c.record, []).append(
                DeadLetterEntry(
                    reason=DeadLetterReason.CONFLICTING_DUPLICATE.value,
                    detail=f"ts {c.ts_ms}: value {c.value!r} differs from the value kept, {c.kept!r}",
                    device=c.key[1],
                    metric=c.key[2],
                )
            )
        return [
            self._dead_letter(
                TopicPartition(self.topic, int(columns.record_partition[r])), int(columns.record_offset[r]),
                columns.record_raw[r], rejected[0]["detail"],
                reason=DeadLetterReason.CONFLICTING_DUPLICATE.value, rejected=rejected,
                tenant=tenants[r], gateway=columns.record_gateway[r],
            )
            for r, rejected in by_record.items()
        ]  # fmt: skip

    async def _send_letters(self, letters: list[bytes | None]) -> None:
        """Send a poll's letters together, then wait for all of them: one round trip to Kafka per poll,
        not one per record."""
        topic = self.settings.kafka.dlq_topic
        sent = [await self.producer.send(topic, letter) for letter in letters if letter is not None]
        await asyncio.gather(*sent)

    def _dead_letter(
        self,
        tp: TopicPartition,
        offset: int,
        value: bytes,
        detail: str,
        *,
        reason: str = "undecodable_record",
        rejected: list[DeadLetterEntry] | None = None,
        tenant: str | None = None,
        gateway: str | None = None,
    ) -> bytes | None:
        """The letter for a record, or None when its gateway has spent its dead-letter budget (then only
        counted, and once a minute a small dlq_budget letter says so). Undecodable records name no
        gateway: they share one budget."""
        BAD_RECORDS.labels(reason).inc()
        key = (tenant, gateway)
        now = time.monotonic()
        if not self._dlq_budget.has_room(key, now):
            DLQ_BUDGET_EXCEEDED.labels(reason).inc()
            return self._budget_letter(tp, tenant, gateway) if self._dlq_budget.announce(key, now) else None
        origin = {
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": offset,
            "tenant": tenant,
            "gateway": gateway,
        }
        received = now_ms()
        cap = self.settings.ingest.dlq_payload_cap_bytes
        record = encode_dead_letter(
            reason=reason,
            detail=detail,
            payload=value,
            cap=cap,
            received_ms=received,
            rejected=rejected,
            **origin,
        )
        if len(record) > MAX_LETTER_BYTES:
            record = encode_dead_letter(
                reason=reason, detail=f"letter of {len(record)} bytes cut to its reasons: {detail}", payload=b"",
                cap=0, received_ms=received, rejected=rejected, record_bytes=len(value), **origin,
            )  # fmt: skip
        self._dlq_budget.spend(key, len(record), now)
        log.warning("record %s[%d]@%d dead-lettered: %s", tp.topic, tp.partition, offset, detail)
        return record

    def _budget_letter(self, tp: TopicPartition, tenant: str | None, gateway: str | None) -> bytes:
        budget = self.settings.ingest.dlq_budget_bytes_per_min
        detail = (
            f"gateway {gateway!r} of tenant {tenant!r} exceeded its dead-letter budget of {budget} bytes a "
            "minute: its dead-lettered records are counted in meterflow_processor_bad_records_total, not "
            "written, until the budget refills"
        )
        log.warning("%s (partition %d)", detail, tp.partition)
        return encode_dead_letter(
            reason=DeadLetterReason.DLQ_BUDGET.value, detail=detail, payload=b"", cap=0, received_ms=now_ms(),
            topic=tp.topic, partition=tp.partition, tenant=tenant, gateway=gateway,
        )  # fmt: skip

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
        await self.key_ids.close()
        log.info("processor stopped")
