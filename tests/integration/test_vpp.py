"""The vpp service end to end: resource models through the API, telemetry over MQTT, capacity now / per
node / history / stale devices through the API, and the live stream pushing a change."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest

from api.auth import hash_key, new_key
from meterflow.contract import gateway_telemetry_topic, now_ms
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _connect

pytestmark = pytest.mark.integration

DEADLINE_S = 30
# Default derating per class (meterflow.settings.VppSettings).
BATTERY, PV, EV, BUILDING = 0.95, 0.8, 0.7, 0.6


@dataclass
class Fleet:
    tenant: str
    gateway: str
    vpp: str
    operator: str  # the operator tenant owning the VPP
    client: mqtt.Client

    def publish(self, values: dict[str, dict[str, float]]) -> None:
        ts = now_ms()
        payload = {device: [{"ts": ts, "values": v}] for device, v in values.items()}
        info = self.client.publish(
            gateway_telemetry_topic(self.tenant, self.gateway), orjson.dumps(payload), qos=1
        )
        info.wait_for_publish(timeout=10)


def _register_fleet(p: Pipeline) -> tuple[str, str, str, str, dict[str, str]]:
    run = uuid.uuid4().hex[:8]
    tenant, gateway, vpp, operator = f"t-{run}", f"gw-{run}", f"vpp-{run}", f"op-{run}"
    devices = {
        "bat-1": {"device_type": "battery", "rated_power_kw": 100, "energy_capacity_kwh": 200, "soc_min_pct": 10,
                  "soc_max_pct": 90, "vpp": vpp, "topology_node": "feeder-1"},
        "pv-1": {"device_type": "pv", "rated_power_kw": 50, "vpp": vpp, "topology_node": "feeder-1",
                 "telemetry_interval_s": 1},
        "ev-1": {"device_type": "ev_charger", "rated_power_kw": 22},
        "bl-1": {"device_type": "meter", "role": "submeter", "rated_power_kw": 400},
    }  # fmt: skip
    models = {
        "bat-1": {"resource_class": "battery", "efficiency": 0.9},
        "pv-1": {"resource_class": "pv", "curtailable": True},
        # The EV charger and the building join the VPP through their resource model (an admin's enrolment).
        "ev-1": {"resource_class": "ev_charger", "vpp": vpp, "topology_node": "feeder-2", "min_power_kw": 6},
        "bl-1": {"resource_class": "building_load", "vpp": vpp, "topology_node": "feeder-2",
                 "sheddable_share": 0.2, "max_shed_min": 60},
    }  # fmt: skip
    with p.http() as http:
        assert http.post("/v1/enterprises", json={"tenant": tenant, "name": tenant}).status_code == 201
        op = {"tenant": operator, "name": "grid operator", "role": "operator"}
        assert http.post("/v1/enterprises", json=op).status_code == 201
        created = http.post("/v1/vpps", json={"vpp": vpp, "name": "east", "owner": operator})
        assert created.status_code == 201, created.text
        assert (
            http.post("/v1/sites", json={"tenant": tenant, "site": "s1", "name": "campus"}).status_code == 201
        )
        resp = http.post("/v1/gateways", json={"tenant": tenant, "gateway": gateway})
        assert resp.status_code == 201, resp.text
        creds: dict[str, str] = resp.json()["mqtt"]
        for device, attrs in devices.items():
            body = {"tenant": tenant, "device": device, "site": "s1", "gateway": gateway, **attrs}
            r = http.post("/v1/devices", json=body)
            assert r.status_code == 201, r.text
        for device, model in models.items():
            r = http.put(f"/v1/devices/{device}/resource", json={"tenant": tenant, **model})
            assert r.status_code == 200, r.text
        # A base station without its reserved SoC is refused with the reason.
        bad = http.put(
            "/v1/devices/bat-1/resource", json={"tenant": tenant, "resource_class": "base_station"}
        )
        assert bad.status_code == 422
        assert bad.headers["content-type"].startswith("application/problem+json")
        assert "reserved_soc_pct" in bad.json()["detail"]
    return tenant, gateway, vpp, operator, creds


@pytest.fixture(scope="module")
def fleet(pipeline: Pipeline) -> Iterator[Fleet]:
    tenant, gateway, vpp, operator, creds = _register_fleet(pipeline)
    pipeline.env["METERFLOW_VPP__METRICS_PORT"] = "0"
    pipeline.env["METERFLOW_VPP__GROUP"] = f"{pipeline.shared_group}-vpp"
    pipeline.start("vpp", "vpp")
    pipeline.wait_for_log("vpp", "vpp service reading")
    client = _connect(pipeline, creds)
    yield Fleet(tenant, gateway, vpp, operator, client)
    client.disconnect()
    client.loop_stop()
    pipeline.stop("vpp")


def _capacity(p: Pipeline, vpp: str, duration: int, key: str | None = None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with p.http() as http:
        r = http.get(f"/v1/vpps/{vpp}/capacity", params={"duration_min": duration}, headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def _wait_for(p: Pipeline, vpp: str, want: dict[str, float], duration: int = 30) -> dict[str, object]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        with p.http() as http:
            r = http.get(f"/v1/vpps/{vpp}/capacity", params={"duration_min": duration})
        body = r.json()
        if r.status_code == 200 and all(body[k] == pytest.approx(v) for k, v in want.items()):
            return dict(body)
        assert time.monotonic() < deadline, f"capacity never became {want}: {body}"
        time.sleep(0.2)


ALL_ONLINE: dict[str, dict[str, float]] = {
    "bat-1": {"power_kw": 20, "soc_pct": 60},
    "pv-1": {"power_kw": -40},
    "ev-1": {"power_kw": 16},
    "bl-1": {"power_kw": 300},
}


def test_capacity_equals_the_hand_computation(pipeline: Pipeline, fleet: Fleet) -> None:
    fleet.publish(ALL_ONLINE)
    # 30 minutes. Battery: up min(100, 50% x 200 kWh x 0.9 / 0.5 h) + 20 charging = 120, down min(100,
    # 30% x 200 / 0.9 / 0.5) - 20 = 80. PV curtailable: down 40. EV 16 kW (min 6, max 22): up 10, down 6.
    # Building: 20 % of 300 kW = 60 up.
    up = 120 * BATTERY + 10 * EV + 60 * BUILDING
    down = 80 * BATTERY + 40 * PV + 6 * EV
    body = _wait_for(
        pipeline, fleet.vpp, {"up_kw": up, "down_kw": down, "devices_online": 4, "devices_stale": 0}
    )
    # Nameplate: battery band 80 % x 200 kWh -> 100 both ways; PV 50 down; EV 16 up / 22 down; building 80 up.
    assert body["nameplate_up_kw"] == pytest.approx(100 + 16 + 80)
    assert body["nameplate_down_kw"] == pytest.approx(100 + 50 + 22)
    with pipeline.http() as http:
        nodes = http.get(f"/v1/vpps/{fleet.vpp}/capacity/nodes", params={"duration_min": 30}).json()
        by_node = {n["node"]: n for n in nodes["nodes"]}
        assert by_node["feeder-1"]["up_kw"] == pytest.approx(120 * BATTERY)
        assert by_node["feeder-1"]["down_kw"] == pytest.approx(80 * BATTERY + 40 * PV)
        assert by_node["feeder-2"]["up_kw"] == pytest.approx(10 * EV + 60 * BUILDING)
        listed = {v["vpp"]: v for v in http.get("/v1/vpps").json()["data"]}
        assert listed[fleet.vpp]["resources"] == 4
        assert listed[fleet.vpp]["owner"] == fleet.operator
        now = datetime.now(UTC)
        hist = http.get(
            f"/v1/vpps/{fleet.vpp}/capacity/history",
            params={"start": (now - timedelta(hours=1)).isoformat(), "end": (now + timedelta(minutes=1)).isoformat(),
                    "interval": "1m", "duration_min": 30},
        )  # fmt: skip
        assert hist.status_code == 200, hist.text
        assert hist.json()["points"], "the minute's capacity is in the history"
        missing = http.get("/v1/vpps/no-such-vpp/capacity")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")


def _operator_key(p: Pipeline, tenant: str | None = None) -> str:
    """A key of the operator `tenant`, or of a new operator tenant that owns nothing."""
    key_id, key = new_key()
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        if tenant is None:
            tenant = f"op-{uuid.uuid4().hex[:8]}"
            conn.execute(
                "INSERT INTO tenants (tenant_id, name, role) VALUES (%s, %s, 'operator')", (tenant, tenant)
            )
        conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, tenant_id, role, label) VALUES (%s, %s, %s, 'operator', 'test')",
            (key_id, hash_key(key), tenant),
        )
    return key


def _stream(
    p: Pipeline,
    vpp: str,
    key: str,
    events: queue.Queue[tuple[float, dict[str, object]]],
    stop: threading.Event,
) -> None:
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with (
        httpx.Client(base_url=p.api_url, timeout=httpx.Timeout(10, read=60)) as http,
        http.stream(
            "GET", f"/v1/vpps/{vpp}/capacity/stream", params={"duration_min": 30}, headers=headers
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if stop.is_set():
                return  # closes the stream, so the API's LISTEN connection goes too
            if line.startswith("data:"):
                events.put((time.monotonic(), orjson.loads(line[5:])))


def test_stream_pushes_a_change_and_the_owner_sees_its_vpp(pipeline: Pipeline, fleet: Fleet) -> None:
    fleet.publish(ALL_ONLINE)
    _wait_for(pipeline, fleet.vpp, {"devices_online": 4})
    key = _operator_key(pipeline, fleet.operator)
    events: queue.Queue[tuple[float, dict[str, object]]] = queue.Queue()
    stop = threading.Event()
    reader = threading.Thread(target=_stream, args=(pipeline, fleet.vpp, key, events, stop), daemon=True)
    reader.start()
    _, first = events.get(timeout=DEADLINE_S)
    assert first["vpp"] == fleet.vpp and first["duration_min"] == 30
    # The EV slows to 10 kW: up 4, down 12.
    sent = time.monotonic()
    fleet.publish({**ALL_ONLINE, "ev-1": {"power_kw": 10}})
    want_up = 120 * BATTERY + 4 * EV + 60 * BUILDING
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got_at, event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if event["up_kw"] == pytest.approx(want_up):
            break
    assert event["down_kw"] == pytest.approx(80 * BATTERY + 40 * PV + 12 * EV)
    # Measured, not asserted (timing never goes in tests): telemetry to pushed event.
    print(f"stream pushed the change {got_at - sent:.3f} s after the telemetry was published")  # noqa: T201
    # The owning operator reads the capacity of its VPP, whose resources are another tenant's; an operator
    # owning nothing does not see it.
    assert _capacity(pipeline, fleet.vpp, 30, key)["vpp"] == fleet.vpp
    stranger = {"Authorization": f"Bearer {_operator_key(pipeline)}"}
    with pipeline.http() as http:
        assert http.get(f"/v1/vpps/{fleet.vpp}/capacity", headers=stranger).status_code == 404
    stop.set()
    fleet.publish({**ALL_ONLINE, "ev-1": {"power_kw": 12}})  # one more event wakes the reader to stop
    reader.join(timeout=DEADLINE_S)
    assert not reader.is_alive()


def test_silent_resource_is_stale_counted_and_excluded(pipeline: Pipeline, fleet: Fleet) -> None:
    fleet.publish(ALL_ONLINE)
    _wait_for(pipeline, fleet.vpp, {"devices_online": 4, "devices_stale": 0})
    # PV reports every second: silent for more than 3 s it is stale. The others keep reporting.
    silent_since = now_ms()
    others = {d: v for d, v in ALL_ONLINE.items() if d != "pv-1"}
    body: dict[str, object] = {}
    deadline = time.monotonic() + DEADLINE_S
    while not body or body["devices_stale"] != 1:
        assert time.monotonic() < deadline, f"pv-1 never went stale: {body}"
        fleet.publish(others)
        time.sleep(1)
        body = _capacity(pipeline, fleet.vpp, 30)
    assert body["devices_online"] == 3
    assert body["down_kw"] == pytest.approx(80 * BATTERY + 6 * EV)  # the PV's 40 kW are gone
    with pipeline.http() as http:
        stale = http.get(f"/v1/vpps/{fleet.vpp}/stale-devices").json()["devices"]
    assert [(d["device"], d["telemetry_interval_s"]) for d in stale] == [("pv-1", 1)]
    assert datetime.fromisoformat(stale[0]["last_seen"]).timestamp() * 1000 <= silent_since
    # Back online with its next reading.
    fleet.publish(ALL_ONLINE)
    _wait_for(pipeline, fleet.vpp, {"devices_online": 4, "devices_stale": 0})
