"""The collector checks the registry: a device of another tenant is `tenant_mismatch`, an unregistered
device is `unknown_device` (and replayable once registered), unknown metrics are kept; every rejection is
a dead letter, never a silent drop."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import psycopg
from aiokafka import AIOKafkaConsumer

from ingest.replay import replay
from meterflow.contract import gateway_telemetry_topic, now_ms
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _connect, _register


def _stored(p: Pipeline, tenant: str, device: str) -> list[tuple[str, float]]:
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        rows = conn.execute(
            "SELECT metric, value FROM readings WHERE tenant_id = %s AND device_id = %s ORDER BY metric",
            (tenant, device),
        ).fetchall()
    return [(m, v) for m, v in rows]


def _wait_stored(p: Pipeline, tenant: str, device: str, count: int) -> list[tuple[str, float]]:
    deadline = time.monotonic() + 30
    while len(rows := _stored(p, tenant, device)) < count and time.monotonic() < deadline:
        time.sleep(0.3)
    return rows


async def _letters(p: Pipeline, tenant: str, count: int) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        p.settings.kafka.dlq_topic, bootstrap_servers=p.settings.kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    found: list[dict[str, object]] = []
    deadline = time.monotonic() + 30
    try:
        while len(found) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    letter = orjson.loads(record.value or b"{}")
                    if letter.get("tenant") == tenant:
                        found.append(letter)
    finally:
        await consumer.stop()
    return found


def test_ownership_is_checked_and_unknown_devices_replay_after_registration(pipeline: Pipeline) -> None:
    tenant, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    # Device ids are unique per run: a device id registered under any tenant counts as "another tenant's".
    theirs, late = f"theirs-{uuid.uuid4().hex[:8]}", f"late-{uuid.uuid4().hex[:8]}"
    creds = _register(pipeline, tenant, gateway, ["m-001"])
    _register(pipeline, other, f"gw-{uuid.uuid4().hex[:8]}", [theirs])
    client = _connect(pipeline, creds)
    ts = now_ms() - 60_000
    batch = {
        "m-001": [{"ts": ts, "values": {"power_kw": 5.0, "vendor_temp_c": 41.0}}],
        theirs: [{"ts": ts, "values": {"power_kw": 6.0}}],
        late: [{"ts": ts, "values": {"power_kw": 7.0}}],
    }
    client.publish(gateway_telemetry_topic(tenant, gateway), orjson.dumps(batch), qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()

    # The owned device lands, its non-canonical metric kept; the other two are dead-lettered, in the
    # message's one letter.
    assert _wait_stored(pipeline, tenant, "m-001", 2) == [("power_kw", 5.0), ("vendor_temp_c", 41.0)]
    letters = asyncio.run(_letters(pipeline, tenant, 1))
    entries = [entry for letter in letters for entry in letter["rejected"]]  # type: ignore[attr-defined]
    assert {(entry["device"], entry["reason"]) for entry in entries} == {
        (theirs, "tenant_mismatch"),
        (late, "unknown_device"),
    }
    assert all(letter["gateway"] == gateway and letter["payload"] for letter in letters)
    assert _stored(pipeline, other, theirs) == []

    with pipeline.http() as http:
        body = {"tenant": tenant, "device": late, "site": "s1", "gateway": gateway}
        assert http.post("/v1/devices", json=body).status_code == 201
    first = asyncio.run(replay(pipeline.settings, reasons={"unknown_device"}, tenant=tenant))
    assert (first.considered, first.replayed_readings) == (1, 1)
    assert _wait_stored(pipeline, tenant, late, 1) == [("power_kw", 7.0)]

    # Progress is committed: nothing new to replay. From the beginning, the reading is sent again and
    # stored once; the other tenant's device stays rejected.
    again = asyncio.run(replay(pipeline.settings, reasons={"unknown_device"}, tenant=tenant))
    assert again.considered == 0
    everything = asyncio.run(
        replay(
            pipeline.settings,
            reasons={"unknown_device", "tenant_mismatch"},
            tenant=tenant,
            from_beginning=True,
        )
    )
    assert everything.replayed_readings == 1
    assert everything.still_rejected == {"tenant_mismatch": 1}
    time.sleep(2)
    assert _stored(pipeline, tenant, late) == [("power_kw", 7.0)]
