"""The numba COPY encoders against a struct-based reference written straight from PostgreSQL's
documented binary format."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processing import pgcopy

pytestmark = pytest.mark.unit

PG_EPOCH_MS = 946_684_800_000


def _field(fmt: str, value: object) -> bytes:
    data = struct.pack(fmt, value)
    return struct.pack(">i", len(data)) + data


def _text(value: str) -> bytes:
    data = value.encode()
    return struct.pack(">i", len(data)) + data


def _us(ms: int) -> int:
    return (ms - PG_EPOCH_MS) * 1000


def reference_readings(rows: list[tuple[int, int, float, str, int, int]]) -> bytes:
    out = pgcopy.SIGNATURE
    for series_id, ts_ms, value, gateway, received_ms, audit_batch in rows:
        out += struct.pack(">h", 6) + _field(">i", series_id) + _field(">q", _us(ts_ms)) + _field(">d", value)
        out += _text(gateway) + _field(">q", _us(received_ms)) + _field(">q", audit_batch)
    return out + pgcopy.TRAILER


def reference_aggregates(rows: list[tuple[int, int, float, float, list[int]]]) -> bytes:
    out = pgcopy.SIGNATURE
    for key_id, bucket_ms, total, max_value, counts in rows:
        out += (
            struct.pack(">h", 11) + _field(">i", key_id) + _field(">q", _us(bucket_ms)) + _field(">d", total)
        )
        out += _field(">i", counts[0])
        out += struct.pack(">i", -1) if math.isnan(max_value) else _field(">d", max_value)
        for c in counts[1:]:
            out += _field(">i", c)
    return out + pgcopy.TRAILER


finite = st.floats(allow_nan=False, allow_infinity=False)
ms = st.integers(min_value=0, max_value=4_102_444_800_000)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
gateway_ids = st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(gateways=gateway_ids, data=st.data())
def test_readings_match_reference(gateways: list[str], data: st.DataObject) -> None:
    rows = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, 2**31 - 1),
                ms,
                finite,
                st.integers(0, len(gateways) - 1),
                ms,
                st.integers(0, 2**62),
            ),
            max_size=30,
        )
    )
    cols: list[tuple[Any, ...]] = list(zip(*rows, strict=True)) if rows else [()] * 6
    stream = pgcopy.encode_readings(
        np.array(cols[0], np.int32), np.array(cols[1], np.int64), np.array(cols[2], np.float64),
        np.array(cols[3], np.int32), pgcopy.TextTable(gateways), np.array(cols[4], np.int64),
        np.array(cols[5], np.int64),
    )  # fmt: skip
    expected = reference_readings([(s, t, v, gateways[g], r, a) for s, t, v, g, r, a in rows])
    assert stream == expected


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 2**31 - 1),
            ms,
            finite,
            st.one_of(finite, st.just(math.nan)),
            st.lists(int32, min_size=7, max_size=7),
        ),
        max_size=30,
    )
)
def test_aggregates_match_reference(rows: list[tuple[int, int, float, float, list[int]]]) -> None:
    n = len(rows)
    stream = pgcopy.encode_aggregates(
        np.array([r[0] for r in rows], np.int32), np.array([r[1] for r in rows], np.int64),
        np.array([r[2] for r in rows], np.float64), np.array([r[3] for r in rows], np.float64),
        np.array([r[4] for r in rows], np.int64).reshape(n, 7).T if n else np.zeros((7, 0), np.int64),
    )  # fmt: skip
    assert stream == reference_aggregates(rows)


def test_selected_rows_of_strided_columns_encode_like_copies() -> None:
    """Encoders take views (slices, masks, transposes) without copying them first."""
    counts = np.arange(7 * 6, dtype=np.int64).reshape(6, 7).T
    rows = np.array([1, 3, 4])
    total, mx = np.linspace(0, 1, 6), np.array([1.0, math.nan, 2.0, 3.0, math.nan, 4.0])
    keys, buckets = np.arange(6, dtype=np.int32), np.arange(6, dtype=np.int64) * 60_000
    assert pgcopy.encode_aggregates(
        keys[rows], buckets[rows], total[rows], mx[rows], counts[:, rows]
    ) == pgcopy.encode_aggregates(
        keys[rows].copy(), buckets[rows].copy(), total[rows].copy(), mx[rows].copy(), counts[:, rows].copy()
    )
