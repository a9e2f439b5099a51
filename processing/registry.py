"""What the processor needs to know about devices, read from the registry tables and kept in memory.

Device attributes (ratings, register maximum and resolution, role, calibration) are reloaded when an
unknown device appears and every `refresh_s`; meter exchanges, multipliers and membership changes carry
a change sequence, so each batch asks only for what changed since the last one. The batch that follows a
registration therefore sees it: the exchange is committed before the simulator or gateway publishes the
reads after it.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import psycopg
from numpy.typing import NDArray

log = logging.getLogger(__name__)

DeviceKey = tuple[str, str]
SeriesKey = tuple[str, str, str]
I64 = NDArray[np.int64]
F64 = NDArray[np.float64]

_NEG_INF_MS = -(2**62)
_POS_INF_MS = 2**62


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    carrier: str
    role: str
    rated_power_kw: float | None
    register_max: float | None
    register_resolution: float
    calibration_due_ms: int | None  # readings after the end of this day are uncalibrated


@dataclass(frozen=True, slots=True)
class Membership:
    valid_from_ms: int
    valid_to_ms: int
    site: str | None
    vpp: str | None


@dataclass(slots=True)
class RegistryView:
    devices: dict[DeviceKey, DeviceInfo] = field(default_factory=dict)
    membership: dict[DeviceKey, list[Membership]] = field(default_factory=dict)
    # (tenant, device, metric) -> sorted [(ts_ms, install_read)]
    exchanges: dict[SeriesKey, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    # (tenant, device) -> sorted [(effective_from_ms, multiplier)]
    multipliers: dict[DeviceKey, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    # Exchanges loaded since the writer last looked: a register already anchored at the removal read
    # must continue from the install read.
    new_exchanges: list[tuple[SeriesKey, int, float]] = field(default_factory=list)
    _seq: dict[str, int] = field(default_factory=lambda: {"x": 0, "m": 0, "b": 0})
    _loaded_at: float = 0.0
    revision: int = 0  # bumped whenever anything that changes per-series parameters changed

    async def refresh(self, conn: psycopg.AsyncConnection[tuple[object, ...]], *, refresh_s: float) -> None:
        """Pick up changes; a full device reload only every `refresh_s` (or when asked by `missing`)."""
        if time.monotonic() - self._loaded_at > refresh_s:
            await self._load_devices(conn)
        await self._load_changes(conn)

    async def ensure(self, conn: psycopg.AsyncConnection[tuple[object, ...]], keys: set[DeviceKey]) -> None:
        if keys - self.devices.keys():
            await self._load_devices(conn)

    async def _load_devices(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        cur = await conn.execute(
            "SELECT tenant_id, device_id, carrier, role, rated_power_kw, register_max, register_resolution, "
            "calibration_due FROM devices"
        )
        devices: dict[DeviceKey, DeviceInfo] = {}
        for tenant, device, carrier, role, rated, rmax, resolution, due in await cur.fetchall():
            devices[(str(tenant), str(device))] = DeviceInfo(
                str(carrier),
                str(role),
                float(rated) if isinstance(rated, float | int) else None,
                float(rmax) if isinstance(rmax, float | int) else None,
                float(resolution) if isinstance(resolution, float | int) else 0.01,
                _end_of_day_ms(due) if isinstance(due, date) else None,
            )
        await conn.commit()
        if devices != self.devices:
            self.revision += 1
        self.devices = devices
        self._loaded_at = time.monotonic()
        log.info("registry loaded: %d devices", len(devices))

    async def _load_changes(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        changed = False
        cur = await conn.execute(
            "SELECT change_seq, tenant_id, device_id, metric, (extract(epoch FROM ts) * 1000)::bigint, install_read "
            "FROM meter_exchanges "
            "WHERE change_seq > %s ORDER BY change_seq",
            (self._seq["x"],),
        )
        for seq, tenant, device, metric, ts, install in await cur.fetchall():
            key = (str(tenant), str(device), str(metric))
            bisect.insort(self.exchanges[key], (_ms(ts), _f(install)))
            self.new_exchanges.append((key, _ms(ts), _f(install)))
            self._seq["x"] = int(str(seq))
            changed = True
        cur = await conn.execute(
            "SELECT change_seq, tenant_id, device_id, (extract(epoch FROM effective_from) * 1000)::bigint, "
            "ct_ratio * vt_ratio * meter_constant "
            "FROM meter_multipliers WHERE change_seq > %s ORDER BY change_seq",
            (self._seq["m"],),
        )
        for seq, tenant, device, since, factor in await cur.fetchall():
            bisect.insort(self.multipliers[(str(tenant), str(device))], (_ms(since), _f(factor)))
            self._seq["m"] = int(str(seq))
            changed = True
        cur = await conn.execute(
            "SELECT max(change_seq) FROM device_membership WHERE change_seq > %s", (self._seq["b"],)
        )
        row = await cur.fetchone()
        if row is not None and row[0] is not None:
            cur = await conn.execute(
                "SELECT tenant_id, device_id, (extract(epoch FROM valid_from) * 1000)::float8, "
                "(extract(epoch FROM valid_to) * 1000)::float8, site_id, vpp FROM device_membership "
                "ORDER BY tenant_id, device_id, valid_from"
            )
            membership: dict[DeviceKey, list[Membership]] = defaultdict(list)
            for tenant, device, since, until, site, vpp in await cur.fetchall():
                membership[(str(tenant), str(device))].append(
                    Membership(_ms(since), _ms(until), str(site) if site else None, str(vpp) if vpp else None)
                )
            self.membership = dict(membership)
            self._seq["b"] = int(str(row[0]))
            changed = True
        await conn.commit()
        if changed:
            self.revision += 1

    def install_read_at(self, key: SeriesKey, ts_ms: int) -> float | None:
        for ts, install in self.exchanges.get(key, ()):
            if ts == ts_ms:
                return install
        return None

    def schedules(self, key: SeriesKey, ts_ms: I64) -> tuple[F64 | None, F64 | None]:
        """For one series' reads: the install read of an exchange registered at each read's time (NaN
        where none), and the multiplier in effect; None for what the series does not have."""
        install: F64 | None = None
        multiplier: F64 | None = None
        exchanges = self.exchanges.get(key)
        if exchanges:
            at = np.array([t for t, _ in exchanges], np.int64)
            reads = np.array([r for _, r in exchanges], np.float64)
            pos = np.minimum(np.searchsorted(at, ts_ms), at.size - 1)
            install = np.where(at[pos] == ts_ms, reads[pos], np.nan)
        schedule = self.multipliers.get((key[0], key[1]))
        if schedule:
            since = np.array([t for t, _ in schedule], np.int64)
            factor = np.array([f for _, f in schedule], np.float64)
            i = np.searchsorted(since, ts_ms, side="right") - 1
            multiplier = np.where(i >= 0, factor[np.maximum(i, 0)], 1.0)
        return install, multiplier


def _ms(value: object) -> int:
    """Epoch milliseconds as the queries compute them; +-infinity (open validity) clamps to sentinels."""
    if isinstance(value, float):
        if value == float("inf"):
            return _POS_INF_MS
        if value == float("-inf"):
            return _NEG_INF_MS
        return int(value)
    if isinstance(value, int):
        return value
    raise TypeError(f"expected epoch milliseconds, got {value!r}")


def _f(value: object) -> float:
    if isinstance(value, float | int):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _end_of_day_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000) + 86_400_000
