"""Who owns what: the collector's view of the registry (gateways and devices) the API writes.

The broker's ACL already keeps a gateway on its own topics; this is the second line, and the one that
catches a valid gateway naming a device of another tenant. A device's registration also bounds its
readings where it can: power beyond its rated power (times a wide factor) or a register beyond its
register_max is out_of_range. The whole registry is held in memory and reloaded periodically; a
device not yet known is looked up once on first sight (a device registered a second ago must not be
dead-lettered), with a short negative cache so a flood of readings for an unregistered device costs
one query per interval, not one per message.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterable
from typing import Final, NamedTuple

import psycopg
from psycopg.rows import TupleRow

from ingest.payloads import ParseResult, Rejection
from meterflow.contract import (
    CANONICAL_METRICS,
    RATED_POWER_METRICS,
    DeadLetterReason,
    DeviceReadings,
    MetricKind,
    Reading,
)

log = logging.getLogger(__name__)

_REGISTERS: Final = frozenset(m for m, kind in CANONICAL_METRICS.items() if kind is MetricKind.CUMULATIVE)


class Ownership(enum.Enum):
    OWNED = "owned"
    UNKNOWN = "unknown"
    OTHER_TENANT = "other_tenant"


class DeviceBounds(NamedTuple):
    """What a device's registration says its readings can be (None: no bound registered)."""

    power_kw: float | None  # |power-like metrics| at most this: rated power x rated_power_factor
    register_max: float | None  # cumulative registers read 0 .. register_max


_DEVICE_COLUMNS: Final = "device_id, tenant_id, rated_power_kw, register_max"


class Registry:
    def __init__(
        self,
        conninfo: str,
        *,
        refresh_s: float = 60.0,
        negative_ttl_s: float = 10.0,
        rated_power_factor: float = 100.0,
        max_misses: int = 100_000,
    ) -> None:
        self._conninfo = conninfo
        self._max_misses = max_misses
        self._refresh_s = refresh_s
        self._negative_ttl_s = negative_ttl_s
        self._rated_power_factor = rated_power_factor
        self._gateways: dict[str, str] = {}
        self._devices: dict[str, set[str]] = {}
        self._bounds: dict[tuple[str, str], DeviceBounds] = {}
        self._misses: dict[tuple[str, str], float] = {}
        self._conn: psycopg.AsyncConnection[TupleRow] | None = None
        self._loaded_at = 0.0

    async def _connection(self) -> psycopg.AsyncConnection[TupleRow]:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
        return self._conn

    async def load(self) -> None:
        """Read every enabled gateway and every device."""
        conn = await self._connection()
        gateways = await (
            await conn.execute("SELECT gateway_id, tenant_id FROM gateways WHERE enabled")
        ).fetchall()
        devices = await (await conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices")).fetchall()
        self._gateways = {str(gateway): str(tenant) for gateway, tenant in gateways}
        self._devices = {}
        self._bounds = {}
        for row in devices:
            self._add_device(row)
        self._misses.clear()
        self._loaded_at = time.monotonic()
        log.info("registry loaded: %d gateways, %d devices", len(self._gateways), len(devices))

    async def refresh_if_due(self) -> None:
        if time.monotonic() - self._loaded_at >= self._refresh_s:
            try:
                await self.load()
            except psycopg.Error as exc:
                # Keep serving from the last good copy; the next message retries.
                log.warning("registry reload failed (%s); keeping the previous one", exc)
                self._loaded_at = time.monotonic() - self._refresh_s / 2

    async def look_up(self, tenant: str, gateway: str, devices: Iterable[str]) -> None:
        """Fetch a gateway or devices not held yet (unless recently found missing), so that a
        registration made after the last reload counts at once."""
        now = time.monotonic()
        gateway_wanted = self._gateways.get(gateway) != tenant and self._misses.get(("", gateway), 0.0) <= now
        wanted = [
            d
            for d in devices
            if tenant not in self._devices.get(d, ()) and self._misses.get((tenant, d), 0.0) <= now
        ]
        if not wanted and not gateway_wanted:
            return
        try:
            conn = await self._connection()
            if gateway_wanted:
                row = await (
                    await conn.execute(
                        "SELECT tenant_id FROM gateways WHERE gateway_id = %s AND enabled", (gateway,)
                    )
                ).fetchone()
                if row is None:
                    self._gateways.pop(gateway, None)
                    self._miss(("", gateway), now)
                else:
                    self._gateways[gateway] = row[0]
            if wanted:
                rows = await (
                    await conn.execute(
                        f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ANY(%s)", (wanted,)
                    )
                ).fetchall()
                for row in rows:
                    self._add_device(row)
        except psycopg.Error as exc:
            log.warning("registry lookup failed (%s); deciding from the cached registry", exc)
            return
        for device in wanted:
            if tenant not in self._devices.get(device, ()):
                self._miss((tenant, device), now)

    def _miss(self, key: tuple[str, str], now: float) -> None:
        """Remember a miss; ids are attacker-chosen, so the oldest are forgotten past `max_misses`
        (a forgotten id costs one more lookup, never a wrong answer)."""
        self._misses.pop(key, None)
        self._misses[key] = now + self._negative_ttl_s
        while len(self._misses) > self._max_misses:
            del self._misses[next(iter(self._misses))]

    def _add_device(self, row: TupleRow) -> None:
        device, tenant, rated_power_kw, register_max = row
        self._devices.setdefault(device, set()).add(tenant)
        if rated_power_kw is not None or register_max is not None:
            power = None if rated_power_kw is None else abs(rated_power_kw) * self._rated_power_factor
            self._bounds[(tenant, device)] = DeviceBounds(power, register_max)
        else:
            self._bounds.pop((tenant, device), None)

    def bounds(self, tenant: str, device: str) -> DeviceBounds | None:
        return self._bounds.get((tenant, device))

    def gateway_owner(self, gateway: str) -> str | None:
        return self._gateways.get(gateway)

    def ownership(self, tenant: str, device: str) -> Ownership:
        owners = self._devices.get(device)
        if not owners:
            return Ownership.UNKNOWN
        return Ownership.OWNED if tenant in owners else Ownership.OTHER_TENANT

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


def check_ownership(
    result: ParseResult, tenant: str, gateway: str, registry: Registry, *, reject_unknown_metrics: bool
) -> tuple[ParseResult, int]:
    """Apply the registry to a parsed message: the gateway must belong to the topic's tenant, each
    device to the tenant, and (when configured) each metric must be canonical.

    Returns the checked result and how many readings carry a metric outside the canonical set (kept
    and counted when not rejected).
    """
    checked = ParseResult(rejected=list(result.rejected))
    owner = registry.gateway_owner(gateway)
    if owner != tenant:
        detail = f"gateway {gateway!r} is not registered to tenant {tenant!r}"
        for device_readings in result.accepted:
            checked.rejected.append(
                Rejection(DeadLetterReason.TENANT_MISMATCH, detail, device_readings.device)
            )
        return checked, 0
    unknown_metric_readings = 0
    for device_readings in result.accepted:
        ownership = registry.ownership(tenant, device_readings.device)
        if ownership is Ownership.OTHER_TENANT:
            detail = f"device {device_readings.device!r} belongs to another tenant"
            checked.rejected.append(
                Rejection(DeadLetterReason.TENANT_MISMATCH, detail, device_readings.device)
            )
            continue
        if ownership is Ownership.UNKNOWN:
            detail = f"device {device_readings.device!r} is not registered for tenant {tenant!r}"
            checked.rejected.append(
                Rejection(DeadLetterReason.UNKNOWN_DEVICE, detail, device_readings.device)
            )
            continue
        bounds = registry.bounds(tenant, device_readings.device)
        if bounds is not None:
            device_readings = _within_bounds(device_readings, bounds, checked.rejected)
            if not device_readings.readings:
                continue
        unknown = [r for r in device_readings.readings if r.metric not in CANONICAL_METRICS]
        if not unknown:
            checked.accepted.append(device_readings)
        elif not reject_unknown_metrics:
            unknown_metric_readings += len(unknown)
            checked.accepted.append(device_readings)
        else:
            checked.rejected += [
                Rejection(DeadLetterReason.UNKNOWN_METRIC, r.metric, device_readings.device) for r in unknown
            ]
            kept = tuple(r for r in device_readings.readings if r.metric in CANONICAL_METRICS)
            if kept:
                checked.accepted.append(device_readings._replace(readings=kept))
    return checked, unknown_metric_readings


def _within_bounds(
    device_readings: DeviceReadings, bounds: DeviceBounds, rejected: list[Rejection]
) -> DeviceReadings:
    """The readings the device's registration allows; the others are out_of_range rejections."""
    kept: list[Reading] = []
    for reading in device_readings.readings:
        metric, value = reading.metric, reading.value
        if bounds.power_kw is not None and metric in RATED_POWER_METRICS and abs(value) > bounds.power_kw:
            limit = f"|{metric}| <= {bounds.power_kw!r} (rated power x factor)"
        elif bounds.register_max is not None and metric in _REGISTERS and value > bounds.register_max:
            limit = f"{metric} <= register_max {bounds.register_max!r}"
        else:
            kept.append(reading)
            continue
        detail = f"{metric}={value!r} at ts {reading.ts_ms} outside {limit}"
        rejected.append(
            Rejection(DeadLetterReason.OUT_OF_RANGE, detail, device_readings.device, metric=metric)
        )
    if len(kept) == len(device_readings.readings):
        return device_readings
    return device_readings._replace(readings=tuple(kept))


async def wait_loaded(registry: Registry, stop: asyncio.Event) -> None:
    """Load the registry, retrying while the database is unreachable (the collector must not start
    deciding ownership from an empty registry)."""
    delay = 1.0
    while not stop.is_set():
        try:
            await registry.load()
            return
        except psycopg.Error as exc:
            log.warning("registry not readable (%s); retrying in %.0f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30)
