"""Register a fleet through the API, and publish as its gateways over MQTT (paho, one client each)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from simulators.encoding import GatewayEncoder
from simulators.engine import BATTERY_EFFICIENCY, MeterExchange
from simulators.runner import RunOptions, RunResult, run
from simulators.spec import DeviceSpec, FleetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayCredentials:
    username: str
    password: str


class RegistrationError(RuntimeError):
    pass


def register_fleet(
    api_url: str, admin_key: str, spec: FleetSpec, *, progress: Callable[[int], None] | None = None
) -> dict[str, GatewayCredentials]:
    """Create every enterprise, site, gateway, device and green-certificate block the description holds
    (existing ones are kept, so this is safe to repeat) and return fresh MQTT credentials per gateway."""
    headers = {"Authorization": f"Bearer {admin_key}"}
    creds: dict[str, GatewayCredentials] = {}
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as http:

        def post(path: str, body: dict[str, object]) -> httpx.Response:
            resp = http.post(path, json=body)
            if resp.status_code not in (201, 409):
                raise RegistrationError(f"POST {path} failed: {resp.status_code} {resp.text}")
            if progress:
                progress(1)
            return resp

        # A VPP is a registry entity (unowned here: admins act on it until one assigns an operator);
        # a device naming it in its registration is then enrolled directly, as the admin key may.
        vpps = {d.vpp for e in spec.enterprises for s in e.sites for g in s.gateways for d in g.devices}
        for vpp in sorted(v for v in vpps if v is not None):
            post("/v1/vpps", {"vpp": vpp, "name": vpp})
        for e in spec.enterprises:
            post(
                "/v1/enterprises",
                {
                    "tenant": e.tenant,
                    "name": e.name,
                    "industry_code": e.industry_code,
                    "timezone": e.timezone,
                    "annual_output_value_cny": e.annual_output_value_cny,
                },
            )
            for cert in e.green_certificates:
                post("/v1/green-certificates", {"tenant": e.tenant, **cert.model_dump(mode="json")})
            for s in e.sites:
                post(
                    "/v1/sites",
                    {
                        "tenant": e.tenant,
                        "site": s.site,
                        "name": s.name,
                        "floor_area_m2": s.floor_area_m2,
                        "province": s.province,
                        "latitude": s.latitude,
                        "longitude": s.longitude,
                    },
                )
                for g in s.gateways:
                    created = post("/v1/gateways", {"tenant": e.tenant, "gateway": g.gateway})
                    if created.status_code == 201:
                        mqtt_creds = created.json()["mqtt"]
                    else:
                        rotated = http.post(f"/v1/gateways/{g.gateway}/credentials")
                        if rotated.status_code != 200:
                            raise RegistrationError(
                                f"rotating {g.gateway} failed: {rotated.status_code} {rotated.text}"
                            )
                        mqtt_creds = rotated.json()["mqtt"]
                    creds[g.gateway] = GatewayCredentials(mqtt_creds["username"], mqtt_creds["password"])
                    for d in g.devices:
                        post(
                            "/v1/devices",
                            {
                                "tenant": e.tenant,
                                "device": d.device,
                                "site": s.site,
                                "gateway": g.gateway,
                                "device_type": d.type,
                                "carrier": d.carrier,
                                "role": d.role,
                                "rated_power_kw": d.rated_power_kw,
                                "register_max": d.register_max,
                                "register_resolution": d.register_resolution,
                                "telemetry_interval_s": d.interval_s,
                                "energy_capacity_kwh": d.energy_capacity_kwh,
                                "soc_min_pct": d.soc_min_pct,
                                "soc_max_pct": d.soc_max_pct,
                                "vpp": d.vpp,
                                "topology_node": d.topology_node,
                            },
                        )
                        model = resource_model(d)
                        if model is not None:
                            resp = http.put(
                                f"/v1/devices/{d.device}/resource", json={"tenant": e.tenant, **model}
                            )
                            if resp.status_code != 200:
                                raise RegistrationError(
                                    f"PUT resource of {d.device} failed: {resp.status_code} {resp.text}"
                                )
    return creds


# A base station keeps this share of its backup battery for outages; the VPP never dispatches it.
BASE_STATION_RESERVE_PCT = 50.0
# EV chargers in the fleet charge at their rating or not at all; they may be slowed down to this share.
EV_MIN_SHARE = 0.25


def resource_model(d: DeviceSpec) -> dict[str, object] | None:
    """The resource model (PUT /v1/devices/{device}/resource) of a simulated VPP resource, matching how
    simulators/engine.py drives it."""
    if d.vpp is None or d.role != "resource":
        return None
    if d.type == "battery":
        return {"resource_class": "battery", "efficiency": BATTERY_EFFICIENCY}
    if d.type == "pv":
        return {"resource_class": "pv", "curtailable": True}
    if d.type == "ev_charger":
        return {"resource_class": "ev_charger", "min_power_kw": round(d.rated_power_kw * EV_MIN_SHARE, 3)}
    if d.sheddable_share > 0:
        model: dict[str, object] = {"resource_class": "building_load", "sheddable_share": d.sheddable_share}
        if d.max_shed_min is not None:
            model["max_shed_min"] = d.max_shed_min
        return model
    if d.type == "base_station":
        return {
            "resource_class": "base_station",
            "reserved_soc_pct": BASE_STATION_RESERVE_PCT,
            "efficiency": 1.0,
        }
    return None


class GatewayClient:
    """One gateway's MQTT v5 connection. Counts publishes until the broker has answered each one;
    a refusal (PUBACK reason >= 0x80, e.g. 135 not authorised) is counted apart from an ack."""

    def __init__(
        self,
        host: str,
        port: int,
        creds: GatewayCredentials,
        *,
        client_id: str,
        qos: int,
        will: tuple[str, bytes] | None = None,
        max_inflight: int = 1000,
    ) -> None:
        self.name = client_id
        self.qos = qos
        self.published = 0
        self.acked = 0
        self.refused = 0
        self._answered = threading.Condition()
        self._connected = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._client.username_pw_set(creds.username, creds.password)
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(max_inflight * 10)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1)
        self._client.connect_async(host, port, keepalive=30)
        self._client.loop_start()

    def _on_connect(
        self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: Properties | None
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused connection of %s: %s", self.name, reason)
            return
        self._connected.set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def _on_publish(
        self, _c: mqtt.Client, _u: object, _mid: int, reason: ReasonCode, _p: Properties | None
    ) -> None:
        with self._answered:
            if reason.is_failure:
                self.refused += 1
            else:
                self.acked += 1
            self._answered.notify_all()

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a publish; blocks (briefly, repeatedly) while paho's outgoing queue is full."""
        while True:
            info = self._client.publish(topic, payload, qos=self.qos)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.published += 1
                return
            if info.rc not in (mqtt.MQTT_ERR_QUEUE_SIZE, mqtt.MQTT_ERR_NO_CONN):
                raise RuntimeError(f"publish failed: {mqtt.error_string(info.rc)}")
            time.sleep(0.002)

    @property
    def outstanding(self) -> int:
        return self.published - self.acked - self.refused

    def wait_answered(self, timeout_s: float) -> bool:
        """Wait until the broker answered every QoS 1 publish (QoS 0 is done once written)."""
        deadline = time.monotonic() + timeout_s
        with self._answered:
            while self.outstanding > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._answered.wait(remaining)
        return True

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class ExchangeReporter:
    """Registers each simulated meter exchange through the API, as a site crew would report it."""

    def __init__(self, api_url: str, admin_key: str) -> None:
        self._http = httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )
        self.reported = 0

    def __call__(self, exchange: MeterExchange) -> None:
        resp = self._http.post(
            f"/v1/devices/{exchange.device}/meter-exchanges",
            json={
                "tenant": exchange.tenant,
                "metric": exchange.metric,
                "ts": datetime.fromtimestamp(exchange.ts / 1000, UTC).isoformat(),
                "removal_read": exchange.old_final,
                "install_read": exchange.new_initial,
            },
        )
        if resp.status_code not in (201, 409):
            raise RegistrationError(
                f"meter exchange of {exchange.device} refused: {resp.status_code} {resp.text}"
            )
        self.reported += 1

    def close(self) -> None:
        self._http.close()


@dataclass(slots=True)
class MqttOutcome:
    acked: int
    refused: int
    unanswered: int


def simulate_over_mqtt(
    spec: FleetSpec,
    options: RunOptions,
    *,
    host: str,
    port: int,
    creds: dict[str, GatewayCredentials],
    qos: int,
    stop: threading.Event | None = None,
    armed_rollovers: list[tuple[str, str]] | None = None,
    on_exchange: Callable[[MeterExchange], None] | None = None,
) -> tuple[RunResult, MqttOutcome]:
    """Run the simulation with one paho client per gateway, then wait for the broker's answers."""
    gateways = [g for _, _, g in spec.gateways()]
    missing = [g.gateway for g in gateways if g.gateway not in creds]
    if missing:
        raise RegistrationError(f"no MQTT credentials for gateways {missing[:5]}")
    clients: list[GatewayClient] = []

    def connect(encoders: list[GatewayEncoder], start_ms: int) -> None:
        for gateway, encoder in zip(gateways, encoders, strict=True):
            will = encoder.will(start_ms) if gateway.format == "sparkplug" else None
            # Gateway listeners replace the id with the gateway's username; on the service listener
            # (benchmarks publish as the service account) it stays distinct and unguessable.
            client_id = f"sim-{gateway.gateway}-{secrets.token_hex(8)}"
            clients.append(
                GatewayClient(host, port, creds[gateway.gateway], client_id=client_id, qos=qos, will=will)
            )
        for client, gateway, encoder in zip(clients, gateways, encoders, strict=True):
            if not client.wait_connected(30):
                raise RuntimeError(f"gateway {gateway.gateway} could not connect to mqtt://{host}:{port}")
            if gateway.format == "sparkplug":
                client.publish(*encoder.birth(start_ms))

    def sink(gateway: int, topic: str, payload: bytes) -> None:
        clients[gateway].publish(topic, payload)

    try:
        result = run(
            spec, options, sink, stop=stop, on_start=connect, armed_rollovers=armed_rollovers,
            on_exchange=on_exchange,
        )  # fmt: skip
        unanswered = 0
        for client in clients:
            if not client.wait_answered(60):
                unanswered += client.outstanding
        return result, MqttOutcome(
            acked=sum(c.acked for c in clients),
            refused=sum(c.refused for c in clients),
            unanswered=unanswered,
        )
    finally:
        for client in clients:
            client.close()
