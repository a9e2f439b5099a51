"""A reading published over MQTT comes back through the API: every hop real."""

from __future__ import annotations

import time
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from meterflow.contract import gateway_telemetry_topic, now_ms
from tests.integration.conftest import Pipeline

DEADLINE_S = 30


def _register(p: Pipeline, tenant: str, gateway: str, devices: list[str]) -> dict[str, str]:
    with p.http() as http:
        assert http.post("/v1/enterprises", json={"tenant": tenant, "name": tenant}).status_code == 201
        assert (
            http.post("/v1/sites", json={"tenant": tenant, "site": "s1", "name": "plant"}).status_code == 201
        )
        resp = http.post("/v1/gateways", json={"tenant": tenant, "gateway": gateway})
        assert resp.status_code == 201, resp.text
        for device in devices:
            body = {"tenant": tenant, "device": device, "site": "s1", "gateway": gateway}
            assert http.post("/v1/devices", json=body).status_code == 201
    creds: dict[str, str] = resp.json()["mqtt"]
    return creds


def _connect(p: Pipeline, creds: dict[str, str]) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"gw-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )
    client.username_pw_set(creds["username"], creds["password"])
    deadline = time.monotonic() + 10
    # The broker reloads its password file on SIGHUP; retry until the new account is live.
    while True:
        client.connect(p.settings.mqtt.host, p.settings.mqtt.port)
        client.loop_start()
        time.sleep(0.3)
        if client.is_connected():
            return client
        client.loop_stop()
        if time.monotonic() > deadline:
            pytest.fail("gateway could not connect with the credentials the API issued")


def readings_back(p: Pipeline, tenant: str, device: str, ts: int, *, count: int) -> list[dict[str, object]]:
    """The device's readings within an hour of `ts`, once the API returns `count` of them."""
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000 - 3600))
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts / 1000 + 3600))
    deadline = time.monotonic() + DEADLINE_S
    with p.http() as http:
        while True:
            resp = http.get(
                f"/v1/devices/{device}/readings", params={"tenant": tenant, "start": start, "end": end}
            )
            if resp.status_code == 200 and len(resp.json()["data"]) >= count:
                data: list[dict[str, object]] = resp.json()["data"]
                return data
            assert time.monotonic() < deadline, f"readings not back within {DEADLINE_S} s: {resp.text}"
            time.sleep(0.3)


def test_reading_published_over_mqtt_comes_back_through_the_api(pipeline: Pipeline) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    creds = _register(pipeline, tenant, gateway, ["m-001", "m-002"])
    client = _connect(pipeline, creds)
    ts = now_ms() - 60_000
    payload = {
        "m-001": [{"ts": ts, "values": {"energy_import_kwh": 12345.67, "power_kw": 42.1}}],
        "m-002": [{"ts": ts, "values": {"power_kw": 7.5}}, {"ts": ts + 1000, "values": {"power_kw": "bad"}}],
    }
    info = client.publish(gateway_telemetry_topic(tenant, gateway), orjson.dumps(payload), qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published()
    client.disconnect()
    client.loop_stop()

    data = readings_back(pipeline, tenant, "m-001", ts, count=2)
    values = {r["metric"]: r["value"] for r in data}
    assert values == {"energy_import_kwh": 12345.67, "power_kw": 42.1}
    # The valid sibling of a bad reading arrived; the bad one did not.
    assert [r["value"] for r in readings_back(pipeline, tenant, "m-002", ts, count=1)] == [7.5]


def test_gateway_cannot_publish_on_another_tenants_topic(pipeline: Pipeline) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    creds = _register(pipeline, tenant, gateway, ["m-001"])
    client = _connect(pipeline, creds)
    acks: list[int] = []
    client.on_publish = lambda _c, _u, _mid, reason, _p: acks.append(reason.value)
    foreign = gateway_telemetry_topic("someone-else", gateway)
    info = client.publish(
        foreign,
        b'{"m-001": [{"ts": 1, "values": {"power_kw": 1}}]}',
        qos=1,
        properties=Properties(PacketTypes.PUBLISH),
    )
    info.wait_for_publish(timeout=10)
    client.disconnect()
    client.loop_stop()
    assert acks == [135]  # MQTT v5 reason code 0x87: not authorized


def test_api_errors_are_problem_json(pipeline: Pipeline) -> None:
    with pipeline.http() as http:
        anon = http.get("/v1/enterprises", headers={"Authorization": ""})
        assert anon.status_code == 401
        assert anon.headers["content-type"] == "application/problem+json"
        bad = http.get("/v1/devices/x/readings", params={"tenant": "t", "start": "yesterday", "end": "now"})
        assert bad.status_code == 422 and bad.json()["type"].endswith("/validation")
