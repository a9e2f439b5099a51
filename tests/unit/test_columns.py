"""Decoding Kafka records (v1 and v2) into columns, and refusing what cannot be decoded."""

from __future__ import annotations

import orjson
import pytest

from meterflow.contract import DEFAULT_MIN_TS_MS, DeviceReadings, GatewayRecord, Reading
from processing.columns import ColumnBuilder, UndecodableRecord
from processing.series import SeriesTable

pytestmark = pytest.mark.unit


def _v2(readings: list[list[object]], devices: list[object] | None = None) -> bytes:
    return orjson.dumps(
        {
            "v": 2,
            "tenant": "t1",
            "gateway": "gw",
            "received_ms": 5,
            "devices": devices or ["a", "b"],
            "readings": readings,
        }
    )


T = 1_767_225_600_000  # 2026-01-01


def test_v1_and_v2_records_become_columns_with_shared_series() -> None:
    table = SeriesTable()
    builder = ColumnBuilder.start(table)
    v1 = DeviceReadings(
        "t1",
        "gw",
        "a",
        7,
        (Reading(T + 60_000, "energy_import_kwh", 1.5), Reading(T + 60_000, "power_kw", 3)),
    )
    assert builder.add(3, v1.encode()) == 2
    v2 = GatewayRecord(
        "t1",
        "gw",
        9,
        ["b", "a"],
        [(1, T + 120_000, "energy_import_kwh", 2.0), (0, T + 60_000, "power_kw", 4.0)],
    )
    assert builder.add(4, v2.encode()) == 2
    cols = builder.finish()
    assert table.keys == [("t1", "a", "energy_import_kwh"), ("t1", "a", "power_kw"), ("t1", "b", "power_kw")]
    assert cols.series.tolist() == [0, 1, 0, 2]
    assert cols.ts.tolist() == [T + 60_000, T + 60_000, T + 120_000, T + 60_000]
    assert cols.value.tolist() == [1.5, 3.0, 2.0, 4.0]
    assert cols.record.tolist() == [0, 0, 1, 1]
    assert cols.partition.tolist() == [3, 3, 4, 4]
    assert cols.record_received_ms.tolist() == [7, 9]
    assert table.kind.size == 3  # per-series arrays grown by finish()


def test_an_empty_record_decodes_to_nothing() -> None:
    builder = ColumnBuilder.start(SeriesTable())
    assert builder.add(0, _v2([])) == 0
    assert builder.finish().series.size == 0


def test_an_empty_poll_has_empty_columns() -> None:
    cols = ColumnBuilder.start(SeriesTable()).finish()
    assert cols.series.size == cols.ts.size == cols.value.size == 0


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "undecodable"),
        (orjson.dumps({"v": 3, "tenant": "t", "gateway": "g", "received_ms": 1, "readings": []}), "version"),
        (_v2([[2, 60_000, "power_kw", 1.0]]), "device ind"),
        (_v2([[-1, 60_000, "power_kw", 1.0]]), "device ind"),
        (_v2([[True, 60_000, "power_kw", 1.0]]), "device ind"),
        (_v2([[0, "soon", "power_kw", 1.0]]), "undecodable"),
        (_v2([[0, 60_000, 5, 1.0]]), "strings"),
        (_v2([[0, 60_000, "power_kw"]]), "undecodable"),
        (_v2([[0, 2**63 + 5, "power_kw", 1.0]]), "undecodable"),
        (_v2([[0, 60_000, "power_kw", 1.0]], devices=[None]), "strings"),
    ],
)
def test_bad_records_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    builder = ColumnBuilder.start(SeriesTable())
    with pytest.raises(UndecodableRecord, match=reason):
        builder.add(0, raw)
    assert builder.finish().series.size == 0  # nothing of a refused record stays behind


def test_poisoned_readings_are_left_out_with_reasons_and_their_siblings_kept() -> None:
    """Values outside their metric's plausible range (no aggregate could hold some of them) and times the
    database cannot store never reach the writer, even when a record bypassed the collector (issue 13,
    finding 5): each is listed with its reason for the record's dead letter; the honest readings stay."""
    t = T
    raw = _v2(
        [
            [0, t, "energy_import_kwh", 1.5],
            [0, t + 1, "energy_import_kwh", 1e308],
            [1, t, "power_kw", -1.8e19],
            [1, t + 1, "power_kw", None],
            [0, -(10**15), "energy_import_kwh", 2.0],
            [1, -62_135_596_800_000, "power_kw", 2.0],
            [1, 2**62, "power_kw", 2.0],
            [1, t + 2, "power_kw", 3.0],
            [0, t + 3, "energy_import_kwh", 5e13],  # beyond any register (METRIC_RANGES)
            [0, t + 4, "energy_import_kwh", -1.0],  # registers never count below zero
        ]
    )
    builder = ColumnBuilder.start(SeriesTable())
    assert builder.add(2, raw, 41) == 2
    cols = builder.finish()
    assert cols.value.tolist() == [1.5, 3.0]
    assert cols.ts.tolist() == [t, t + 2]
    (refusal,) = builder.refused
    assert (refusal.partition, refusal.offset, refusal.raw) == (2, 41, raw)
    assert [(e["reason"], e["device"], e["metric"], e["point"]) for e in refusal.rejected] == [
        ("out_of_range", "a", "energy_import_kwh", 1),
        ("out_of_range", "b", "power_kw", 2),
        ("non_finite", "b", "power_kw", 3),
        ("past_ts", "a", "energy_import_kwh", 4),
        ("past_ts", "b", "power_kw", 5),
        ("future_ts", "b", "power_kw", 6),
        ("out_of_range", "a", "energy_import_kwh", 8),
        ("out_of_range", "a", "energy_import_kwh", 9),
    ]
    assert refusal.reasons == {"out_of_range": 4, "non_finite": 1, "past_ts": 2, "future_ts": 1}
    assert cols.record_offset.tolist() == [41] and cols.record_raw == [raw]


def test_configured_ranges_replace_the_contract_ones() -> None:
    builder = ColumnBuilder.start(SeriesTable(metric_ranges={"power_kw": (-10.0, 10.0)}))
    assert builder.add(0, _v2([[0, T, "power_kw", 11.0], [0, T + 1, "power_kw", 9.0]])) == 1
    assert [e["reason"] for e in builder.refused[0].rejected] == ["out_of_range"]


def test_readings_before_the_configured_floor_are_refused_as_past_ts() -> None:
    """A record produced straight to Kafka, past the collector's floor (ingest.min_ts, 2000 by default):
    1970s and 1999 readings are refused as past_ts like the collector refuses them, their siblings kept
    (issue 13 review nit)."""
    raw = _v2(
        [
            [0, 60_000, "power_kw", 1.0],
            [0, DEFAULT_MIN_TS_MS - 1, "power_kw", 2.0],
            [0, DEFAULT_MIN_TS_MS, "power_kw", 3.0],
            [1, T, "power_kw", 4.0],
        ]
    )
    builder = ColumnBuilder.start(SeriesTable())
    assert builder.add(0, raw, 7) == 2
    assert builder.finish().value.tolist() == [3.0, 4.0]
    (refusal,) = builder.refused
    assert [(e["reason"], e["point"]) for e in refusal.rejected] == [("past_ts", 0), ("past_ts", 1)]
    assert refusal.reasons == {"past_ts": 2}
    assert str(DEFAULT_MIN_TS_MS) in refusal.rejected[0]["detail"]


def test_the_floor_follows_the_setting_together_with_the_other_refusals() -> None:
    floor = T - 1000
    builder = ColumnBuilder.start(SeriesTable(min_ts_ms=floor))
    raw = _v2(
        [[0, floor - 1, "power_kw", 1.0], [0, floor + 1, "power_kw", 1e308], [0, floor, "power_kw", 2.0]]
    )
    assert builder.add(0, raw) == 1
    assert builder.finish().ts.tolist() == [floor]
    assert builder.refused[0].reasons == {"past_ts": 1, "out_of_range": 1}


def test_a_floor_below_the_epoch_keeps_the_database_bound() -> None:
    builder = ColumnBuilder.start(SeriesTable(min_ts_ms=-(10**15)))
    assert builder.add(0, _v2([[0, -1, "power_kw", 1.0], [0, 60_000, "power_kw", 2.0]])) == 1
    assert [e["reason"] for e in builder.refused[0].rejected] == ["past_ts"]
