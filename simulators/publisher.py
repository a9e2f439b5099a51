"""Publish a fleet's readings over MQTT as gateway batches, and register the fleet through the API."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from meterflow.contract import gateway_telemetry_topic, now_ms
from simulators.fleet import Fleet, gateway_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayCredentials:
    username: str
    password: str


def register_fleet(api_url: str, admin_key: str, fleet: Fleet) -> GatewayCredentials:
    """Register tenant, site, gateway and devices (existing ones are kept); rotate the gateway password."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=api_url, headers=headers, timeout=30) as http:

        def post(path: str, body: dict[str, object]) -> httpx.Response:
            resp = http.post(path, json=body)
            if resp.status_code not in (201, 409):
                raise RuntimeError(f"POST {path} failed: {resp.status_code} {resp.text}")
            return resp

        post("/v1/enterprises", {"tenant": fleet.tenant, "name": f"{fleet.tenant} (simulated)"})
        post("/v1/sites", {"tenant": fleet.tenant, "site": fleet.site, "name": "simulated site"})
        post("/v1/gateways", {"tenant": fleet.tenant, "gateway": fleet.gateway})
        for meter in fleet.meters:
            post(
                "/v1/devices",
                {
                    "tenant": fleet.tenant,
                    "device": meter.device,
                    "site": fleet.site,
                    "gateway": fleet.gateway,
                    "rated_power_kw": round(meter.base_kw * 2, 1),
                },
            )
        resp = http.post(f"/v1/gateways/{fleet.gateway}/credentials")
        if resp.status_code != 200:
            raise RuntimeError(f"rotating gateway credentials failed: {resp.status_code} {resp.text}")
        creds = resp.json()["mqtt"]
    return GatewayCredentials(creds["username"], creds["password"])


class Publisher:
    """One gateway's MQTT connection; QoS 1 publishes are counted until the broker acknowledges them."""

    def __init__(self, host: str, port: int, creds: GatewayCredentials, *, qos: int = 1) -> None:
        self.qos = qos
        self._acked = 0
        self._lock = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{creds.username}")
        self._client.username_pw_set(creds.username, creds.password)
        self._client.on_publish = self._on_publish
        self._client.max_inflight_messages_set(1000)
        self._client.connect(host, port, keepalive=30)
        self._client.loop_start()

    def _on_publish(self, *_args: object) -> None:
        with self._lock:
            self._acked += 1
            self._lock.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=self.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")

    def wait_acked(self, count: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._acked < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run_fleet(
    fleet: Fleet,
    publisher: Publisher,
    *,
    steps: int | None,
    step_s: float,
    speed: float,
    start_ms: int | None = None,
) -> int:
    """Publish `steps` batches (forever when None), `step_s` simulated seconds apart, `speed` x real time.

    Returns the number of readings published and acknowledged by the broker.
    """
    topic = gateway_telemetry_topic(fleet.tenant, fleet.gateway)
    ts = start_ms if start_ms is not None else now_ms()
    published = readings = 0
    started = time.monotonic()
    while steps is None or published < steps:
        batch = fleet.step(ts, step_s)
        publisher.publish(topic, orjson.dumps(gateway_batch(batch)))
        published += 1
        readings += sum(len(v) for v in batch.values())
        ts += int(step_s * 1000)
        if speed > 0:
            sleep = started + published * step_s / speed - time.monotonic()
            if sleep > 0:
                time.sleep(sleep)
        if published % 100 == 0:
            log.info("published %d batches, %d readings", published, readings)
    if not publisher.wait_acked(published, timeout_s=60):
        raise RuntimeError("the broker did not acknowledge every publish within 60 s")
    return readings
