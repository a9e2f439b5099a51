"""Batches to MQTT publishes in the three contract forms: gateway batch, single device, Sparkplug B."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from meterflow import sparkplug
from meterflow.contract import TOPIC_ROOT
from meterflow.sparkplug import MessageType
from simulators.engine import Batch, DevicePoint
from simulators.spec import PayloadFormat

Publish = tuple[str, bytes]


def _points_json(points: list[DevicePoint]) -> list[dict[str, object]]:
    return [{"ts": p.ts_ms, "values": p.values} for p in points]


@dataclass(slots=True)
class SparkplugSession:
    """One edge node's Sparkplug state: birth/death sequence, message sequence, aliases per device."""

    bd_seq: int = 0
    seq: int = 0
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)

    def next_seq(self) -> int:
        current = self.seq
        self.seq = sparkplug.next_seq(current)
        return current


class GatewayEncoder:
    """Encodes one gateway's batches in its payload format."""

    def __init__(
        self,
        tenant: str,
        gateway: str,
        device_names: list[str],
        payload_format: PayloadFormat,
        topic_root: str = TOPIC_ROOT,
    ) -> None:
        self.tenant = tenant
        self.gateway = gateway
        self.format = payload_format
        self._names = device_names
        self._root = topic_root
        self.batch_topic = f"{topic_root}/{tenant}/{gateway}/telemetry"
        self.session = SparkplugSession()

    def birth(self, ts_ms: int) -> Publish:
        """NBIRTH, published on every (re)connect with the bdSeq of the will it registered."""
        return (
            sparkplug.topic(self.tenant, MessageType.NBIRTH, self.gateway),
            sparkplug.encode_nbirth(self.session.bd_seq, ts_ms, seq=self.session.next_seq()),
        )

    def will(self, ts_ms: int) -> Publish:
        return (
            sparkplug.topic(self.tenant, MessageType.NDEATH, self.gateway),
            sparkplug.encode_ndeath(self.session.bd_seq, ts_ms),
        )

    def encode(self, batch: Batch, *, historical: bool = False) -> list[Publish]:
        if self.format == "json-batch":
            doc = {self._names[d]: _points_json(pts) for d, pts in batch.points.items()}
            return [(self.batch_topic, orjson.dumps(doc))]
        if self.format == "json-single":
            return [
                (
                    f"{self._root}/{self.tenant}/{self.gateway}/{self._names[d]}/telemetry",
                    orjson.dumps(_points_json(pts)),
                )
                for d, pts in batch.points.items()
            ]
        return [
            msg for d, pts in batch.points.items() for msg in self._sparkplug(self._names[d], pts, historical)
        ]

    def _sparkplug(self, device: str, points: list[DevicePoint], historical: bool) -> list[Publish]:
        out: list[Publish] = []
        aliases = self.session.aliases.get(device)
        if aliases is None:
            first = points[0]
            aliases = {metric: n for n, metric in enumerate(sorted(first.values), start=1)}
            self.session.aliases[device] = aliases
            births = [(metric, alias, first.values[metric]) for metric, alias in aliases.items()]
            out.append(
                (
                    sparkplug.topic(self.tenant, MessageType.DBIRTH, self.gateway, device),
                    sparkplug.encode_dbirth(births, first.ts_ms, self.session.next_seq()),
                )
            )
        data: list[tuple[int | str, int, float]] = [
            (aliases.get(metric, metric), p.ts_ms, value)
            for p in points
            for metric, value in p.values.items()
        ]
        out.append(
            (
                sparkplug.topic(self.tenant, MessageType.DDATA, self.gateway, device),
                sparkplug.encode_ddata(
                    data, points[0].ts_ms, self.session.next_seq(), is_historical=historical
                ),
            )
        )
        return out
