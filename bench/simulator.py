"""`meterflow bench simulator`: one simulator process publishing gateway batches, beside bare paho.

Both sides publish the same messages, QoS 1, through the same number of paho clients to the stack's
Mosquitto, and both are timed until the broker has acknowledged every message. The simulator side
generates, encodes and paces the readings as `meterflow simulate --mode backfill` does; the peer
(the ceiling for a Python publisher) only sends payloads prepared before its clock starts. Topics sit
under ``meterflow/bench/`` so that no running collector ingests them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from meterflow.contract import now_ms
from meterflow.settings import Settings
from simulators.publisher import GatewayClient, GatewayCredentials, simulate_over_mqtt
from simulators.runner import RunOptions, run
from simulators.spec import generate_fleet

TOPIC_ROOT = "meterflow/bench/v1"


def run_simulator_bench(
    settings: Settings,
    *,
    gateways: int,
    devices_per_gateway: int,
    minutes: int,
    tick: Callable[[str], None],
) -> dict[str, object]:
    spec = generate_fleet(
        enterprises=gateways,
        meters_per_site=devices_per_gateway,
        max_devices_per_gateway=devices_per_gateway + 2,  # a site's gas or heat meter rides along
        seed=1,
        tenant_prefix="bench-",
    )
    n_gateways = sum(1 for _ in spec.gateways())
    # The bench publishes as the broker's service account, which may write anywhere under meterflow/,
    # so it needs no registration and no API.
    account = GatewayCredentials(
        settings.mqtt.service_user, settings.mqtt.service_password.get_secret_value()
    )
    creds = {g.gateway: account for _, _, g in spec.gateways()}
    start = now_ms() - minutes * 60_000 - 3_600_000
    options = RunOptions(
        mode="backfill", start_ms=start - start % 60_000, duration_s=minutes * 60, topic_root=TOPIC_ROOT
    )
    # Several clients of one (service) account: the service listener keeps their distinct ids.
    host, port = settings.mqtt.host, settings.mqtt.service_port

    tick(f"simulator: {spec.device_count} devices on {n_gateways} gateways, {minutes} simulated minutes")
    started = time.perf_counter()
    result, outcome = simulate_over_mqtt(spec, options, host=host, port=port, creds=creds, qos=1)
    sim_s = time.perf_counter() - started
    if outcome.unanswered or outcome.refused:
        raise RuntimeError(f"broker left {outcome.unanswered} unanswered and refused {outcome.refused}")

    tick("bare paho: the same messages, prepared beforehand")
    captured: list[tuple[int, str, bytes]] = []
    run(spec, options, lambda g, topic, payload: captured.append((g, topic, payload)))
    clients = [
        GatewayClient(host, port, account, client_id=f"bench-bare-{i}", qos=1) for i in range(n_gateways)
    ]
    try:
        for client in clients:
            if not client.wait_connected(30):
                raise RuntimeError(f"bare client could not connect to mqtt://{host}:{port}")
        started = time.perf_counter()
        for gateway, topic, payload in captured:
            clients[gateway].publish(topic, payload)
        for client in clients:
            if not client.wait_answered(120):
                raise RuntimeError("broker did not acknowledge the bare publishes")
        bare_s = time.perf_counter() - started
    finally:
        for client in clients:
            client.close()

    value = result.readings / sim_s
    peer_value = result.readings / bare_s
    return {
        "bench": "simulator",
        "metric": "readings_per_s",
        "value": round(value),
        "unit": "readings/s",
        "peer": "bare paho publish of the same pre-encoded messages",
        "peer_value": round(peer_value),
        "ratio": round(value / peer_value, 3),
        "readings": result.readings,
        "messages": result.messages,
        "target": 50_000,
    }
