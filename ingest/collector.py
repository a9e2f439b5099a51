"""MQTT -> Kafka collector.

Everything runs on one asyncio loop: paho-mqtt through its external-loop API (the socket is watched
with add_reader/add_writer, no network thread), the parsing, and aiokafka. Messages are taken in
batches, as many as have arrived: a batch's accepted readings become few v2 Kafka records (one per
tenant, gateway and partition, ingest.records), and one task waits for Kafka to acknowledge them all.
A QoS 1 message is acknowledged to the broker (manual ack) only after Kafka acknowledged every record
made from it (acks=all, idempotent producer), and acks leave in the order the messages arrived. The
broker's receive-maximum window bounds how many messages are held unacknowledged; while Kafka is down
nothing is acked, so the broker keeps the rest in the persistent session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import paho.mqtt.client as mqtt
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber, ProducerClosed
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge, Histogram

from ingest.budget import DeadLetterBudget
from ingest.payloads import Limits, ParseResult, Rejection, parse_message
from ingest.records import Partitioner, RecordBatch
from ingest.registry import Registry, check_ownership, wait_loaded
from ingest.sparkplug import SparkplugSessions
from meterflow import sparkplug
from meterflow.contract import (
    DEAD_LETTER_ORIGIN_CHARS,
    DeadLetterReason,
    TelemetryTopic,
    encode_dead_letter,
    now_ms,
    parse_telemetry_topic,
)
from meterflow.runtime import settle_after_start_up
from meterflow.settings import Settings

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

log = logging.getLogger(__name__)

RECEIVED = Counter("meterflow_ingest_messages_received_total", "MQTT messages received")
READINGS_PRODUCED = Counter("meterflow_ingest_readings_produced_total", "Readings acknowledged by Kafka")
REJECTED = Counter(
    "meterflow_ingest_rejected_total",
    "Messages or readings refused, by reason (dead-lettered or over budget)",
    ["reason"],
)
DEAD_LETTERS = Counter("meterflow_ingest_dead_letters_total", "Dead-letter records written (one per message)")
DEAD_LETTER_BYTES = Counter(
    "meterflow_ingest_dead_letter_bytes_total", "Bytes of dead-letter records written"
)
DLQ_BUDGET_EXCEEDED = Counter(
    "meterflow_ingest_dlq_budget_exceeded_total",
    "Messages whose dead letter was not written: their gateway had spent its dead-letter budget",
)
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

# MQTT v5 subscription identifiers tell the two kinds of Sparkplug delivery apart. Readings
# subscriptions are shared: each message goes to one collector of the group. Sparkplug births and
# deaths are also subscribed unshared by every collector, because every collector needs every node's
# aliases to read the data messages the group hands it; those copies only update state. JSON topics
# carry no identifier: a message without one is a readings delivery, and paho parses one property
# less for each of them.
READINGS_SUBSCRIPTION_ID: Final = 1
STATE_SUBSCRIPTION_ID: Final = 2
JSON_TOPICS: Final = ("meterflow/v1/+/+/telemetry", "meterflow/v1/+/+/+/telemetry")
SPARKPLUG_DATA_TOPICS: Final = ("spBv1.0/+/NDATA/+", "spBv1.0/+/DDATA/+/+")
SPARKPLUG_BIRTH_TOPICS: Final = ("spBv1.0/+/NBIRTH/+", "spBv1.0/+/DBIRTH/+/+")
SPARKPLUG_STATE_TOPICS: Final = (*SPARKPLUG_BIRTH_TOPICS, "spBv1.0/+/NDEATH/+", "spBv1.0/+/DDEATH/+/+")
# A record Kafka has not acknowledged in this long is sent again through a new producer.
DELIVERY_TIMEOUT_S: Final = 30.0
# A retiring collector stops waiting for messages queued for it once none arrived for this long.
LEAVE_QUIET_S: Final = 2.0
# Broker counters published every sys_interval: a dropped message must never go unnoticed.
BROKER_GAUGES: Final = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/store/messages/count": "stored",
}
# Packets read in one go before the loop serves Kafka and the batch pump again.
READ_BURST_PACKETS: Final = 1000
RECV_BYTES: Final = 256 * 1024
RECONNECT_MIN_S: Final = 1.0
RECONNECT_MAX_S: Final = 30.0
# paho's keepalive and ping checks; they only need to run a few times per keepalive interval.
MISC_INTERVAL_S: Final = 1.0
# Topics parsed once: a fleet publishes on a bounded set of them, parsed again after this many.
MAX_CACHED_TOPICS: Final = 100_000


def _consume_outcome(fut: asyncio.Future[object]) -> None:
    if not fut.cancelled():
        fut.exception()


def _fatal(fut: asyncio.Future[object]) -> bool:
    """A delivery failure that only a new producer (a new producer id) gets past."""
    return not fut.cancelled() and isinstance(fut.exception(), OutOfOrderSequenceNumber | ProducerClosed)


class _Client(mqtt.Client):
    """paho's client with buffered socket reads. paho reads each packet with at least three recv
    calls (type, length, body); reading up to RECV_BYTES at once serves hundreds of small packets per
    system call, and tells the reader whether a packet is already waiting without another recv.

    `_sock_recv` is paho's one hook for socket reads (paho-mqtt is pinned in constraints.txt)."""

    _rbuf = b""
    _rpos = 0

    def reset_buffer(self) -> None:
        """A new socket: what the old one left unread belongs to a closed connection."""
        self._rbuf, self._rpos = b"", 0

    @property
    def buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(RECV_BYTES)
            if len(data) <= bufsize:
                return data  # also b"" at end of stream
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]


@dataclass(frozen=True, slots=True)
class _Record:
    topic: str
    key: bytes
    value: bytes
    # None: the default partitioner places it by key.
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class _Incoming:
    msg: mqtt.MQTTMessage
    topic: str
    # The connection that delivered it: a message is acknowledged only on that connection.
    connection: int


# What acknowledging a message takes: (packet id, QoS, receipt time (monotonic), connection). Plain
# tuples of numbers, which the garbage collector stops tracking: thousands of messages wait for Kafka
# at any time, and paho's message objects (properties tables, a Condition each) kept that long made
# the collector spend about half its time in garbage collection.
_Ack = tuple[int, int, float, int]


@dataclass(slots=True)
class _Batch:
    """Messages handled together; acknowledged together once Kafka holds all their records."""

    acks: list[_Ack]
    readings: int
    done: bool = False


class Collector:
    def __init__(
        self, settings: Settings, *, shared_group: str | None = None, leave_group_on_exit: bool = False
    ) -> None:
        self.settings = settings
        self.shared_group = shared_group
        self.leave_group_on_exit = leave_group_on_exit
        self.limits = Limits.from_settings(settings.ingest)
        self._dlq_budget = DeadLetterBudget(settings.ingest.dlq_budget_bytes_per_min)
        self._incoming: list[_Incoming] = []
        self._arrived = asyncio.Event()
        self._batches: deque[_Batch] = deque()
        self._inflight = 0
        self._stop = asyncio.Event()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._client: _Client | None = None
        self._sock: SocketLike | None = None
        self._reading = False
        self._connection = 0
        self._disconnected = asyncio.Event()
        self._reconnect_delay = RECONNECT_MIN_S
        self._tasks: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[None]] = set()
        self._partitioner = Partitioner()
        self._topics: dict[str, TelemetryTopic | None] = {}
        self.registry = Registry(
            settings.db.conninfo(),
            refresh_s=settings.ingest.registry_refresh_s,
            rated_power_factor=settings.ingest.rated_power_factor,
        )
        # Seq continuity is meaningless when a shared subscription splits a node's messages.
        self.sparkplug = SparkplugSessions(
            track_seq=shared_group is None,
            max_devices_per_node=settings.ingest.sparkplug_max_devices_per_node,
            max_metrics_per_node=settings.ingest.sparkplug_max_metrics_per_node,
        )
        self._subscriptions_pending = 0
        self.received = 0
        self.produced = 0
        self._last_dropped = b"0"
        self._broker_gauges_mid: int | None = None
        self._readings_topics: list[str] = []

    # --- MQTT side: paho driven by the asyncio loop --------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("collector not started")
        return self._loop

    def _make_client(self) -> _Client:
        m = self.settings.mqtt
        client = _Client(
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
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600
        props.ReceiveMaximum = min(self.settings.ingest.max_inflight, 65535)
        # The service listener: gateway listeners replace client ids with usernames, and collectors
        # sharing the subscription need distinct ids (settings.MqttSettings.service_port).
        client.connect_async(
            m.host, m.service_port, keepalive=m.keepalive_s, clean_start=False, properties=props
        )
        return client

    def _on_socket_open(self, _client: mqtt.Client, _userdata: object, sock: SocketLike) -> None:
        if self._client is not None:
            self._client.reset_buffer()
        self._sock = sock
        self._resume_reading()

    def _on_socket_close(self, _client: mqtt.Client, _userdata: object, sock: SocketLike) -> None:
        self._pause_reading()
        self._sock = None

    def _on_socket_register_write(self, client: mqtt.Client, _userdata: object, sock: SocketLike) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _userdata: object, sock: SocketLike) -> None:
        self.loop.remove_writer(sock)

    def _pause_reading(self) -> None:
        if self._reading and self._sock is not None:
            self.loop.remove_reader(self._sock)
        self._reading = False

    def _resume_reading(self) -> None:
        if self._reading or self._sock is None or self._closing:
            return
        self._reading = True
        self.loop.add_reader(self._sock, self._read_ready)
        if self._client is not None and self._client.buffered:
            # Packets already read from the socket: no readiness event will announce them.
            self.loop.call_soon(self._read_ready)

    def _read_ready(self) -> None:
        client = self._client
        if client is None or not self._reading:
            return
        for _ in range(READ_BURST_PACKETS):
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or not client.buffered:
                break
        else:
            self.loop.call_soon(self._read_ready)
        # Bounded intake. QoS 1 deliveries never exceed the broker's receive maximum (max_inflight), so
        # only a flood of QoS 0 reaches this; pausing stops reading pings too, which is why QoS 1
        # alone must never trigger it (a stuck Kafka producer would cost the connection).
        if len(self._incoming) >= 2 * self.settings.ingest.max_inflight:
            self._pause_reading()

    async def _keep_connected(self, client: _Client) -> None:
        """Connect, and connect again with backoff whenever the connection drops, until closing."""
        while not self._closing:
            self._disconnected.clear()
            try:
                # A blocking TCP connect, bounded by paho's connect timeout; the broker is near.
                client.reconnect()
            except OSError as exc:
                log.warning("MQTT broker not reachable (%s); retrying in %.0f s", exc, self._reconnect_delay)
                self._disconnected.set()
            await self._disconnected.wait()
            if self._closing:
                return
            await asyncio.sleep(self._reconnect_delay)
            self._reconnect_delay = min(self._reconnect_delay * 2, RECONNECT_MAX_S)

    async def _misc(self, client: _Client) -> None:
        while True:
            client.loop_misc()
            await asyncio.sleep(MISC_INTERVAL_S)

    def _on_connect(
        self, client: mqtt.Client, _userdata: object, _flags: object, reason: ReasonCode, _props: object
    ) -> None:
        if reason.is_failure:
            log.error("MQTT connect refused: %s", reason)
            return
        self._connection += 1
        self._reconnect_delay = RECONNECT_MIN_S
        qos = self.settings.mqtt.qos

        def share(topics: tuple[str, ...]) -> list[tuple[str, int]]:
            return [(f"$share/{self.shared_group}/{t}" if self.shared_group else t, qos) for t in topics]

        json_topics = share(JSON_TOPICS)
        # Unshared, the birth copies only update state; the group's copy carries the readings.
        sparkplug_topics = share(
            (*SPARKPLUG_DATA_TOPICS, *SPARKPLUG_BIRTH_TOPICS) if self.shared_group else SPARKPLUG_DATA_TOPICS
        )
        self._readings_topics = [t for t, _ in (*json_topics, *sparkplug_topics)]
        state = [(t, qos) for t in SPARKPLUG_STATE_TOPICS]
        self._subscriptions_pending = 4
        self._broker_gauges_mid = client.subscribe([(t, 0) for t in BROKER_GAUGES])[1]
        client.subscribe(json_topics)
        for topics, sub_id in ((sparkplug_topics, READINGS_SUBSCRIPTION_ID), (state, STATE_SUBSCRIPTION_ID)):
            props = Properties(PacketTypes.SUBSCRIBE)
            props.SubscriptionIdentifier = sub_id
            client.subscribe(topics, properties=props)
        log.info(
            "connected to MQTT %s:%d, subscribing to %s, %s and %s",
            self.settings.mqtt.host, self.settings.mqtt.service_port, json_topics, sparkplug_topics, state,
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
        if not self._closing:
            log.warning("MQTT disconnected; reconnecting with backoff")
        self._disconnected.set()

    def _on_message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        gauge = BROKER_GAUGES.get(topic)
        if gauge is not None:
            with contextlib.suppress(ValueError):
                BROKER_MESSAGES.labels(gauge).set(float(msg.payload))
            if gauge == "dropped" and msg.payload not in (b"0", b"0.0") and msg.payload != self._last_dropped:
                log.error(
                    "the broker reports %s dropped messages: queue limits reached", msg.payload.decode()
                )
                self._last_dropped = bytes(msg.payload)
            return
        self._incoming.append(_Incoming(msg, topic, self._connection))
        self._arrived.set()

    # --- asyncio side --------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self.stop)
        self._producer = self._new_producer()
        await self._start_producer()
        await wait_loaded(self.registry, self._stop)
        # paho allocates a few dozen container objects per message; a collection would otherwise
        # walk every message read but not handled yet, every few dozen messages.
        settle_after_start_up()
        client = self._client = self._make_client()
        for job in (self._keep_connected(client), self._misc(client)):
            task = asyncio.create_task(job)
            self._tasks.add(task)
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

    def _take(self) -> list[_Incoming]:
        """Everything that arrived since the last batch (intake resumes if it was paused)."""
        self._arrived.clear()
        batch, self._incoming = self._incoming, []
        self._resume_reading()
        return batch

    async def _pump(self) -> None:
        while True:
            await self._arrived.wait()
            if self._stop.is_set():
                # What arrived is left to _leave_group, or to the broker to deliver again.
                return
            await self._handle(self._take())

    async def _readings_partitions(self) -> list[int]:
        """The readings topic's partitions, sorted as the default partitioner sees them."""
        topic = self.settings.kafka.readings_topic
        delay = 0.5
        while True:
            producer = self.producer
            known = producer.client.cluster.partitions_for_topic(topic)
            if known:
                return sorted(known)
            try:
                return sorted(await producer.partitions_for(topic))
            except Exception as exc:  # noqa: BLE001 - metadata errors are retried; nothing is acked
                log.warning("no metadata for %s (%s); retrying in %.1f s", topic, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _handle(self, messages: list[_Incoming]) -> None:
        RECEIVED.inc(len(messages))
        self.received += len(messages)
        self._inflight += len(messages)
        INFLIGHT.set(self._inflight)
        received_ms = now_ms()
        await self.registry.refresh_if_due()
        records = RecordBatch(received_ms, await self._readings_partitions(), self._partitioner)
        dead_letters: list[_Record] = []
        reject_unknown_metrics = self.settings.ingest.unknown_metrics == "reject"
        unknown_metric_readings = 0
        for item in messages:
            json_topic = self._json_topic(item.topic)
            payload = bytes(item.msg.payload)
            result: ParseResult | None = None
            if json_topic is not None:
                tenant, gateway = json_topic.tenant, json_topic.gateway
                result = parse_message(json_topic, payload, received_ms=received_ms, limits=self.limits)
            elif (sp_topic := sparkplug.parse_topic(item.topic)) is not None:
                tenant, gateway = sp_topic.group, sp_topic.edge_node
                result = self._sparkplug(item.msg, sp_topic, payload, received_ms)
            else:
                rejection = Rejection(DeadLetterReason.BAD_TOPIC, "not a meterflow telemetry topic")
                if (letter := self._dead_letter(item, [rejection], received_ms)) is not None:
                    dead_letters.append(letter)
            if result is None:
                continue
            if result.accepted:
                await self.registry.look_up(tenant, gateway, [d.device for d in result.accepted])
            checked, unknown = check_ownership(
                result, tenant, gateway, self.registry, reject_unknown_metrics=reject_unknown_metrics
            )
            unknown_metric_readings += unknown
            if checked.rejected and (letter := self._dead_letter(item, checked.rejected, received_ms)):
                dead_letters.append(letter)
            for device in checked.accepted:
                records.add(device)
        UNKNOWN_METRIC_READINGS.inc(unknown_metric_readings)
        topic = self.settings.kafka.readings_topic
        outgoing = [_Record(topic, key, value, partition) for partition, key, value in records.encoded()]
        outgoing += dead_letters
        sends = [(record, await self._send_retrying(record)) for record in outgoing]
        acks = [(m.msg.mid, m.msg.qos, m.msg.timestamp, m.connection) for m in messages]
        batch = _Batch(acks, records.readings)
        self._batches.append(batch)
        task = asyncio.create_task(self._deliver(batch, sends))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _json_topic(self, topic: str) -> TelemetryTopic | None:
        try:
            return self._topics[topic]
        except KeyError:
            if len(self._topics) >= MAX_CACHED_TOPICS:
                self._topics.clear()
            parsed = self._topics[topic] = parse_telemetry_topic(topic)
            return parsed

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
                    record.topic, value=record.value, key=record.key, partition=record.partition
                )
                return fut
            except ProducerClosed:
                await self._replace_producer(producer)
            except Exception as exc:  # noqa: BLE001 - broker errors are retried; the message stays unacked
                log.warning("Kafka send failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    def _dead_letter(self, item: _Incoming, rejections: list[Rejection], received_ms: int) -> _Record | None:
        """One record for everything refused in a message, or None when its gateway is over its
        dead-letter budget (then only counted, and announced once a minute)."""
        reasons: dict[str, int] = {}
        for rejection in rejections:
            reasons[rejection.reason.value] = reasons.get(rejection.reason.value, 0) + 1
        for reason, count in reasons.items():
            REJECTED.labels(reason).inc(count)
        parts = item.topic.split("/")
        binary = parts[0] == sparkplug.NAMESPACE
        tenant, gateway = (
            ((parts[1], parts[3]) if binary else (parts[2], parts[3])) if len(parts) > 3 else (None, None)
        )
        key = (tenant, gateway)
        now = time.monotonic()
        if not self._dlq_budget.has_room(key, now):
            DLQ_BUDGET_EXCEEDED.inc()
            if not self._dlq_budget.announce(key, now):
                return None
            return self._budget_letter(item.topic, tenant, gateway, received_ms)
        first = rejections[0]
        devices = {r.device for r in rejections}
        value = encode_dead_letter(
            reason=first.reason.value,
            detail=first.detail,
            payload=item.msg.payload,
            cap=self.settings.ingest.dlq_payload_cap_bytes,
            received_ms=received_ms,
            binary=binary,
            rejected=[r.entry() for r in rejections],
            topic=item.topic,
            tenant=tenant,
            gateway=gateway,
            # The device when the whole letter is about one.
            device=first.device if len(devices) == 1 else None,
        )
        self._dlq_budget.spend(key, len(value), now)
        DEAD_LETTERS.inc()
        DEAD_LETTER_BYTES.inc(len(value))
        log.debug("dead letter on %s: %s", item.topic, reasons)
        return _Record(self.settings.kafka.dlq_topic, item.topic.encode()[:DEAD_LETTER_ORIGIN_CHARS], value)

    def _budget_letter(
        self, topic: str, tenant: str | None, gateway: str | None, received_ms: int
    ) -> _Record:
        budget = self.settings.ingest.dlq_budget_bytes_per_min
        detail = (
            f"gateway {gateway!r} of tenant {tenant!r} exceeded its dead-letter budget of {budget} bytes a "
            "minute: its refused messages are counted in meterflow_ingest_rejected_total, not written, "
            "until the budget refills"
        )
        log.warning("%s (topic %s)", detail, topic)
        DEAD_LETTERS.inc()
        value = encode_dead_letter(
            reason=DeadLetterReason.DLQ_BUDGET.value,
            detail=detail,
            payload=b"",
            cap=0,
            received_ms=received_ms,
            topic=topic,
            tenant=tenant,
            gateway=gateway,
            device=None,
        )
        DEAD_LETTER_BYTES.inc(len(value))
        return _Record(self.settings.kafka.dlq_topic, topic.encode()[:DEAD_LETTER_ORIGIN_CHARS], value)

    async def _deliver(self, batch: _Batch, sends: list[tuple[_Record, asyncio.Future[object]]]) -> None:
        """Wait until Kafka acknowledged every record of the batch, sending again what failed or
        stalled, then acknowledge what is ready."""
        while sends:
            producer = self.producer
            done, stalled = await asyncio.wait({fut for _, fut in sends}, timeout=DELIVERY_TIMEOUT_S)
            if stalled:
                # After a broker restart an idempotent producer can wait on a partition leader for
                # good; a fresh producer finds it.
                log.warning(
                    "no Kafka acknowledgement within %.0f s for %d records", DELIVERY_TIMEOUT_S, len(stalled)
                )
            if stalled or any(_fatal(fut) for fut in done):
                # Stopping the old producer settles what it still holds, delivered or failed, so that
                # only what it did not deliver is sent again (Kafka recovering just as the timeout
                # expires would otherwise get those records twice).
                await self._replace_producer(producer)
            failed: list[_Record] = []
            for record, fut in sends:
                if not fut.done():
                    # The abandoned delivery may still fail later; its outcome no longer matters.
                    fut.add_done_callback(_consume_outcome)
                    failed.append(record)
                elif fut.cancelled() or (exc := fut.exception()) is not None:
                    reason = "cancelled" if fut.cancelled() else exc
                    log.warning("Kafka delivery failed (%s); sending again", reason)
                    failed.append(record)
            sends = [(record, await self._send_retrying(record)) for record in failed]
        batch.done = True
        READINGS_PRODUCED.inc(batch.readings)
        self.produced += batch.readings
        self._ack_ready()

    def _ack_ready(self) -> None:
        client = self._client
        now = time.monotonic()
        connection = self._connection
        while self._batches and self._batches[0].done:
            batch = self._batches.popleft()
            self._inflight -= len(batch.acks)
            for mid, qos, received, delivered_on in batch.acks:
                PRODUCE_LATENCY.observe(now - received)
                # A message delivered on an earlier connection is delivered again on this one, maybe
                # under the same packet id as another message: acking the old one could ack that.
                if qos > 0 and client is not None and delivered_on == connection:
                    client.ack(mid, qos)
        INFLIGHT.set(self._inflight)

    async def _leave_group(self) -> None:
        """Retire this collector: stop the group assigning it messages, then take in what the broker
        already queued for it, so that nothing is left behind in a session about to end."""
        if self._client is None or not self._readings_topics:
            return
        self._client.unsubscribe(self._readings_topics)
        log.info("leaving the shared group: unsubscribed, taking in what is still queued for us")
        while True:
            if batch := self._take():
                await self._handle(batch)
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), LEAVE_QUIET_S)
            except TimeoutError:
                return

    async def _flushed(self, timeout_s: float) -> None:
        """Wait until paho has written what it queued (acks, the DISCONNECT) or the socket closed."""
        deadline = time.monotonic() + timeout_s
        client = self._client
        while client is not None and self._sock is not None and client.want_write():
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.01)

    async def _shutdown(self) -> None:
        if self.leave_group_on_exit:
            await self._leave_group()
        # Stop intake and stay on this connection: what the broker sends from now on, or what would
        # need a new connection to be acknowledged, it delivers again to the next session.
        self._closing = True
        self._pause_reading()
        log.info("stopping: draining %d in-flight messages", self._inflight)
        if self._deliveries:
            await asyncio.wait(self._deliveries, timeout=30)
        self._ack_ready()
        client = self._client
        if client is not None:
            await self._flushed(5)
            if self.leave_group_on_exit:
                # Ending the session removes this member from the group; kept, the broker would go on
                # queueing a share of the messages for a collector that is never coming back.
                props = Properties(PacketTypes.DISCONNECT)
                props.SessionExpiryInterval = 0
                client.disconnect(properties=props)
            else:
                client.disconnect()
            await self._flushed(5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        await self.registry.close()
        log.info(
            "collector stopped: %d messages received, %d readings produced", self.received, self.produced
        )

    def stop(self) -> None:
        self._stop.set()
        self._arrived.set()
