"""The broker's TLS listener: a gateway that trusts the stack's CA publishes through it; others are refused."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import uuid

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deploy.local import tls
from meterflow.contract import gateway_telemetry_topic, now_ms
from meterflow.settings import Settings
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _register, readings_back


def _client() -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"gw-tls-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
    )


def _trusting_context(settings: Settings) -> ssl.SSLContext:
    # create_default_context verifies the chain and the hostname; only the stack's CA is trusted.
    return ssl.create_default_context(cafile=tls.broker_files(settings).ca_cert)


def _connect_tls(settings: Settings, creds: dict[str, str]) -> mqtt.Client:
    client = _client()
    client.username_pw_set(creds["username"], creds["password"])
    client.tls_set_context(_trusting_context(settings))
    deadline = time.monotonic() + 10
    # The broker reloads its password file on SIGHUP; retry until the new account is live.
    while True:
        client.connect(settings.mqtt.host, settings.mqtt.tls_port)
        client.loop_start()
        time.sleep(0.3)
        if client.is_connected():
            return client
        client.loop_stop()
        if time.monotonic() > deadline:
            pytest.fail("gateway could not connect over TLS with the credentials the API issued")


def test_batch_published_over_tls_comes_back_through_the_api(pipeline: Pipeline) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    gateway = f"gw-{uuid.uuid4().hex[:8]}"
    creds = _register(pipeline, tenant, gateway, ["m-001"])
    client = _connect_tls(pipeline.settings, creds)
    ts = now_ms() - 60_000
    batch = {"m-001": [{"ts": ts + i * 1000, "values": {"power_kw": 10.0 + i}} for i in range(3)]}
    info = client.publish(gateway_telemetry_topic(tenant, gateway), orjson.dumps(batch), qos=1)
    info.wait_for_publish(timeout=10)
    assert info.is_published()
    client.disconnect()
    client.loop_stop()

    data = readings_back(pipeline, tenant, "m-001", ts, count=3)
    assert sorted(float(str(r["value"])) for r in data) == [10.0, 11.0, 12.0]


def _handshake(settings: Settings, context: ssl.SSLContext, host: str) -> None:
    # The standard library rather than paho: paho leaves the socket of a failed handshake unclosed.
    with (
        socket.create_connection((host, settings.mqtt.tls_port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=host),
    ):
        pass


def test_client_that_does_not_trust_the_stack_ca_fails_the_handshake(base_settings: Settings) -> None:
    system_trust = ssl.create_default_context()  # does not hold the stack's CA
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(base_settings, system_trust, base_settings.mqtt.host)


def test_hostname_is_verified(base_settings: Settings) -> None:
    # The resolver reads "127.1" as 127.0.0.1, but the certificate names only localhost and 127.0.0.1.
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        _handshake(base_settings, _trusting_context(base_settings), "127.1")


def test_plaintext_connect_to_the_tls_port_fails(base_settings: Settings) -> None:
    mqtt_settings = base_settings.mqtt
    client = _client()
    # Valid credentials: the only thing wrong is the missing TLS.
    client.username_pw_set(mqtt_settings.service_user, mqtt_settings.service_password.get_secret_value())
    connacked, dropped = threading.Event(), threading.Event()
    client.on_connect = lambda *_args: connacked.set()
    client.on_disconnect = lambda *_args: dropped.set()
    client.connect(mqtt_settings.host, mqtt_settings.tls_port)
    client.loop_start()
    try:
        assert dropped.wait(timeout=10), "the broker kept a plaintext connection on its TLS port"
        assert not connacked.is_set()
    finally:
        client.disconnect()
        client.loop_stop()
