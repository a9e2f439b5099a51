"""Poison, as an attacker sends it (issue 13, findings 5 and 6): records produced straight to Kafka, past
the collector's checks (defence in depth), carrying +-1e308, 1.8e19, 1.2e29, nulls and timestamps the
database cannot hold, and re-sends of a stored reading with another value. The processor leaves them out
with a reason, keeps their honest siblings and keeps consuming; aggregates stay finite. The API refuses
subnormal and non-numeric registry values and answers poisoned stored figures with a problem or null,
never a 500 or "NaN"."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from meterflow.contract import now_ms
from tests.integration.conftest import Isolated, Pipeline, start_isolated
from tests.integration.test_end_to_end import _register

pytestmark = pytest.mark.integration

ENERGY, POWER = "energy_import_kwh", "power_kw"
PROBLEM = "application/problem+json"


@dataclass
class Poisoned(Isolated):
    def produce(self, *records: dict[str, object]) -> None:
        async def send() -> None:
            # Up to the broker's own record limit (1 MiB), past aiokafka's default request size.
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.kafka.bootstrap, acks="all", max_request_size=2 << 20
            )
            await producer.start()
            try:
                for record in records:
                    await producer.send_and_wait(self.settings.kafka.readings_topic, orjson.dumps(record))
            finally:
                await producer.stop()

        asyncio.run(send())

    def letters(self, tenant: str, count: int) -> list[dict[str, object]]:
        async def read() -> list[dict[str, object]]:
            consumer = AIOKafkaConsumer(
                self.settings.kafka.dlq_topic,
                bootstrap_servers=self.settings.kafka.bootstrap,
                auto_offset_reset="earliest",
            )
            await consumer.start()
            found: list[dict[str, object]] = []
            deadline = time.monotonic() + 60
            try:
                while len(found) < count and time.monotonic() < deadline:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        for record in records:
                            letter = orjson.loads(record.value or b"{}")
                            # Dead letters go out at least once: a processor that dies between a
                            # poll's letters and its commit sends them again.
                            if letter.get("tenant") == tenant and all(
                                (f["partition"], f["offset"], f["reason"])
                                != (letter["partition"], letter["offset"], letter["reason"])
                                for f in found
                            ):
                                found.append(letter)
            finally:
                await consumer.stop()
            return found

        return asyncio.run(read())

    def all_letters(self, tenant: str) -> list[dict[str, object]]:
        """Every letter about the tenant in the dead-letter topic, read to its end."""

        async def read() -> list[dict[str, object]]:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka.bootstrap)
            await consumer.start()
            try:
                k = self.settings.kafka
                tps = [TopicPartition(k.dlq_topic, p) for p in range(k.dlq_partitions)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                end = await consumer.end_offsets(tps)
                found: list[dict[str, object]] = []
                while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        letters = (orjson.loads(record.value or b"{}") for record in records)
                        found.extend(letter for letter in letters if letter.get("tenant") == tenant)
                return found
            finally:
                await consumer.stop()

        return asyncio.run(read())


@pytest.fixture(scope="module")
def poisoned(pipeline: Pipeline) -> Iterator[Poisoned]:
    """A processor of its own on topics of its own, with its metrics served."""
    name = "poison-processor"
    own = start_isolated(pipeline, name, ["processor"], "processor consuming")
    yield Poisoned(own.pipeline, own.settings, own.metrics_url)
    pipeline.stop(name)


# Room for about one letter of the attack below; it refills 500 bytes a second, a letter's worth in half
# a minute.
SMALL_BUDGET = 30_000


@pytest.fixture(scope="module")
def budgeted(pipeline: Pipeline) -> Iterator[Poisoned]:
    """A processor of its own whose gateways may cause SMALL_BUDGET dead-letter bytes a minute."""
    name = "budget-processor"
    own = start_isolated(
        pipeline,
        name,
        ["processor"],
        "processor consuming",
        env={"METERFLOW_INGEST__DLQ_BUDGET_BYTES_PER_MIN": str(SMALL_BUDGET)},
    )
    yield Poisoned(own.pipeline, own.settings, own.metrics_url)
    pipeline.stop(name)


def _record(tenant: str, gateway: str, devices: list[str], readings: list[list[object]]) -> dict[str, object]:
    return {
        "v": 2, "tenant": tenant, "gateway": gateway, "received_ms": now_ms(), "devices": devices,
        "readings": readings,
    }  # fmt: skip


def _stored(p: Pipeline, tenant: str, device: str) -> list[tuple[str, int, float]]:
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        rows = conn.execute(
            "SELECT metric, (extract(epoch FROM ts) * 1000)::bigint, value FROM readings "
            "WHERE tenant_id = %s AND device_id = %s ORDER BY metric, ts",
            (tenant, device),
        ).fetchall()
    return [(str(m), int(t), float(v)) for m, t, v in rows]


def _wait(predicate: object, what: str, timeout_s: float = 60) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _aggregates(p: Pipeline, tenant: str) -> list[tuple[str, str, str, float, float | None]]:
    with psycopg.connect(p.settings.db.conninfo()) as conn:
        rows = conn.execute(
            "SELECT 'agg_1m', scope, metric, total, max_value FROM agg_1m WHERE tenant_id = %(t)s "
            "UNION ALL SELECT 'agg_15m', scope, metric, total, max_value FROM agg_15m WHERE tenant_id = %(t)s "
            "UNION ALL SELECT 'agg_1h', scope, metric, total, max_value FROM agg_1h WHERE tenant_id = %(t)s",
            {"t": tenant},
        ).fetchall()
    return [(str(a), str(b), str(c), float(d), None if e is None else float(e)) for a, b, c, d, e in rows]


def _energy(rows: list[tuple[str, str, str, float, float | None]], table: str, scope: str) -> float:
    return sum(r[3] for r in rows if r[0] == table and r[1] == scope and r[2] == ENERGY)


def test_extreme_values_never_reach_aggregates_and_the_partition_moves_on(poisoned: Poisoned) -> None:
    p = poisoned.pipeline
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    _register(p, tenant, gateway, ["m-1"])  # a grid meter without rated power or register maximum
    t = (now_ms() // 3_600_000 - 2) * 3_600_000
    before = {
        reason: poisoned.counter("meterflow_processor_refused_readings_total", reason=reason)
        for reason in ("out_of_range", "non_finite", "past_ts", "future_ts")
    }
    honest = [[0, t, ENERGY, 100.0], [0, t + 60_000, ENERGY, 101.0], [0, t + 120_000, ENERGY, 102.0]]
    poison = [
        [0, t + 30_000, ENERGY, 1e308],
        [0, t + 90_000, ENERGY, -1e308],
        [0, t + 150_000, ENERGY, 1.8e19],
        [0, t + 170_000, ENERGY, 1.2e29],
        [0, t + 175_000, ENERGY, 5e13],  # finite, but beyond any register
        [0, t, POWER, 1e308],
        [0, t + 60_000, POWER, None],
        [0, -(10**15), ENERGY, 5.0],
        [0, -62_135_596_800_000, ENERGY, 5.0],  # year 1
        [0, 2**62, ENERGY, 5.0],
    ]
    poisoned.produce(_record(tenant, gateway, ["m-1"], [*honest, *poison, [0, t + 30_000, POWER, 5.0]]))
    # The partition moves on: a later record of the same device is written.
    poisoned.produce(_record(tenant, gateway, ["m-1"], [[0, t + 180_000, ENERGY, 103.0]]))

    _wait(lambda: len(_stored(p, tenant, "m-1")) == 5, "the honest readings")
    assert _stored(p, tenant, "m-1") == [
        (ENERGY, t, 100.0), (ENERGY, t + 60_000, 101.0), (ENERGY, t + 120_000, 102.0),
        (ENERGY, t + 180_000, 103.0), (POWER, t + 30_000, 5.0),
    ]  # fmt: skip
    for reason, count in {"out_of_range": 6, "non_finite": 1, "past_ts": 2, "future_ts": 1}.items():
        poisoned.wait_counter(
            "meterflow_processor_refused_readings_total", before[reason] + count, reason=reason
        )
    (letter,) = poisoned.letters(tenant, 1)
    assert letter["gateway"] == gateway and letter["payload"]
    assert letter["reasons"] == {"out_of_range": 6, "non_finite": 1, "past_ts": 2, "future_ts": 1}
    rejected = letter["rejected"]
    assert isinstance(rejected, list) and rejected
    assert {e["device"] for e in rejected} == {"m-1"}

    # Every aggregate is finite, and the device, site and enterprise hold exactly the honest 3 kWh.
    _wait(lambda: _energy(_aggregates(p, tenant), "agg_1h", "device") == pytest.approx(3.0), "the aggregates")
    rows = _aggregates(p, tenant)
    assert all(math.isfinite(r[3]) and (r[4] is None or math.isfinite(r[4])) for r in rows), rows
    for table in ("agg_1m", "agg_15m", "agg_1h"):
        for scope in ("device", "site", "enterprise"):
            assert _energy(rows, table, scope) == pytest.approx(3.0), (table, scope)

    start = datetime.fromtimestamp(t / 1000, UTC)
    with p.http() as http:
        for interval in ("1m", "15m", "1h", "1d", "1mo"):
            resp = http.get(
                "/v1/sites/s1/load",
                params={"tenant": tenant, "start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat(),
                        "interval": interval},
            )  # fmt: skip
            assert resp.status_code == 200, resp.text
            assert "NaN" not in resp.text and "Infinity" not in resp.text
            assert sum(pt["energy_kwh"] for pt in resp.json()["points"]) == pytest.approx(3.0)
        resp = http.get(f"/v1/enterprises/{tenant}/carbon-account", params={"year": start.year})
        assert resp.status_code == 200, resp.text


def test_conflicting_duplicates_are_dead_lettered_and_the_first_value_kept(poisoned: Poisoned) -> None:
    p = poisoned.pipeline
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    _register(p, tenant, gateway, ["m-1"])
    t = (now_ms() // 3_600_000 - 2) * 3_600_000
    conflicts = poisoned.counter("meterflow_processor_conflicting_duplicates_total")
    duplicates = poisoned.counter("meterflow_processor_duplicate_readings_total")
    poisoned.produce(
        _record(
            tenant,
            gateway,
            ["m-1"],
            [[0, t, ENERGY, 10.0], [0, t + 60_000, ENERGY, 11.0], [0, t, POWER, 4.0]],
        )
    )
    _wait(lambda: len(_stored(p, tenant, "m-1")) == 3, "the first readings")
    # An identical re-send is a plain duplicate; another value for a stored reading, or two values for
    # one time in the same record, is a conflict: the first stays, the other is dead-lettered.
    poisoned.produce(
        _record(
            tenant, gateway, ["m-1"],
            [[0, t + 60_000, ENERGY, 11.0], [0, t, POWER, 4.5], [0, t + 120_000, ENERGY, 12.0],
             [0, t + 120_000, ENERGY, 12.7]],
        )
    )  # fmt: skip
    poisoned.wait_counter("meterflow_processor_conflicting_duplicates_total", conflicts + 2)
    poisoned.wait_counter("meterflow_processor_duplicate_readings_total", duplicates + 3)
    (letter,) = poisoned.letters(tenant, 1)
    assert letter["reason"] == "conflicting_duplicate" and letter["gateway"] == gateway
    rejected = letter["rejected"]
    assert isinstance(rejected, list) and len(rejected) == 2
    details = {(e["metric"], e["reason"]): e["detail"] for e in rejected}
    assert (
        "4.5" in details[(POWER, "conflicting_duplicate")]
        and "4.0" in details[(POWER, "conflicting_duplicate")]
    )
    assert "12.7" in details[(ENERGY, "conflicting_duplicate")]
    assert "12.0" in details[(ENERGY, "conflicting_duplicate")]
    assert _stored(p, tenant, "m-1") == [
        (ENERGY, t, 10.0), (ENERGY, t + 60_000, 11.0), (ENERGY, t + 120_000, 12.0), (POWER, t, 4.0),
    ]  # fmt: skip
    # Nothing counted twice: 2 kWh from the first values.
    _wait(lambda: _energy(_aggregates(p, tenant), "agg_1h", "device") == pytest.approx(2.0), "the aggregates")


def test_a_gateway_past_its_dead_letter_budget_writes_no_more_letters_and_the_partition_moves_on(
    budgeted: Poisoned,
) -> None:
    """Review finding 6: a gateway re-sends the same batch, each time with changed values. Every re-send
    conflicts reading by reading, and each letter (the record plus the list) is about twice the record.
    Past the gateway's budget the letters stop: one dlq_budget letter says so, the counters keep
    counting, and the processor keeps writing, for this gateway and for another one on its partitions,
    whose letters still go out."""
    p = budgeted.pipeline
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    other, other_gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    _register(p, tenant, gateway, ["m-1"])
    _register(p, other, other_gateway, ["m-1"])
    t = (now_ms() // 3_600_000 - 3) * 3_600_000
    n, resends = 300, 12
    conflicts = budgeted.counter("meterflow_processor_conflicting_duplicates_total")
    bad = budgeted.counter("meterflow_processor_bad_records_total", reason="conflicting_duplicate")
    over = budgeted.counter("meterflow_processor_dlq_budget_exceeded_total", reason="conflicting_duplicate")

    def batch(k: int) -> dict[str, object]:
        return _record(tenant, gateway, ["m-1"], [[0, t + i * 1000, POWER, float(i + k)] for i in range(n)])

    budgeted.produce(batch(0))
    _wait(lambda: len(_stored(p, tenant, "m-1")) == n, "the first batch")
    budgeted.produce(*(batch(k) for k in range(1, resends + 1)))
    budgeted.produce(
        _record(other, other_gateway, ["m-1"], [[0, t, POWER, 1.0], [0, t, POWER, 2.0]]),
        _record(tenant, gateway, ["m-1"], [[0, t + n * 1000, POWER, 7.0]]),
    )
    budgeted.wait_counter("meterflow_processor_conflicting_duplicates_total", conflicts + resends * n + 1)
    budgeted.wait_counter(
        "meterflow_processor_bad_records_total", bad + resends + 1, reason="conflicting_duplicate"
    )
    _wait(lambda: len(_stored(p, tenant, "m-1")) == n + 1, "the reading after the re-sends")
    assert _stored(p, tenant, "m-1")[0] == (POWER, t, 0.0)  # the first value stays

    letters = budgeted.all_letters(tenant)
    written = [x for x in letters if x["reason"] == "conflicting_duplicate"]
    announced = [x for x in letters if x["reason"] == "dlq_budget"]
    size = len(orjson.dumps(written[0]))
    assert size > SMALL_BUDGET / 2  # the attack's letters are big: a few fill the budget
    # The bucket may go into debt by one letter, and refills while the test runs.
    assert 1 <= len(written) <= 3, [x["offset"] for x in written]
    assert len(announced) == 1 and announced[0]["gateway"] == gateway and not announced[0]["payload"]
    assert budgeted.counter(
        "meterflow_processor_dlq_budget_exceeded_total", reason="conflicting_duplicate"
    ) >= over + resends - len(written)
    (letter,) = budgeted.letters(other, 1)
    assert letter["gateway"] == other_gateway and letter["reason"] == "conflicting_duplicate"


def test_a_record_near_the_size_limit_with_every_reading_refused_gets_a_cut_letter(
    poisoned: Poisoned,
) -> None:
    """A record of almost 1 MiB produced straight to Kafka, every reading but one out of range: its
    letter (payload and list) would pass Kafka's request limit and fail the poll on every attempt. The
    letter keeps the reasons and counts without the payload; the honest reading and later ones are
    written."""
    p = poisoned.pipeline
    tenant, gateway = f"t-{uuid.uuid4().hex[:8]}", f"gw-{uuid.uuid4().hex[:8]}"
    _register(p, tenant, gateway, ["m-1"])
    t = (now_ms() // 3_600_000 - 2) * 3_600_000
    n = 25_000
    record = _record(
        tenant, gateway, ["m-1"], [[0, t, POWER, 5.0], *([0, t + i, POWER, 1e308] for i in range(1, n + 1))]
    )
    assert 800_000 < len(orjson.dumps(record)) < 1_000_000
    poisoned.produce(record, _record(tenant, gateway, ["m-1"], [[0, t + 60_000, POWER, 6.0]]))
    _wait(lambda: len(_stored(p, tenant, "m-1")) == 2, "the honest readings")
    (letter,) = poisoned.letters(tenant, 1)
    assert letter["reasons"] == {"out_of_range": n} and letter["rejected_total"] == n
    assert letter["rejected_truncated"] and letter["record_bytes"] == len(orjson.dumps(record))


def _problem(resp: httpx.Response, status: int = 422) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body: dict[str, object] = resp.json()
    return body


def test_absurd_registry_values_are_422_problems(pipeline: Pipeline) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with pipeline.http() as http:
        assert http.post("/v1/enterprises", json={"tenant": tenant, "name": "x"}).status_code == 201
        for body in ('{"tenant": "%s", "name": "y", "annual_output_value_cny": 5e-324}',
                     '{"tenant": "%s", "name": "y", "annual_output_value_cny": 1e309}',
                     '{"tenant": "%s", "name": "y", "annual_output_value_cny": true}'):  # fmt: skip
            resp = http.post(
                "/v1/enterprises", content=body % f"{tenant}x", headers={"content-type": "application/json"}
            )
            _problem(resp)
        url = f"/v1/enterprises/{tenant}/output-values"
        for value in (5e-324, 1e308, True, "1e6", -1.0):
            _problem(http.post(url, json={"period_start": "2026-01-01", "period_end": "2027-01-01",
                                          "value_added_cny": value}))  # fmt: skip
        assert http.post("/v1/sites", json={"tenant": tenant, "site": "s1", "name": "s"}).status_code == 201
        _problem(
            http.post(
                "/v1/sites", json={"tenant": tenant, "site": "s2", "name": "s", "floor_area_m2": 5e-324}
            )
        )
        for field, value in (("rated_power_kw", 5e-324), ("rated_power_kw", 1e308), ("register_max", 1.8e19),
                             ("register_resolution", 5e-324), ("rated_power_kw", True)):  # fmt: skip
            _problem(
                http.post("/v1/devices", json={"tenant": tenant, "device": "m-1", "site": "s1", field: value})
            )


def test_registry_values_stored_before_the_bounds_never_answer_500(pipeline: Pipeline) -> None:
    """Rows written before the API bounded them (straight into the database here): 5e-324 as annual
    output value, value added and product quantity. The account answers, without intensities."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    industry = f"I{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pipeline.settings.db.conninfo()) as conn:
        for t in (tenant, f"{tenant}-peer"):
            conn.execute(
                "INSERT INTO tenants (tenant_id, name, industry_code, annual_output_value_cny) "
                "VALUES (%s, %s, %s, 5e-324)",
                (t, t, industry),
            )
            conn.execute(
                "INSERT INTO output_values (tenant_id, period_start, period_end, value_added_cny, product_quantity, "
                "product_unit) VALUES (%s, '2026-01-01', '2027-01-01', 5e-324, 5e-324, 't')",
                (t,),
            )
    with pipeline.http() as http:
        resp = http.get(f"/v1/enterprises/{tenant}/carbon-account", params={"year": 2026})
        assert resp.status_code == 200, resp.text
        account = resp.json()
        assert account["intensity"] is None and account["intensity_per_output_value"] is None
        assert account["grade"] is None
        assert account["intensity_per_product"] is None or math.isfinite(account["intensity_per_product"])
        assert (
            http.get(f"/v1/enterprises/{tenant}/carbon-account/export", params={"year": 2026}).status_code
            == 200
        )
        assert http.get(f"/v1/enterprises/{tenant}/output-values").status_code == 200
        assert http.get(f"/v1/enterprises/{tenant}").status_code == 200


def test_poisoned_stored_aggregates_answer_null_or_a_problem(pipeline: Pipeline) -> None:
    """Aggregates written before the processor refused such values (inserted directly here): NaN and
    infinity are answered as null in load points, sums that overflow and carbon figures that are not
    finite as a 422 problem; never "NaN", never a 500."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    day = datetime(2026, 3, 2, tzinfo=UTC)
    cols = "scope, tenant_id, entity_id, metric, bucket, total, n, n_measured"
    with psycopg.connect(pipeline.settings.db.conninfo()) as conn:
        conn.execute(
            "INSERT INTO tenants (tenant_id, name, timezone) VALUES (%s, %s, 'UTC')", (tenant, tenant)
        )
        for site, totals in (("nan", ["NaN", "Infinity", "1.5"]), ("huge", ["1e308", "1e308", "1.5"])):
            conn.execute(
                "INSERT INTO sites (tenant_id, site_id, name, province, floor_area_m2) "
                "VALUES (%s, %s, %s, 'zhejiang', 100)",
                (tenant, site, site),
            )
            for q, total in enumerate(totals):
                bucket = day + timedelta(minutes=15 * q)
                for table in ("agg_15m", "agg_1m"):
                    conn.execute(
                        f"INSERT INTO {table} ({cols}) VALUES ('site', %s, %s, %s, %s, %s::float8, 1, 1)",
                        (tenant, site, "energy_import_kwh", bucket, total),
                    )
                conn.execute(
                    f"INSERT INTO agg_1h ({cols}) VALUES ('site', %s, %s, %s, %s, %s::float8, 1, 1)",
                    (tenant, site, "energy_import_kwh", bucket + timedelta(hours=q), total),
                )
    span = {"tenant": tenant, "start": day.isoformat(), "end": (day + timedelta(days=1)).isoformat()}
    with pipeline.http() as http:
        for interval in ("1m", "15m", "1h", "1d", "1mo"):
            resp = http.get("/v1/sites/nan/load", params={**span, "interval": interval})
            assert resp.status_code == 200, resp.text
            assert "NaN" not in resp.text and "Infinity" not in resp.text
            points = resp.json()["points"]
            assert any(pt["energy_kwh"] is None for pt in points), points
            assert all(pt["energy_kwh"] is None or math.isfinite(pt["energy_kwh"]) for pt in points)
        for interval in ("1d", "1mo"):
            body = _problem(http.get("/v1/sites/huge/load", params={**span, "interval": interval}))
            assert body["type"] and "non-finite" in str(body["type"])
        for site in ("nan", "huge"):
            _problem(http.get(f"/v1/sites/{site}/load/tou", params=span))
            _problem(http.get(f"/v1/sites/{site}/eui", params=span))
        carbon = {"start": span["start"], "end": span["end"]}
        _problem(http.get(f"/v1/enterprises/{tenant}/carbon", params=carbon))
        _problem(http.get(f"/v1/enterprises/{tenant}/carbon-account", params={"year": 2026}))
