"""No acknowledged reading is lost: Kafka down for 20 s, a collector SIGKILLed mid-stream, and two
collectors sharing the subscription. Readings are identified by (device, ts) and counted in Kafka."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections import Counter

import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaConsumer

from deploy.local import stack
from deploy.local.services import Kafka
from meterflow.contract import decode_records, gateway_telemetry_topic, now_ms
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _connect, _register

Key = tuple[str, int]


class Stream:
    """Publishes one single-reading message per `interval_s` from one gateway, QoS 1, counting the
    broker's acknowledgements, until stopped."""

    def __init__(self, p: Pipeline, interval_s: float = 0.005) -> None:
        self.tenant = f"t-{uuid.uuid4().hex[:8]}"
        gateway = f"gw-{uuid.uuid4().hex[:8]}"
        self.devices = [f"nl-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
        creds = _register(p, self.tenant, gateway, self.devices)
        self.topic = gateway_telemetry_topic(self.tenant, gateway)
        self.client = _connect(p, creds)
        self.published: list[tuple[mqtt.MQTTMessageInfo, Key]] = []
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        base = now_ms() - 3_600_000
        i = 0
        while not self._stop.is_set():
            device = self.devices[i % len(self.devices)]
            ts = base + i
            body = orjson.dumps({device: [{"ts": ts, "values": {"power_kw": float(i)}}]})
            # No lock of ours around paho: it calls back from its network thread holding its own.
            self.published.append((self.client.publish(self.topic, body, qos=1), (device, ts)))
            i += 1
            time.sleep(self._interval_s)

    @property
    def acked(self) -> set[Key]:
        """Readings whose message the broker acknowledged (PUBACK) to the gateway."""
        return {key for info, key in self.published if info.is_published()}

    def start(self) -> Stream:
        self._thread.start()
        return self

    def stop(self, settle_s: float = 60) -> None:
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + settle_s
        while len(self.acked) < len(self.published) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.client.disconnect()
        self.client.loop_stop()
        unacked = len(self.published) - len(self.acked)
        assert not unacked, f"{unacked} publishes never acknowledged by the broker"


async def _records(p: Pipeline, tenant: str, want: set[Key], timeout_s: float = 120) -> Counter[Key]:
    consumer = AIOKafkaConsumer(
        p.settings.kafka.readings_topic,
        bootstrap_servers=p.settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    seen: Counter[Key] = Counter()
    deadline = time.monotonic() + timeout_s
    idle_until = None
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    for readings in decode_records(record.value or b""):
                        if readings.tenant == tenant:
                            seen.update((readings.device, r.ts_ms) for r in readings.readings)
            if want <= set(seen):
                # Everything is there; linger briefly so that late duplicates would be seen too.
                idle_until = idle_until or time.monotonic() + 3
                if time.monotonic() > idle_until:
                    break
    finally:
        await consumer.stop()
    return seen


def _kafka(p: Pipeline) -> Kafka:
    return next(s for s in stack.services(p.settings) if isinstance(s, Kafka))


def test_kafka_down_for_20_s_loses_and_duplicates_nothing(pipeline: Pipeline) -> None:
    kafka = _kafka(pipeline)
    stream = Stream(pipeline).start()
    time.sleep(3)
    kafka.stop()
    try:
        time.sleep(20)  # messages keep coming; the collector stops acknowledging, the broker keeps them
    finally:
        kafka.start()
        kafka.wait_healthy(120)
    time.sleep(5)
    stream.stop(settle_s=120)
    seen = asyncio.run(_records(pipeline, stream.tenant, stream.acked))
    missing = stream.acked - set(seen)
    assert not missing, f"{len(missing)} acknowledged readings missing from Kafka"
    duplicated = {k: n for k, n in seen.items() if n > 1}
    assert not duplicated, f"{len(duplicated)} readings in Kafka more than once"
    assert len(stream.acked) > 2000


def test_collector_sigkilled_mid_stream_loses_no_acknowledged_reading(pipeline: Pipeline) -> None:
    stream = Stream(pipeline).start()
    time.sleep(3)
    collector = pipeline.procs.pop("collector")
    collector.send_signal(signal.SIGKILL)
    collector.wait(timeout=30)
    time.sleep(3)
    # Same client id: the broker kept the persistent session and redelivers what was never acked.
    pipeline.start("collector", "collector", "--shared-group", pipeline.shared_group, "--leave-group-on-exit")
    pipeline.wait_for_log("collector", "subscriptions acknowledged", occurrence=2)
    time.sleep(3)
    stream.stop()
    seen = asyncio.run(_records(pipeline, stream.tenant, stream.acked))
    missing = stream.acked - set(seen)
    assert not missing, f"{len(missing)} acknowledged readings missing from Kafka"
    assert len(stream.acked) > 1000


def test_two_collectors_share_the_subscription(pipeline: Pipeline) -> None:
    # Scaled down for good when stopped: it leaves the group instead of keeping a share of messages
    # queued in a session nobody resumes.
    pipeline.start(
        "collector-2", "collector", "--shared-group", pipeline.shared_group, "--leave-group-on-exit",
        client_id_suffix="-2",
    )  # fmt: skip
    pipeline.wait_for_log("collector-2", "subscriptions acknowledged")
    stream = Stream(pipeline, interval_s=0.002).start()
    time.sleep(5)
    stream.stop()
    seen = asyncio.run(_records(pipeline, stream.tenant, stream.acked))
    assert stream.acked <= set(seen)
    assert all(n == 1 for n in seen.values())
    pipeline.stop("collector-2")
    handled = pipeline.log_counter("collector-2", "messages received")
    assert 0 < handled < len(stream.acked), "the second collector should take a share, not all"
