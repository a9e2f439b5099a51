"""The simulator's office buildings shed load in a DR event; the pipeline measures the delivery.

A campus with two feeders that are VPP building loads is simulated over MQTT from noon to 16:30 on a
Tuesday (backfill, 1-minute readings, no faults). A DR event from 14:00 to 16:00 makes both shed 20 % of
their load; the simulator's ground truth says how much energy each shed per 15 minutes.
The API's actual load equals the metered truth exactly, and the delivery measured against the real-time
baseline (the 15 minutes before the start) matches the true shed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from simulators.faults import FaultConfig
from simulators.publisher import register_fleet, simulate_over_mqtt
from simulators.runner import RunOptions
from simulators.spec import DrEventSpec, generate_fleet
from tests.integration.conftest import Pipeline
from tests.integration.fleet import wait_for_readings

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("Asia/Shanghai")
START = datetime(2026, 3, 17, 12, 0, tzinfo=ZONE)
EVENT = (datetime(2026, 3, 17, 14, 0, tzinfo=ZONE), datetime(2026, 3, 17, 16, 0, tzinfo=ZONE))
END = datetime(2026, 3, 17, 16, 30, tzinfo=ZONE)
# The real-time baseline misses how the load would have moved within the two hours (weather, noise).
TOLERANCE = 0.10


def test_simulated_buildings_shed_and_the_measured_delivery_matches(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:6]
    vpp = f"vpp-sim-{run}"
    fleet = generate_fleet(
        enterprises=3, meters_per_site=3, vpp_buildings=2, vpp=vpp, seed=21, tenant_prefix=f"d{run}-"
    )
    campus = [e for e in fleet.enterprises if e.tenant.startswith(f"d{run}-campus")]
    spec = fleet.model_copy(
        update={"enterprises": campus, "dr_events": [DrEventSpec(vpp=vpp, start=EVENT[0], end=EVENT[1])]}
    )
    creds = register_fleet(pipeline.api_url, pipeline.admin_key, spec)
    options = RunOptions(
        mode="backfill",
        start_ms=int(START.timestamp() * 1000),
        duration_s=(END - START).total_seconds(),
        faults=FaultConfig(),
        truth_dir=tmp_path,
        max_payload_bytes=pipeline.settings.ingest.max_payload_bytes,
    )
    s = pipeline.settings
    result, outcome = simulate_over_mqtt(
        spec, options, host=s.mqtt.host, port=s.mqtt.port, creds=creds, qos=1
    )
    assert outcome.unanswered == 0
    wait_for_readings(pipeline, [campus[0].tenant], result.true_readings)

    truth_shed = (
        pl.read_parquet(tmp_path / "dr_shed_15m.parquet")
        .group_by("bucket_start_ms")
        .agg(pl.col("shed_kwh").sum())
        .sort("bucket_start_ms")
    )
    assert truth_shed.height == 8
    buildings = [d.device for _, _, _, d in spec.devices() if d.sheddable_share > 0]
    truth_actual = (
        pl.read_parquet(tmp_path / "energy_15m.parquet")
        .filter(pl.col("device").is_in(buildings) & (pl.col("metric") == "energy_import_kwh"))
        .group_by("bucket_start")
        .agg(pl.col("quantity").sum())
    )
    actual_at = {row["bucket_start"].timestamp(): row["quantity"] for row in truth_actual.to_dicts()}

    with pipeline.http() as http:
        created = http.post(
            f"/v1/vpps/{vpp}/dr-events",
            json={"start": EVENT[0].isoformat(), "end": EVENT[1].isoformat(), "direction": "up",
                  "committed_kw": 1.0, "baseline": "CN_JS_RT15"},
        )  # fmt: skip
        assert created.status_code == 201, created.text
        event_id = created.json()["event_id"]
        resp = http.get(f"/v1/dr-events/{event_id}/result")
        assert resp.status_code == 200, resp.text
        rt15 = resp.json()
    assert rt15["total"]["complete"] is True
    for iv in rt15["intervals"]:
        # What the API measured is what the buildings' registers counted, interval by interval.
        assert iv["actual_kw"] == pytest.approx(
            actual_at[datetime.fromisoformat(iv["start"]).timestamp()] * 4
        )
    true_kw = float(truth_shed["shed_kwh"].sum()) / 2.0  # kWh over two hours
    measured = rt15["total"]["delivered_kw"]
    print(f"true shed {true_kw:.2f} kW; measured against CN_JS_RT15 {measured:.2f} kW")  # noqa: T201
    assert measured == pytest.approx(true_kw, rel=TOLERANCE)
