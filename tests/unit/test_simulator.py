"""The simulator's promises: deterministic, registers integrate power exactly, and the ground truth
holds under every fault, as a correct pipeline reading what was published would reconstruct it."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ingest.payloads import Limits, parse_message
from meterflow import sparkplug
from meterflow.contract import now_ms, parse_telemetry_topic
from simulators import behaviour as bh
from simulators.faults import FaultConfig, arm_rollovers
from simulators.runner import RunOptions, RunResult, run
from simulators.spec import FleetSpec, generate_fleet
from tests.truthcheck import assert_counts_match, fleet_devices, register_minute_counts, truth_minute_counts

START_MS = 1_767_225_600_000 - 8 * 3_600_000  # 2026-01-01 00:00 Asia/Shanghai, a public holiday
LIMITS = Limits(max_payload_bytes=256 * 1024, max_future_skew_ms=300_000)
Published = list[tuple[int, str, bytes]]


def simulate(
    spec: FleetSpec,
    tmp_path: Path,
    *,
    hours: float = 3,
    faults: FaultConfig | None = None,
    start_ms: int = START_MS,
) -> tuple[Published, RunResult, FleetSpec]:
    """Publishes into a list; returns the stream, the run, and the fleet as registered (with any
    register faults armed)."""
    published: Published = []
    faults = faults or FaultConfig()
    armed_spec, armed = arm_rollovers(spec, faults.rollover, spec.seed)
    result = run(
        armed_spec,
        RunOptions(
            mode="backfill", start_ms=start_ms, duration_s=hours * 3600, truth_dir=tmp_path, faults=faults
        ),
        lambda g, topic, payload: published.append((g, topic, payload)),
        armed_rollovers=armed,
    )
    return published, result, armed_spec


def small_fleet(**kwargs: object) -> FleetSpec:
    params: dict[str, object] = {"enterprises": 3, "meters_per_site": 4, "vpp_resources": 12, "seed": 7}
    params.update(kwargs)
    return generate_fleet(**params)  # type: ignore[arg-type]


class Reconstruction:
    """What a correct pipeline makes of the published stream: the collector's own parser decides what
    is rejected; registers become per-minute counts with rollover and meter exchanges honoured."""

    def __init__(self, spec: FleetSpec, published: Published, truth_dir: Path) -> None:
        self.dead_letters: Counter[str] = Counter()
        self.refused = 0
        self.readings: dict[tuple[str, str, str, int], float] = {}
        self.duplicates = 0
        devices = fleet_devices(spec)
        tenant_of_gateway = {g.gateway: e.tenant for e, _, g in spec.gateways()}
        births: dict[tuple[str, str], sparkplug.AliasTable] = {}
        received_ms = self.received_ms = now_ms()
        for _, topic, payload in published:
            if topic.startswith("spBv1.0/"):
                self._sparkplug(topic, payload, births)
                continue
            parsed = parse_telemetry_topic(topic)
            assert parsed is not None, topic
            if tenant_of_gateway[parsed.gateway] != parsed.tenant:
                self.refused += 1  # the broker's ACL refuses a gateway writing under another tenant
                continue
            result = parse_message(parsed, payload, received_ms=received_ms, limits=LIMITS)
            self.dead_letters.update(r.reason.value for r in result.rejected)
            for device_readings in result.accepted:
                for r in device_readings.readings:
                    self._add((parsed.tenant, device_readings.device, r.metric, r.ts_ms), r.value)
        self.devices = devices
        self.truth_dir = truth_dir

    def _add(self, key: tuple[str, str, str, int], value: float) -> None:
        if key in self.readings:
            assert self.readings[key] == value, f"conflicting duplicate {key}"
            self.duplicates += 1
        else:
            self.readings[key] = value

    def _sparkplug(
        self, topic: str, payload: bytes, births: dict[tuple[str, str], sparkplug.AliasTable]
    ) -> None:
        parsed = sparkplug.parse_topic(topic)
        assert parsed is not None
        if parsed.device is None:
            return
        decoded = sparkplug.decode_payload(payload)
        if parsed.message_type == sparkplug.MessageType.DBIRTH:
            births[(parsed.group, parsed.device)] = sparkplug.AliasTable(decoded.metrics)
            return
        table = births[(parsed.group, parsed.device)]
        for metric in decoded.metrics:
            name = table.resolve(metric)
            assert name is not None and metric.ts_ms is not None and isinstance(metric.value, float)
            if metric.ts_ms > self.received_ms + LIMITS.max_future_skew_ms:
                self.dead_letters["future_ts"] += 1
                continue
            self._add((parsed.group, parsed.device, name, metric.ts_ms), metric.value)

    def minute_counts(self) -> dict[tuple[str, str, str, int], int]:
        return register_minute_counts(self.readings, self.devices, self.truth_dir)


def assert_truth_holds(spec: FleetSpec, published: Published, truth_dir: Path) -> Reconstruction:
    rebuilt = Reconstruction(spec, published, truth_dir)
    assert_counts_match(truth_minute_counts(truth_dir), rebuilt.minute_counts())
    return rebuilt


# --- determinism and exactness ---------------------------------------------------------------------


def test_same_seed_same_stream_and_truth(tmp_path: Path) -> None:
    faults = FaultConfig.all(3.0)
    a, _, _ = simulate(small_fleet(), tmp_path / "a", faults=faults)
    b, _, _ = simulate(small_fleet(), tmp_path / "b", faults=faults)
    assert a == b
    assert pl.read_parquet(tmp_path / "a" / "energy_15m.parquet").equals(
        pl.read_parquet(tmp_path / "b" / "energy_15m.parquet")
    )
    c, _, _ = simulate(small_fleet(seed=8), tmp_path / "c", faults=faults)
    assert a != c


def test_registers_integrate_reported_power(tmp_path: Path) -> None:
    """Over each minute, a register advances by the power held through it, to the register's resolution."""
    spec = small_fleet()
    published, _, spec = simulate(spec, tmp_path)
    rebuilt = assert_truth_holds(spec, published, tmp_path)
    checked = 0
    for (tenant, device, metric, ts), counts in rebuilt.minute_counts().items():
        d = rebuilt.devices[(tenant, device)]
        if d.carrier != "electricity":
            continue
        power = rebuilt.readings[(tenant, device, "power_kw", ts)]
        expected_kwh = max(power if metric == "energy_import_kwh" else -power, 0.0) / 60.0
        # power is reported to 1 W; the register carries its sub-resolution rest between minutes
        assert abs(counts * d.register_resolution - expected_kwh) <= d.register_resolution + 0.001 / 60
        checked += 1
    assert checked > 1000


def test_15_minute_truth_is_the_sum_of_its_minutes(tmp_path: Path) -> None:
    simulate(small_fleet(), tmp_path)
    one = pl.read_parquet(tmp_path / "energy_1m" / "*.parquet")
    fifteen = pl.read_parquet(tmp_path / "energy_15m.parquet")
    summed = (
        one.with_columns(pl.col("bucket_start").dt.truncate("15m"))
        .group_by("tenant", "device", "metric", "bucket_start")
        .agg(pl.col("counts").sum())
    )
    joined = fifteen.join(summed, on=["tenant", "device", "metric", "bucket_start"], suffix="_1m")
    assert joined.height == fifteen.height == summed.height
    assert (joined["counts"] == joined["counts_1m"]).all()


def test_daily_emissions_follow_the_boundary_meters(tmp_path: Path) -> None:
    spec = small_fleet()
    simulate(spec, tmp_path, hours=24)
    daily = pl.read_parquet(tmp_path / "emissions_daily.parquet")
    one = pl.read_parquet(tmp_path / "energy_1m" / "*.parquet")
    for row in daily.filter(pl.col("complete")).iter_rows(named=True):
        grid = one.filter(
            (pl.col("tenant") == row["tenant"])
            & (pl.col("role") == "grid")
            & (pl.col("metric") == "energy_import_kwh")
        )
        assert row["electricity_import_kwh"] == pytest.approx(grid["counts"].sum() / 100, abs=1e-6)
        assert row["co2e_location_kg"] == pytest.approx(
            row["scope1_kg"] + row["scope2_location_kg"], abs=0.01
        )
        assert row["scope2_market_kg"] >= 0
        assert "cn-" in row["factor_ids"]
    assert daily["complete"].any()


# --- every fault leaves the truth reconstructible, with the rejections counted ------------------------


@pytest.mark.parametrize(
    ("fault", "rate"),
    [
        ("duplicate", 0.3),
        ("reorder", 0.3),
        ("offline", 2.0),
        ("clock_skew", 2.0),
        ("malformed", 0.2),
        ("wrong_tenant", 0.2),
        ("oversized", 0.05),
        ("rollover", 1.0),
        ("meter_exchange", 20.0),
        ("spike", 0.05),
        ("glitch", 0.05),
        ("frozen", 0.05),
    ],
)
def test_truth_holds_under_fault(fault: str, rate: float, tmp_path: Path) -> None:
    spec = small_fleet()
    faults = FaultConfig.model_validate({fault: rate})
    published, result, spec = simulate(spec, tmp_path, faults=faults)
    rebuilt = assert_truth_holds(spec, published, tmp_path)
    manifest = result.manifest
    assert manifest is not None
    expected = manifest["expected"]
    assert dict(rebuilt.dead_letters) == expected["dead_letters"]
    assert rebuilt.refused == expected["broker_refused"]
    assert rebuilt.duplicates == expected["duplicate_readings"]
    effect = {
        "duplicate": expected["duplicate_readings"],
        "reorder": expected["delayed_readings"],
        "offline": expected["outages"],
        "clock_skew": expected["dead_letters"].get("future_ts", 0),
        "malformed": expected["dead_letters"].get("invalid_json", 0)
        + expected["dead_letters"].get("schema", 0),
        "wrong_tenant": expected["broker_refused"],
        "oversized": expected["dead_letters"].get("too_large", 0),
        "rollover": _rollovers_seen(rebuilt),
        "meter_exchange": manifest["flags"]["meter_exchanges"],
        "spike": manifest["flags"]["spike"],
        "glitch": manifest["flags"]["glitch"],
        "frozen": manifest["flags"]["frozen_runs"],
    }[fault]
    assert effect > 0, f"{fault} at rate {rate} never happened"


def _rollovers_seen(rebuilt: Reconstruction) -> int:
    by_register: dict[tuple[str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for (tenant, device, metric, ts), value in rebuilt.readings.items():
        if metric == "energy_import_kwh":
            by_register[(tenant, device, metric)].append((ts, value))
    return sum(
        1
        for points in by_register.values()
        for a, b in zip(sorted(points), sorted(points)[1:], strict=False)
        if b[1] < a[1]
    )


def test_spikes_and_frozen_values_are_logged_where_they_were_published(tmp_path: Path) -> None:
    spec = small_fleet()
    published, _, spec = simulate(spec, tmp_path, faults=FaultConfig(spike=0.05, frozen=0.05))
    rebuilt = Reconstruction(spec, published, tmp_path)
    faults = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    rated = {(e.tenant, d.device): d.rated_power_kw for e, _, _, d in spec.devices()}
    spikes = [f for f in faults if f["fault"] == "spike"]
    assert spikes
    for f in spikes:
        assert (
            rebuilt.readings[(f["tenant"], f["device"], "power_kw", f["ts"])]
            > 10 * rated[(f["tenant"], f["device"])]
        )
    for f in (f for f in faults if f["fault"] == "frozen"):
        values = [
            v for (t, d, m, ts), v in rebuilt.readings.items()
            if (t, d, m) == (f["tenant"], f["device"], f["metric"]) and f["ts"] <= ts < f["ts"] + f["readings"] * 60_000
        ]  # fmt: skip
        assert len(set(values)) == 1


def test_all_faults_together_keep_the_truth(tmp_path: Path) -> None:
    spec = small_fleet()
    published, result, spec = simulate(spec, tmp_path, hours=4, faults=FaultConfig.all(5.0))
    rebuilt = assert_truth_holds(spec, published, tmp_path)
    assert result.manifest is not None
    assert dict(rebuilt.dead_letters) == result.manifest["expected"]["dead_letters"]


def test_sparkplug_stream_carries_the_same_truth(tmp_path: Path) -> None:
    spec = small_fleet(payload_format="sparkplug")
    published, _, spec = simulate(
        spec, tmp_path, faults=FaultConfig(duplicate=0.1, offline=1.0, rollover=0.5)
    )
    assert any("/NBIRTH/" not in t and "/DBIRTH/" in t for _, t, _ in published)
    assert_truth_holds(spec, published, tmp_path)


def test_json_single_device_form(tmp_path: Path) -> None:
    spec = small_fleet(payload_format="json-single")
    published, _, spec = simulate(spec, tmp_path, hours=1)
    assert all(t.count("/") == 5 for _, t, _ in published)
    assert_truth_holds(spec, published, tmp_path)


# --- the fleet description ---------------------------------------------------------------------------


def test_fleet_yaml_round_trip(tmp_path: Path) -> None:
    spec = generate_fleet(enterprises=4, sites_per_enterprise=2, meters_per_site=6, vpp_resources=300, seed=3)
    spec.dump(tmp_path / "fleet.yaml")
    assert FleetSpec.load(tmp_path / "fleet.yaml") == spec
    kinds = Counter(d.type for _, _, _, d in spec.devices())
    assert kinds["battery"] and kinds["pv"] and kinds["ev_charger"] and kinds["base_station"]
    assert sum(kinds[k] for k in ("battery", "pv", "ev_charger", "base_station")) == 300


def test_large_fleet_generation_is_cheap() -> None:
    spec = generate_fleet(enterprises=50, meters_per_site=20, vpp_resources=10_000, seed=1)
    assert spec.device_count > 11_000
    assert all(len(g.devices) <= 200 for _, _, g in spec.gateways())


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda doc: doc["enterprises"][0]["sites"][0]["gateways"][0]["devices"].append(
            dict(doc["enterprises"][0]["sites"][0]["gateways"][0]["devices"][0], device="main-2")), "exactly one"),
        (lambda doc: doc["enterprises"][0]["sites"][0]["gateways"][0]["devices"][0].update(interval_s=45), "interval_s"),
        (lambda doc: doc["enterprises"][0]["sites"][0]["gateways"][0]["devices"][0].update(register_resolution=0.02), "power of ten"),
        (lambda doc: doc["enterprises"].append(doc["enterprises"][0]), "unique"),
    ],
)  # fmt: skip
def test_fleet_description_is_validated(mutation: object, message: str) -> None:
    doc = small_fleet().model_dump(mode="json")
    mutation(doc)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        FleetSpec.model_validate(doc)


# --- behaviour models ----------------------------------------------------------------------------------


def test_pv_follows_the_sun() -> None:
    lat, lon = np.array([30.0]), np.array([120.0])
    noon_utc = START_MS / 1000 + 12 * 3600  # 12:00 local solar time at 120 E
    midnight_utc = START_MS / 1000
    noon = bh.pv_output_kw(np.array([100.0]), bh.solar_sin_elevation(noon_utc, lat, lon), np.array([0.0]))
    night = bh.pv_output_kw(
        np.array([100.0]), bh.solar_sin_elevation(midnight_utc, lat, lon), np.array([0.0])
    )
    cloudy = bh.pv_output_kw(np.array([100.0]), bh.solar_sin_elevation(noon_utc, lat, lon), np.array([1.0]))
    assert night[0] == 0.0
    assert 30 < noon[0] < 85  # January sun at 30 N stands about 36 degrees high
    assert cloudy[0] < 0.3 * noon[0]


def test_factory_works_shifts_weekdays_and_starts_up_with_a_peak() -> None:
    rated, base, prod, one = np.array([100.0]), np.array([0.2]), np.array([0.9]), np.array([1.0])
    weekday = bh.day_factor(np.array([2]), np.array([False]))
    sunday = bh.day_factor(np.array([6]), np.array([False]))
    holiday = bh.day_factor(np.array([2]), np.array([True]))
    running = bh.factory_load_kw(rated, base, prod, np.array([True]), np.array([-1.0]), weekday, one)
    starting = bh.factory_load_kw(rated, base, prod, np.array([True]), np.array([0.0]), weekday, one)
    off = bh.factory_load_kw(rated, base, prod, np.array([False]), np.array([-1.0]), weekday, one)
    on_sunday = bh.factory_load_kw(rated, base, prod, np.array([True]), np.array([-1.0]), sunday, one)
    on_holiday = bh.factory_load_kw(rated, base, prod, np.array([True]), np.array([-1.0]), holiday, one)
    assert starting[0] > running[0] > on_sunday[0] > on_holiday[0] > off[0] == pytest.approx(20.0)


def test_hvac_follows_outdoor_temperature() -> None:
    rated, base, occupied, one = np.array([100.0]), np.array([0.2]), np.array([1.0]), np.array([1.0])
    loads = [
        bh.commercial_load_kw(rated, base, occupied, np.array([t]), one)[0] for t in (18.0, 28.0, 35.0, 2.0)
    ]
    assert loads[0] < loads[1] < loads[2]
    assert loads[3] > loads[0]


def test_battery_stays_within_soc_limits_and_ratings(tmp_path: Path) -> None:
    spec = small_fleet(vpp_resources=40)
    published, _, spec = simulate(spec, tmp_path, hours=36, start_ms=START_MS + 5 * 86_400_000)  # a Tuesday
    rebuilt = Reconstruction(spec, published, tmp_path)
    batteries = {d.device: d for _, _, _, d in spec.devices() if d.type == "battery"}
    socs = [v for (t, d, m, ts), v in rebuilt.readings.items() if d in batteries and m == "soc_pct"]
    powers = [(d, v) for (t, d, m, ts), v in rebuilt.readings.items() if d in batteries and m == "power_kw"]
    assert socs and min(socs) >= 10.0 - 1e-6 and max(socs) <= 95.0 + 1e-6
    assert all(abs(v) <= batteries[d].rated_power_kw + 1e-6 for d, v in powers)
    assert any(v < 0 for _, v in powers), "no battery ever discharged to shave a peak"
    assert any(v > 0 for _, v in powers), "no battery ever recharged in the valley"


def test_ev_chargers_deliver_sessions_within_rating(tmp_path: Path) -> None:
    spec = small_fleet(vpp_resources=40)
    published, _, spec = simulate(spec, tmp_path, hours=24, start_ms=START_MS + 86_400_000)
    rebuilt = Reconstruction(spec, published, tmp_path)
    chargers = {d.device: d for _, _, _, d in spec.devices() if d.type == "ev_charger"}
    powers = [(d, v) for (t, d, m, ts), v in rebuilt.readings.items() if d in chargers and m == "power_kw"]
    assert all(0 <= v <= chargers[d].rated_power_kw + 1e-6 for d, v in powers)
    assert any(v > 0 for _, v in powers)
    assert not math.isnan(sum(v for _, v in powers))


def test_a_stop_request_flushes_and_finishes_the_truth(tmp_path: Path) -> None:
    """SIGINT/SIGTERM set the stop event: delayed messages still go out and the truth files are written."""
    spec = small_fleet()
    stop = threading.Event()
    published: Published = []

    def sink(gateway: int, topic: str, payload: bytes) -> None:
        published.append((gateway, topic, payload))
        if len(published) == 200:
            stop.set()

    faults = FaultConfig(offline=5.0)
    result = run(
        spec, RunOptions(mode="backfill", start_ms=START_MS, duration_s=6 * 3600, truth_dir=tmp_path, faults=faults),
        sink, stop=stop,
    )  # fmt: skip
    assert result.ticks < 6 * 60
    assert result.manifest is not None and (tmp_path / "manifest.json").exists()
    assert_truth_holds(spec, published, tmp_path)


@pytest.mark.parametrize("payload_format", ["json-batch", "sparkplug"])
def test_gateways_uploading_every_few_ticks_carry_the_same_truth(payload_format: str, tmp_path: Path) -> None:
    spec = small_fleet(payload_format=payload_format)
    published: Published = []
    result = run(
        spec, RunOptions(mode="backfill", start_ms=START_MS, duration_s=3600, truth_dir=tmp_path, batch_ticks=5),
        lambda g, topic, payload: published.append((g, topic, payload)),
    )  # fmt: skip
    per_instant = spec.device_count if payload_format == "sparkplug" else sum(1 for _ in spec.gateways())
    assert result.messages < result.ticks * per_instant / 4
    assert_truth_holds(spec, published, tmp_path)
