"""Hostile and broken gateways against the real broker, collector and Kafka: dead letters stay one per
message and within a small multiple of the payload, a gateway's dead letters stop at its budget, values
that would poison aggregates and timestamps PostgreSQL cannot hold are refused one by one while their
siblings arrive, and empty messages are refused and counted, never dropped silently.

The attacks go through a collector of this module's own (own shared group, Kafka topics, metrics port
and a small dead-letter budget), so its letters and counters are this module's alone; the session's
collector and processor still store the valid siblings in the database.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from meterflow.contract import gateway_telemetry_topic, now_ms
from meterflow.settings import Settings
from meterflow.sparkplug import MessageType, topic
from meterflow.sparkplug import sparkplug_b_pb2 as pb
from tests.integration.conftest import Isolated, Pipeline, start_isolated
from tests.integration.test_end_to_end import _connect, _register

BUDGET = 64 * 1024
WEEK_MS = 7 * 86_400_000


@pytest.fixture(scope="module")
def attacked(pipeline: Pipeline) -> Iterator[Isolated]:
    name = "attack-collector"
    run = uuid.uuid4().hex[:8]
    yield start_isolated(
        pipeline,
        name,
        ["collector", "--shared-group", f"attack-{run}", "--leave-group-on-exit"],
        "subscriptions acknowledged",
        {"METERFLOW_INGEST__DLQ_BUDGET_BYTES_PER_MIN": str(BUDGET)},
    )
    pipeline.stop(name)


def _gateway(p: Pipeline, devices: list[str]) -> tuple[str, str, mqtt.Client]:
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    client = _connect(p, _register(p, tenant, gateway, devices))
    return tenant, gateway, client


def _publish(client: mqtt.Client, topic_name: str, payloads: list[bytes]) -> None:
    infos = [client.publish(topic_name, payload, qos=1) for payload in payloads]
    for info in infos:
        info.wait_for_publish(30)


async def _records(
    settings: Settings, topic_name: str, tenant: str, done: int, *, until_tenant: str | None = None
) -> list[bytes]:
    """The topic's records naming `tenant`, once `done` of them are there, or once a record naming
    `until_tenant` is (then all before it are in), or a minute passed."""
    consumer = AIOKafkaConsumer(
        topic_name, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    found: list[bytes] = []
    needle = f'"tenant":"{tenant}"'.encode()
    stop = None if until_tenant is None else f'"tenant":"{until_tenant}"'.encode()
    deadline = time.monotonic() + 60
    try:
        while len(found) < done and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    value = record.value or b""
                    if needle in value:
                        found.append(value)
                    elif stop is not None and stop in value:
                        return found
    finally:
        await consumer.stop()
    return found


def _letters(a: Isolated, tenant: str, done: int) -> list[bytes]:
    return asyncio.run(_records(a.settings, a.settings.kafka.dlq_topic, tenant, done))


def _readings(a: Isolated, tenant: str, done: int) -> int:
    """Readings of `tenant` the attacked collector produced, once at least `done`."""
    count = 0
    deadline = time.monotonic() + 60
    while count < done and time.monotonic() < deadline:
        records = asyncio.run(_records(a.settings, a.settings.kafka.readings_topic, tenant, 1))
        count = sum(len(orjson.loads(r)["readings"]) for r in records)
    return count


def _stored(p: Pipeline, tenant: str, done: int) -> list[tuple[str, float]]:
    deadline = time.monotonic() + 60
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        while True:
            rows = conn.execute(
                "SELECT metric, value FROM readings WHERE tenant_id = %s ORDER BY ts, metric", (tenant,)
            ).fetchall()
            if len(rows) >= done or time.monotonic() > deadline:
                return [(m, v) for m, v in rows]
            time.sleep(0.3)


def test_a_thousand_bad_points_make_one_letter_and_the_valid_one_arrives(attacked: Isolated) -> None:
    tenant, gateway, client = _gateway(attacked.pipeline, ["m-1"])
    good = orjson.dumps({"ts": now_ms() - 60_000, "values": {"power_kw": 7.0}})
    payload = b'{"m-1":[' + b",".join([b"10"] * 1000) + b"," + good + b"]}"
    before = attacked.counter("meterflow_ingest_rejected_total", reason="schema")
    _publish(client, gateway_telemetry_topic(tenant, gateway), [payload])
    client.disconnect()
    (letter,) = _letters(attacked, tenant, 1)
    assert len(letter) <= 3 * len(payload)
    doc = orjson.loads(letter)
    assert (doc["reasons"], doc["rejected_total"], doc["payload"]) == (
        {"schema": 1000},
        1000,
        payload.decode(),
    )
    attacked.wait_counter("meterflow_ingest_rejected_total", before + 1000, reason="schema")
    assert _readings(attacked, tenant, 1) == 1
    assert _stored(attacked.pipeline, tenant, 1) == [("power_kw", 7.0)]


def test_a_gateway_a_week_ahead_stops_at_its_dead_letter_budget(attacked: Isolated) -> None:
    devices = [f"m-{i}" for i in range(10)]
    tenant, gateway, client = _gateway(attacked.pipeline, devices)
    batches = 300
    ahead = now_ms() + WEEK_MS
    payloads = [
        orjson.dumps(
            {
                d: [{"ts": ahead + b * 10_000 + i, "values": {"power_kw": 1.0}} for i in range(10)]
                for d in devices
            }
        )
        for b in range(batches)
    ]
    future = attacked.counter("meterflow_ingest_rejected_total", reason="future_ts")
    exceeded = attacked.counter("meterflow_ingest_dlq_budget_exceeded_total")
    started = time.monotonic()
    _publish(client, gateway_telemetry_topic(tenant, gateway), payloads)
    # Every refusal is counted, written or not.
    attacked.wait_counter("meterflow_ingest_rejected_total", future + batches * 100, reason="future_ts")
    elapsed = time.monotonic() - started
    # A valid batch of the same gateway still arrives: the budget holds back dead letters, not readings.
    _publish(
        client,
        gateway_telemetry_topic(tenant, gateway),
        [orjson.dumps({"m-0": [{"ts": now_ms(), "values": {"power_kw": 2.0}}]})],
    )
    client.disconnect()
    assert _readings(attacked, tenant, 1) == 1

    # The dead-letter topic has one partition and the collector writes in arrival order: once another
    # gateway's later letter is there, every letter of the flood is.
    sentinel, sentinel_gateway, other = _gateway(attacked.pipeline, ["m-1"])
    _publish(other, gateway_telemetry_topic(sentinel, sentinel_gateway), [b"{}"])
    other.disconnect()
    raw_letters = asyncio.run(
        _records(
            attacked.settings, attacked.settings.kafka.dlq_topic, tenant, batches + 10, until_tenant=sentinel
        )
    )
    letters = [orjson.loads(raw) | {"bytes": len(raw)} for raw in raw_letters]
    data = [letter for letter in letters if letter["reason"] == "future_ts"]
    announced = [letter for letter in letters if letter["reason"] == "dlq_budget"]
    assert data and 1 <= len(announced) <= 1 + elapsed // 60
    assert announced[0]["gateway"] == gateway
    # The bucket holds a minute's budget and refills evenly; one record may overdraw it.
    refilled = BUDGET * (1 + elapsed / 60)
    assert sum(letter["bytes"] for letter in data) <= refilled + max(letter["bytes"] for letter in data)
    assert len(data) < batches / 4
    attacked.wait_counter("meterflow_ingest_dlq_budget_exceeded_total", exceeded + batches - len(data))
    assert sum(sum(letter["reasons"].values()) for letter in data) == len(data) * 100


def test_values_that_would_poison_aggregates_are_refused_one_by_one(attacked: Isolated) -> None:
    tenant, gateway, client = _gateway(attacked.pipeline, ["m-1"])
    ts = now_ms() - 3_600_000
    extreme = {
        "m-1": [
            {"ts": ts, "values": {"power_kw": 1e308, "reactive_power_kvar": 2.0}},
            {"ts": ts + 1000, "values": {"power_kw": -1e308}},
            {"ts": ts + 2000, "values": {"energy_import_kwh": 1.8e19}},
            {"ts": ts + 3000, "values": {"energy_import_kwh": 1.2e29}},
            {"ts": "0001-01-01T00:00:00Z", "values": {"power_kw": 1.0}},
            {"ts": -1_000_000_000_000_000, "values": {"power_kw": 1.0}},
        ]
    }
    hundred = orjson.dumps(
        {"m-1": [{"ts": ts + 60_000 + i * 1000, "values": {"power_kw": 100.0 + i}} for i in range(100)]}
    )
    hundred = hundred.replace(b'"power_kw":150.0', b'"power_kw":1e309', 1)
    counts = {
        r: attacked.counter("meterflow_ingest_rejected_total", reason=r)
        for r in ("out_of_range", "past_ts", "non_finite")
    }
    _publish(client, gateway_telemetry_topic(tenant, gateway), [orjson.dumps(extreme), hundred])
    client.disconnect()
    letters = sorted((orjson.loads(raw)["reasons"] for raw in _letters(attacked, tenant, 2)), key=len)
    assert letters == [{"non_finite": 1}, {"out_of_range": 4, "past_ts": 2}]
    for reason, n in (("out_of_range", 4), ("past_ts", 2), ("non_finite", 1)):
        attacked.wait_counter("meterflow_ingest_rejected_total", counts[reason] + n, reason=reason)
    # The sibling of the extreme values and the 99 valid readings around 1e309 are stored.
    stored = _stored(attacked.pipeline, tenant, 100)
    assert stored[0] == ("reactive_power_kvar", 2.0)
    assert [v for m, v in stored[1:]] == [100.0 + i for i in range(100) if i != 50]
    assert _readings(attacked, tenant, 100) == 100


def test_empty_messages_are_refused_and_counted(attacked: Isolated) -> None:
    tenant, gateway, client = _gateway(attacked.pipeline, ["m-1"])
    before = attacked.counter("meterflow_ingest_rejected_total", reason="empty")
    _publish(client, gateway_telemetry_topic(tenant, gateway), [b"{}", b"[]", b'{"m-1": []}'])
    _publish(client, f"meterflow/v1/{tenant}/{gateway}/m-1/telemetry", [b"[]"])
    empty_data = pb.Payload(timestamp=now_ms(), seq=0).SerializeToString()
    _publish(client, topic(tenant, MessageType.NDATA, gateway), [empty_data])
    client.disconnect()
    letters = [orjson.loads(raw) for raw in _letters(attacked, tenant, 5)]
    assert sorted(letter["topic"].split("/")[0] for letter in letters) == ["meterflow"] * 4 + ["spBv1.0"]
    assert all(letter["reasons"] == {"empty": 1} for letter in letters)
    attacked.wait_counter("meterflow_ingest_rejected_total", before + 5, reason="empty")
