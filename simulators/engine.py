"""The simulation: fleet state advanced tick by tick, readings out, ground truth alongside.

Power is piecewise constant over a tick, so the energy of a tick is exactly ``power * tick``. Registers
count whole units of their resolution (0.01 kWh, 0.001 GJ, ...) as real meters do: the fractional rest
is carried, never rounded away, so every register advance is an integer number of counts and the
ground truth of any interval is an exact integer difference. Faults that change what a register shows
(rollover, meter exchange, spikes) never change those counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import holidays
import numpy as np
import numpy.typing as npt

from simulators import behaviour as bh
from simulators.spec import DeviceSpec, FleetSpec

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

MINUTE_MS = 60_000
QUARTER_MS = 15 * MINUTE_MS
DAY_MS = 86_400_000
# 1970-01-01 was a Thursday; Monday = 0 as in datetime.weekday().
_EPOCH_WEEKDAY = 3
# Valley tariff hours in which batteries recharge (Shanghai and most eastern provinces: 22:00-06:00).
VALLEY_START_H, VALLEY_END_H = 22.0, 6.0
BATTERY_EFFICIENCY = 0.95  # one-way, charge or discharge
PEAK_SHAVING_THRESHOLD = 0.55  # of the site's rated feeder load
SPIKE_FACTOR = 50.0
GLITCH_HOURS = 100.0  # a glitch read jumps the register by this many hours at rated power

(K_GRID, K_FACTORY, K_COMMERCIAL, K_GAS, K_HEAT, K_DIESEL, K_BATTERY, K_PV, K_EV, K_BTS) = range(10)


def _kind(site_profile: str, device: DeviceSpec) -> int:
    if device.type == "battery":
        return K_BATTERY
    if device.type == "pv":
        return K_PV
    if device.type == "ev_charger":
        return K_EV
    if device.type == "base_station":
        return K_BTS
    if device.carrier == "natural_gas":
        return K_GAS
    if device.carrier == "heat":
        return K_HEAT
    if device.carrier == "diesel":
        return K_DIESEL
    if device.role == "grid":
        return K_GRID
    return K_COMMERCIAL if site_profile == "commercial" else K_FACTORY


@dataclass(frozen=True, slots=True)
class Register:
    """One cumulative register of one device: which device, which metric, and how it is shown."""

    device: int
    metric: str
    resolution: float
    decimals: int
    modulus: int  # register_max in counts + 1: where the display rolls over


@dataclass(slots=True)
class DevicePoint:
    """What one device reports at one instant (a JSON `{"ts", "values"}` object)."""

    ts_ms: int
    values: dict[str, float]


@dataclass(slots=True)
class Batch:
    """Everything one gateway reports at one tick, before any fault or encoding."""

    gateway: int
    ts_ms: int
    points: dict[int, list[DevicePoint]]

    @property
    def reading_count(self) -> int:
        return sum(len(p.values) for pts in self.points.values() for p in pts)


@dataclass(frozen=True, slots=True)
class MeterExchange:
    tenant: str
    device: str
    metric: str
    ts: int
    old_final: float
    new_initial: float


@dataclass(slots=True)
class ReadingFaults:
    """Per-reading fault rates the engine applies itself (message faults live in `simulators.faults`)."""

    spike: float = 0.0
    glitch: float = 0.0
    frozen: float = 0.0
    meter_exchange_per_day: float = 0.0
    frozen_readings: int = 5


@dataclass(frozen=True, slots=True)
class LoggedFault:
    fault: str
    tenant: str
    device: str
    metric: str
    ts: int
    readings: int = 1


@dataclass(slots=True)
class FaultLog:
    """Readings a correct pipeline must flag (not reject), and register events it must honour."""

    spikes: list[LoggedFault] = field(default_factory=list)
    glitches: list[LoggedFault] = field(default_factory=list)
    frozen: list[LoggedFault] = field(default_factory=list)
    exchanges: list[MeterExchange] = field(default_factory=list)


def _decimals(resolution: float) -> int:
    return max(0, -math.floor(math.log10(resolution) + 1e-9))


class Simulation:
    """Advances a fleet from `start_ms` in ticks of the shortest reading interval."""

    def __init__(self, spec: FleetSpec, start_ms: int, *, faults: ReadingFaults | None = None) -> None:
        self.spec = spec
        self.faults = faults or ReadingFaults()
        self.log = FaultLog()
        rows = list(spec.devices())
        self.devices = [d for _, _, _, d in rows]
        self.device_names = [d.device for d in self.devices]
        self.gateway_names = [g.gateway for _, _, g in spec.gateways()]
        gateway_index = {name: i for i, name in enumerate(self.gateway_names)}
        sites = [(e, s) for e in spec.enterprises for s in e.sites]
        site_index = {(e.tenant, s.site): i for i, (e, s) in enumerate(sites)}
        self.tenants = [e.tenant for e in spec.enterprises]
        tenant_index = {t: i for i, t in enumerate(self.tenants)}
        self.site_names = [s.site for _, s in sites]
        self.site_tenant = np.array([tenant_index[e.tenant] for e, _ in sites], dtype=np.int64)
        n, n_sites = len(rows), len(sites)

        self.dev_tenant = np.array([tenant_index[e.tenant] for e, _, _, _ in rows], dtype=np.int64)
        self.dev_site = np.array([site_index[(e.tenant, s.site)] for e, s, _, _ in rows], dtype=np.int64)
        self.dev_gateway = np.array([gateway_index[g.gateway] for _, _, g, _ in rows], dtype=np.int64)
        self.kind = np.array([_kind(s.profile, d) for _, s, _, d in rows], dtype=np.int64)
        self.rated = np.array([d.rated_power_kw for d in self.devices], dtype=np.float64)
        self.interval_ms = np.array([d.interval_s * 1000 for d in self.devices], dtype=np.int64)
        self.tick_ms = int(np.gcd.reduce(self.interval_ms)) if n else MINUTE_MS
        self.dt_h = self.tick_ms / 3_600_000.0

        rng = np.random.default_rng(spec.seed)
        self._rng = rng
        self.base_frac = rng.uniform(0.12, 0.25, n)
        self.production_frac = rng.uniform(0.7, 0.95, n)
        self._noise_state = np.zeros(n)
        capacity = [d.energy_capacity_kwh or 0.0 for d in self.devices]
        self.capacity = np.array(capacity, dtype=np.float64)
        self.soc_min = np.array([d.soc_min_pct for d in self.devices])
        self.soc_max = np.array([d.soc_max_pct for d in self.devices])
        self.soc = np.where(self.kind == K_BATTERY, rng.uniform(40.0, 80.0, n), 100.0)

        # Site geography, calendar and weather.
        self.lat = np.array([s.latitude for _, s in sites])
        self.lon = np.array([s.longitude for _, s in sites])
        self._site_zone = [ZoneInfo(e.timezone) for e, _ in sites]
        self._offsets_day = -1
        self.site_offset_ms = np.zeros(n_sites, dtype=np.int64)
        self.temp_anomaly = rng.normal(0.0, 2.0, n_sites)
        self.cloud = rng.uniform(0.0, 0.6, n_sites)
        self.shift_start = np.full((n_sites, 3), np.nan)
        self.shift_end = np.full((n_sites, 3), np.nan)
        self.startup = np.zeros((n_sites, 3), dtype=np.bool_)
        for i, (_, s) in enumerate(sites):
            ends = {sh.end_h % 24 for sh in s.shifts}
            for j, sh in enumerate(s.shifts[:3]):
                self.shift_start[i, j], self.shift_end[i, j] = sh.start_h, sh.end_h
                self.startup[i, j] = sh.start_h not in ends
        self.profile_commercial = np.array([s.profile == "commercial" for _, s in sites])
        self._holiday_days = self._holidays(start_ms)

        # Batteries shave their site's peak above a share of the site's rated feeder load.
        feeder = np.isin(self.kind, (K_FACTORY, K_COMMERCIAL))
        site_feeder_kw = np.bincount(self.dev_site[feeder], weights=self.rated[feeder], minlength=n_sites)
        battery = self.kind == K_BATTERY
        site_battery_kw = np.bincount(self.dev_site[battery], weights=self.rated[battery], minlength=n_sites)
        self.battery_share = np.where(
            battery, self.rated / np.maximum(site_battery_kw[self.dev_site], 1e-9), 0.0
        )
        self.site_threshold_kw = PEAK_SHAVING_THRESHOLD * site_feeder_kw

        # DR events: building loads of the event's VPP shed their share; the shed energy per device and
        # 15-minute bucket is the ground truth of what the event delivered.
        self.shed_share = np.array([d.sheddable_share for d in self.devices])
        self.max_shed_ms = np.array(
            [np.inf if d.max_shed_min is None else d.max_shed_min * MINUTE_MS for d in self.devices]
        )
        vpp_names = sorted({d.vpp for d in self.devices if d.vpp is not None})
        dev_vpp = [-1 if d.vpp is None else vpp_names.index(d.vpp) for d in self.devices]
        self.dev_vpp = np.array(dev_vpp, dtype=np.int64)
        self.dr_events = [
            (vpp_names.index(ev.vpp), int(ev.start.timestamp() * 1000), int(ev.end.timestamp() * 1000))
            for ev in spec.dr_events
            if ev.vpp in vpp_names
        ]
        self.shed_kwh: dict[int, F64] = {}

        # EV sessions: plug-in and departure instants and the energy still wanted.
        self.ev_arrive = np.zeros(n, dtype=np.int64)
        self.ev_depart = np.zeros(n, dtype=np.int64)
        self.ev_need_kwh = np.zeros(n)
        self._site_day = np.full(n_sites, -1, dtype=np.int64)

        # Registers: import-side first (the device's own carrier), then export where the device has one.
        self.registers: list[Register] = []
        import_reg = np.full(n, -1, dtype=np.int64)
        export_reg = np.full(n, -1, dtype=np.int64)
        initial: list[int] = []
        for i, d in enumerate(self.devices):
            for metric in d.register_metrics:
                modulus = round(d.register_max / d.register_resolution) + 1
                (export_reg if metric == "energy_export_kwh" else import_reg)[i] = len(self.registers)
                self.registers.append(
                    Register(i, metric, d.register_resolution, _decimals(d.register_resolution), modulus)
                )
                initial.append(
                    round(d.initial_register / d.register_resolution) if metric != "energy_export_kwh" else 0
                )
        self.import_reg, self.export_reg = import_reg, export_reg
        n_regs = len(self.registers)
        self.counts = np.zeros(n_regs, dtype=np.int64)  # true advance since start, never shown directly
        self._frac = np.zeros(n_regs)
        self.display_base = np.array(initial, dtype=np.int64)  # what the register showed at start
        self.reg_modulus = np.array([r.modulus for r in self.registers], dtype=np.int64)
        self.reg_resolution = np.array([r.resolution for r in self.registers])
        self.reg_device = np.array([r.device for r in self.registers], dtype=np.int64)

        self._frozen_left = np.zeros(n, dtype=np.int64)
        self._frozen_value: dict[int, dict[str, float]] = {}
        self.ts_ms = start_ms
        self.start_ms = start_ms

    # --- calendar -------------------------------------------------------------------------------

    def _holidays(self, start_ms: int) -> I64:
        year = datetime.fromtimestamp(start_ms / 1000, UTC).year
        cn = holidays.country_holidays("CN", years=range(year - 1, year + 3))
        return np.array(sorted((d - date(1970, 1, 1)).days for d in cn), dtype=np.int64)

    def _refresh_offsets(self, ts_ms: int) -> None:
        day = ts_ms // DAY_MS
        if day == self._offsets_day:
            return
        instant = datetime.fromtimestamp(ts_ms / 1000, UTC)
        self.site_offset_ms = np.array(
            [int(instant.astimezone(z).utcoffset().total_seconds() * 1000) for z in self._site_zone],  # type: ignore[union-attr]
            dtype=np.int64,
        )
        self._offsets_day = day

    # --- one tick ----------------------------------------------------------------------------------

    def step(self) -> tuple[list[Batch], I64 | None]:
        """Report at the current instant, then advance one tick.

        Returns the gateways' batches and, when the instant is a minute boundary, the register counts
        at that boundary (the ground truth's snapshot).
        """
        ts = self.ts_ms
        self._refresh_offsets(ts)
        power, soc_report = self._power(ts)
        snapshot = self.counts.copy() if ts % MINUTE_MS == 0 else None
        batches = self._report(ts, power, soc_report)
        self._advance(power)
        self.ts_ms = ts + self.tick_ms
        return batches, snapshot

    def _noise(self, scale: float) -> F64:
        self._noise_state = 0.9 * self._noise_state + scale * self._rng.standard_normal(
            self._noise_state.shape
        )
        result: F64 = 1.0 + self._noise_state
        return result

    def _power(self, ts: int) -> tuple[F64, F64]:
        """Power of every device over [ts, ts + tick): kW for electricity, unit per hour otherwise.

        Sign follows the contract: positive imports (consumes), negative exports (generates)."""
        k, site = self.kind, self.dev_site
        local_ms = ts + self.site_offset_ms
        local_day = local_ms // DAY_MS
        local_hour = (local_ms % DAY_MS) / 3_600_000.0
        weekday = (local_day + _EPOCH_WEEKDAY) % 7
        holiday = np.isin(local_day, self._holiday_days)
        day = bh.day_factor(weekday, holiday)
        in_window = (self.shift_start <= local_hour[:, None]) & (local_hour[:, None] < self.shift_end)
        in_shift = np.asarray(in_window.any(axis=1), dtype=np.bool_)
        since = np.where(in_window & self.startup, (local_hour[:, None] - self.shift_start) * 60.0, np.inf)
        minutes_since_startup = np.where(np.isfinite(since.min(axis=1)), since.min(axis=1), -1.0)
        workday = (weekday < 5) & ~holiday
        occupied = np.where(
            workday,
            np.where(
                (local_hour >= 8) & (local_hour < 20),
                1.0,
                np.where((local_hour >= 7) & (local_hour < 8), 0.5, 0.0),
            ),
            np.where((weekday == 5) & ~holiday & (local_hour >= 9) & (local_hour < 14), 0.6, 0.0),
        )
        day_of_year = (ts / DAY_MS) % 365.2422
        self.temp_anomaly = 0.999 * self.temp_anomaly + 0.05 * self._rng.standard_normal(
            self.temp_anomaly.shape
        )
        outdoor = bh.outdoor_temperature_c(self.lat, day_of_year, local_hour, self.temp_anomaly)
        self.cloud = np.clip(self.cloud + 0.03 * self._rng.standard_normal(self.cloud.shape), 0.0, 1.0)
        sin_elev = bh.solar_sin_elevation(ts / 1000.0, self.lat, self.lon)
        noise = self._noise(0.004)

        p = np.zeros(len(k))
        m = k == K_FACTORY
        p[m] = bh.factory_load_kw(
            self.rated[m], self.base_frac[m], self.production_frac[m], in_shift[site[m]],
            minutes_since_startup[site[m]], day[site[m]], noise[m],
        )  # fmt: skip
        m = k == K_COMMERCIAL
        p[m] = bh.commercial_load_kw(
            self.rated[m], self.base_frac[m], occupied[site[m]], outdoor[site[m]], noise[m]
        )
        m = k == K_GAS
        p[m] = bh.gas_flow_per_h(self.rated[m], in_shift[site[m]], day[site[m]], noise[m])
        m = k == K_HEAT
        p[m] = bh.heat_flow_per_h(self.rated[m], occupied[site[m]], outdoor[site[m]], noise[m])
        m = k == K_DIESEL
        p[m] = 0.02 * self.rated[m] * noise[m]
        m = k == K_BTS
        p[m] = bh.base_station_kw(self.rated[m], local_hour[site[m]], noise[m])
        m = k == K_PV
        generation = bh.pv_output_kw(self.rated[m], sin_elev[site[m]], self.cloud[site[m]])
        standby = 0.002 * self.rated[m]
        p[m] = np.where(generation > standby, -generation, standby)
        m = k == K_EV
        p[m] = self._ev_power(ts, m, local_day, site)
        if self.dr_events:
            self._shed(ts, p)

        # Batteries see their site's load after everything else behind the same grid meter.
        electric_load = np.isin(k, (K_FACTORY, K_COMMERCIAL, K_BTS, K_PV, K_EV))
        site_load = np.bincount(site[electric_load], weights=p[electric_load], minlength=len(self.lat))
        m = k == K_BATTERY
        if m.any():
            valley = (local_hour >= VALLEY_START_H) | (local_hour < VALLEY_END_H)
            charge, discharge = bh.peak_shaving(
                site_load[site[m]] * self.battery_share[m],
                self.site_threshold_kw[site[m]] * self.battery_share[m],
                valley[site[m]], self.rated[m], self.capacity[m], self.soc[m],
                self.soc_min[m], self.soc_max[m], self.dt_h, BATTERY_EFFICIENCY,
            )  # fmt: skip
            p[m] = charge - discharge
        soc_report = self.soc.copy()
        if m.any():
            delta_kwh = (
                np.maximum(p[m], 0.0) * BATTERY_EFFICIENCY - np.maximum(-p[m], 0.0) / BATTERY_EFFICIENCY
            ) * self.dt_h
            self.soc[m] = np.clip(self.soc[m] + 100.0 * delta_kwh / self.capacity[m], 0.0, 100.0)

        behind_meter = electric_load | (k == K_BATTERY)
        net = np.bincount(site[behind_meter], weights=p[behind_meter], minlength=len(self.lat))
        m = k == K_GRID
        p[m] = net[site[m]]
        return p, soc_report

    def _shed(self, ts: int, p: F64) -> None:
        """Building loads of a VPP in a DR event drop their sheddable share of the load over [ts, ts + tick)."""
        shedding = np.zeros(p.size, dtype=np.bool_)
        for vpp, start, end in self.dr_events:
            if start <= ts < end:
                # A building sheds for at most its maximum duration, then takes its load back.
                shedding |= (self.dev_vpp == vpp) & (ts - start < self.max_shed_ms)
        shedding &= self.shed_share > 0
        if not shedding.any():
            return
        shed = np.where(shedding, self.shed_share * np.maximum(p, 0.0), 0.0)
        p -= shed
        bucket = ts - ts % QUARTER_MS
        booked = self.shed_kwh.setdefault(bucket, np.zeros(p.size))
        booked += shed * self.dt_h

    def _ev_power(self, ts: int, m: npt.NDArray[np.bool_], local_day: I64, site: I64) -> F64:
        """Chargers plug in once per local day with some probability, charge at their rating until the
        energy wanted is delivered or the car leaves."""
        new_day = local_day[site[m]] != self._site_day[site[m]]
        if new_day.any():
            count = int(m.sum())
            plug = self._rng.random(count)
            arrive_h = self._rng.uniform(7.0, 10.0, count)
            dwell_h = self._rng.uniform(3.0, 9.0, count)
            need = self._rng.uniform(5.0, 60.0, count)
            weekday = (local_day[site[m]] + _EPOCH_WEEKDAY) % 7
            chance = np.where(weekday < 5, 0.75, 0.25)
            midnight_utc = local_day[site[m]] * DAY_MS - self.site_offset_ms[site[m]]
            arrive = midnight_utc + (arrive_h * 3_600_000).astype(np.int64)
            depart = arrive + (dwell_h * 3_600_000).astype(np.int64)
            wanted = np.where(plug < chance, np.minimum(need, self.rated[m] * dwell_h * 0.9), 0.0)
            idx = np.flatnonzero(m)[new_day]
            self.ev_arrive[idx] = arrive[new_day]
            self.ev_depart[idx] = depart[new_day]
            self.ev_need_kwh[idx] = wanted[new_day]
            changed = np.unique(site[m][new_day])
            self._site_day[changed] = local_day[changed]
        plugged = (self.ev_arrive[m] <= ts) & (ts < self.ev_depart[m])
        power = np.where(plugged, np.minimum(self.rated[m], self.ev_need_kwh[m] / self.dt_h), 0.0)
        self.ev_need_kwh[m] -= power * self.dt_h
        result: F64 = power
        return result

    def _advance(self, power: F64) -> None:
        has_import = self.import_reg >= 0
        has_export = self.export_reg >= 0
        increment = np.zeros(len(self.registers))
        increment[self.import_reg[has_import]] = np.maximum(power[has_import], 0.0)
        increment[self.export_reg[has_export]] = np.maximum(-power[has_export], 0.0)
        self._frac += increment * self.dt_h / self.reg_resolution
        whole = np.floor(self._frac)
        self._frac -= whole
        self.counts += whole.astype(np.int64)

    def display_counts(self) -> I64:
        """What each register shows now: its start value plus the true advance, wrapped at its maximum."""
        result: I64 = (self.display_base + self.counts) % self.reg_modulus
        return result

    # --- reporting -------------------------------------------------------------------------------

    def _report(self, ts: int, power: F64, soc: F64) -> list[Batch]:
        due = np.flatnonzero(ts % self.interval_ms == 0)
        if due.size == 0:
            return []
        shown = self.display_counts()
        register_values: dict[int, dict[str, float]] = {}
        for r_idx in np.flatnonzero(np.isin(self.reg_device, due)).tolist():
            reg = self.registers[r_idx]
            register_values.setdefault(reg.device, {})[reg.metric] = round(
                int(shown[r_idx]) * reg.resolution, reg.decimals
            )
        power_r = np.round(power, 3).tolist()
        soc_r = np.round(soc, 1).tolist()
        kind = self.kind.tolist()
        batches: dict[int, Batch] = {}
        f = self.faults
        draws = self._rng.random((due.size, 3)) if (f.spike or f.glitch or f.frozen) else None
        for j, i in enumerate(due.tolist()):
            values = dict(register_values.get(i, {}))
            k = kind[i]
            if k in (K_GRID, K_FACTORY, K_COMMERCIAL, K_BATTERY, K_PV, K_EV, K_BTS):
                values["power_kw"] = power_r[i]
            if k in (K_BATTERY, K_BTS):
                values["soc_pct"] = soc_r[i]
            points = [DevicePoint(ts, values)]
            if draws is not None:
                self._reading_faults(i, ts, values, points, draws[j])
            batch = batches.get(int(self.dev_gateway[i]))
            if batch is None:
                batch = batches[int(self.dev_gateway[i])] = Batch(int(self.dev_gateway[i]), ts, {})
            batch.points[i] = points
        self._exchanges(ts, due)
        return list(batches.values())

    def _reading_faults(
        self, i: int, ts: int, values: dict[str, float], points: list[DevicePoint], draw: F64
    ) -> None:
        f, name = self.faults, self.device_names[i]
        tenant = self.tenants[int(self.dev_tenant[i])]
        if "power_kw" in values:
            if self._frozen_left[i] > 0:
                self._frozen_left[i] -= 1
                values.update(self._frozen_value[i])
            elif draw[2] < f.frozen:
                self._frozen_left[i] = f.frozen_readings - 1
                frozen = {m: v for m, v in values.items() if m in ("power_kw", "soc_pct")}
                self._frozen_value[i] = frozen
                for metric in frozen:
                    self.log.frozen.append(LoggedFault("frozen", tenant, name, metric, ts, f.frozen_readings))
            elif draw[0] < f.spike:
                values["power_kw"] = round(float(self.rated[i]) * SPIKE_FACTOR, 3)
                self.log.spikes.append(LoggedFault("spike", tenant, name, "power_kw", ts))
        if draw[1] < f.glitch and self.import_reg[i] >= 0:
            reg = self.registers[int(self.import_reg[i])]
            glitch_ts = ts + int(self.interval_ms[i]) // 2
            glitched = round(values[reg.metric] + float(self.rated[i]) * GLITCH_HOURS, reg.decimals)
            # No register shows more than its maximum: the collector refuses such a read (out_of_range),
            # so it could not test the processor's plausibility check.
            if glitched <= (reg.modulus - 1) * reg.resolution:
                points.append(DevicePoint(glitch_ts, {reg.metric: glitched}))
                self.log.glitches.append(LoggedFault("glitch", tenant, name, reg.metric, glitch_ts))

    def _exchanges(self, ts: int, due: I64) -> None:
        """Swap meters after their reading at `ts`: the old meter's last read is what was just reported,
        the new meter starts near zero."""
        rate = self.faults.meter_exchange_per_day
        if not rate:
            return
        per_reading = rate * self.tick_ms / DAY_MS
        hits = due[self._rng.random(due.size) < per_reading]
        for i in hits.tolist():
            for r_idx in (int(self.import_reg[i]), int(self.export_reg[i])):
                if r_idx < 0:
                    continue
                reg = self.registers[r_idx]
                old = int((self.display_base[r_idx] + self.counts[r_idx]) % reg.modulus)
                new = int(self._rng.integers(0, 100))
                self.display_base[r_idx] = new - self.counts[r_idx]
                self.log.exchanges.append(
                    MeterExchange(
                        self.tenants[int(self.dev_tenant[i])], self.device_names[i], reg.metric, ts,
                        round(old * reg.resolution, reg.decimals), round(new * reg.resolution, reg.decimals),
                    )
                )  # fmt: skip

    def run(self, end_ms: int) -> Iterator[tuple[list[Batch], I64 | None, int]]:
        """Steps up to and including `end_ms`, whose readings close the last bucket."""
        while self.ts_ms <= end_ms:
            ts = self.ts_ms
            batches, snapshot = self.step()
            yield batches, snapshot, ts
