"""`meterflow bench ingest`: one collector process from MQTT to Kafka-acknowledged, beside bare paho.

One collector runs as its own process (``python -m meterflow collector``) on Kafka topics, an MQTT
client id and a shared-subscription group of this run only. A publisher process sends pre-encoded
messages at QoS 1 as fast as the broker takes them (inline paho loop, 1,000 in flight), first 100-reading
gateway batches (contract form 1: 50 devices x 2 metrics), then single-reading messages (form 2). A
phase is timed from the first publish until a Kafka consumer of the run's readings topic, reading it
from the start, has counted every reading of the phase (a consumer sees only records under the high
watermark, which with acks=all are acknowledged by every in-sync replica). Duplicates (a message the
broker delivered again after a reconnect is produced again) do not count towards a phase. Afterwards
every record is read back and decoded (`decode_records`) to check that every reading arrived.

The peer, the ceiling for a Python MQTT subscriber, is a bare paho subscriber process (QoS 1, automatic
acknowledgement, messages discarded) receiving the same single-reading messages from the same publisher,
on topics outside the collector's subscriptions (``meterflow/bench-<run>/…``). It is timed the same way,
from the first publish to the last message received.

The collector checks ownership against the registry, so the bench tenant, gateway and devices are
inserted into PostgreSQL (and kept; inserting again is a no-op). Messages are published as the broker's
service account, so no broker credentials are synchronised. Every shared-subscription group gets its
own copy of a telemetry message: another running collector (``make run``, an integration test) would
ingest the bench's readings, and the bench collector ingests theirs (counted apart, as foreign). So the
bench waits for other collector processes to exit before it starts and stops when one appears (unless
told to run beside them), and it publishes with a message expiry so that copies queued for persistent
sessions of collectors that are offline are dropped rather than ingested when those come back. The
bench collector's own persistent session is discarded when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import orjson
import paho.mqtt.client as mqtt
import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from deploy.local import proc
from deploy.local.services import ensure_topics
from meterflow.brokerauth import hash_password
from meterflow.contract import RECORD_V1, TOPIC_ROOT, decode_records, now_ms
from meterflow.settings import Settings

TENANT = "bench-ingest"
GATEWAY = "gw-bench-ingest"
METRICS = ("energy_import_kwh", "power_kw")
BATCH_DEVICES = 50  # x 2 metrics = 100 readings per gateway batch
SINGLE_DEVICES = 50
BATCH_TARGET = 100_000  # readings/s, gateway batches
SINGLE_TARGET_RATIO = 0.5  # single-reading messages against the bare paho ceiling
# Copies of the bench's messages queued for offline persistent sessions of other collectors expire
# instead of being ingested whenever those collectors come back. (Mosquitto 2.0 still keeps them in its
# store, and in every autosave, until such a session reconnects or itself expires.)
MESSAGE_EXPIRY_S = 600
STALL_S = 60.0
POLL_S = 0.02
QUIET_WAIT_S = 300.0

Kind = Literal["batch", "single"]


def device_name(index: int) -> str:
    return f"bi-{index:05d}"


@dataclass(frozen=True, slots=True)
class PublishJob:
    host: str
    port: int
    username: str
    password: str
    client_id: str
    kind: Kind
    topic_root: str
    messages: int
    t0_ms: int
    window: int


@dataclass(frozen=True, slots=True)
class PublishOutcome:
    elapsed_s: float
    cpu_s: float
    refused: int


@dataclass(frozen=True, slots=True)
class SubscribeJob:
    host: str
    port: int
    username: str
    password: str
    client_id: str
    topic_filter: str
    expected: int
    receive_maximum: int


def encode_messages(kind: Kind, topic_root: str, messages: int, t0_ms: int) -> list[tuple[str, bytes]]:
    """The bench's messages: every reading has its own (device, metric, ts)."""
    out: list[tuple[str, bytes]] = []
    if kind == "batch":
        topic = f"{topic_root}/{TENANT}/{GATEWAY}/telemetry"
        for i in range(messages):
            ts = t0_ms + i * 1000
            doc = {
                device_name(d): [
                    {"ts": ts, "values": {METRICS[0]: 1000.0 + d + i * 0.01, METRICS[1]: 10.0 + (i + d) % 7}}
                ]
                for d in range(BATCH_DEVICES)
            }
            out.append((topic, orjson.dumps(doc)))
    else:
        for i in range(messages):
            d, step = i % SINGLE_DEVICES, i // SINGLE_DEVICES
            topic = f"{topic_root}/{TENANT}/{GATEWAY}/{device_name(d)}/telemetry"
            point = {"ts": t0_ms + step * 1000, "values": {METRICS[0]: 2000.0 + d + step * 0.01}}
            out.append((topic, orjson.dumps(point)))
    return out


# --- child processes (spawned) ----------------------------------------------------------------------


def expiry_properties() -> Properties:
    """Publish properties packed once: paho packs a Properties object again for every publish."""
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = MESSAGE_EXPIRY_S
    packed = props.pack()
    object.__setattr__(props, "pack", lambda: packed)  # paho's __setattr__ takes property names only
    return props


def publisher_main(job: PublishJob, conn: Connection) -> None:
    """Encode, connect, report ready; on "go" publish everything at QoS 1 with ``job.window`` in flight
    (inline paho loop, no network thread) and report once the broker answered every publish."""
    messages = encode_messages(job.kind, job.topic_root, job.messages, job.t0_ms)
    answered = refused = 0

    def on_publish(_c: mqtt.Client, _u: object, _mid: int, reason: ReasonCode, _p: Properties | None) -> None:
        nonlocal answered, refused
        answered += 1
        if reason.is_failure:
            refused += 1

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=job.client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(job.username, job.password)
    client.on_publish = on_publish
    # The window is kept here. paho's own limit (when set) rescans every unacknowledged message on each
    # PUBACK, which at 1,000 in flight costs more CPU than the publish itself.
    client.max_inflight_messages_set(0)
    client.connect(job.host, job.port, keepalive=60, clean_start=True)
    deadline = time.monotonic() + 30
    while not client.is_connected():
        if time.monotonic() > deadline:
            conn.send(("error", f"publisher could not connect to mqtt://{job.host}:{job.port}"))
            return
        client.loop(timeout=0.1)
    conn.send(("ready", len(messages)))
    conn.recv()
    props = expiry_properties()
    cpu0, started = time.process_time(), time.monotonic()
    sent, total = 0, len(messages)
    while answered < total:
        while sent < total and sent - answered < job.window:
            topic, payload = messages[sent]
            client.publish(topic, payload, qos=1, properties=props)
            sent += 1
        client.loop(timeout=0.01)
    outcome = PublishOutcome(time.monotonic() - started, time.process_time() - cpu0, refused)
    client.disconnect()
    conn.send(("done", outcome))


def subscriber_main(job: SubscribeJob, conn: Connection) -> None:
    """Bare paho: subscribe (QoS 1, automatic acks), count and discard; report the time of the last
    expected message."""
    received = 0
    cpu0 = 0.0

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: Properties | None) -> None:
        if reason.is_failure:
            conn.send(("error", f"bare subscriber refused: {reason}"))
            c.disconnect()
            return
        c.subscribe(job.topic_filter, qos=1)

    def on_subscribe(
        c: mqtt.Client, _u: object, _mid: int, reasons: list[ReasonCode], _p: Properties
    ) -> None:
        nonlocal cpu0
        if any(r.is_failure for r in reasons):
            conn.send(("error", f"bare subscription refused: {reasons}"))
            c.disconnect()
            return
        cpu0 = time.process_time()
        conn.send(("ready", 0))

    def on_message(c: mqtt.Client, _u: object, _msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received == job.expected:
            conn.send(("done", (time.monotonic(), time.process_time() - cpu0)))
            c.disconnect()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=job.client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(job.username, job.password)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = job.receive_maximum
    client.connect(job.host, job.port, keepalive=60, clean_start=True, properties=props)
    client.loop_forever()


# --- helpers ------------------------------------------------------------------------------------------


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None, tid: int | None = None) -> float:
    """User + system CPU of a process (or one of its threads) from /proc; 0 when it is gone."""
    if pid is None:
        return 0.0
    path = Path(f"/proc/{pid}/task/{tid}/stat") if tid is not None else Path(f"/proc/{pid}/stat")
    try:
        fields = path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_ids(pid: int) -> list[int]:
    try:
        return sorted(int(p.name) for p in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def other_collectors(own: int | None = None) -> list[int]:
    """Pids of running `meterflow collector` processes but ``own`` (each ingests the bench's messages)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), own):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"collector" in argv and any(a.endswith(b"meterflow") for a in argv):
            pids.append(int(entry.name))
    return pids


def register(settings: Settings) -> None:
    """The bench tenant, gateway and devices, straight into the registry the collector reads."""
    devices = [device_name(d) for d in range(max(BATCH_DEVICES, SINGLE_DEVICES))]
    with psycopg.connect(settings.db.conninfo(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tenants (tenant_id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (TENANT, "meterflow bench ingest"),
        )
        conn.execute(
            "INSERT INTO gateways (gateway_id, tenant_id, mqtt_password_hash) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (GATEWAY, TENANT, hash_password(secrets.token_urlsafe(24))),
        )
        row = conn.execute(
            "SELECT tenant_id, enabled FROM gateways WHERE gateway_id = %s", (GATEWAY,)
        ).fetchone()
        if row != (TENANT, True):
            raise RuntimeError(f"gateway {GATEWAY} exists as {row}; the bench needs it enabled for {TENANT}")
        conn.execute(
            "INSERT INTO devices (tenant_id, device_id, gateway_id) "
            "SELECT %s, d, %s FROM unnest(%s::text[]) AS d ON CONFLICT DO NOTHING",
            (TENANT, GATEWAY, devices),
        )


def drop_session(settings: Settings, client_id: str) -> None:
    """Connect once with a clean start and no session expiry, so the broker discards the persistent
    session (and the shared subscription) the collector left."""
    m = settings.mqtt
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(m.service_user, m.service_password.get_secret_value())
    with contextlib.suppress(OSError):
        client.connect(m.host, m.service_port, keepalive=10, clean_start=True)
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        client.disconnect()
        client.loop(timeout=0.1)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def reading_keys(doc: dict[str, Any]) -> Iterator[int]:
    """A hash of (device, metric, ts) for each reading of a decoded v1 or v2 record: the tally runs
    beside the collector on the same cores, so it reads the JSON directly, not through
    `decode_records`."""
    if doc["v"] == RECORD_V1:
        device = doc["device"]
        for ts, metric, _ in doc["readings"]:
            yield hash((device, metric, ts))
    else:
        devices = doc["devices"]
        for index, ts, metric, _ in doc["readings"]:
            yield hash((devices[index], metric, ts))


class KafkaTally:
    """Counts the distinct readings of the bench tenant as they reach the run's readings topic, the
    duplicates (a message the broker delivered again after a reconnect is produced again: at least
    once, and the processor drops the copy) and the bench's dead letters; records of other tenants
    (copies of other publishers' messages) are counted apart."""

    def __init__(self, bootstrap: str, readings: list[TopicPartition], dlq: list[TopicPartition]) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
        )
        self._readings_topic = readings[0].topic
        self._partitions = [*readings, *dlq]
        self._task: asyncio.Task[None] | None = None
        self.readings = 0
        self.duplicates = 0
        self._seen: set[int] = set()
        self.updated_at = time.monotonic()
        self.foreign_records = 0
        self.dead_letters: list[bytes] = []
        self.foreign_dead_letters = 0

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._partitions)
        await self._consumer.seek_to_beginning(*self._partitions)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self._consumer.stop()

    def check(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            counted = 0
            for tp, records in batches.items():
                for record in records:
                    doc = orjson.loads(record.value or b"{}")
                    ours = doc.get("tenant") == TENANT and doc.get("gateway") == GATEWAY
                    if tp.topic == self._readings_topic:
                        if ours:
                            for key in reading_keys(doc):
                                if key in self._seen:
                                    self.duplicates += 1
                                else:
                                    self._seen.add(key)
                                    counted += 1
                        else:
                            self.foreign_records += 1
                    elif ours:
                        self.dead_letters.append(record.value or b"")
                    else:
                        self.foreign_dead_letters += 1
            if counted:
                self.readings += counted
                self.updated_at = time.monotonic()


# --- the run --------------------------------------------------------------------------------------


@dataclass(slots=True)
class PhaseResult:
    readings: int
    messages: int
    elapsed_s: float
    publisher: PublishOutcome
    collector_cpu_s: float
    collector_threads_cpu_s: list[float]
    broker_cpu_s: float

    @property
    def rate(self) -> float:
        return self.readings / self.elapsed_s


class IngestBench:
    def __init__(
        self,
        settings: Settings,
        *,
        batch_readings: int,
        singles: int,
        profile: Path | None,
        keep_topics: bool,
        ignore_other_collectors: bool,
        tick: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.ignore_other_collectors = ignore_other_collectors
        self.others_seen: set[int] = set()
        self.batch_messages = max(1, batch_readings // (BATCH_DEVICES * len(METRICS)))
        self.singles = singles
        self.profile = profile
        self.keep_topics = keep_topics
        self.tick = tick
        run = uuid.uuid4().hex[:8]
        self.run_id = run
        self.readings_topic = f"bench-{run}.readings"
        self.dlq_topic = f"bench-{run}.dlq"
        self.client_id = f"bench-{run}-collector"
        self.group = f"bench-{run}"
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"meterflow-bench-ingest-{run}-"))
        self.log_file = self.log_dir / "collector.log"
        self.collector: subprocess.Popen[bytes] | None = None
        self.ctx = multiprocessing.get_context("spawn")
        self.broker_pid = proc.running_pid(settings.state_path / "mosquitto" / "mosquitto.pid")
        # One second apart per message (batches) or per device round (singles), ending a day ago: in
        # the past however many readings, and the two phases never share a timestamp.
        day = 86_400_000
        start = now_ms()
        self.batch_t0 = start - start % 60_000 - day - self.batch_messages * 1000
        self.single_t0 = self.batch_t0 - day - (singles // SINGLE_DEVICES + 1) * 1000

    def _bench_settings(self) -> Settings:
        kafka = self.settings.kafka.model_copy(
            update={"readings_topic": self.readings_topic, "dlq_topic": self.dlq_topic}
        )
        return self.settings.model_copy(update={"kafka": kafka})

    def collector_argv(self) -> list[str]:
        argv = [sys.executable]
        if self.profile is not None:
            argv += ["-m", "cProfile", "-o", str(self.profile)]
        return [*argv, "-m", "meterflow", "collector", "--shared-group", self.group]

    def _start_collector(self) -> None:
        env = {
            **os.environ,
            "METERFLOW_KAFKA__READINGS_TOPIC": self.readings_topic,
            "METERFLOW_KAFKA__DLQ_TOPIC": self.dlq_topic,
            "METERFLOW_MQTT__CLIENT_ID": self.client_id,
            "METERFLOW_INGEST__METRICS_PORT": "0",
        }
        with self.log_file.open("ab") as log:
            self.collector = subprocess.Popen(self.collector_argv(), env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while "subscriptions acknowledged" not in self.log_file.read_text(errors="replace"):
            if self.collector.poll() is not None:
                raise RuntimeError(f"the collector exited:\n{_tail(self.log_file)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the collector did not subscribe within 60 s:\n{_tail(self.log_file)}")
            time.sleep(0.1)

    def _stop_collector(self) -> None:
        if self.collector is None:
            return
        if self.collector.poll() is None:
            self.collector.terminate()
            try:
                self.collector.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.collector.kill()
                self.collector.wait()
        self.collector = None
        drop_session(self.settings, self.client_id)

    def _publish_job(self, kind: Kind, topic_root: str, messages: int, t0_ms: int, name: str) -> PublishJob:
        m = self.settings.mqtt
        return PublishJob(
            host=m.host,
            port=m.service_port,
            username=m.service_user,
            password=m.service_password.get_secret_value(),
            client_id=f"bench-{self.run_id}-{name}",
            kind=kind,
            topic_root=topic_root,
            messages=messages,
            t0_ms=t0_ms,
            window=m.max_inflight_messages,
        )

    @staticmethod
    async def _recv(conn: Connection, timeout_s: float, what: str) -> tuple[str, object]:
        if not await asyncio.to_thread(conn.poll, timeout_s):
            raise RuntimeError(f"{what} did not answer within {timeout_s:.0f} s")
        kind, payload = conn.recv()
        if kind == "error":
            raise RuntimeError(str(payload))
        return str(kind), payload

    async def _outcome(self, conn: Connection) -> PublishOutcome:
        _, outcome = await self._recv(conn, 120, "the publisher")
        if not isinstance(outcome, PublishOutcome):
            raise RuntimeError(f"unexpected answer from the publisher: {outcome!r}")
        return outcome

    def _note_others(self) -> None:
        """Note other collectors; unless told to run beside them, stop when one appears, since it
        ingests the bench's messages (an integration test, say, then drowns in them)."""
        own = self.collector.pid if self.collector is not None else None
        others = other_collectors(own)
        self.others_seen.update(others)
        if others and not self.ignore_other_collectors:
            raise RuntimeError(
                f"collectors {others} started during the bench: they ingest its messages too, and the "
                "figures would not be the bench collector's; run again when they are gone"
            )

    async def _wait_for_quiet(self) -> None:
        others = other_collectors()
        if not others:
            return
        if self.ignore_other_collectors:
            self.others_seen.update(others)
            self.tick(
                f"[yellow]warning:[/] other collectors are running (pids {others}): each ingests its own "
                "copy of the bench's messages, and they share the CPU"
            )
            return
        self.tick(
            f"waiting up to {QUIET_WAIT_S / 60:.0f} min for other collectors (pids {others}) to exit: "
            "each would ingest its own copy of the bench's messages"
        )
        deadline = time.monotonic() + QUIET_WAIT_S
        while others:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"collectors {others} are still running; run the bench when they are gone, or pass "
                    "--ignore-other-collectors to run beside them"
                )
            await asyncio.sleep(2)
            others = other_collectors()

    async def _collector_phase(self, tally: KafkaTally, kind: Kind, messages: int) -> PhaseResult:
        readings = messages * (BATCH_DEVICES * len(METRICS) if kind == "batch" else 1)
        t0_ms = self.batch_t0 if kind == "batch" else self.single_t0
        job = self._publish_job(kind, TOPIC_ROOT, messages, t0_ms, f"pub-{kind}")
        parent, child = self.ctx.Pipe()
        publisher = self.ctx.Process(target=publisher_main, args=(job, child), daemon=True)
        publisher.start()
        try:
            await self._recv(parent, 300, "the publisher")
            collector = self.collector
            if collector is None:
                raise RuntimeError("the collector is not running")
            self._note_others()
            target = tally.readings + readings
            pid = collector.pid
            tids = thread_ids(pid)
            threads0 = [cpu_seconds(pid, t) for t in tids]
            cpu0, broker0 = cpu_seconds(pid), cpu_seconds(self.broker_pid)
            started = time.monotonic()
            parent.send("go")
            last_count, looked = tally.readings, started
            while tally.readings < target:
                await asyncio.sleep(POLL_S)
                if time.monotonic() - looked > 1:
                    self._note_others()
                    looked = time.monotonic()
                tally.check()
                if tally.dead_letters:
                    raise RuntimeError(
                        f"{len(tally.dead_letters)} of the bench's readings were dead-lettered, e.g. "
                        + tally.dead_letters[0][:500].decode(errors="replace")
                    )
                if collector.poll() is not None:
                    raise RuntimeError(f"the collector exited:\n{_tail(self.log_file)}")
                if tally.readings > last_count:
                    last_count = tally.readings
                elif time.monotonic() - max(tally.updated_at, started) > STALL_S:
                    raise RuntimeError(
                        f"no reading reached Kafka for {STALL_S:.0f} s ({target - tally.readings:,} of "
                        f"{readings:,} missing); collector log:\n{_tail(self.log_file)}"
                    )
            elapsed = tally.updated_at - started
            cpu = cpu_seconds(pid) - cpu0
            threads = [cpu_seconds(pid, t) - c for t, c in zip(tids, threads0, strict=True)]
            broker = cpu_seconds(self.broker_pid) - broker0
            outcome = await self._outcome(parent)
            if outcome.refused:
                raise RuntimeError(f"the broker refused {outcome.refused} publishes")
            self._note_others()
        except BaseException:
            publisher.terminate()  # stop publishing at once
            raise
        finally:
            publisher.join(timeout=10)
            if publisher.is_alive():
                publisher.terminate()
        return PhaseResult(
            readings=readings,
            messages=messages,
            elapsed_s=elapsed,
            publisher=outcome,
            collector_cpu_s=cpu,
            collector_threads_cpu_s=threads,
            broker_cpu_s=broker,
        )

    async def _bare_phase(self) -> tuple[PhaseResult, float]:
        m = self.settings.mqtt
        root = f"meterflow/bench-{self.run_id}"
        sub = SubscribeJob(
            host=m.host,
            port=m.service_port,
            username=m.service_user,
            password=m.service_password.get_secret_value(),
            client_id=f"bench-{self.run_id}-bare",
            topic_filter=f"{root}/#",
            expected=self.singles,
            receive_maximum=min(self.settings.ingest.max_inflight, 65535),
        )
        job = self._publish_job("single", root, self.singles, self.single_t0, "pub-bare")
        sub_parent, sub_child = self.ctx.Pipe()
        pub_parent, pub_child = self.ctx.Pipe()
        subscriber = self.ctx.Process(target=subscriber_main, args=(sub, sub_child), daemon=True)
        publisher = self.ctx.Process(target=publisher_main, args=(job, pub_child), daemon=True)
        subscriber.start()
        publisher.start()
        try:
            await self._recv(sub_parent, 60, "the bare subscriber")
            await self._recv(pub_parent, 300, "the publisher")
            broker0 = cpu_seconds(self.broker_pid)
            started = time.monotonic()
            pub_parent.send("go")
            _, done = await self._recv(sub_parent, 600, "the bare subscriber")
            broker = cpu_seconds(self.broker_pid) - broker0
            last_at, sub_cpu = done if isinstance(done, tuple) else (time.monotonic(), 0.0)
            outcome = await self._outcome(pub_parent)
        finally:
            for child in (publisher, subscriber):
                child.join(timeout=10)
                if child.is_alive():
                    child.terminate()
        result = PhaseResult(
            readings=self.singles,
            messages=self.singles,
            elapsed_s=float(last_at) - started,
            publisher=outcome,
            collector_cpu_s=0.0,
            collector_threads_cpu_s=[],
            broker_cpu_s=broker,
        )
        return result, float(sub_cpu)

    async def _verify(self, partitions: list[TopicPartition], expected: int) -> int:
        """Read every record back: every reading published is there, and nothing else of the bench's.
        Returns how many readings are there twice (at least once: the processor drops copies)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap, enable_auto_commit=False, max_poll_records=5000
        )
        await consumer.start()
        try:
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            ends = await consumer.end_offsets(partitions)
            seen: set[int] = set()
            readings = 0
            remaining = dict(ends)
            while remaining:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        for dev in decode_records(bytes(record.value or b"")):
                            if (dev.tenant, dev.gateway) != (TENANT, GATEWAY):
                                continue  # a copy of another publisher's message
                            for r in dev.readings:
                                seen.add(hash((dev.device, r.metric, r.ts_ms)))
                            readings += len(dev.readings)
                for tp in list(remaining):
                    if await consumer.position(tp) >= remaining[tp]:
                        del remaining[tp]
        finally:
            await consumer.stop()
        if len(seen) != expected:
            raise RuntimeError(
                f"Kafka holds {readings:,} readings ({len(seen):,} distinct); {expected:,} were published"
            )
        return readings - len(seen)

    async def _wait_for_leaders(self) -> None:
        """Partitions of a topic just created have no leader for a moment (consumers log errors)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap)
        await admin.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                described = await admin.describe_topics([self.readings_topic, self.dlq_topic])
                leaders = [p["leader"] for d in described for p in d["partitions"]]
                if len(described) == 2 and leaders and min(leaders) >= 0:
                    break
                await asyncio.sleep(0.2)
        finally:
            await admin.close()
        await asyncio.sleep(1.0)  # the broker's metadata follows the controller's a moment later

    async def _delete_topics(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([self.readings_topic, self.dlq_topic])
        finally:
            await admin.close()

    async def run(self) -> dict[str, object]:
        await self._wait_for_quiet()
        self.tick(
            f"registering {TENANT}/{GATEWAY} and its devices; topics {self.readings_topic}, {self.dlq_topic}"
        )
        register(self.settings)
        bench_settings = self._bench_settings()
        await ensure_topics(bench_settings)
        await self._wait_for_leaders()
        k = bench_settings.kafka
        readings_parts = [TopicPartition(self.readings_topic, p) for p in range(k.partitions)]
        dlq_parts = [TopicPartition(self.dlq_topic, p) for p in range(k.dlq_partitions)]
        tally = KafkaTally(k.bootstrap, readings_parts, dlq_parts)
        await tally.start()
        try:
            self.tick(f"one collector (shared group {self.group}); log {self.log_file}")
            await asyncio.to_thread(self._start_collector)
            try:
                n = self.batch_messages * BATCH_DEVICES * len(METRICS)
                self.tick(f"collector: {n:,} readings in {self.batch_messages:,} gateway batches of 100")
                batch = await self._collector_phase(tally, "batch", self.batch_messages)
                self._report("gateway batches", batch)
                self.tick(f"collector: {self.singles:,} single-reading messages")
                single = await self._collector_phase(tally, "single", self.singles)
                self._report("single readings", single)
            finally:
                await asyncio.to_thread(self._stop_collector)
            await tally.stop()
            self.tick(f"bare paho subscriber: the same {self.singles:,} single-reading messages")
            bare, bare_sub_cpu = await self._bare_phase()
            self._report("bare paho", bare)
            self.tick(f"bare subscriber process {bare_sub_cpu / bare.elapsed_s:.0%} of a core")
            self.tick("reading every record back to check that every reading arrived")
            duplicates = await self._verify(readings_parts, batch.readings + single.readings)
        finally:
            await tally.stop()
            if not self.keep_topics:
                with contextlib.suppress(Exception):
                    await self._delete_topics()
        if duplicates:
            self.tick(
                f"[yellow]note:[/] {duplicates:,} readings reached Kafka twice (messages the broker "
                "delivered again, after a reconnect; see the collector log)"
            )
        if tally.foreign_records or tally.foreign_dead_letters or self.others_seen:
            self.tick(
                f"[yellow]note:[/] the collector also handled other publishers' messages "
                f"({tally.foreign_records:,} records, {tally.foreign_dead_letters:,} dead letters); "
                f"other collectors seen: {sorted(self.others_seen) or 'none'}"
            )
        if self.profile is not None:
            self.tick(f"collector profile (asyncio thread only) in {self.profile}")
        value, peer_value = single.rate, bare.rate
        return {
            "bench": "ingest",
            "metric": "readings_per_s",
            "value": round(value),
            "unit": "readings/s",
            "peer": "bare paho-mqtt subscriber (QoS 1, auto-ack, discard) of the same single-reading messages",
            "peer_value": round(peer_value),
            "ratio": round(value / peer_value, 3),
            "target_ratio": SINGLE_TARGET_RATIO,
            "batch_readings_per_s": round(batch.rate),
            "batch_target": BATCH_TARGET,
            "batch_readings": batch.readings,
            "single_readings": single.readings,
            "batch_collector_cores": round(batch.collector_cpu_s / batch.elapsed_s, 2),
            "single_collector_cores": round(single.collector_cpu_s / single.elapsed_s, 2),
            "duplicates": duplicates,
            "foreign_records": tally.foreign_records,
            "other_collectors_seen": len(self.others_seen),
        }

    def _report(self, name: str, phase: PhaseResult) -> None:
        parts = [
            f"{name}: {phase.rate:,.0f} readings/s ({phase.messages / phase.elapsed_s:,.0f} msg/s, "
            f"{phase.elapsed_s:.1f} s)",
            f"publisher {phase.publisher.cpu_s / phase.publisher.elapsed_s:.0%} of a core",
            f"broker {phase.broker_cpu_s / phase.elapsed_s:.0%}",
        ]
        if phase.collector_threads_cpu_s:
            threads = "/".join(f"{c / phase.elapsed_s:.0%}" for c in phase.collector_threads_cpu_s)
            parts.append(f"collector {phase.collector_cpu_s / phase.elapsed_s:.0%} (threads {threads})")
        self.tick("; ".join(parts))


def run_ingest_bench(
    settings: Settings,
    *,
    batch_readings: int,
    singles: int,
    profile: Path | None = None,
    keep_topics: bool = False,
    ignore_other_collectors: bool = False,
    tick: Callable[[str], None],
) -> dict[str, object]:
    bench = IngestBench(
        settings,
        batch_readings=batch_readings,
        singles=singles,
        profile=profile,
        keep_topics=keep_topics,
        ignore_other_collectors=ignore_other_collectors,
        tick=tick,
    )
    return asyncio.run(bench.run())
