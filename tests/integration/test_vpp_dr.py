"""A demand-response event end to end: two simulated buildings in a VPP report their energy registers
over MQTT for 17 days; on the event day they shed a known load (30 + 20 kW) for two hours. The processor
rolls the registers up per VPP, and every baseline method measures the delivery the buildings made."""

from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import psycopg
import pytest

from meterflow.contract import gateway_telemetry_topic
from meterflow.settings import Settings
from tests.integration.conftest import Pipeline
from tests.integration.test_end_to_end import _connect

pytestmark = pytest.mark.integration

ZONE = ZoneInfo(Settings().vpp.timezone)
DAYS = 17
SHED_KW = {"bldg-1": 30.0, "bldg-2": 20.0}
BUSINESS_KW = {"bldg-1": 100.0, "bldg-2": 60.0}  # 08:00-20:00 on working days
NIGHT_KW = {"bldg-1": 40.0, "bldg-2": 20.0}
WEEKEND_KW = {"bldg-1": 30.0, "bldg-2": 15.0}
EVENT_HOURS = (14, 16)


def _event_day() -> date:
    """The most recent Wednesday at least three days ago: every interval of it is over."""
    d = datetime.now(ZONE).date() - timedelta(days=3)
    while d.weekday() != 2:
        d -= timedelta(days=1)
    return d


def _load_kw(device: str, day: date, interval: int, shed_days: set[date]) -> float:
    hour = interval / 4
    if day.weekday() >= 5:
        return WEEKEND_KW[device]
    kw = BUSINESS_KW[device] if 8 <= hour < 20 else NIGHT_KW[device]
    if day in shed_days and EVENT_HOURS[0] <= hour < EVENT_HOURS[1]:
        kw -= SHED_KW[device]
    return kw


def _publish_history(
    p: Pipeline, tenant: str, gateway: str, creds: dict[str, str], shed_days: set[date]
) -> int:
    """Register reads on the 15-minute grid from D-16 00:00 to D+1 00:00; returns the last read's ms."""
    client = _connect(p, creds)
    first = _event_day() - timedelta(days=DAYS - 1)
    last_ms = 0
    for device in SHED_KW:
        register = 1000.0
        for k in range(DAYS):
            day = first + timedelta(days=k)
            midnight = datetime.combine(day, datetime.min.time(), ZONE)
            points = []
            for i in range(96):
                points.append({"ts": int((midnight + timedelta(minutes=15 * i)).timestamp() * 1000),
                               "values": {"energy_import_kwh": round(register, 4)}})  # fmt: skip
                register += _load_kw(device, day, i, shed_days) * 0.25
            if k == DAYS - 1:
                last_ms = int((midnight + timedelta(days=1)).timestamp() * 1000)
                points.append({"ts": last_ms, "values": {"energy_import_kwh": round(register, 4)}})
            info = client.publish(
                gateway_telemetry_topic(tenant, gateway), orjson.dumps({device: points}), qos=1
            )
            info.wait_for_publish(timeout=10)
    client.disconnect()
    client.loop_stop()
    return last_ms


def _wait_for_rollup(p: Pipeline, vpp: str, last_ms: int) -> None:
    deadline = time.monotonic() + 120
    last_bucket = datetime.fromtimestamp((last_ms - 900_000) / 1000, ZONE)
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        while True:
            row = conn.execute(
                "SELECT total FROM agg_15m WHERE scope = 'vpp' AND tenant_id = '' AND entity_id = %s "
                "AND metric = 'energy_import_kwh' AND bucket = %s",
                (vpp, last_bucket),
            ).fetchone()
            # Both buildings' last interval is in: (40 + 20) kW x 0.25 h.
            if row is not None and abs(float(row[0]) - 15.0) < 1e-6:
                return
            assert time.monotonic() < deadline, f"the VPP's last interval never rolled up: {row}"
            time.sleep(1)


def test_buildings_shed_a_known_load_and_every_baseline_measures_it(pipeline: Pipeline) -> None:
    run = uuid.uuid4().hex[:8]
    tenant, gateway, vpp = f"t-{run}", f"gw-{run}", f"vpp-dr-{run}"
    day = _event_day()
    earlier_event = day - timedelta(days=7)  # a past event: shed too, and never a baseline day
    with pipeline.http() as http:
        assert http.post("/v1/enterprises", json={"tenant": tenant, "name": tenant}).status_code == 201
        assert (
            http.post("/v1/sites", json={"tenant": tenant, "site": "s1", "name": "campus"}).status_code == 201
        )
        resp = http.post("/v1/gateways", json={"tenant": tenant, "gateway": gateway})
        assert resp.status_code == 201, resp.text
        creds = resp.json()["mqtt"]
        # An unowned VPP (admins act on it); the admin's device registrations enrol directly.
        assert http.post("/v1/vpps", json={"vpp": vpp, "name": "dr test"}).status_code == 201
        for device in SHED_KW:
            body = {"tenant": tenant, "device": device, "site": "s1", "gateway": gateway, "role": "resource",
                    "rated_power_kw": 200, "vpp": vpp, "topology_node": "feeder-9"}  # fmt: skip
            assert http.post("/v1/devices", json=body).status_code == 201
            model = {
                "tenant": tenant,
                "resource_class": "building_load",
                "sheddable_share": 0.3,
                "max_shed_min": 120,
            }
            assert http.put(f"/v1/devices/{device}/resource", json=model).status_code == 200
    last_ms = _publish_history(pipeline, tenant, gateway, creds, {day, earlier_event})
    _wait_for_rollup(pipeline, vpp, last_ms)

    def at(d: date, hour: int) -> str:
        return datetime.combine(d, datetime.min.time(), ZONE).replace(hour=hour).isoformat()

    with pipeline.http() as http:
        earlier = {"start": at(earlier_event, 14), "end": at(earlier_event, 16), "direction": "up",
                   "committed_kw": 40}  # fmt: skip
        assert http.post(f"/v1/vpps/{vpp}/dr-events", json=earlier).status_code == 201
        resp = http.post(
            f"/v1/vpps/{vpp}/dr-events",
            json={"start": at(day, 14), "end": at(day, 16), "direction": "up", "committed_kw": 40,
                  "baseline": "CN_JS_5WD", "program": "test-peak-shaving"},
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        event_id = resp.json()["event_id"]
        off_grid = http.post(
            f"/v1/vpps/{vpp}/dr-events",
            json={"start": at(day, 14).replace(":00:00", ":05:00"), "end": at(day, 16), "direction": "up",
                  "committed_kw": 40},
        )  # fmt: skip
        assert off_grid.status_code == 422
        # Marginal intensity over the event (WattTime-style MOER, g/kWh): 800 in the first hour, 600 in the
        # second. Written as the intensity service writes it; the Kafka path is tests/integration/test_grid_intensity.py.
        moer_zone = f"MOER-{run}"
        with psycopg.connect(pipeline.settings.db.conninfo()) as conn:
            for hour, g in ((14, 800.0), (15, 600.0)):
                conn.execute(
                    "INSERT INTO grid_intensity (zone, signal_type, basis, ts, duration_s, g_co2e_per_kwh, "
                    "is_estimated, is_forecast, source, kafka_partition, kafka_offset) "
                    "VALUES (%s, 'marginal', 'direct', %s, 3600, %s, true, false, 'test', 0, 0)",
                    (moer_zone, at(day, hour), g),
                )
        avoided = http.get(f"/v1/dr-events/{event_id}/result", params={"marginal_zone": moer_zone}).json()
        uncovered = http.get(
            f"/v1/dr-events/{event_id}/result", params={"marginal_zone": f"none-{run}"}
        ).json()
        results = {}
        for method in ("CN_JS_5WD", "CN_BJ_5of10", "CAISO_10of10", "CN_JS_RT15"):
            r = http.get(f"/v1/dr-events/{event_id}/result", params={"baseline": method})
            assert r.status_code == 200, f"{method}: {r.text}"
            results[method] = r.json()
        report = http.get(f"/v1/dr-events/{event_id}/report").json()

    truth = sum(SHED_KW.values())
    for method, result in results.items():
        assert len(result["intervals"]) == 8
        for iv in result["intervals"]:
            assert iv["baseline_kw"] == pytest.approx(160.0), method
            assert iv["actual_kw"] == pytest.approx(110.0), method
            assert iv["delivered_kw"] == pytest.approx(truth), method
        total = result["total"]
        assert total["delivered_kw"] == pytest.approx(truth), method
        assert total["performance_ratio"] == pytest.approx(truth / 40), method
        assert total["valid"] is True and total["complete"] is True
    five = results["CN_JS_5WD"]
    assert earlier_event.isoformat() not in five["baseline_days"]
    assert earlier_event.isoformat() in five["excluded_days"]
    assert all(date.fromisoformat(d).weekday() < 5 for d in five["baseline_days"])
    assert results["CAISO_10of10"]["adjustment"] == pytest.approx(1.0)
    assert report["objectType"] == "REPORT" and report["programID"] == "test-peak-shaving"
    first = report["resources"][0]["intervals"][0]["payloads"]
    assert {"type": "DELTA_USAGE", "values": [pytest.approx(truth * 0.25)]} in first
    assert report["x-meterflow-performance"]["valid"] is True
    # Avoided emissions: 50 kW shed for 15 minutes is 12.5 kWh per interval, at 800 then 600 g/kWh.
    assert [iv["avoided_co2e_kg"] for iv in avoided["intervals"]] == pytest.approx([10.0] * 4 + [7.5] * 4)
    assert avoided["total"]["avoided_co2e_kg"] == pytest.approx(70.0)
    assert avoided["marginal_zone"] == moer_zone
    assert uncovered["total"]["avoided_co2e_kg"] is None
    assert all(iv["avoided_co2e_kg"] is None for iv in uncovered["intervals"])
    assert results["CN_JS_5WD"]["total"]["avoided_co2e_kg"] is None  # not asked for
