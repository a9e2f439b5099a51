"""MQTT -> Kafka collector.

paho-mqtt runs its network loop in its own thread and hands each message to the asyncio loop. A QoS 1
message is acknowledged to the broker (manual ack) only after Kafka acknowledged every record made
from it (acks=all, idempotent producer), and acks leave in the order the messages arrived. The broker's
receive-maximum window bounds how many messages are held unacknowledged; while Kafka is down nothing
is acked, so the broker keeps the rest in the persistent session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import orjson
import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber, ProducerClosed
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge, Histogram

from ingest.payloads import Limits, ParseResult, Rejection, parse_message
from ingest.registry import Registry, check_ownership, wait_loaded
from ingest.sparkplug import SparkplugSessions
from meterflow import sparkplug
from meterflow.contract import DeadLetterReason, now_ms, parse_telemetry_topic
from meterflow.settings import Settings

log = logging.getLogger(__name__)

RECEIVED = Counter("meterflow_ingest_messages_received_total", "MQTT messages received")
READINGS_PRODUCED = Counter("meterflow_ingest_readings_produced_total", "Readings acknowledged by Kafka")
REJECTED = Counter("meterflow_ingest_rejected_total", "Messages or readings sent to the DLQ", ["reason"])
UNKNOWN_METRIC_READINGS = Counter(
    "meterflow_ingest_unknown_metric_readings_total", "Readings kept whose metric is not canonical"
)
SPARKPLUG_REBIRTHS = Counter(
    "meterflow_ingest_sparkplug_rebirth_requests_total", "Rebirth commands sent to Sparkplug edge nodes"
)
SPARKPLUG_DEATHS = Counter("meterflow_ingest_sparkplug_deaths_total", "Sparkplug NDEATH/DDEATH honoured")
BROKER_MESSAGES = Gauge(
    "meterflow_broker_publish_messages",
    "Mosquitto's own counters: messages dropped at queue limits (total) and messages stored now",
    ["kind"],
)
PRODUCER_RESTARTS = Counter(
    "meterflow_ingest_kafka_producer_restarts_total", "Kafka producers replaced after a fatal delivery error"
)
INFLIGHT = Gauge("meterflow_ingest_inflight_messages", "Messages received but not yet acknowledged")
PRODUCE_LATENCY = Histogram(
    "meterflow_ingest_produce_latency_seconds",
    "MQTT receipt to Kafka acknowledgement of all records of a message",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# MQTT v5 subscription identifiers tell the two kinds of delivery apart. Readings subscriptions are
# shared: each message goes to one collector of the group. Sparkplug births and deaths are also
# subscribed unshared by every collector, because every collector needs every node's aliases to read
# the data messages the group hands it; those copies only update state.
READINGS_SUBSCRIPTION_ID = 1
STATE_SUBSCRIPTION_ID = 2
JSON_TOPICS = ("meterflow/v1/+/+/telemetry", "meterflow/v1/+/+/+/telemetry")
SPARKPLUG_DATA_TOPICS = ("spBv1.0/+/NDATA/+", "spBv1.0/+/DDATA/+/+")
SPARKPLUG_BIRTH_TOPICS = ("spBv1.0/+/NBIRTH/+", "spBv1.0/+/DBIRTH/+/+")
SPARKPLUG_STATE_TOPICS = (*SPARKPLUG_BIRTH_TOPICS, "spBv1.0/+/NDEATH/+", "spBv1.0/+/DDEATH/+/+")
# A record Kafka has not acknowledged in this long is sent again through a new producer.
DELIVERY_TIMEOUT_S = 30.0
# A retiring collector stops waiting for messages queued for it once none arrived for this long.
LEAVE_QUIET_S = 2.0
# Broker counters published every sys_interval: a dropped message must never go unnoticed.
BROKER_GAUGES = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/store/messages/count": "stored",
}


def _consume_outcome(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass(frozen=True, slots=True)
class _Record:
    topic: str
    key: bytes
    value: bytes


@dataclass(slots=True)
class _Pending:
    mid: int
    qos: int
    done: bool = False
    received: float = field(default_factory=time.monotonic)


class Collector:
    def __init__(
        self, settings: Settings, *, shared_group: str | None = None, leave_group_on_exit: bool = False
    ) -> None:
        self.settings = settings
        self.shared_group = shared_group
        self.leave_group_on_exit = leave_group_on_exit
        self.limits = Limits(settings.ingest.max_payload_bytes, settings.ingest.max_future_skew_s * 1000)
        self._queue: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self._pending: deque[_Pending] = deque()
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._client: mqtt.Client | None = None
        self._completions: set[asyncio.Task[None]] = set()
        self.registry = Registry(settings.db.conninfo(), refresh_s=settings.ingest.registry_refresh_s)
        # Seq continuity is meaningless when a shared subscription splits a node's messages.
        self.sparkplug = SparkplugSessions(track_seq=shared_group is None)
        self._subscriptions_pending = 0
        self.received = 0
        self.produced = 0
        self._last_dropped = b"0"
        self._broker_gauges_mid: int | None = None
        self._readings_topics: list[str] = []

    # --- MQTT side (paho thread) ---------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        m = self.settings.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=m.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        client.username_pw_set(m.service_user, m.service_password.get_secret_value())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason: object, _props: object
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.error("MQTT connect refused: %s", reason)
            return
        qos = self.settings.mqtt.qos
        shared = [*JSON_TOPICS, *SPARKPLUG_DATA_TOPICS]
        if self.shared_group:
            # Unshared, the birth copies only update state; the group's copy carries the readings.
            shared += SPARKPLUG_BIRTH_TOPICS
        readings = [(f"$share/{self.shared_group}/{t}" if self.shared_group else t, qos) for t in shared]
        self._readings_topics = [t for t, _ in readings]
        state = [(t, qos) for t in SPARKPLUG_STATE_TOPICS]
        self._subscriptions_pending = 3
        self._broker_gauges_mid = client.subscribe([(t, 0) for t in BROKER_GAUGES])[1]
        for topics, sub_id in ((readings, READINGS_SUBSCRIPTION_ID), (state, STATE_SUBSCRIPTION_ID)):
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
            client.subscribe(topics, properties=props)
        log.info(
            "connected to MQTT %s:%d, subscribing to %s and %s",
            self.settings.mqtt.host, self.settings.mqtt.port, readings, state,
        )  # fmt: skip

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        _props: Properties,
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed and mid == self._broker_gauges_mid:
            log.warning(
                "broker counters not readable (%s): the ACL predates them; queue drops unmonitored", failed
            )
        elif failed:
            log.error("MQTT subscription refused: %s", failed)
            return
        self._subscriptions_pending -= 1
        if self._subscriptions_pending == 0:
            # Tests and operators wait for this line: from here on the broker queues messages for us.
            log.info("subscriptions acknowledged; collecting")

    def _on_disconnect(self, *_args: object) -> None:
        log.warning("MQTT disconnected; paho reconnects with backoff")

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        gauge = BROKER_GAUGES.get(msg.topic)
        if gauge is not None:
            with contextlib.suppress(ValueError):
                BROKER_MESSAGES.labels(gauge).set(float(msg.payload))
            if gauge == "dropped" and msg.payload not in (b"0", b"0.0") and msg.payload != self._last_dropped:
                log.error(
                    "the broker reports %s dropped messages: queue limits reached", msg.payload.decode()
                )
                self._last_dropped = bytes(msg.payload)
            return
        # The loop is set before the client connects, so it is there for every message.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, msg)

    # --- asyncio side --------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        self._producer = self._new_producer()
        await self._start_producer()
        await wait_loaded(self.registry, self._stop)
        self._client = self._make_client()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600
        props.ReceiveMaximum = min(self.settings.ingest.max_inflight, 65535)
        self._client.connect_async(
            self.settings.mqtt.host,
            self.settings.mqtt.port,
            keepalive=self.settings.mqtt.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()
        try:
            await self._pump()
        finally:
            await self._shutdown()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            max_batch_size=256 * 1024,
            request_timeout_ms=30_000,
        )

    async def _replace_producer(self, failed: AIOKafkaProducer) -> None:
        """Start a fresh producer after `failed` gave up. An idempotent producer whose batches failed
        while Kafka was away comes back out of sequence (OutOfOrderSequenceNumber) and closes for good;
        only a new producer (new producer id) can send again. Many failures of one producer cause one
        replacement."""
        async with self._producer_lock:
            if id(self._producer) != id(failed):  # already replaced by a concurrent failure
                return
            PRODUCER_RESTARTS.inc()
            log.warning("replacing the Kafka producer after a delivery failure")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(failed.stop(), timeout=5)
            self._producer = self._new_producer()
            await self._start_producer()

    @property
    def producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("collector not started")
        return self._producer

    async def _start_producer(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                await self.producer.start()
                return
            except Exception as exc:  # noqa: BLE001 - any start failure is retried with backoff
                log.warning("Kafka not reachable (%s); retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    async def _pump(self) -> None:
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                get = asyncio.create_task(self._queue.get())
                done, _ = await asyncio.wait({get, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                await self._handle(get.result())
        finally:
            stop_wait.cancel()

    async def _handle(self, msg: mqtt.MQTTMessage) -> None:
        RECEIVED.inc()
        self.received += 1
        pending = _Pending(msg.mid, msg.qos)
        self._pending.append(pending)
        INFLIGHT.set(len(self._pending))
        received_ms = now_ms()
        payload = bytes(msg.payload)
        records: list[_Record] = []
        n_readings = 0
        json_topic = parse_telemetry_topic(msg.topic)
        sp_topic = None if json_topic is not None else sparkplug.parse_topic(msg.topic)
        result: ParseResult | None = None
        if json_topic is not None:
            tenant, gateway = json_topic.tenant, json_topic.gateway
            result = parse_message(json_topic, payload, received_ms=received_ms, limits=self.limits)
        elif sp_topic is not None:
            tenant, gateway = sp_topic.group, sp_topic.edge_node
            result = self._sparkplug(msg, sp_topic, payload, received_ms)
        else:
            rejection = Rejection(DeadLetterReason.BAD_TOPIC, "not a meterflow telemetry topic")
            records.append(self._dead_letter(msg, rejection, received_ms))
        if result is not None:
            await self.registry.refresh_if_due()
            await self.registry.look_up(tenant, gateway, [d.device for d in result.accepted])
            checked, unknown_metric_readings = check_ownership(
                result, tenant, gateway, self.registry,
                reject_unknown_metrics=self.settings.ingest.unknown_metrics == "reject",
            )  # fmt: skip
            UNKNOWN_METRIC_READINGS.inc(unknown_metric_readings)
            records += [self._dead_letter(msg, r, received_ms) for r in checked.rejected]
            records += [
                _Record(self.settings.kafka.readings_topic, d.kafka_key(), d.encode())
                for d in checked.accepted
            ]
            n_readings = checked.reading_count
        sends = [(record, await self._send_retrying(record)) for record in records]
        task = asyncio.create_task(self._complete(pending, sends, n_readings))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)

    def _sparkplug(
        self, msg: mqtt.MQTTMessage, topic: sparkplug.SparkplugTopic, payload: bytes, received_ms: int
    ) -> ParseResult | None:
        """What a Sparkplug delivery yields: readings (None for a state-only copy), after its effect on
        the node's session state."""
        ids = set(getattr(msg.properties, "SubscriptionIdentifier", None) or [READINGS_SUBSCRIPTION_ID])
        is_birth = topic.message_type in (sparkplug.MessageType.NBIRTH, sparkplug.MessageType.DBIRTH)
        produced: ParseResult | None = None
        if STATE_SUBSCRIPTION_ID in ids or not is_birth:
            state = self.sparkplug.handle(topic, payload, received_ms=received_ms, limits=self.limits)
            if state.rebirth is not None and self._client is not None:
                SPARKPLUG_REBIRTHS.inc()
                self._client.publish(*state.rebirth, qos=0)
            for tenant, gateway, device in state.offline:
                SPARKPLUG_DEATHS.inc()
                log.info("sparkplug %s/%s%s is offline", tenant, gateway, f"/{device}" if device else "")
            # Without a shared group there is no separate readings copy of a birth: this one counts.
            if READINGS_SUBSCRIPTION_ID in ids or (is_birth and self.shared_group is None):
                produced = state
            elif not is_birth and state.rejected:
                # A death carries no readings, but a malformed one is still dead-lettered.
                produced = ParseResult(rejected=state.rejected)
        elif READINGS_SUBSCRIPTION_ID in ids:
            # The group's copy of a birth: its values are readings; the state copy sets the aliases.
            produced = SparkplugSessions(track_seq=False).handle(
                topic, payload, received_ms=received_ms, limits=self.limits
            )
            produced.rebirth = None
        return produced

    async def _send_retrying(self, record: _Record) -> asyncio.Future[object]:
        """Enqueue a record; while Kafka refuses, wait and retry rather than lose or ack the message."""
        delay = 0.5
        while True:
            producer = self.producer
            try:
                fut: asyncio.Future[object] = await producer.send(
                    record.topic, value=record.value, key=record.key
                )
                return fut
            except ProducerClosed:
                await self._replace_producer(producer)
            except Exception as exc:  # noqa: BLE001 - broker errors are retried; the message stays unacked
                log.warning("Kafka send failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def _dead_letter(self, msg: mqtt.MQTTMessage, rejection: Rejection, received_ms: int) -> _Record:
        REJECTED.labels(rejection.reason.value).inc()
        cap = self.settings.ingest.dlq_payload_cap_bytes
        parts = msg.topic.split("/")
        binary = parts[0] == sparkplug.NAMESPACE
        tenant, gateway = (parts[1], parts[3]) if binary else (parts[2], parts[3])
        kept = msg.payload[:cap]
        value = orjson.dumps(
            {
                "v": 1,
                "reason": rejection.reason.value,
                "detail": rejection.detail,
                "topic": msg.topic,
                "tenant": tenant if len(parts) > 3 else None,
                "gateway": gateway if len(parts) > 3 else None,
                "device": rejection.device,
                "received_ms": received_ms,
                # Sparkplug payloads are protobuf: kept as base64 so they survive JSON intact.
                "payload": base64.b64encode(kept).decode()
                if binary
                else kept.decode("utf-8", errors="replace"),
                "payload_encoding": "base64" if binary else "utf-8",
                "payload_bytes": len(msg.payload),
                "payload_truncated": len(msg.payload) > cap,
            }
        )
        log.debug("dead letter %s on %s: %s", rejection.reason.value, msg.topic, rejection.detail)
        return _Record(self.settings.kafka.dlq_topic, msg.topic.encode(), value)

    async def _complete(
        self, pending: _Pending, sends: list[tuple[_Record, asyncio.Future[object]]], n_readings: int
    ) -> None:
        for record, fut in sends:
            while True:
                producer = self.producer
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout=DELIVERY_TIMEOUT_S)
                    break
                except TimeoutError:
                    # After a broker restart an idempotent producer can wait on a partition leader for
                    # good; a fresh producer finds it.
                    log.warning("no Kafka acknowledgement within %.0f s; sending again", DELIVERY_TIMEOUT_S)
                    # The abandoned delivery may still fail later; its outcome no longer matters.
                    fut.add_done_callback(_consume_outcome)
                    await self._replace_producer(producer)
                    fut = await self._send_retrying(record)
                except Exception as exc:  # noqa: BLE001 - a failed delivery is sent again, never acked
                    log.warning("Kafka delivery failed (%s); sending again", exc)
                    if isinstance(exc, OutOfOrderSequenceNumber | ProducerClosed):
                        await self._replace_producer(producer)
                    fut = await self._send_retrying(record)
        pending.done = True
        READINGS_PRODUCED.inc(n_readings)
        self.produced += n_readings
        PRODUCE_LATENCY.observe(time.monotonic() - pending.received)
        self._ack_ready()

    def _ack_ready(self) -> None:
        client = self._client
        while self._pending and self._pending[0].done:
            head = self._pending.popleft()
            if head.qos > 0 and client is not None:
                client.ack(head.mid, head.qos)
        INFLIGHT.set(len(self._pending))

    async def _leave_group(self) -> None:
        """Retire this collector: stop the group assigning it messages, then take in what the broker
        already queued for it, so that nothing is left behind in a session about to end."""
        if self._client is None or not self._readings_topics:
            return
        self._client.unsubscribe(self._readings_topics)
        log.info("leaving the shared group: unsubscribed, taking in what is still queued for us")
        while True:
            try:
                msg = await asyncio.wait_for(self._queue.get(), timeout=LEAVE_QUIET_S)
            except TimeoutError:
                return
            await self._handle(msg)

    async def _shutdown(self) -> None:
        if self.leave_group_on_exit:
            await self._leave_group()
        log.info("stopping: draining %d in-flight messages", len(self._pending))
        if self._completions:
            await asyncio.wait(self._completions, timeout=30)
        self._ack_ready()
        if self._client is not None:
            # Give paho a moment to flush the last PUBACKs before the DISCONNECT.
            await asyncio.sleep(0.2)
            if self.leave_group_on_exit:
                # Ending the session removes this member from the group; kept, the broker would go on
                # queueing a share of the messages for a collector that is never coming back.
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
                self._client.disconnect(properties=props)
            else:
                self._client.disconnect()
            self._client.loop_stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        await self.registry.close()
        log.info(
            "collector stopped: %d messages received, %d readings produced", self.received, self.produced
        )

    def stop(self) -> None:
        self._stop.set()
