"""MQTT client ids belong to their accounts (issue 13, finding 2: client-id takeover).

Mosquitto gives a session to whoever presents its client id and disconnects the holder. Written as the
attacker would try it: a gateway of another tenant connects with its victim's client id (the one the
victim sent, and the one the broker assigned), and with a collector's; the victims stay connected and
keep delivering. Gateways cannot log in where service clients choose their ids.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from meterflow.contract import gateway_telemetry_topic, now_ms
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _register, readings_back


class Watched:
    """A paho client that records its CONNACK and every disconnection."""

    def __init__(self, client_id: str, username: str, password: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(username, password)
        self.connack = threading.Event()
        self.refused: ReasonCode | None = None
        self.disconnects: list[str] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            self.refused = reason
        self.connack.set()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: ReasonCode, _p: Properties | None
    ) -> None:
        self.disconnects.append(str(reason))

    def connect(self, host: str, port: int) -> None:
        self.client.reconnect_delay_set(60, 60)  # a kicked victim must not hide it by reconnecting
        self.client.connect(host, port)
        self.client.loop_start()
        assert self.connack.wait(10), f"no CONNACK on port {port}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _connected_gateway(p: Pipeline, client_id: str, creds: dict[str, str]) -> Watched:
    """A gateway connection; retried while the broker reloads the password file with the new account."""
    deadline = time.monotonic() + 10
    while True:
        gw = Watched(client_id, creds["username"], creds["password"])
        gw.connect(p.settings.mqtt.host, p.settings.mqtt.port)
        if gw.refused is None:
            return gw
        gw.close()
        if time.monotonic() > deadline:
            pytest.fail(f"gateway {creds['username']} refused: {gw.refused}")
        time.sleep(0.3)


def _publish(gw: Watched, tenant: str, gateway: str, ts: int, value: float) -> None:
    info = gw.client.publish(
        gateway_telemetry_topic(tenant, gateway),
        orjson.dumps({"m-001": [{"ts": ts, "values": {"power_kw": value}}]}),
        qos=1,
    )
    info.wait_for_publish(timeout=10)
    assert info.is_published()


def test_a_gateway_cannot_take_over_another_tenants_session(pipeline: Pipeline) -> None:
    victim_tenant, victim_gw = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    attacker_tenant, attacker_gw = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    victim_creds = _register(pipeline, victim_tenant, victim_gw, ["m-001"])
    attacker_creds = _register(pipeline, attacker_tenant, attacker_gw, ["m-001"])
    mqtt_settings = pipeline.settings.mqtt
    # A service client as the collector is one: the service listener, an id of its own.
    service_id = f"collector-{secrets.token_hex(16)}"
    service = Watched(
        service_id, mqtt_settings.service_user, mqtt_settings.service_password.get_secret_value()
    )
    service.connect(mqtt_settings.host, mqtt_settings.service_port)
    assert service.refused is None
    victim = _connected_gateway(pipeline, f"sim-{victim_gw}", victim_creds)
    ts = now_ms() - 60_000
    _publish(victim, victim_tenant, victim_gw, ts, 1.0)

    collector_id = pipeline.env["METERFLOW_MQTT__CLIENT_ID"]
    for stolen in (f"sim-{victim_gw}", victim_gw, service_id, collector_id):
        attacker = _connected_gateway(pipeline, stolen, attacker_creds)
        attacker.close()

    assert victim.disconnects == [], "the victim gateway was disconnected"
    assert service.disconnects == [], "the service client was disconnected"
    assert pipeline.procs["collector"].poll() is None
    # The victim keeps delivering, through the collector, after every attempt.
    _publish(victim, victim_tenant, victim_gw, ts + 1000, 2.0)
    data = readings_back(pipeline, victim_tenant, "m-001", ts, count=2)
    assert sorted(float(str(r["value"])) for r in data) == [1.0, 2.0]
    assert victim.disconnects == [] and service.disconnects == []
    victim.close()
    service.close()


def test_gateways_cannot_log_in_where_service_clients_choose_their_ids(pipeline: Pipeline) -> None:
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    creds = _register(pipeline, tenant, gateway, ["m-001"])
    _connected_gateway(pipeline, gateway, creds).close()  # the account is live on the gateway listener
    mqtt_settings = pipeline.settings.mqtt
    intruder = Watched(pipeline.env["METERFLOW_MQTT__CLIENT_ID"], creds["username"], creds["password"])
    intruder.connect(mqtt_settings.host, mqtt_settings.service_port)
    assert intruder.refused is not None and intruder.refused.value == 135  # not authorized
    intruder.close()
    assert pipeline.procs["collector"].poll() is None
