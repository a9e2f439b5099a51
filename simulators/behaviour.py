"""How simulated loads and resources behave: pure functions over numpy arrays, no state, no I/O.

Every function takes the per-device (or per-site) parameters and the local calendar features of the
current instant, and returns power. The engine owns state (registers, state of charge, EV sessions)
and randomness, so these models stay easy to read and to test one by one.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
B = npt.NDArray[np.bool_]

# Fraction of production load a factory keeps on a Saturday, Sunday or public holiday.
SATURDAY_FACTOR = 0.6
SUNDAY_FACTOR = 0.25
HOLIDAY_FACTOR = 0.1
# Motors, compressors and furnaces starting together after a shutdown: peak above the running load,
# decaying over minutes.
STARTUP_PEAK = 0.4
STARTUP_DECAY_MIN = 5.0
PV_DERATE = 0.85  # inverter, wiring and soiling losses of a typical rooftop system
SOLAR_CONSTANT_W_M2 = 1000.0


def day_factor(weekday: npt.NDArray[np.int64], holiday: B) -> F64:
    """Production intensity by calendar day (Monday = 0)."""
    factor = np.where(weekday == 5, SATURDAY_FACTOR, np.where(weekday == 6, SUNDAY_FACTOR, 1.0))
    return np.where(holiday, HOLIDAY_FACTOR, factor)


def factory_load_kw(
    rated_kw: F64,
    base_frac: F64,
    production_frac: F64,
    in_shift: B,
    minutes_since_startup: F64,
    day: F64,
    noise: F64,
) -> F64:
    """A production line: base load always, production load in shifts, a start-up peak after a stop."""
    production = np.where(in_shift, (production_frac - base_frac) * day, 0.0)
    startup = np.where(
        in_shift & (minutes_since_startup >= 0),
        STARTUP_PEAK * np.exp(-minutes_since_startup / STARTUP_DECAY_MIN),
        0.0,
    )
    return rated_kw * np.clip((base_frac + production) * (1.0 + startup) * noise, 0.0, 1.0)


def commercial_load_kw(rated_kw: F64, base_frac: F64, occupied: F64, outdoor_c: F64, noise: F64) -> F64:
    """An office or mall feeder: base load, lighting and plug loads when occupied, and HVAC that works
    harder the further the outdoor temperature is from the comfort band (cooling above 22 C, electric
    heating below 14 C). `occupied` is 0..1 so pre-conditioning can run at part load."""
    lighting = 0.35 * occupied
    hvac = occupied * np.minimum(
        0.6, 0.04 * np.maximum(0.0, outdoor_c - 22.0) + 0.03 * np.maximum(0.0, 14.0 - outdoor_c)
    )
    return rated_kw * np.clip((base_frac + lighting + hvac) * noise, 0.0, 1.0)


def heat_flow_per_h(rated_per_h: F64, occupied: F64, outdoor_c: F64, noise: F64) -> F64:
    """District heat drawn by a building: proportional to the heating degree below 18 C."""
    demand = np.clip((18.0 - outdoor_c) / 20.0, 0.0, 1.0)
    return rated_per_h * demand * (0.4 + 0.6 * occupied) * noise


def gas_flow_per_h(rated_per_h: F64, in_shift: B, day: F64, noise: F64) -> F64:
    """Process gas (boilers, kilns): a pilot flow always, production flow in shifts."""
    return rated_per_h * (0.1 + 0.8 * np.where(in_shift, day, 0.0)) * noise


def base_station_kw(rated_kw: F64, local_hour: F64, noise: F64) -> F64:
    """A 5G base station: near-constant, with a traffic bump in the day and a trough before dawn."""
    traffic = 0.5 * (1.0 - np.cos(2.0 * np.pi * (local_hour - 4.0) / 24.0))
    return rated_kw * (0.55 + 0.1 * traffic) * noise


def solar_sin_elevation(utc_s: float, latitude_deg: F64, longitude_deg: F64) -> F64:
    """Sine of the sun's elevation from declination and hour angle (Cooper's declination formula).

    Accurate to about a degree, which is more than enough for load shapes."""
    day_of_year = (utc_s / 86_400.0) % 365.2422
    declination = np.radians(23.44) * np.sin(2.0 * np.pi * (284.0 + day_of_year) / 365.0)
    solar_hour = (utc_s / 3600.0 + longitude_deg / 15.0) % 24.0
    hour_angle = np.radians(15.0 * (solar_hour - 12.0))
    lat = np.radians(latitude_deg)
    result: F64 = np.sin(lat) * np.sin(declination) + np.cos(lat) * np.cos(declination) * np.cos(hour_angle)
    return result


def pv_output_kw(rated_kw: F64, sin_elevation: F64, cloud_cover: F64) -> F64:
    """Generation from clear-sky irradiance scaled by cloud cover (Kasten-Czeplak attenuation)."""
    clear_sky = SOLAR_CONSTANT_W_M2 * np.power(np.clip(sin_elevation, 0.0, 1.0), 1.15)
    attenuation = 1.0 - 0.75 * np.power(np.clip(cloud_cover, 0.0, 1.0), 3.4)
    return rated_kw * PV_DERATE * clear_sky * attenuation / SOLAR_CONSTANT_W_M2


def outdoor_temperature_c(latitude_deg: F64, day_of_year: float, local_hour: F64, anomaly_c: F64) -> F64:
    """Seasonal and daily temperature cycle for a mid-latitude Chinese city plus a weather anomaly:
    coldest mid-January and before dawn, warmest mid-July and mid-afternoon."""
    annual_mean = 27.0 - 0.33 * latitude_deg
    seasonal = (6.0 + 0.25 * latitude_deg) * -np.cos(2.0 * np.pi * (day_of_year - 15.0) / 365.0)
    daily = 4.0 * np.cos(2.0 * np.pi * (local_hour - 15.0) / 24.0)
    result: F64 = annual_mean + seasonal + daily + anomaly_c
    return result


def peak_shaving(
    site_load_kw: F64,
    threshold_kw: F64,
    valley: B,
    rated_kw: F64,
    capacity_kwh: F64,
    soc_pct: F64,
    soc_min_pct: F64,
    soc_max_pct: F64,
    dt_h: float,
    efficiency: float,
) -> tuple[F64, F64]:
    """A battery shaving its site's peak: discharge the load above the threshold while energy is left
    above the minimum state of charge; recharge in the valley tariff period below the threshold.

    Inputs are per battery (the site load and threshold already shared out by rating). Returns
    (charge_kw, discharge_kw), both >= 0 and never both positive.
    """
    available_kwh = np.maximum(0.0, (soc_pct - soc_min_pct) / 100.0 * capacity_kwh) * efficiency
    room_kwh = np.maximum(0.0, (soc_max_pct - soc_pct) / 100.0 * capacity_kwh) / efficiency
    excess = np.maximum(0.0, site_load_kw - threshold_kw)
    discharge = np.minimum(np.minimum(excess, rated_kw), available_kwh / dt_h)
    headroom = np.maximum(0.0, threshold_kw - site_load_kw)
    charge = np.where(
        valley & (excess <= 0.0), np.minimum(np.minimum(headroom, rated_kw), room_kwh / dt_h), 0.0
    )
    return charge, discharge
