"""The collector's own machinery without services: paho's buffered reads and the ack order."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ingest.collector import Collector, _Batch, _Client
from meterflow.settings import Settings


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
