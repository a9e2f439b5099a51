"""Replay dead letters once their cause is fixed (a device registered late, a metric now accepted).

Each dead letter keeps the original payload, topic, what was refused in it (reason and device of each
rejection) and the receive time. A replay parses the payload again exactly as the collector did at that
receive time, applies today's registry, and produces the readings that now pass, of the devices the
letter refused for a reason being replayed, to the readings topic. A letter whose list of rejections was
cut (a message with very many) names too few devices: all of the message's readings that pass are sent
again, which the processor stores once. Replaying
twice is harmless: the processor stores a reading once per device, metric and timestamp. Progress is
kept as the replay consumer group's committed offsets, so a second run looks only at newer letters
unless asked to start from the beginning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from ingest.payloads import Limits, parse_message
from ingest.registry import Registry, check_ownership
from meterflow.contract import DeadLetterReason, parse_telemetry_topic
from meterflow.settings import Settings

log = logging.getLogger(__name__)

REPLAYABLE = (
    DeadLetterReason.UNKNOWN_DEVICE,
    DeadLetterReason.TENANT_MISMATCH,
    DeadLetterReason.UNKNOWN_METRIC,
)
REPLAY_GROUP = "meterflow-dlq-replay"


@dataclass(slots=True)
class ReplaySummary:
    letters: int = 0
    considered: int = 0
    replayed_readings: int = 0
    still_rejected: Counter[str] = field(default_factory=Counter)
    not_replayable: Counter[str] = field(default_factory=Counter)


async def replay(
    settings: Settings,
    *,
    reasons: set[str],
    tenant: str | None = None,
    from_beginning: bool = False,
    dry_run: bool = False,
    on_letter: Callable[[], None] | None = None,
) -> ReplaySummary:
    """Replay the dead letters present now whose reason is in `reasons` (and tenant, if given)."""
    summary = ReplaySummary()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap,
        group_id=REPLAY_GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap, acks="all", enable_idempotence=True
    )
    registry = Registry(settings.db.conninfo(), rated_power_factor=settings.ingest.rated_power_factor)
    limits = Limits.from_settings(settings.ingest)
    reject_unknown_metrics = settings.ingest.unknown_metrics == "reject"
    await consumer.start()
    await producer.start()
    try:
        await registry.load()
        # The producer fetches the topic's metadata on demand; a bare assigned consumer would not.
        partitions = [
            TopicPartition(settings.kafka.dlq_topic, p)
            for p in sorted(await producer.partitions_for(settings.kafka.dlq_topic))
        ]
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if await consumer.position(tp) < end[tp]}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=1000)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    summary.letters += 1
                    if on_letter:
                        on_letter()
                    sends = _replay_one(
                        record.value or b"",
                        summary,
                        registry,
                        limits,
                        reasons,
                        tenant,
                        reject_unknown_metrics,
                    )
                    if not dry_run:
                        for key, value in sends:
                            await producer.send(settings.kafka.readings_topic, value=value, key=key)
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
        if not dry_run:
            await producer.flush()
            await consumer.commit({tp: end[tp] for tp in partitions})
    finally:
        await consumer.stop()
        await producer.stop()
        await registry.close()
    return summary


def _replay_one(
    raw: bytes,
    summary: ReplaySummary,
    registry: Registry,
    limits: Limits,
    reasons: set[str],
    tenant: str | None,
    reject_unknown_metrics: bool,
) -> list[tuple[bytes, bytes]]:
    letter = orjson.loads(raw)
    wanted, devices = _devices_to_replay(letter, reasons)
    if not wanted or (tenant is not None and letter.get("tenant") != tenant):
        return []
    summary.considered += 1
    if letter.get("payload_truncated"):
        summary.not_replayable["payload_truncated"] += 1
        return []
    topic = parse_telemetry_topic(str(letter.get("topic")))
    if topic is None:
        summary.not_replayable["not_a_json_telemetry_topic"] += 1
        return []
    payload = str(letter.get("payload", "")).encode()
    parsed = parse_message(topic, payload, received_ms=int(letter["received_ms"]), limits=limits)
    parsed.accepted = [d for d in parsed.accepted if devices is None or d.device in devices]
    result, _ = check_ownership(
        parsed, topic.tenant, topic.gateway, registry, reject_unknown_metrics=reject_unknown_metrics
    )
    summary.still_rejected.update(
        r.reason.value for r in result.rejected if devices is None or r.device in devices
    )
    summary.replayed_readings += result.reading_count
    return [(d.kafka_key(), d.encode()) for d in result.accepted]


def _devices_to_replay(letter: dict[str, object], reasons: set[str]) -> tuple[bool, frozenset[str] | None]:
    """Whether the letter refused anything for the reasons asked, and the devices whose readings its
    replay may send (None: any)."""
    if letter.get("v") == 1:
        # One rejection per letter, about one device (or the whole message).
        if str(letter.get("reason")) not in reasons:
            return False, None
        device = letter.get("device")
        return True, None if device is None else frozenset({str(device)})
    counted = letter.get("reasons")
    if not isinstance(counted, dict) or not reasons.intersection(counted):
        return False, None
    rejected = letter.get("rejected")
    if letter.get("rejected_truncated") or not isinstance(rejected, list):
        return True, None
    devices = {
        entry.get("device")
        for entry in rejected
        if isinstance(entry, dict) and entry.get("reason") in reasons
    }
    if None in devices:
        return True, None
    return True, frozenset(str(d) for d in devices)
