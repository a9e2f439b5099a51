"""The collector's own machinery without services: paho's buffered reads, the ack order, and dead letters
(one per message, bounded, within a gateway's budget)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from types import SimpleNamespace

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import REGISTRY

from ingest.collector import Collector, _Batch, _Client, _Incoming
from ingest.payloads import parse_message
from ingest.registry import Registry, check_ownership
from meterflow.contract import TelemetryTopic
from meterflow.settings import IngestSettings, Settings


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(mid: int, topic: str, payload: bytes) -> bytes:
    """An MQTT v5 PUBLISH, QoS 1, no properties."""
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", mid) + b"\x00" + payload
    return b"\x32" + _varint(len(body)) + body


def test_buffered_reads_deliver_every_packet_in_order() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = _Client(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True)
    got: list[tuple[int, str, bytes]] = []
    client.on_message = lambda _c, _u, m: got.append((m.mid, m.topic, bytes(m.payload)))
    client.connect_async("127.0.0.1", server.getsockname()[1], clean_start=False)
    client.reconnect()
    peer, _ = server.accept()
    # CONNACK, then packets of every size class in one write: many end up in one recv, and one is
    # larger than the read buffer.
    packets = [_publish(i + 1, f"t/{i}", b"x" * (i * 997 % 5000)) for i in range(300)]
    packets.append(_publish(301, "t/big", b"y" * 600_000))
    peer.sendall(b"\x20\x03\x00\x00\x00" + b"".join(packets))
    for _ in range(100_000):
        if len(got) == len(packets):
            break
        client.loop_read()
    assert [m for m, _, _ in got] == list(range(1, 302))
    assert got[-1][2] == b"y" * 600_000
    assert got[7] == (8, "t/7", b"x" * (7 * 997 % 5000))
    assert not client.buffered
    peer.close()
    server.close()


@dataclass
class _FakeClient:
    acks: list[int] = field(default_factory=list)

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)


def _batch(mids: list[int], connection: int) -> _Batch:
    return _Batch([(mid, 1, 0.0, connection) for mid in mids], readings=len(mids))


def test_acks_leave_in_arrival_order_and_only_on_the_delivering_connection() -> None:
    collector = Collector(Settings())
    fake = _FakeClient()
    collector._client = fake  # type: ignore[assignment]
    collector._connection = 1
    first, second, third = _batch([1, 2], 1), _batch([3], 1), _batch([4, 5], 1)
    collector._batches.extend([first, second, third])
    collector._inflight = 5
    second.done = True
    collector._ack_ready()
    assert fake.acks == []  # the first batch is still waiting for Kafka
    first.done = True
    collector._ack_ready()
    assert fake.acks == [1, 2, 3]
    # Reconnected: the broker delivers 4 and 5 again, perhaps under ids given to other messages now.
    collector._connection = 2
    third.done = True
    collector._ack_ready()
    assert fake.acks == [1, 2, 3]
    assert collector._inflight == 0


# --- dead letters: one per message, bounded, within a gateway's budget ------------------------------

NOW = 1763712000000
GATEWAY_TOPIC = "meterflow/v1/acme/gw-1/telemetry"


def _incoming(topic: str, payload: bytes) -> _Incoming:
    msg = mqtt.MQTTMessage(1, topic.encode())
    msg.payload = payload
    return _Incoming(msg, topic, 0)


def _rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("meterflow_ingest_rejected_total", {"reason": reason}) or 0.0


def _budget_exceeded() -> float:
    return REGISTRY.get_sample_value("meterflow_ingest_dlq_budget_exceeded_total") or 0.0


def _letter(
    collector: Collector, topic: str, payload: bytes, registry: Registry | None = None
) -> bytes | None:
    parsed = parse_message(
        TelemetryTopic("acme", "gw-1", None), payload, received_ms=NOW, limits=collector.limits
    )
    if registry is not None:
        parsed, _ = check_ownership(parsed, "acme", "gw-1", registry, reject_unknown_metrics=False)
    record = collector._dead_letter(_incoming(topic, payload), parsed.rejected, NOW)
    return None if record is None else record.value


def test_a_thousand_bad_points_make_one_letter_of_bounded_size() -> None:
    collector = Collector(Settings())
    payload = b'{"m-1":[' + b",".join([b"10"] * 1000) + b"]}"
    assert 2900 < len(payload) < 3100
    before = _rejected("schema")
    value = _letter(collector, GATEWAY_TOPIC, payload)
    assert value is not None
    assert len(value) <= 2.5 * len(payload)
    letter = orjson.loads(value)
    assert letter["reasons"] == {"schema": 1000}
    assert (letter["rejected_total"], letter["rejected_truncated"]) == (1000, True)
    assert letter["rejected"][0] == {
        "reason": "schema",
        "detail": letter["detail"],
        "device": "m-1",
        "point": 0,
    }
    assert letter["payload"] == payload.decode()
    assert _rejected("schema") - before == 1000


def test_a_thousand_unknown_devices_make_one_letter_of_bounded_size() -> None:
    collector = Collector(Settings())
    registry = Registry("", rated_power_factor=100.0)
    registry._gateways = {"gw-1": "acme"}
    payload = orjson.dumps({f"d{i}": [{"ts": NOW, "values": {"power_kw": 1}}] for i in range(1000)})
    before = _rejected("unknown_device")
    value = _letter(collector, GATEWAY_TOPIC, payload, registry)
    assert value is not None
    assert len(value) <= 2.5 * len(payload)
    assert orjson.loads(value)["reasons"] == {"unknown_device": 1000}
    assert _rejected("unknown_device") - before == 1000


def test_an_empty_payload_on_a_64_kb_topic_makes_a_small_letter_and_key() -> None:
    """MQTT allows 64 KB topics: the letter and its Kafka key name the topic cut, not twice in full."""
    collector = Collector(Settings())
    topic = "meterflow/v1/acme/" + "g" * 65_000 + "/telemetry"
    parsed = parse_message(
        TelemetryTopic("acme", "gw-1", None), b"", received_ms=NOW, limits=collector.limits
    )
    assert parsed.rejected
    record = collector._dead_letter(_incoming(topic, b""), parsed.rejected, NOW)
    assert record is not None
    assert len(record.key) <= 512
    assert len(record.value) < 4096
    assert orjson.loads(record.value)["topic"] == topic[:512]


def test_a_gateway_past_its_budget_is_counted_and_announced_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway whose clock runs a week ahead: every batch is future_ts. Its letters stop at its
    budget (plus the record that crossed it), one dlq_budget letter says so, its refusals are still
    counted, and another gateway's letters are unaffected; a minute later it writes again."""
    clock = [1000.0]
    monkeypatch.setattr("ingest.collector.time", SimpleNamespace(monotonic=lambda: clock[0]))
    budget = 64 * 1024
    collector = Collector(Settings(ingest=IngestSettings(dlq_budget_bytes_per_min=budget)))
    week = 7 * 86_400_000
    batch = orjson.dumps(
        {
            f"m-{d}": [{"ts": NOW + week + i * 1000, "values": {"power_kw": 5.0}} for i in range(10)]
            for d in range(10)
        }
    )
    future_before, exceeded_before = _rejected("future_ts"), _budget_exceeded()
    letters = [_letter(collector, GATEWAY_TOPIC, batch) for _ in range(200)]
    written = [(value, orjson.loads(value)) for value in letters if value is not None]
    data = [value for value, letter in written if letter["reason"] == "future_ts"]
    announced = [letter for _, letter in written if letter["reason"] == "dlq_budget"]
    assert len(announced) == 1 and announced[0]["gateway"] == "gw-1"
    assert sum(len(value) for value in data) <= budget + len(data[0])
    suppressed = 200 - len(data)
    assert suppressed > 150
    assert _budget_exceeded() - exceeded_before == suppressed
    assert _rejected("future_ts") - future_before == 200 * 100
    # Another gateway of the same moment is not held back.
    other = _letter(collector, "meterflow/v1/acme/gw-2/telemetry", batch)
    assert other is not None and orjson.loads(other)["reason"] == "future_ts"
    clock[0] += 60
    again = _letter(collector, GATEWAY_TOPIC, batch)
    assert again is not None and orjson.loads(again)["reason"] == "future_ts"
