"""Time-varying grid intensity end to end: points published to Kafka (by the CLI and the library), the
intensity service writing them, dead letters for records that are not points, a replay changing
nothing, and the API's intensity and estimated carbon against a hand calculation on the known
aggregates of tests/integration/test_api_fixtures.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from deploy.local.services import ensure_topics
from ingest.intensity import publish
from meterflow.contract import EmissionBasis, GridIntensityPoint
from meterflow.settings import KafkaSettings, Settings
from tests.integration.test_api_fixtures import (
    DAY_IMPORT,
    DAY_MARCH,
    IMPORT_KWH,
    PEAK_IMPORT_KWH,
    PEAK_QUARTER,
    SHANGHAI,
    ApiServer,
    Fleet,
    load_fleet,
)

pytestmark = pytest.mark.integration

MISSING_HOUR = 22
FORECAST_HOUR = 21  # only a forecast was ever published for it
DAY_START = datetime.combine(DAY_MARCH, datetime.min.time(), SHANGHAI)
DAY = {"start": DAY_START.isoformat(), "end": (DAY_START + timedelta(days=1)).isoformat()}


def g_of(hour: int) -> float:
    return 400.0 + 10 * hour


def kwh_of(hour: int) -> float:
    return 4 * IMPORT_KWH + (PEAK_IMPORT_KWH - IMPORT_KWH if hour == PEAK_QUARTER // 4 else 0.0)


def point(
    zone: str, hour: int, value: float, *, forecast: bool = False, basis: str = "direct"
) -> GridIntensityPoint:
    return GridIntensityPoint.model_validate(
        {
            "zone": zone,
            "ts": int((DAY_START + timedelta(hours=hour)).timestamp() * 1000),
            "g_co2e_per_kwh": value,
            "basis": basis,
            "is_forecast": forecast,
            "source": "test",
        }
    )


@dataclass
class Feed:
    settings: Settings
    env: dict[str, str]
    zone: str
    fleet: Fleet
    log_dir: Path

    def serve(self, group: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "METERFLOW_INTENSITY__GROUP": group}
        with (self.log_dir / f"intensity-{group}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "meterflow", "intensity", "serve"], env=env, stdout=log, stderr=log
            )

    def rows(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.db.conninfo()) as conn:
            return conn.execute(
                "SELECT basis, ts, g_co2e_per_kwh, is_forecast, received_at FROM grid_intensity WHERE zone = %s "
                "ORDER BY basis, ts",
                (self.zone,),
            ).fetchall()

    def wait_for(self, check: str, timeout_s: float = 60) -> list[tuple[object, ...]]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.rows()
            if _done(rows):
                return rows
            if time.monotonic() > deadline:
                pytest.fail(f"intensity service did not write {check}: {len(rows)} rows")
            time.sleep(0.3)


def _done(rows: list[tuple[object, ...]]) -> bool:
    direct = [r for r in rows if r[0] == "direct"]
    return len(direct) == 23 and any(r[2] == g_of(23) for r in direct) and len(rows) == 24


@pytest.fixture(scope="module")
def feed(base_settings: Settings, api: ApiServer) -> Iterator[Feed]:
    run = uuid.uuid4().hex[:8]
    fleet = load_fleet(base_settings)
    zone = f"T-{run}"
    with api.client() as http:
        r = http.patch(f"/v1/sites/{fleet.site}", params={"tenant": fleet.tenant}, json={"grid_zone": zone})
        assert r.status_code == 200 and r.json()["grid_zone"] == zone, r.text
    kafka = {"intensity_topic": f"test-{run}.intensity", "dlq_topic": f"test-{run}.dlq"}
    settings = Settings(kafka=KafkaSettings(**kafka))
    asyncio.run(ensure_topics(settings))
    env = {
        **os.environ,
        "METERFLOW_KAFKA__INTENSITY_TOPIC": kafka["intensity_topic"],
        "METERFLOW_KAFKA__DLQ_TOPIC": kafka["dlq_topic"],
        "METERFLOW_INTENSITY__METRICS_PORT": "0",
    }
    log_dir = Path(os.environ.get("METERFLOW_TEST_ARTIFACTS", "test-artifacts")) / f"intensity-{run}"
    log_dir.mkdir(parents=True, exist_ok=True)
    f = Feed(settings, env, zone, fleet, log_dir)
    service = f.serve(f"test-{run}-intensity")
    # First batch through the CLI: every hour but one, a forecast for the last hour, a direct-basis point.
    first = [point(zone, h, g_of(h), forecast=h == FORECAST_HOUR) for h in range(23) if h != MISSING_HOUR]
    first += [point(zone, 23, 999.0, forecast=True), point(zone, 0, 123.0, basis="lifecycle")]
    jsonl = log_dir / "first.jsonl"
    jsonl.write_text("".join(p.encode().decode() + "\n" for p in first))
    cli = subprocess.run(
        [sys.executable, "-m", "meterflow", "intensity", "publish", str(jsonl), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    # Then a forecast that must not replace hour 0's value, the actual value of hour 23, and bad records.
    asyncio.run(
        publish(settings, [point(zone, 0, 999.0, forecast=True), point(zone, 23, g_of(23))], progress=False)
    )
    asyncio.run(
        _send_raw(settings, [b"{", b'{"zone": "Z", "ts": 0, "g_co2e_per_kwh": NaN, "source": "s"}', b"[]"])
    )
    try:
        f.wait_for("both batches")
        yield f
    finally:
        service.terminate()
        assert service.wait(timeout=30) == 0


async def _send_raw(settings: Settings, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.kafka.intensity_topic, value, key=b"bad")
    finally:
        await producer.stop()


async def _dead_letters(settings: Settings, n: int) -> list[dict[str, object]]:
    consumer = AIOKafkaConsumer(
        settings.kafka.dlq_topic, bootstrap_servers=settings.kafka.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    letters: list[dict[str, object]] = []
    try:
        deadline = time.monotonic() + 30
        while len(letters) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                letters += [orjson.loads(r.value or b"") for r in records]
    finally:
        await consumer.stop()
    return letters


def test_service_writes_points_and_keeps_actuals_over_forecasts(feed: Feed) -> None:
    rows = feed.rows()
    direct = {r[1]: (r[2], r[3]) for r in rows if r[0] == "direct"}
    assert direct[DAY_START] == (g_of(0), False)  # the later forecast did not replace it
    assert direct[DAY_START + timedelta(hours=23)] == (g_of(23), False)  # the actual replaced the forecast
    assert direct[DAY_START + timedelta(hours=FORECAST_HOUR)] == (g_of(FORECAST_HOUR), True)
    assert DAY_START + timedelta(hours=MISSING_HOUR) not in direct
    assert [(r[1], r[2]) for r in rows if r[0] == "lifecycle"] == [(DAY_START, 123.0)]


def test_records_that_are_not_points_are_dead_lettered_with_a_reason(feed: Feed) -> None:
    letters = asyncio.run(_dead_letters(feed.settings, 3))
    assert sorted(str(letter["reason"]) for letter in letters) == ["invalid_json", "non_finite", "schema"]
    assert all(
        letter["topic"] == feed.settings.kafka.intensity_topic and letter["detail"] for letter in letters
    )


def test_replaying_the_topic_changes_no_value(feed: Feed) -> None:
    before = feed.rows()
    replay = feed.serve(f"replay-{uuid.uuid4().hex[:6]}")
    try:
        # Every row's winning point is in the topic, so the replay has rewritten all of them once it is through.
        written = max(r[4] for r in before)
        deadline = time.monotonic() + 60
        while min(r[4] for r in feed.rows()) <= written:
            assert time.monotonic() < deadline, "the replaying service did not rewrite every row"
            time.sleep(0.3)
    finally:
        replay.terminate()
        assert replay.wait(timeout=30) == 0
    assert [r[:4] for r in feed.rows()] == [r[:4] for r in before]


def test_cli_reports_rows_that_are_not_points(feed: Feed, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("zone,ts,g_co2e_per_kwh\nCN-JS,0,500\nCN-JS,3600000,-5\n")
    out = subprocess.run(
        [sys.executable, "-m", "meterflow", "intensity", "publish", str(bad), "--out", str(tmp_path / "ok.jsonl"),
         "--source", "manual"],
        env=feed.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "line 3" in out.stderr and "1 rows rejected" in out.stderr
    assert len((tmp_path / "ok.jsonl").read_text().splitlines()) == 1


def test_zone_points_latest_and_best_window(api: ApiServer, feed: Feed) -> None:
    with api.client() as http:
        body = http.get(f"/v1/grid-intensity/{feed.zone}", params=DAY).json()
        hours = [h for h in range(24) if h != MISSING_HOUR]
        assert [p["g_co2e_per_kwh"] for p in body["points"]] == [g_of(h) for h in hours]
        assert [p["is_forecast"] for p in body["points"]] == [h == FORECAST_HOUR for h in hours]
        assert body["covered_share"] == pytest.approx(23 / 24)
        assert body["mean_g_co2e_per_kwh"] == pytest.approx(sum(g_of(h) for h in hours) / 23)
        latest = http.get(f"/v1/grid-intensity/{feed.zone}/latest").json()
        assert (latest["g_co2e_per_kwh"], latest["is_forecast"]) == (g_of(23), False)
        assert (
            http.get(f"/v1/grid-intensity/{feed.zone}/latest", params={"signal_type": "marginal"}).status_code
            == 404
        )
        best = http.get(
            f"/v1/grid-intensity/{feed.zone}/best-window", params={**DAY, "window_minutes": 120}
        ).json()
        assert datetime.fromisoformat(best["start"]) == DAY_START
        assert best["mean_g_co2e_per_kwh"] == pytest.approx((g_of(0) + g_of(1)) / 2)
        late = {"start": (DAY_START + timedelta(hours=21)).isoformat(), "end": DAY["end"]}
        # 21:00-24:00 has no fully covered two-hour window (22:00 is missing).
        gap = http.get(
            f"/v1/grid-intensity/{feed.zone}/best-window", params={**late, "window_minutes": 120}
        ).json()
        assert gap["start"] is None and gap["mean_g_co2e_per_kwh"] is None
        zones = {(z["zone"], z["basis"]): z for z in http.get("/v1/grid-intensity").json()}
        assert zones[(feed.zone, "direct")]["points"] == 23 and zones[(feed.zone, "direct")]["sources"] == [
            "test"
        ]
        assert http.get("/v1/grid-intensity/bad zone", params=DAY).status_code in (404, 422)


def test_estimated_carbon_matches_a_hand_calculation(api: ApiServer, feed: Feed) -> None:
    tenant, site = feed.fleet.tenant, feed.fleet.site
    url = f"/v1/enterprises/{tenant}/carbon/estimated"
    with api.client() as http:
        hourly = http.get(url, params={**DAY, "interval": "1h"}).json()
        assert hourly["estimated"] is True and hourly["compliance"] is False
        assert hourly["zones"] == {site: feed.zone} and hourly["sources"] == ["test"]
        points = hourly["points"]
        assert len(points) == 24
        for hour, p in enumerate(points):
            assert datetime.fromisoformat(p["ts"]) == DAY_START + timedelta(hours=hour)
            assert p["electricity_import_kwh"] == pytest.approx(kwh_of(hour))
            if hour == MISSING_HOUR:
                assert (p["covered_kwh"], p["co2e_kg"], p["mean_g_co2e_per_kwh"]) == (0, 0, None)
                assert p["uncovered_kwh"] == pytest.approx(kwh_of(hour))
            else:
                assert p["co2e_kg"] == pytest.approx(kwh_of(hour) * g_of(hour) / 1000, abs=5e-4)
                assert p["mean_g_co2e_per_kwh"] == pytest.approx(g_of(hour), abs=5e-4)
            assert p["forecast_kwh"] == pytest.approx(kwh_of(hour) if hour == FORECAST_HOUR else 0)
        quarters = http.get(url, params={**DAY, "interval": "15m"}).json()["points"]
        assert len(quarters) == 96
        assert quarters[PEAK_QUARTER]["co2e_kg"] == pytest.approx(PEAK_IMPORT_KWH * g_of(10) / 1000)
        [day] = http.get(url, params={**DAY, "interval": "1d"}).json()["points"]
        expected = sum(kwh_of(h) * g_of(h) for h in range(24) if h != MISSING_HOUR) / 1000
        assert day["co2e_kg"] == pytest.approx(expected, abs=1e-3)
        assert day["covered_kwh"] == pytest.approx(DAY_IMPORT - kwh_of(MISSING_HOUR))
        assert day["forecast_kwh"] == pytest.approx(kwh_of(FORECAST_HOUR))
        lifecycle = http.get(
            url, params={**DAY, "interval": "1d", "basis": EmissionBasis.LIFECYCLE.value}
        ).json()
        assert lifecycle["points"][0]["co2e_kg"] == pytest.approx(kwh_of(0) * 123.0 / 1000)


def test_estimated_carbon_and_site_changes_are_scoped(api: ApiServer, feed: Feed) -> None:
    with api.client() as http:
        r = http.post("/v1/api-keys", json={"role": "enterprise", "tenant": feed.fleet.other, "label": "t"})
        other_key = r.json()["key"]
        unknown = http.patch(
            "/v1/sites/nowhere", params={"tenant": feed.fleet.tenant}, json={"grid_zone": "X"}
        )
        assert unknown.status_code == 404
        assert http.patch(f"/v1/sites/{feed.fleet.site}", params={"tenant": feed.fleet.tenant},
                          json={"name": None}).status_code == 422  # fmt: skip
    with api.client(other_key) as http:
        r = http.get(f"/v1/enterprises/{feed.fleet.tenant}/carbon/estimated", params=DAY)
        assert r.status_code in (403, 404) and r.headers["content-type"] == "application/problem+json"
        patched = http.patch(f"/v1/sites/{feed.fleet.other_site}", params={"tenant": feed.fleet.other},
                             json={"grid_zone": "CN-JS"})  # fmt: skip
        assert patched.status_code == 403  # even its own site: the registry is the admins'
