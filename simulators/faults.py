"""Fault injection on the message stream, and what each fault should make meterflow do.

Every fault either changes only *when or how often* true data arrives (duplicates, reordering, a
gateway offline then forwarding its backlog oldest first, clock skew followed by a re-send), or adds
extra messages that must be rejected (malformed, oversized, wrong tenant, skewed timestamps). None
removes or alters true data, so the ground truth holds under all of them, and the rejections are
counted here so the expected dead-letter figures are known exactly.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from meterflow.contract import DeadLetterReason
from simulators.engine import DAY_MS, Batch, DevicePoint
from simulators.spec import FleetSpec

Rate = float


class FaultConfig(BaseModel):
    """Fault rates. Message faults are per message, gateway faults per gateway-hour, reading faults
    per reading, register faults per register (rollover) or per device-day (meter exchange)."""

    model_config = ConfigDict(extra="forbid")

    duplicate: Rate = Field(0.0, ge=0, le=1, description="message sent twice")
    reorder: Rate = Field(0.0, ge=0, le=1, description="message delayed behind up to 5 later ones")
    offline: Rate = Field(
        0.0, ge=0, description="gateway outages per hour (5-30 min, then backlog oldest first)"
    )
    clock_skew: Rate = Field(
        0.0, ge=0, description="clock jumps a day ahead per gateway-hour; re-sent after resync"
    )
    malformed: Rate = Field(
        0.0, ge=0, le=1, description="extra malformed message (bad JSON or a non-numeric value)"
    )
    wrong_tenant: Rate = Field(0.0, ge=0, le=1, description="extra copy published on another tenant's topic")
    oversized: Rate = Field(0.0, ge=0, le=1, description="extra payload over the size limit")
    rollover: Rate = Field(0.0, ge=0, le=1, description="share of registers started just below their maximum")
    meter_exchange: Rate = Field(0.0, ge=0, description="meter exchanges per device-day")
    spike: Rate = Field(0.0, ge=0, le=1, description="power reading replaced by an implausible spike")
    glitch: Rate = Field(0.0, ge=0, le=1, description="extra implausible register read between two reads")
    frozen: Rate = Field(0.0, ge=0, le=1, description="instantaneous values stuck for 5 readings")

    @classmethod
    def parse(cls, text: str) -> FaultConfig:
        """`duplicate=0.01,offline=0.2` as typed on a command line."""
        pairs: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected name=rate, got {item!r}")
            pairs[name.strip().replace("-", "_")] = float(value)
        return cls.model_validate(pairs)

    @classmethod
    def all(cls, rate: float) -> FaultConfig:
        """Every fault at a modest rate scaled by `rate` (1.0 = a rough day in the field)."""
        return cls(
            duplicate=0.02 * rate, reorder=0.02 * rate, offline=0.05 * rate, clock_skew=0.02 * rate,
            malformed=0.005 * rate, wrong_tenant=0.002 * rate, oversized=0.001 * rate,
            rollover=min(1.0, 0.1 * rate), meter_exchange=0.05 * rate, spike=0.001 * rate,
            glitch=0.001 * rate, frozen=0.0005 * rate,
        )  # fmt: skip


def arm_rollovers(spec: FleetSpec, share: float, seed: int) -> tuple[FleetSpec, list[tuple[str, str]]]:
    """Give a share of devices a short register (5 integer digits) that starts just below its maximum,
    so it rolls over within roughly the first hour at load. Returns the new spec and the (tenant,
    device) pairs armed. The register maximum is part of the registration, as on a real meter."""
    if share <= 0:
        return spec, []
    rng = random.Random(seed)
    armed: list[tuple[str, str]] = []
    enterprises = []
    for enterprise in spec.enterprises:
        sites = []
        for site in enterprise.sites:
            gateways = []
            for gateway in site.gateways:
                devices = []
                for device in gateway.devices:
                    if rng.random() < share:
                        register_max = 99_999 + (1 - device.register_resolution)
                        below = device.rated_power_kw * rng.uniform(0.05, 0.5)
                        initial = round(max(0.0, register_max - below), 6)
                        device = device.model_copy(
                            update={"register_max": register_max, "initial_register": initial}
                        )
                        armed.append((enterprise.tenant, device.device))
                    devices.append(device)
                gateways.append(gateway.model_copy(update={"devices": devices}))
            sites.append(site.model_copy(update={"gateways": gateways}))
        enterprises.append(enterprise.model_copy(update={"sites": sites}))
    return spec.model_copy(update={"enterprises": enterprises}), armed


OutgoingKind = Literal["batch", "raw"]


@dataclass(slots=True)
class Outgoing:
    """One thing to publish: a batch (encoded by the gateway's format) or raw bytes on a topic."""

    kind: OutgoingKind
    gateway: int
    batch: Batch | None = None
    topic: str | None = None
    payload: bytes | None = None
    expect_refused: bool = False
    historical: bool = False


@dataclass(slots=True)
class Expected:
    """What a correct pipeline must report for the injected faults."""

    dead_letters: dict[str, int] = field(default_factory=dict)
    broker_refused: int = 0
    duplicate_readings: int = 0
    delayed_readings: int = 0
    outages: int = 0
    skew_windows: int = 0

    def dead_letter(self, reason: DeadLetterReason, count: int = 1) -> None:
        self.dead_letters[reason.value] = self.dead_letters.get(reason.value, 0) + count


@dataclass(slots=True)
class _GatewayState:
    offline_until: int = -1
    skew_until: int = -1


class Scheduler:
    """Orders outgoing messages by the simulated instant they leave their gateway."""

    def __init__(
        self,
        config: FaultConfig,
        *,
        seed: int,
        tick_ms: int,
        gateway_topics: list[str],
        gateway_tenants: list[str],
        gateway_formats: list[str],
        device_names: list[str],
        max_payload_bytes: int,
        wall_clock_ms: int,
    ) -> None:
        self.config = config
        self.expected = Expected()
        self._rng = random.Random(seed ^ 0x5EED)
        self._tick_ms = tick_ms
        self._topics = gateway_topics
        self._tenants = gateway_tenants
        self._formats = gateway_formats
        self._devices = device_names
        self._max_payload = max_payload_bytes
        self._wall_clock_ms = wall_clock_ms
        self._heap: list[tuple[int, int, Outgoing]] = []
        self._seq = itertools.count()
        self._state = [_GatewayState() for _ in gateway_topics]
        self._per_tick_hourly = tick_ms / 3_600_000

    def _push(self, send_at: int, out: Outgoing) -> None:
        heapq.heappush(self._heap, (send_at, next(self._seq), out))

    def submit(self, batch: Batch) -> None:
        c, rng, state = self.config, self._rng, self._state[batch.gateway]
        ts = batch.ts_ms
        if state.offline_until <= ts and c.offline and rng.random() < c.offline * self._per_tick_hourly:
            state.offline_until = ts + rng.randint(5, 30) * 60_000
            self.expected.outages += 1
        if state.skew_until <= ts and c.clock_skew and rng.random() < c.clock_skew * self._per_tick_hourly:
            state.skew_until = ts + rng.randint(2, 10) * 60_000
            self.expected.skew_windows += 1

        send_at = ts
        historical = False
        if ts < state.skew_until:
            # The gateway's clock is a day ahead: what it stamps now is rejected; after resync it re-sends
            # the window from its buffer with the right time.
            self._push(ts, Outgoing("batch", batch.gateway, self._skewed(batch)))
            send_at, historical = state.skew_until, True
        if ts < state.offline_until:
            send_at, historical = max(send_at, state.offline_until), True
        elif c.reorder and rng.random() < c.reorder:
            send_at = ts + rng.randint(1, 5) * self._tick_ms
        if send_at > ts:
            self.expected.delayed_readings += batch.reading_count
        self._push(send_at, Outgoing("batch", batch.gateway, batch, historical=historical))
        if c.duplicate and rng.random() < c.duplicate:
            self._push(
                send_at + self._tick_ms // 2, Outgoing("batch", batch.gateway, batch, historical=historical)
            )
            self.expected.duplicate_readings += batch.reading_count
        self._extras(batch)

    def _skewed(self, batch: Batch) -> Batch:
        # Whole days ahead of the wall clock: far beyond any sane skew limit, and the same bytes on every
        # run of the same seed (within a day).
        skew = (max(0, self._wall_clock_ms - batch.ts_ms) // DAY_MS + 2) * DAY_MS
        points = {
            device: [DevicePoint(p.ts_ms + skew, p.values) for p in pts]
            for device, pts in batch.points.items()
        }
        # JSON rejects a skewed point (all its values); Sparkplug rejects each metric on its own.
        per_value = self._formats[batch.gateway] == "sparkplug"
        rejected = sum(len(p.values) if per_value else 1 for pts in points.values() for p in pts)
        self.expected.dead_letter(DeadLetterReason.FUTURE_TS, rejected)
        return Batch(batch.gateway, batch.ts_ms + skew, points)

    def _extras(self, batch: Batch) -> None:
        c, rng, ts, topic = self.config, self._rng, batch.ts_ms, self._topics[batch.gateway]
        device = self._devices[next(iter(batch.points))]
        if c.malformed and rng.random() < c.malformed:
            if rng.random() < 0.5:
                body = orjson.dumps({device: [{"ts": ts, "values": {"power_kw": 1.0}}]})
                self._push(ts, Outgoing("raw", batch.gateway, topic=topic, payload=body[: len(body) // 2]))
                self.expected.dead_letter(DeadLetterReason.INVALID_JSON)
            else:
                body = orjson.dumps({device: [{"ts": ts, "values": {"power_kw": "n/a"}}]})
                self._push(ts, Outgoing("raw", batch.gateway, topic=topic, payload=body))
                self.expected.dead_letter(DeadLetterReason.SCHEMA)
        if c.oversized and rng.random() < c.oversized:
            pad = b"x" * (self._max_payload + 1024)
            body = b'{"' + device.encode() + b'":[],"padding":"' + pad + b'"}'
            self._push(ts, Outgoing("raw", batch.gateway, topic=topic, payload=body))
            self.expected.dead_letter(DeadLetterReason.TOO_LARGE)
        if c.wrong_tenant and rng.random() < c.wrong_tenant:
            own = self._tenants[batch.gateway]
            others = sorted(set(self._tenants) - {own}) or [f"not-{own}"[:63]]
            foreign = topic.replace(f"/{own}/", f"/{rng.choice(others)}/", 1)
            body = orjson.dumps({device: [{"ts": ts, "values": {"power_kw": 1.0}}]})
            self._push(ts, Outgoing("raw", batch.gateway, topic=foreign, payload=body, expect_refused=True))
            self.expected.broker_refused += 1

    def due(self, now_ms: int) -> list[Outgoing]:
        """Everything whose send instant has come, oldest first."""
        out: list[Outgoing] = []
        while self._heap and self._heap[0][0] <= now_ms:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def drain(self) -> list[Outgoing]:
        out = [item[2] for item in sorted(self._heap)]
        self._heap.clear()
        return out

    @property
    def pending(self) -> int:
        return len(self._heap)
