"""A simulated fleet with faults, through the real broker, collector, Kafka and processor: what lands in
the database reconstructs the ground truth exactly, and the rejections are the ones announced."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer

from meterflow.carbon.accounting import EMISSION_FIELDS
from meterflow.contract import now_ms
from processing.carbon import daily_emissions
from simulators.faults import FaultConfig, arm_rollovers
from simulators.publisher import ExchangeReporter, register_fleet, simulate_over_mqtt
from simulators.runner import RunOptions
from simulators.spec import generate_fleet
from tests.integration.conftest import Pipeline
from tests.integration.fleet import device_aggregates, wait_for_readings
from tests.truthcheck import (
    assert_counts_match,
    assert_quantities_match,
    fleet_devices,
    register_minute_counts,
    truth_minute_counts,
    truth_quantities,
)

FAULTS = FaultConfig(
    duplicate=0.2, reorder=0.2, offline=1.0, clock_skew=1.0, malformed=0.1, wrong_tenant=0.05,
    oversized=0.03, rollover=0.5, meter_exchange=5.0, glitch=0.01, spike=0.01,
)  # fmt: skip


@pytest.mark.parametrize("payload_format", ["json-batch", "json-single", "sparkplug"])
def test_simulated_fleet_with_faults_lands_exactly(
    payload_format: str, pipeline: Pipeline, tmp_path: Path
) -> None:
    prefix = f"s{uuid.uuid4().hex[:6]}-"
    spec = generate_fleet(
        enterprises=2, meters_per_site=3, vpp_resources=8, seed=11, tenant_prefix=prefix,
        payload_format=payload_format,  # type: ignore[arg-type]
    )  # fmt: skip
    spec, armed = arm_rollovers(spec, FAULTS.rollover, spec.seed)
    creds = register_fleet(pipeline.api_url, pipeline.admin_key, spec)
    start = now_ms() - 4 * 3_600_000
    options = RunOptions(
        mode="backfill",
        start_ms=start - start % 60_000,
        duration_s=2 * 3600,
        faults=FAULTS,
        truth_dir=tmp_path,
        max_payload_bytes=pipeline.settings.ingest.max_payload_bytes,
    )
    exchanges = ExchangeReporter(pipeline.api_url, pipeline.admin_key)
    result, outcome = simulate_over_mqtt(
        spec,
        options,
        host=pipeline.settings.mqtt.host,
        port=pipeline.settings.mqtt.port,
        creds=creds,
        qos=1,
        armed_rollovers=armed,
        on_exchange=exchanges,
    )
    exchanges.close()
    assert exchanges.reported > 0
    assert result.manifest is not None
    expected = result.manifest["expected"]
    assert outcome.unanswered == 0
    assert outcome.refused == expected["broker_refused"] > 0

    tenants = [e.tenant for e in spec.enterprises]
    readings = wait_for_readings(pipeline, tenants, result.true_readings)
    got = register_minute_counts(readings, fleet_devices(spec), tmp_path)
    assert_counts_match(truth_minute_counts(tmp_path), got)
    # The processor's interval aggregates (committed with the raw readings) equal the ground truth.
    assert_quantities_match(truth_quantities(tmp_path, "1m"), device_aggregates(pipeline, tenants, "agg_1m"))
    assert_quantities_match(
        truth_quantities(tmp_path, "15m"), device_aggregates(pipeline, tenants, "agg_15m"), complete=False
    )

    # Daily carbon from the processor's site aggregates equals the hand calculation on true quantities.
    truth_days = pl.read_parquet(tmp_path / "emissions_daily.parquet")
    for tenant in tenants:
        got_days = {r["day"]: r for r in asyncio.run(_emissions(pipeline, tenant))}
        expected_days = truth_days.filter(pl.col("tenant") == tenant).to_dicts()
        assert expected_days and {r["day"] for r in expected_days} == set(got_days)
        for expected_day in expected_days:
            got_day = got_days[expected_day["day"]]
            for name in (*EMISSION_FIELDS, "electricity_import_kwh", "green_traced_kwh"):
                assert got_day[name] == pytest.approx(expected_day[name], abs=2e-3), (
                    tenant,
                    expected_day["day"],
                    name,
                )
            assert got_day["factor_ids"] == expected_day["factor_ids"]

    dead_letters = asyncio.run(_dead_letters(pipeline, prefix, sum(expected["dead_letters"].values())))
    assert dict(dead_letters) == expected["dead_letters"]


async def _emissions(p: Pipeline, tenant: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(p.settings.db.conninfo()) as conn:
        return await daily_emissions(conn, tenant, date(2000, 1, 1), date(2100, 1, 1))


async def _dead_letters(p: Pipeline, prefix: str, count: int) -> Counter[str]:
    """Dead letters of this fleet's tenants (an oversized or wrong-topic message carries its topic's)."""
    consumer = AIOKafkaConsumer(
        p.settings.kafka.dlq_topic,
        bootstrap_servers=p.settings.kafka.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    try:
        while sum(seen.values()) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    letter = orjson.loads(record.value or b"{}")
                    if (letter.get("tenant") or "").startswith(prefix):
                        # One letter per message, counting its rejections by reason.
                        seen.update(letter["reasons"])
    finally:
        await consumer.stop()
    return seen
